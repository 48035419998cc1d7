"""``placerank demo``: the main job on real data in one command.

``--preset gardens-night`` (default) indexes GardensPoint Walking ``day_right`` (140 frames),
retrieves for every ``night_right`` frame with the default model, re-ranks the top-10 with
RANSAC on XFeat matches when that re-ranker is installed, and writes Recall@N, the recall curve,
example and match pictures. Dataset presets live in :mod:`placerank.presets.datasets`.
"""

from __future__ import annotations

from pathlib import Path

from placerank.commands._common import add_compile_arg, add_precision_arg, positive_int


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the main job on real data (default: GardensPoint day -> night)")
    p.add_argument("--preset", default="gardens-night", help="dataset preset (see `placerank models`)")
    p.add_argument("--data", default=None, help="shared data folder (default: $PLACERANK_DATA or ../shared/data)")
    p.add_argument("--out", type=Path, default=Path("placerank-demo"))
    p.add_argument("--model", default=None, help="model (default: the preset's, effnet-lite0-gem)")
    p.add_argument("--rerank", default=None, help="re-ranker name, 'auto' (ransac-xfeat if available) or 'none'")
    p.add_argument(
        "--top-k", type=positive_int, default=None, help="candidates re-ranked per query (default: the preset's)"
    )
    p.add_argument("--device", default="auto")
    add_precision_arg(p)
    add_compile_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from placerank.commands.eval import print_summary
    from placerank.eval.evaluate import EvalConfig, evaluate
    from placerank.presets import get_preset
    from placerank.presets.datasets import resolve_rerank

    preset = get_preset(args.preset, kind="dataset")
    database, queries = preset.paths(args.data)
    model = args.model or preset.model
    top_k = args.top_k if args.top_k is not None else preset.top_k
    rerank = resolve_rerank(args.rerank or preset.rerank)
    print(
        f"placerank demo: database {database} ({preset.database_label}), queries {queries} ({preset.queries_label}), "
        f"positives {preset.rule()}, model {model}" + (f", re-rank top-{top_k} with {rerank}" if rerank else "")
    )
    cfg = EvalConfig(
        database=database,
        queries=queries,
        out=args.out,
        model=model,
        rerank=rerank,
        top_k=top_k,
        frame_tolerance=preset.frame_tolerance,
        radius=preset.radius,
        device=args.device,
        precision=args.precision,
        compile=args.compile,
        runtime=args.runtime,
    )
    result = evaluate(cfg)
    print_summary(result, args.out)
    return 0
