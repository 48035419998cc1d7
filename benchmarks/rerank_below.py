"""``eval --rerank-below CONF``: how much re-ranking time confident queries save, at what R@1.

    python benchmarks/rerank_below.py                                   # ransac-xfeat and fol-region
    python benchmarks/rerank_below.py --rerankers ransac-xfeat --query-step 2
    python benchmarks/rerank_below.py --quick                           # smoke: 30 frames, small input
    G=../shared/data/gardenspoint_walking                              # an easy pair: a confident first stage
    python benchmarks/rerank_below.py --rerankers ransac-xfeat --query-step 2 --database $G/day_right \
        --queries $G/day_left --out benchmarks/results/rerank_below_day.json

GardensPoint day_left -> night_right (positives |i-j| <= 2), top-20 re-ranked, on the stage
functions ``placerank eval`` runs (global descriptors and local features from the usual cache):

1. First stage once: global descriptors, FAISS top-100, the first-stage confidence (place margin).
2. Every query re-ranked once (:func:`placerank.rerank.stage.rerank_candidates`), which times
   each query's scoring (``ms_per_query``; store reads included). A query's re-ranked list does
   not depend on which other queries are re-ranked, so for any CONF the result of
   ``--rerank-below CONF`` is the re-ranked rows of the queries with confidence < CONF and the
   global rows of the others, and its re-rank time the sum of those queries' measured times.
   This sweeps CONF (the quantiles that skip 5 / 10 / 25 / 50 / 75 % of the queries, the first stage's
   ``threshold_at_100_precision`` (an in-sample choice on this labelled run), 0 = no re-ranking)
   at the cost of one re-ranking on a 2-core machine where RANSAC takes seconds per query.
3. The CONF with the least time at the full re-ranking's R@1 (or, if none, skip 50 %) is then
   *run* with ``queries=`` (the ``--rerank-below`` path): its wall time is measured and its
   ranking checked equal to the derived one (``validated``).

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
    p.add_argument("--query-step", type=int, default=1, help="every N-th query frame (all 140 database frames)")
    p.add_argument("--rerankers", nargs="+", default=["ransac-xfeat", "fol-region"], choices=sorted(FIRST_STAGE))
    p.add_argument("--skip-fractions", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5, 0.75])
    p.add_argument("--quick", action="store_true", help="30 frames, 180x320 input")
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


def first_stage(name: str, args, ds, device):
    """The model, re-ranker, local store and top-100 candidates, as ``evaluate`` builds them."""
    from placerank.descriptors.extract import local_numerics, local_store_for
    from placerank.descriptors.files import extract_descriptors
    from placerank.index.candidates import search
    from placerank.rerank.base import create_reranker, shares_model_head

    model = build_model(FIRST_STAGE[name], args.quick).to(device)
    reranker = create_reranker(name, model=model).to(device)
    store = local_store_for(reranker, numerics=local_numerics(model, reranker, "fp32"))
    shared = store if shares_model_head(model, reranker) else None
    db, q = (
        extract_descriptors(model, s.paths, device, 16, 0, True, reranker=reranker if shared else None, store=shared)
        for s in (ds.database, ds.queries)
    )
    return model, reranker, store, search(db, q, min(100, len(ds.database)), device=device)


def outcome(ds, cands, full, first_conf, rerun, name: str, top_k: int) -> dict:
    """R@N and the final PR metrics when only ``rerun`` queries take their re-ranked rows."""
    from placerank.eval.confidence import query_confidence
    from placerank.eval.precision import precision_recall_entries
    from placerank.eval.recall import recall_at_n

    ids = np.where(rerun[:, None], full.ids, cands.ids)
    scores = np.where(rerun[:, None], full.scores, np.nan)
    conf = query_confidence(first_conf, scores, rerun, name)
    pr, _, _ = precision_recall_entries(conf, cands.ids, ids, ds.positives, f"+ {name} (top-{top_k})")
    recall = recall_at_n(ids, ds.positives, (1, 5, 10))
    return {"ids": ids, "recall": recall, "pr_auc": pr["auc"], "recall_at_100_precision": pr["recall_at_100_precision"]}


def sweep(name: str, args, ds, device) -> dict:
    from placerank.eval.confidence import global_confidence, queries_to_rerank
    from placerank.eval.precision import precision_recall
    from placerank.eval.recall import recall_at_n
    from placerank.rerank.stage import rerank_candidates
    from placerank.utils import Timer

    _, reranker, store, cands = first_stage(name, args, ds, device)
    first_conf = global_confidence(ds, cands.similarities, cands.ids)
    has = np.array([len(p) > 0 for p in ds.positives])
    first_ok = np.array([len(p) > 0 and cands.ids[q, 0] in p for q, p in enumerate(ds.positives)])
    first_pr = precision_recall(first_conf, first_ok, has)
    timer = Timer()
    try:
        _, full = rerank_candidates(cands, reranker, args.top_k, store, store, device, 0, timer)
        ms = full.ms_per_query
        confs: dict[str, float | None] = {"none (every query)": None}
        confs.update({f"skip {int(100 * f)}%": float(np.quantile(first_conf, 1 - f)) for f in args.skip_fractions})
        if first_pr.threshold_at_100_precision is not None:
            confs["first-stage threshold at 100% precision"] = first_pr.threshold_at_100_precision
        confs["0 (no re-ranking)"] = 0.0
        runs = []
        for label, c in confs.items():
            rerun = queries_to_rerank(first_conf, c)
            o = outcome(ds, cands, full, first_conf, rerun, name, args.top_k)
            runs.append(
                {
                    "label": label,
                    "conf": c,
                    "queries_reranked": int(rerun.sum()),
                    "recall": o["recall"],
                    "pr_auc": o["pr_auc"],
                    "recall_at_100_precision": o["recall_at_100_precision"],
                    "rerank_s": round(float(ms[rerun].sum()) / 1000, 2),
                }
            )
        full_run = runs[0]
        equal = [r for r in runs[1:] if r["recall"]["1"] >= full_run["recall"]["1"] - 1e-9]
        pick = min(equal, key=lambda r: r["rerank_s"], default=None) or next(r for r in runs if "50%" in r["label"])
        rerun = queries_to_rerank(first_conf, pick["conf"])
        check = Timer()
        t0 = time.perf_counter()
        real, _ = rerank_candidates(cands, reranker, args.top_k, store, store, device, 0, check, queries=rerun)
        validated = {
            "label": pick["label"],
            "conf": pick["conf"],
            "queries_reranked": int(rerun.sum()),
            "rerank_s_measured": round(check.totals.get("rerank", 0.0), 2),
            "rerank_s_derived": pick["rerank_s"],
            "wall_s": round(time.perf_counter() - t0, 2),
            "ranking_equals_derived": bool(
                np.array_equal(real.ids, outcome(ds, cands, full, first_conf, rerun, name, args.top_k)["ids"])
            ),
        }
    finally:
        store.close()
    return {
        "first_stage_model": FIRST_STAGE[name],
        "first_stage": {
            "recall": recall_at_n(cands.ids, ds.positives, (1, 5, 10)),
            **first_pr.summary("place margin"),
        },
        "full_rerank": {
            "rerank_s": round(timer.totals.get("rerank", 0.0), 2),
            "extract_local_s": round(timer.totals.get("extract_local", 0.0), 2),
            "ms_per_query_median": round(float(np.median(ms)), 1),
        },
        "runs": runs,
        "equal_r1": None
        if not equal
        else {
            "conf": pick["conf"],
            "label": pick["label"],
            "rerank_s": pick["rerank_s"],
            "full_rerank_s": full_run["rerank_s"],
            "time_saved": round(1 - pick["rerank_s"] / max(full_run["rerank_s"], 1e-9), 3),
        },
        "validated": validated,
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
            "timing": "rerank_s = the re-ranked queries' measured scoring seconds (ms_per_query, store reads"
            " included; local features cached); validated: one --rerank-below run timed for real",
        },
        "rerankers": {},
    }
    from placerank.eval.evaluate import EvalConfig, open_eval_dataset

    device = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="rerank-below-") as tmp:
        root = Path(tmp)
        ds = open_eval_dataset(
            EvalConfig(
                database=frames_manifest(args.database, range(n), root / "db.csv"),
                queries=frames_manifest(args.queries, range(0, n, args.query_step), root / "q.csv"),
                frame_tolerance=args.frame_tolerance,
            )
        )
        counts = {"num_database": len(ds.database), "num_queries": len(ds.queries), "query_step": args.query_step}
        for name in args.rerankers:
            out["rerankers"][name] = {**counts, **sweep(name, args, ds, device)}
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
    first = res["first_stage"]
    print(f"\n{name} (first stage {res['first_stage_model']}: R@1 {first['recall']['1']:.3f}, PR-AUC {first['auc']})")
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
    v = res["validated"]
    print(
        f"run with --rerank-below {v['conf']:.4g} ({v['label']}): {v['queries_reranked']} queries re-ranked in"
        f" {v['rerank_s_measured']:.1f}s (derived {v['rerank_s_derived']:.1f}s); ranking equals the derived one:"
        f" {v['ranking_equals_derived']}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
