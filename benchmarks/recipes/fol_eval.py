"""Evaluate FoL on held-out GardensPoint frames: untrained vs trained vs trained + fol-region.

    python benchmarks/recipes/fol_eval.py --run RUN_DIR --out results.json
        [--frames 100 140] [--database day_right] [--queries night_right] [--top-k 20]
        [--modes center pool3 dense] [--image-size 360 640]

Writes CSV manifests (path,frame) for the held-out frame range into a temp folder, then runs
:func:`placerank.eval.evaluate.evaluate` for

- ``effnet-lite0-gem``: the ImageNet backbone with GeM (the untrained baseline);
- ``fol-effnet-lite0`` untrained: ImageNet backbone, randomly initialised FoL heads (seed 0);
- the trained ``RUN_DIR/model.pt``: global only, and + ``--rerank fol-region`` for each local
  mode asked for (R@1 vs bytes per database image).

Positives: |i - j| <= frame tolerance (2, the dataset's default rule).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("PLACERANK_SHARED", REPO.parent / "shared"))
GARDENS = SHARED / "data" / "gardenspoint_walking"


def write_manifest(folder: Path, traversal: str, frames: tuple[int, int]) -> Path:
    path = folder / f"{traversal}_{frames[0]}_{frames[1]}.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "frame"])
        for k in range(*frames):
            w.writerow([str(GARDENS / traversal / f"Image{k:03d}.jpg"), k])
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=None, help="training run folder (RUN_DIR/model.pt)")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--frames", type=int, nargs=2, default=[100, 140])
    p.add_argument("--database", default="day_right")
    p.add_argument("--queries", default="night_right")
    p.add_argument("--frame-tolerance", type=int, default=2)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--modes", nargs="+", default=["pool3"], help="fol-region local modes to measure (trained model)")
    p.add_argument(
        "--untrained-modes", nargs="*", default=["pool3"], help="fol-region local modes for the untrained model"
    )
    p.add_argument("--image-size", type=int, nargs=2, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-untrained", action="store_true")
    args = p.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from placerank.eval.evaluate import EvalConfig, evaluate

    frames = tuple(args.frames)
    results: dict = {
        "protocol": {
            "database": f"gardenspoint_walking/{args.database} frames {frames[0]}-{frames[1] - 1}",
            "queries": f"gardenspoint_walking/{args.queries} frames {frames[0]}-{frames[1] - 1}",
            "positives": f"|i-j| <= {args.frame_tolerance}",
            "top_k": args.top_k,
        }
    }
    size = tuple(args.image_size) if args.image_size else None
    with tempfile.TemporaryDirectory(prefix="fol_eval_") as tmp:
        tmp = Path(tmp)
        db = write_manifest(tmp, args.database, frames)
        q = write_manifest(tmp, args.queries, frames)

        def run(label, **kw):
            import torch

            torch.manual_seed(0)  # untrained FoL heads: the same random init in every run
            t0 = time.perf_counter()
            cfg = EvalConfig(
                database=db,
                queries=q,
                out=tmp / label,
                frame_tolerance=args.frame_tolerance,
                top_k=args.top_k,
                device=args.device,
                num_examples=0,
                use_cache=False,
                image_size=size,
                **kw,
            )
            r = evaluate(cfg)
            entry = {
                "recall": {k: round(v, 4) for k, v in r.recall.items() if k in ("1", "5", "10")},
                "recall_first_stage": {
                    k: round(v, 4) for k, v in r.recall_first_stage.items() if k in ("1", "5", "10")
                },
                "seconds": round(time.perf_counter() - t0, 1),
            }
            if r.rerank:
                entry["rerank"] = {k: r.rerank[k] for k in ("bytes_per_image", "ms_per_query_median", "top_k")}
            results[label] = entry
            print(
                f"{label:32s} R@1 {entry['recall']['1']:.3f} R@5 {entry['recall']['5']:.3f}"
                + (
                    f"  ({entry['rerank']['bytes_per_image']:.0f} B/img, {entry['rerank']['ms_per_query_median']:.2f} ms/query)"
                    if "rerank" in entry
                    else ""
                ),
                flush=True,
            )

        if not args.skip_untrained:
            run("untrained_effnet_lite0_gem", model="effnet-lite0-gem")
            run("untrained_fol_effnet_lite0", model="fol-effnet-lite0")
            for mode in args.untrained_modes:
                run(
                    f"untrained_fol_region_{mode}",
                    model="fol-effnet-lite0",
                    rerank="fol-region",
                    rerank_options={"mode": mode},
                )
        if args.run is not None:
            weights = args.run / "model.pt"
            run("trained_global", model="fol-effnet-lite0", weights=weights)
            for mode in args.modes:
                run(
                    f"trained_fol_region_{mode}",
                    model="fol-effnet-lite0",
                    weights=weights,
                    rerank="fol-region",
                    rerank_options={"mode": mode},
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
