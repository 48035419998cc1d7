"""Evaluate every model of an SFRS run on held-out data and write one JSON.

    python benchmarks/recipes/sfrs_eval.py RUN_DIR --database DB.csv --queries Q.csv \
        --frame-tolerance 2 --out RESULTS.json [--rerank NAME] [--model sfrs-effnet-lite0]

Models: ``untrained.pt`` (ImageNet backbone + k-means NetVLAD + PCA from the same training
images: the starting point of every generation), ``gen0.pt`` .. ``genN.pt`` and ``model.pt``,
each loaded exactly as ``placerank eval --model NAME --weights RUN_DIR/<file>`` does; plus the
registry model without weights (NetVLAD k-means-initialised on the test database). With
``--rerank`` the final model is also evaluated with that re-ranker.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from placerank.eval.evaluate import EvalConfig, evaluate
from placerank.utils import write_json_atomic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--database", required=True)
    ap.add_argument("--queries", required=True)
    ap.add_argument("--frame-tolerance", type=int, default=2)
    ap.add_argument("--model", default="sfrs-effnet-lite0")
    ap.add_argument("--rerank", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    gens = sorted(a.run.glob("gen*.pt"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    runs: list[tuple[str, Path | None, str | None]] = [("registry_untrained (k-means on test db, no PCA)", None, None)]
    runs += [("untrained (init + PCA)", a.run / "untrained.pt", None)] if (a.run / "untrained.pt").exists() else []
    runs += [(p.stem, p, None) for p in gens]
    runs += [("model.pt", a.run / "model.pt", None)]
    if a.rerank:
        runs += [(f"model.pt + {a.rerank}", a.run / "model.pt", a.rerank)]
    results = {}
    for name, weights, rerank in runs:
        slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
        res = evaluate(EvalConfig(database=a.database, queries=a.queries, out=a.out.parent / f"eval_{slug}",
                                  model=a.model, weights=weights, rerank=rerank, frame_tolerance=a.frame_tolerance,
                                  device=a.device, use_cache=False, num_examples=0))
        results[name] = {"weights": str(weights) if weights else None, "rerank": rerank,
                         "recall": {k: res.recall[k] for k in ("1", "5", "10") if k in res.recall},
                         "recall_first_stage": {k: res.recall_first_stage[k] for k in ("1", "5", "10")
                                                if k in res.recall_first_stage},
                         "descriptor_dim": res.model.get("descriptor_dim"), "timing_s": res.timing_s}
        r = results[name]["recall"]
        print(f"{name:50s} R@1 {100 * r['1']:5.1f}  R@5 {100 * r['5']:5.1f}  R@10 {100 * r['10']:5.1f}", flush=True)
    log = a.run / "log.jsonl"
    epochs = [json.loads(l) for l in log.read_text().splitlines() if '"epoch_end"' in l] if log.exists() else []
    write_json_atomic(a.out, {"database": a.database, "queries": a.queries, "frame_tolerance": a.frame_tolerance,
                              "model": a.model, "results": results, "training_epochs": epochs})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
