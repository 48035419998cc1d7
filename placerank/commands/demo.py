"""``placerank demo``: the main job on real data in one command.

Indexes GardensPoint Walking ``day_right`` (140 frames), retrieves for every ``night_right``
frame with the default model, re-ranks the top-10 with RANSAC on XFeat matches when that
re-ranker is installed, and writes Recall@N, the recall curve, example and match pictures.
"""

from __future__ import annotations

import os
from pathlib import Path

from placerank.errors import DataError

_REPO = Path(__file__).resolve().parents[2]


def find_shared_data(explicit: str | None = None) -> Path:
    cands = [Path(explicit)] if explicit else []
    if os.environ.get("PLACERANK_DATA"):
        cands.append(Path(os.environ["PLACERANK_DATA"]))
    cands += [Path.cwd().parent / "shared" / "data", _REPO.parent / "shared" / "data", Path.cwd() / "shared" / "data"]
    for c in cands:
        if (c / "gardenspoint_walking").is_dir():
            return c
    raise DataError(
        "shared data not found: pass --data DIR (the folder holding gardenspoint_walking/) or set PLACERANK_DATA"
    )


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the main job on real data (GardensPoint day -> night)")
    p.add_argument("--data", default=None, help="folder with gardenspoint_walking/ (default: ../shared/data)")
    p.add_argument("--out", type=Path, default=Path("placerank-demo"))
    p.add_argument("--model", default="effnet-lite0-gem")
    p.add_argument("--rerank", default="auto", help="re-ranker name, 'auto' (ransac-xfeat if available) or 'none'")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args) -> int:
    from placerank.commands.eval import print_summary
    from placerank.eval.evaluate import EvalConfig, evaluate
    from placerank.rerank import list_rerankers

    data = find_shared_data(args.data) / "gardenspoint_walking"
    rerank = args.rerank
    if rerank == "auto":
        names = {r.name for r in list_rerankers()}
        rerank = "ransac-xfeat" if "ransac-xfeat" in names else None
    elif rerank == "none":
        rerank = None
    print(
        f"placerank demo: database {data / 'day_right'} (day), queries {data / 'night_right'} (night), "
        f"positives |i-j| <= 2, model {args.model}" + (f", re-rank top-{args.top_k} with {rerank}" if rerank else "")
    )
    cfg = EvalConfig(
        database=data / "day_right",
        queries=data / "night_right",
        out=args.out,
        model=args.model,
        rerank=rerank,
        top_k=args.top_k,
        frame_tolerance=2,
        device=args.device,
    )
    result = evaluate(cfg)
    print_summary(result, args.out)
    return 0
