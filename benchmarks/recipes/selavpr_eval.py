"""Evaluate the SelaVPR CPU recipe: untrained vs trained global retrieval vs trained + MNN
re-ranking, on held-out GardensPoint frames; writes one JSON summary.

The untrained model is ``selavpr-effnet-lite0`` straight from ImageNet: its zero-initialised
adapters make it exactly frozen EfficientNet-Lite0 + GeM on L2-normalised features, and its
up-conv head is random (its re-ranking row shows what an untrained head is worth).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from placerank.eval.evaluate import EvalConfig, evaluate
from placerank.models import create
from placerank.utils import write_json_atomic


def run_one(label: str, model, db: Path, q: Path, out: Path, top_k: int, tol: int, device: str) -> dict:
    cfg = EvalConfig(
        database=str(db),
        queries=str(q),
        out=str(out / label),
        model=model.name,
        rerank="selavpr-mnn",
        top_k=top_k,
        frame_tolerance=tol,
        device=device,
        num_examples=4,
    )
    r = evaluate(cfg, model=model)
    keep = ("1", "5", "10")
    return {
        "global": {k: r.recall_first_stage[k] for k in keep if k in r.recall_first_stage},
        "reranked": {k: r.recall[k] for k in keep if k in r.recall},
        "timing_s": r.timing_s,
        "rerank_bytes_per_image": (r.rerank or {}).get("bytes_per_image"),
        "rerank_ms_per_query_median": (r.rerank or {}).get("ms_per_query_median"),
        "weights": r.model.get("weights"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="training run folder (RUN_DIR/model.pt)")
    ap.add_argument("--manifests", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="summary JSON path; per-eval folders next to it")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--frame-tolerance", type=int, default=2)
    ap.add_argument("--protocols", default="day_right", help="comma list of databases: day_right,day_left")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    trained = create("selavpr-effnet-lite0", weights=str(args.run / "model.pt"))
    untrained = create("selavpr-effnet-lite0", image_size=trained.preprocess.size)
    work = args.out.parent / (args.out.stem + "_evals")
    summary = {
        "recipe": "selavpr_cpu",
        "run": str(args.run),
        "input_size": list(trained.preprocess.size),
        "top_k": args.top_k,
        "frame_tolerance": args.frame_tolerance,
        "protocols": {},
    }
    log = args.run / "log.jsonl"
    if log.exists():
        lines = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
        steps = [l for l in lines if l.get("event") == "step"]
        summary["training"] = {
            "steps": len(steps),
            "time_s": lines[-1].get("time_s"),
            "first_losses": [round(s["loss"], 4) for s in steps[:5]],
            "last_losses": [round(s["loss"], 4) for s in steps[-5:]],
            "validation": [
                {"epochs_done": l["epochs_done"], "step": l["step"], "recall": l["recall"]}
                for l in lines
                if l.get("event") == "validation"
            ],
            "selected": next((l for l in reversed(lines) if l.get("event") == "selected"), None),
        }
    for db_name in args.protocols.split(","):
        db = args.manifests / f"eval_db_{db_name}.csv"
        q = args.manifests / "eval_q_night_right.csv"
        name = f"{db_name}->night_right"
        summary["protocols"][name] = {
            "untrained": run_one(
                f"{db_name}_untrained", untrained, db, q, work, args.top_k, args.frame_tolerance, args.device
            ),
            "trained": run_one(
                f"{db_name}_trained", trained, db, q, work, args.top_k, args.frame_tolerance, args.device
            ),
        }
        p = summary["protocols"][name]
        print(
            f"{name}: R@1 untrained GeM {p['untrained']['global']['1']:.3f} | trained global "
            f"{p['trained']['global']['1']:.3f} | trained + selavpr-mnn {p['trained']['reranked']['1']:.3f}"
        )
    write_json_atomic(args.out, summary)
    print(f"summary written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
