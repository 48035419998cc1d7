"""``eval --rerank-below CONF``: how much re-ranking time confident queries save, at what R@1.

    python benchmarks/rerank_below.py                          # ransac-xfeat and fol-region, 140 queries
    python benchmarks/rerank_below.py --rerankers fol-region   # one re-ranker
    python benchmarks/rerank_below.py --quick                  # smoke: 30 queries, small input

GardensPoint day_left -> night_right (positives |i-j| <= 2), top-20 re-ranked. For each
re-ranker, :func:`placerank.eval.evaluate.evaluate` (the code ``placerank eval`` runs) is called
once per CONF with the same model object, so the global descriptors and local features come from
the cache after the first run and every run times the same work:

1. CONF = none: every query re-ranked (the first run; its local-feature extraction is cold and
   reported apart as ``extract_local_s``).
2. CONF = the first-stage confidence (place margin) quantiles that skip 25 / 50 / 75 % of the
   queries, and the first stage's ``threshold_at_100_precision`` (the largest set of queries the
   global ranking answers without a wrong one on *this* labelled run: an in-sample choice).
3. CONF = 0: no query re-ranked (the global ranking).

``rerank_s`` is the scoring loop's wall time (``timing_s.rerank``; the local features are
cached, so skipped queries' feature extraction, saved too in a cold run, is not in it).
Output: a table and ``benchmarks/results/rerank_below.json``. First stages: ``effnet-lite0-gem``
(ImageNet) for ``ransac-xfeat``; ``fol-effnet-lite0`` with ImageNet backbone and seeded,
untrained FoL head (no trained FoL weights ship) for ``fol-region``, which needs a FoL model.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PLACERANK_SHARED", REPO.parent / "shared"))
GARDENS = SHARED / "data" / "gardenspoint_walking"
FIRST_STAGE = {"ransac-xfeat": "effnet-lite0-gem", "fol-region": "fol-effnet-lite0"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--database", default=str(GARDENS / "day_left"))
    p.add_argument("--queries", default=str(GARDENS / "night_right"))
    p.add_argument("--frame-tolerance", type=int, default=2)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--rerankers", nargs="+", default=["ransac-xfeat", "fol-region"], choices=sorted(FIRST_STAGE))
    p.add_argument("--skip-fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--quick", action="store_true", help="30 queries and database images, 180x320 input")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "rerank_below.json"))
    return p.parse_args(argv)


def frames_manifest(folder: str, frames, path: Path) -> Path:
    with open(path, "w") as f:
        f.write("path,frame\n")
        for k in frames:
            f.write(f"{Path(folder) / f'Image{k:03d}.jpg'},{k}\n")
    return path


def build_model(name: str, quick: bool):
    from placerank.models import create

    torch.manual_seed(0)  # the untrained FoL head: the same weights (and cache entries) every run
    kwargs = {"image_size": (180, 320)} if quick else {}
    return create(name, **kwargs).eval()


def one_run(cfg_kw: dict, out: Path, model, rerank_below) -> dict:
    from placerank.eval.evaluate import EvalConfig, evaluate

    t0 = time.perf_counter()
    r = evaluate(EvalConfig(out=out, rerank_below=rerank_below, **cfg_kw), model=model)
    below = (r.rerank or {}).get("rerank_below") or {}
    return {
        "conf": rerank_below,
        "queries_reranked": below.get("queries_reranked", r.num_queries),
        "recall": {k: r.recall[k] for k in ("1", "5", "10")},
        "pr_auc": r.precision_recall.get("auc"),
        "recall_at_100_precision": r.precision_recall.get("recall_at_100_precision"),
        "rerank_s": r.timing_s.get("rerank", 0.0),
        "extract_local_s": r.timing_s.get("extract_local", 0.0),
        "ms_per_query_median": (r.rerank or {}).get("ms_per_query_median"),
        "eval_wall_s": round(time.perf_counter() - t0, 2),
        "first_stage": {"recall_1": r.recall_first_stage["1"], **r.precision_recall_first_stage},
    }


def sweep(name: str, args, root: Path, cfg_kw: dict) -> dict:
    model = build_model(FIRST_STAGE[name], args.quick)
    kw = {**cfg_kw, "rerank": name}
    runs = [one_run(kw, root / f"{name}-all", model, None)]
    preds = (root / f"{name}-all" / "predictions.csv").read_text().splitlines()
    head = preds[0].split(",")
    conf = np.array([float(line.split(",")[head.index("first_stage_confidence")]) for line in preds[1:]])
    first = runs[0]["first_stage"]
    confs = {f"skip {int(100 * f)}%": float(np.quantile(conf, 1 - f)) for f in args.skip_fractions}
    if first.get("threshold_at_100_precision") is not None:
        confs["first-stage threshold at 100% precision"] = float(first["threshold_at_100_precision"])
    confs["0 (no re-ranking)"] = 0.0
    for label, c in confs.items():
        runs.append({**one_run(kw, root / f"{name}-{len(runs)}", model, c), "label": label})
    runs[0]["label"] = "none (every query)"
    full = runs[0]
    equal = [r for r in runs[1:] if r["recall"]["1"] >= full["recall"]["1"] - 1e-9]
    best = min(equal, key=lambda r: r["rerank_s"], default=None)
    return {
        "first_stage_model": FIRST_STAGE[name],
        "first_stage": full["first_stage"],
        "runs": runs,
        "equal_r1": None
        if best is None
        else {
            "conf": best["conf"],
            "label": best["label"],
            "rerank_s": best["rerank_s"],
            "full_rerank_s": full["rerank_s"],
            "time_saved": round(1 - best["rerank_s"] / max(full["rerank_s"], 1e-9), 3),
        },
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    n = 30 if args.quick else 140
    out: dict = {
        "benchmark": "rerank_below",
        "dataset": {"database": args.database, "queries": args.queries, "rule": f"|i-j| <= {args.frame_tolerance}"},
        "config": {
            "top_k": args.top_k,
            "quick": args.quick,
            "device": "cpu",
            "torch_threads": 1,
            "cpu_count": os.cpu_count(),
            "timing": "rerank_s = wall seconds of the scoring loop over the re-ranked queries (local features cached)",
        },
        "rerankers": {},
    }
    with tempfile.TemporaryDirectory(prefix="rerank-below-") as tmp:
        root = Path(tmp)
        frames = range(n)  # the descriptor cache is the usual one: a second run extracts nothing
        cfg_kw = dict(
            database=frames_manifest(args.database, frames, root / "db.csv"),
            queries=frames_manifest(args.queries, frames, root / "q.csv"),
            frame_tolerance=args.frame_tolerance,
            top_k=args.top_k,
            num_examples=0,
        )
        for name in args.rerankers:
            out["rerankers"][name] = sweep(name, args, root, cfg_kw)
            print_table(name, out["rerankers"][name])
    out["config"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    out = merged(Path(args.out), out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from placerank.utils import write_json_atomic

    write_json_atomic(args.out, out)
    print(f"wrote {args.out}")
    return 0


def merged(path: Path, new: dict) -> dict:
    """Re-rankers measured by an earlier run (same dataset and config) stay in the file beside the
    new ones, each with the load average of its own run."""
    import json

    for res in new["rerankers"].values():
        res["load_average_at_end"] = new["config"]["load_average_at_end"]
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return new
    same = old.get("dataset") == new["dataset"] and old.get("config", {}).get("top_k") == new["config"]["top_k"]
    if (
        old.get("benchmark") != "rerank_below"
        or not same
        or old.get("config", {}).get("quick") != new["config"]["quick"]
    ):
        return new
    return {**new, "rerankers": {**old.get("rerankers", {}), **new["rerankers"]}}


def print_table(name: str, res: dict) -> None:
    print(f"\n{name} (first stage {res['first_stage_model']}: R@1 {res['first_stage']['recall_1']:.3f})")
    print(
        f"{'--rerank-below':42s} {'CONF':>9s} {'re-ranked':>9s} {'R@1':>6s} {'R@5':>6s} {'PR-AUC':>7s} {'rerank s':>9s}"
    )
    for r in res["runs"]:
        conf = "-" if r["conf"] is None else f"{r['conf']:.4g}"
        auc = "-" if r["pr_auc"] is None else f"{r['pr_auc']:.3f}"
        print(
            f"{r['label']:42s} {conf:>9s} {r['queries_reranked']:>9d} {r['recall']['1']:6.3f} {r['recall']['5']:6.3f}"
            f" {auc:>7s} {r['rerank_s']:9.1f}"
        )
    eq = res["equal_r1"]
    if eq:
        print(
            f"equal R@1 with CONF {eq['conf']:.4g} ({eq['label']}): re-ranking {eq['rerank_s']:.1f}s instead of"
            f" {eq['full_rerank_s']:.1f}s ({100 * eq['time_saved']:.0f}% saved)"
        )
    else:
        print("no CONF kept the full re-ranking's R@1")


if __name__ == "__main__":
    raise SystemExit(main())
