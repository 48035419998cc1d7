"""``placerank eval``: Recall@N of a model (and optional re-ranker) on a database/query pair:
the ``extract``, ``search`` and ``rerank`` stages in one process, plus the report."""

from __future__ import annotations

from pathlib import Path

from placerank.commands._common import add_model_args, add_rerank_args, image_size_arg, rerank_options_arg


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate retrieval (+ re-ranking) on a database and a query set")
    p.add_argument(
        "--database", required=True, help="database folder (@UTM@ names or a frame-aligned traversal) or CSV"
    )
    p.add_argument("--queries", required=True, help="query folder or CSV")
    add_model_args(p)
    add_rerank_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--radius", type=float, default=None, help="positive radius in metres (default 25 for positions)")
    g.add_argument("--frame-tolerance", type=int, default=None, help="positives are frames with |i-j| <= N")
    p.add_argument("--layout", default="auto", choices=["auto", "csv", "utm", "traversal"])
    p.add_argument("--no-cache", action="store_true", help="do not read or write the descriptor cache")
    p.add_argument("--examples", type=int, default=8, help="example pictures to draw")
    p.add_argument("--out", required=True, type=Path, help="output folder (results.json, recall_curve.png, examples/)")
    p.set_defaults(func=run)


def run(args) -> int:
    from placerank.eval.evaluate import EvalConfig, evaluate

    options = rerank_options_arg(args.rerank, args.rerank_option)  # checked before any work
    cfg = EvalConfig(
        database=args.database,
        queries=args.queries,
        out=args.out,
        model=args.model,
        weights=args.weights,
        rerank=args.rerank,
        top_k=args.top_k,
        radius=args.radius,
        frame_tolerance=args.frame_tolerance,
        layout=args.layout,
        image_size=image_size_arg(args.image_size),
        device=args.device,
        batch_size=args.batch_size,
        num_workers=args.workers,
        use_cache=not args.no_cache,
        num_examples=args.examples,
        rerank_options=options,
    )
    result = evaluate(cfg)
    print_summary(result, args.out)
    return 0


def print_summary(result, out) -> None:
    first = result.recall_first_stage
    print(
        f"{result.model.get('name')} on {result.num_queries} queries x {result.num_database} database images"
        f" ({result.dataset.get('rule')}; {result.num_queries_with_positives} queries have positives)"
    )
    header = "  ".join(f"R@{n:>3}" for n in result.recall)
    print(f"{'':18s}{header}")
    print(f"{'global':18s}" + "  ".join(f"{100 * v:5.1f}" for v in first.values()))
    if result.rerank:
        print(f"{'+ ' + result.rerank['name']:18s}" + "  ".join(f"{100 * v:5.1f}" for v in result.recall.values()))
    t = result.timing_s
    print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()) + f"; peak memory {result.peak_memory_mb:.0f} MB")
    print(f"wrote {Path(out) / 'results.json'}, recall_curve.png, examples/")
