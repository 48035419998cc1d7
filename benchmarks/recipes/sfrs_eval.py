"""Evaluate every model of an SFRS run on held-out data and write one JSON.

    python benchmarks/recipes/sfrs_eval.py RUN_DIR --pair NAME DB.csv Q.csv [--pair ...] \
        --frame-tolerance 2 --out RESULTS.json [--rerank NAME] [--model sfrs-effnet-lite0]

Models: ``untrained.pt`` (ImageNet backbone + k-means NetVLAD + PCA from the same training
images: the starting point of every generation), ``gen0.pt`` .. ``genN.pt`` and ``model.pt``,
each loaded exactly as ``placerank eval --model NAME --weights RUN_DIR/<file>`` does; plus the
registry model without weights at the run's input size (NetVLAD k-means-initialised on the test
database, no PCA). With ``--rerank`` the final model is also evaluated with that re-ranker.
Recall@1/5/10 per pair and the mean over pairs.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from placerank.eval.evaluate import EvalConfig, evaluate
from placerank.utils import write_json_atomic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--pair", nargs=3, action="append", required=True, metavar=("NAME", "DATABASE", "QUERIES"))
    ap.add_argument("--frame-tolerance", type=int, default=2)
    ap.add_argument("--model", default="sfrs-effnet-lite0")
    ap.add_argument("--rerank", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    cfg = json.loads((a.run / "config.json").read_text())
    size = tuple(cfg["image_size"]) if cfg.get("image_size") else None
    gens = sorted(a.run.glob("gen*.pt"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    runs: list[tuple[str, Path | None, str | None]] = [("registry_untrained", None, None)]
    runs += [("untrained", a.run / "untrained.pt", None)] if (a.run / "untrained.pt").exists() else []
    runs += [(p.stem, p, None) for p in gens]
    runs += [("model.pt", a.run / "model.pt", None)]
    if a.rerank:
        runs += [(f"model.pt+{a.rerank}", a.run / "model.pt", a.rerank)]
    results = {}
    for name, weights, rerank in runs:
        per_pair = {}
        for pair, db, q in a.pair:
            res = evaluate(
                EvalConfig(
                    database=db,
                    queries=q,
                    out=a.out.parent / f"eval_{name}_{pair}",
                    model=a.model,
                    weights=weights,
                    rerank=rerank,
                    frame_tolerance=a.frame_tolerance,
                    device=a.device,
                    use_cache=False,
                    num_examples=0,
                    image_size=size if weights is None else None,
                )
            )
            per_pair[pair] = {
                "recall": {k: res.recall[k] for k in ("1", "5", "10")},
                "num_queries": res.num_queries,
                "descriptor_dim": res.model.get("descriptor_dim"),
            }
        mean = {k: float(np.mean([v["recall"][k] for v in per_pair.values()])) for k in ("1", "5", "10")}
        results[name] = {
            "weights": str(weights) if weights else None,
            "rerank": rerank,
            "mean_recall": mean,
            "pairs": per_pair,
        }
        cells = "  ".join(f"{p}: R@1 {100 * v['recall']['1']:5.1f}" for p, v in per_pair.items())
        print(
            f"{name:24s} mean R@1 {100 * mean['1']:5.1f} R@5 {100 * mean['5']:5.1f} R@10 {100 * mean['10']:5.1f}"
            f"   ({cells})",
            flush=True,
        )
    log = a.run / "log.jsonl"
    epochs = [json.loads(l) for l in log.read_text().splitlines() if '"epoch_end"' in l] if log.exists() else []
    stopped = [json.loads(l) for l in log.read_text().splitlines() if '"time_limit"' in l] if log.exists() else []
    write_json_atomic(
        a.out,
        {
            "pairs": {p: {"database": db, "queries": q} for p, db, q in a.pair},
            "frame_tolerance": a.frame_tolerance,
            "model": a.model,
            "image_size": size,
            "results": results,
            "training_epochs": epochs,
            "stopped_by_time_limit": bool(stopped),
        },
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
