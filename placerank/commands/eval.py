"""``placerank eval``: Recall@N of a model (and optional re-ranker) on a database/query pair:
the ``extract``, ``search`` and ``rerank`` stages in one process, plus the report."""

from __future__ import annotations

from pathlib import Path

from placerank.commands._common import (
    add_compile_arg,
    add_index_args,
    add_model_args,
    add_nproc_arg,
    add_precision_arg,
    add_rerank_args,
    image_size_arg,
    index_options_arg,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    rerank_options_arg,
)

# placerank.data.layouts.LAYOUTS and msls.SUBTASKS, spelled out to keep `placerank --help` light
LAYOUT_CHOICES = ["auto", "csv", "utm", "frames", "traversal", "unlabelled", "msls", "netvlad-mat"]
LAYOUT_CHOICES += ["vpr-downloader", "patchnetvlad"]
MSLS_SUBTASKS = ["all", "summer2winter", "winter2summer", "day2night", "night2day", "old2new", "new2old"]


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate retrieval (+ re-ranking) on a database and a query set")
    p.add_argument(
        "--database", help="database folder (@UTM@ names, MSLS <city>/database, plain = unlabelled) or CSV manifest"
    )
    p.add_argument("--queries", help="query folder or CSV")
    p.add_argument(
        "--dataset",
        metavar="NAME:ROOT|ROOT",
        help="a named benchmark split (pitts30k-test:ROOT, msls-val:ROOT, ...; `placerank models` lists them) or a"
        " dataset root (MSLS, NetVLAD .mat, images/test/{database,queries} tree, Patch-NetVLAD .npz)",
    )
    add_model_args(p)
    add_precision_arg(p)
    add_compile_arg(p)
    add_rerank_args(p)
    p.add_argument(
        "--rerank-below",
        type=non_negative_float,
        default=None,
        metavar="CONF",
        help="re-rank only queries whose global confidence (place margin, see docs/eval.md) is below CONF;"
        " the others keep their global ranking (a labelled run's precision_recall_first_stage"
        " threshold_at_100_precision is a safe CONF)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--radius", type=positive_float, default=None, help="positive radius in metres (default 25 for positions)"
    )
    g.add_argument(
        "--frame-tolerance",
        type=non_negative_int,
        default=None,
        help="frame-aligned folders: positives are frames with |i-j| <= N",
    )
    p.add_argument("--layout", default="auto", choices=LAYOUT_CHOICES, help="default: recognised by its files")
    p.add_argument("--msls-subtask", default="all", choices=MSLS_SUBTASKS, help="MSLS subtask (default all)")
    p.add_argument("--queries-subset", default=None, help="query subset: day|sunset|night (Tokyo 24/7), v1|night|...")
    p.add_argument("--images-root", type=Path, default=None, help="image root for .mat / Patch-NetVLAD lists")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the descriptor cache")
    p.add_argument(
        "--sequence-length",
        type=positive_int,
        default=1,
        metavar="L",
        help="ordered traversals: match the last L query frames along constant-velocity paths through the"
        " ordered database (SeqSLAM-style; 1 = off, the default; see docs/sequence.md)",
    )
    p.add_argument(
        "--sequence-velocity",
        type=velocity_range,
        default=(0.8, 1.2),
        metavar="MIN:MAX",
        help="with --sequence-length: database frames per query frame, searched in steps of 0.1"
        " (default 0.8:1.2; 1 for frame-aligned traversals)",
    )
    p.add_argument(
        "--standardize",
        choices=("none", "center", "zscore"),
        default="none",
        help="subtract each side's mean descriptor (zscore: and divide by its std per dimension), then"
        " re-normalise, before the search; transductive: uses the query set's statistics (docs/eval.md)",
    )
    p.add_argument("--examples", type=non_negative_int, default=8, help="example pictures to draw")
    add_nproc_arg(p)  # extraction by N ranks, then search + re-rank here
    add_index_args(p)  # --index SPEC, --index-option KEY=VALUE (docs/index.md)
    p.add_argument("--out", required=True, type=Path, help="output folder (results.json, recall_curve.png, examples/)")
    p.set_defaults(func=run)


def run(args) -> int:
    from placerank.errors import PlaceRankError
    from placerank.eval.evaluate import EvalConfig, evaluate

    options = rerank_options_arg(args.rerank, args.rerank_option)  # checked before any work
    if args.dataset is None and (args.database is None or args.queries is None):
        raise PlaceRankError("give --database and --queries, or --dataset NAME:ROOT (or a dataset root)")
    benchmark, root = None, args.dataset
    if args.dataset is not None:
        from placerank.presets.benchmarks import split_dataset_arg

        benchmark, root = split_dataset_arg(args.dataset)
    dataset = None
    if benchmark is not None:
        if args.database or args.queries:
            raise PlaceRankError(f"--dataset {args.dataset} names the database and queries; drop --database/--queries")
        if args.frame_tolerance is not None:
            raise PlaceRankError(f"--frame-tolerance does not apply to {benchmark.name} (positives by metres)")
        dataset = benchmark.load(root, radius=args.radius, images_root=args.images_root)
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
        dataset=root if benchmark is None else None,
        msls_subtask=args.msls_subtask,
        queries_subset=args.queries_subset,
        images_root=args.images_root,
        image_size=image_size_arg(args.image_size),
        device=args.device,
        precision=args.precision,
        compile=args.compile,
        runtime=args.runtime,
        batch_size=args.batch_size,
        num_workers=args.workers,
        use_cache=not args.no_cache,
        num_examples=args.examples,
        rerank_options=options,
        nproc=args.nproc,
        rerank_below=args.rerank_below,
        sequence_length=args.sequence_length,
        sequence_velocity=args.sequence_velocity,
        standardize=args.standardize,
        index=args.index,
        index_options=index_options_arg(args.index_option),
    )
    result = evaluate(cfg, dataset=dataset)
    print_summary(result, args.out)
    return 0


def velocity_range(text: str) -> tuple[float, float]:
    """``MIN:MAX`` or one number (both ends), each a positive number, MIN <= MAX."""
    import argparse

    parts = text.split(":")
    try:
        lo, hi = (float(parts[0]), float(parts[-1])) if len(parts) in (1, 2) else (0.0, -1.0)
    except ValueError:
        lo, hi = 0.0, -1.0
    if not (0 < lo <= hi < float("inf")):
        raise argparse.ArgumentTypeError(f"must be MIN:MAX with 0 < MIN <= MAX (or one number), got '{text}'")
    return lo, hi


def unlabelled_line(result, out) -> str:
    """The one line eval prints for unlabelled data (no positions, so no recall)."""
    return (
        f"unlabelled: {result.dataset.get('database')} and {result.dataset.get('queries')} carry no positions"
        f" (no @UTM@ names, manifest or known layout), so no recall; wrote the top-5 of {result.num_queries}"
        f" queries to {Path(out) / 'predictions.csv'} (for frame-aligned folders pass --layout frames"
        " or --frame-tolerance N)"
    )


def print_summary(result, out) -> None:
    if not result.labelled:
        print(unlabelled_line(result, out))
        return
    first = result.recall_first_stage
    print(
        f"{result.model.get('name')} on {result.num_queries} queries x {result.num_database} database images"
        f" ({result.dataset.get('rule')}; {result.num_queries_with_positives} queries have positives)"
    )
    header = "  ".join(f"R@{n:>3}" for n in result.recall)
    print(f"{'':18s}{header}")
    print(f"{'global':18s}" + "  ".join(f"{100 * v:5.1f}" for v in first.values()))
    if result.rerank:
        shown = result.sequence["recall_single_frame"] if result.sequence else result.recall
        print(f"{'+ ' + result.rerank['name']:18s}" + "  ".join(f"{100 * v:5.1f}" for v in shown.values()))
    if result.sequence:
        label = f"+ sequence L={result.sequence['length']}"
        print(f"{label:18s}" + "  ".join(f"{100 * v:5.1f}" for v in result.recall.values()))
    from placerank.eval.precision import summary_lines

    for line in summary_lines(result):  # confidence: PR-AUC, Recall@100%Precision (docs/eval.md)
        print(line)
    t = result.timing_s
    print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()) + f"; peak memory {result.peak_memory_mb:.0f} MB")
    print(f"wrote {Path(out) / 'results.json'}, recall_curve.png, pr_curve.png, examples/")
