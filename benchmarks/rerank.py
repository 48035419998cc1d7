"""Re-ranking benchmark: every registered re-ranker on the SAME first-stage candidates.

    python benchmarks/rerank.py                       # GardensPoint day_right -> night_right, top-K 20/50/100
    python benchmarks/rerank.py --quick               # CI smoke: 6 queries, top-5, small local input
    python benchmarks/rerank.py --rerankers ransac-xfeat selavpr-mnn \\
        --model-for selavpr-mnn=selavpr-effnet-lite0 --weights-for selavpr-mnn=runs/selavpr/model.pt

1. First stage, computed once: global descriptors of the default model (``effnet-lite0-gem``,
   ImageNet weights) for database and queries, FAISS flat inner product, top max(K) per query.
2. Each re-ranker runs in its own child process (so its peak memory is its own): it extracts the
   database candidates' local features into its LocalFeatureStore (float16, the same store eval
   uses; reused across runs: ``db_images_extracted`` says how many were extracted in this run),
   extracts each query's local features afresh (timed), then re-ranks the top-K with
   :func:`placerank.rerank.topk.rerank_topk`, the loop eval and localize run, once per K; the
   time for K is that loop's per-query time, candidate store reads included.
3. Output: a table and ``benchmarks/results/rerank.json`` with R@1/5 before and after, ms per
   query for re-ranking (median, p90), query local-feature extraction ms, bytes of local data per
   database image, peak memory, and ratios against RANSAC (``ransac-xfeat``) in the same run.
   Re-rankers that need a trained model are skipped, with the reason, unless ``--model-for`` says
   which model (and ``--weights-for`` which weights) to build them with.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PLACERANK_SHARED", REPO.parent / "shared"))
GARDENS = SHARED / "data" / "gardenspoint_walking"
REFERENCE = "ransac-xfeat"


def _kv(items: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise SystemExit(f"{flag} takes RERANKER=VALUE, got '{it}'")
        k, v = it.split("=", 1)
        out[k] = v
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--database", default=str(GARDENS / "day_right"))
    p.add_argument("--queries", default=str(GARDENS / "night_right"))
    p.add_argument("--frame-tolerance", type=int, default=2)
    p.add_argument("--radius", type=float, default=None, help="metres, for datasets with UTM positions")
    p.add_argument("--top-k", type=int, nargs="+", default=[20, 50, 100])
    p.add_argument("--model", default="effnet-lite0-gem", help="first-stage model (global descriptors)")
    p.add_argument("--weights", default=None, help="first-stage model weights")
    p.add_argument("--rerankers", nargs="+", default=None, help="subset of registered re-rankers (default: all)")
    p.add_argument("--exclude", nargs="+", default=[], help="re-rankers to leave out (reported as skipped)")
    p.add_argument(
        "--model-for",
        action="append",
        metavar="RERANKER=MODEL",
        help="model a needs-model re-ranker is built with (repeatable)",
    )
    p.add_argument("--weights-for", action="append", metavar="RERANKER=PATH", help="weights of that model (repeatable)")
    p.add_argument(
        "--local-size",
        type=int,
        nargs=2,
        default=[360, 640],
        metavar=("H", "W"),
        help="network input of the RANSAC local features (GardensPoint frames are 16:9)",
    )
    p.add_argument("--max-keypoints", type=int, default=2048)
    p.add_argument("--max-queries", type=int, default=None, help="evenly spaced subset of the queries")
    p.add_argument(
        "--query-frames",
        type=int,
        nargs=2,
        default=None,
        metavar=("START", "STOP"),
        help="frame-indexed sets only: keep the queries with frame in [START, STOP), e.g. the "
        "frames a trained re-ranker's recipe held out (100 140 for the placerank recipes)",
    )
    p.add_argument(
        "--max-database",
        type=int,
        default=None,
        help="first N database images only (queries without a positive among them are dropped)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke run: 40 database images, 6 queries, top-5, local input 288x512, 1024 keypoints",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "rerank.json"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.max_queries = args.max_queries or 6
        args.max_database = args.max_database or 40
        args.top_k = [5]
        args.local_size = [288, 512]
        args.max_keypoints = 1024
    args.top_k = sorted(set(int(k) for k in args.top_k))
    return args


# ---------------------------------------------------------------------------------------------
def first_stage(args) -> dict:
    """Global retrieval once; returns everything the children need."""
    import torch

    from placerank.data.dataset import Dataset
    from placerank.data.readers import load_dataset
    from placerank.descriptors.extract import extract_global
    from placerank.eval.recall import recall_at_n
    from placerank.index.flat import FlatIndex
    from placerank.models import create
    from placerank.utils import resolve_device

    ds = load_dataset(
        args.database, args.queries, radius=args.radius, frame_tolerance=None if args.radius else args.frame_tolerance
    )
    if args.max_database and args.max_database < len(ds.database):
        ds = Dataset(ds.database.subset(np.arange(args.max_database)), ds.queries, ds.rule, name=ds.name)
        has_pos = np.flatnonzero([len(p) > 0 for p in ds.positives])
        ds = Dataset(ds.database, ds.queries.subset(has_pos), ds.rule, name=ds.name)
    if args.query_frames:
        if ds.queries.kind != "frame":
            raise SystemExit(
                f"--query-frames needs frame-indexed queries, {args.queries} has '{ds.queries.kind}' positions"
            )
        start, stop = args.query_frames
        keep = np.flatnonzero((ds.queries.positions >= start) & (ds.queries.positions < stop))
        if len(keep) == 0:
            raise SystemExit(f"--query-frames {start} {stop}: no query has a frame in that range")
        ds = Dataset(ds.database, ds.queries.subset(keep), ds.rule, name=ds.name)
    if args.max_queries and args.max_queries < len(ds.queries):
        sel = np.unique(np.linspace(0, len(ds.queries) - 1, args.max_queries).round().astype(int))
        ds = Dataset(ds.database, ds.queries.subset(sel), ds.rule, name=ds.name)
    device = resolve_device(args.device)
    model = create(args.model, weights=args.weights).to(device).eval()
    t0 = time.perf_counter()
    db = extract_global(model, ds.database.paths, device, desc="database")
    q = extract_global(model, ds.queries.paths, device, desc="queries")
    t_extract = time.perf_counter() - t0
    depth = min(max(args.top_k), len(ds.database))
    _, ids = FlatIndex.build(db, model.name, model.weights_id).search(q, depth)
    positives = ds.positives
    return {
        "dataset": {
            "database": str(args.database),
            "queries": str(args.queries),
            "rule": ds.rule.describe(),
            "query_frames": list(args.query_frames) if args.query_frames else None,
            "num_database": len(ds.database),
            "num_queries": len(ds.queries),
            "num_queries_with_positives": int(sum(len(p) > 0 for p in positives)),
        },
        "model": model.describe(),
        "global_extract_s": round(t_extract, 2),
        "ids": ids,
        "positives": positives,
        "db_paths": [str(p) for p in ds.database.paths],
        "q_paths": [str(p) for p in ds.queries.paths],
        "recall_first_stage": recall_at_n(ids, positives, [n for n in (1, 5, 10) if n <= depth]),
        "torch_threads": torch.get_num_threads(),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory. ``VmHWM`` rather than ``getrusage``: Linux carries
    ``ru_maxrss`` over fork + exec, so a child would report at least its parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def run_child(spec_path: str) -> None:
    """One re-ranker: extract, re-rank, write its result JSON (runs in its own process)."""
    import torch

    from placerank.descriptors.extract import extract_local, local_store_for
    from placerank.eval.recall import recall_at_n
    from placerank.rerank.base import create_reranker
    from placerank.rerank.topk import rerank_topk
    from placerank.utils import resolve_device

    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    data = np.load(spec["arrays"], allow_pickle=False)
    ids = data["ids"]
    positives = [data[f"pos_{i}"] for i in range(len(ids))]
    device = resolve_device(spec["device"])
    model = None
    if spec.get("model"):
        from placerank.models import create

        # Parts a checkpoint does not cover (an untrained local head) are initialised from a
        # fixed seed, so a run without --weights-for is reproducible.
        torch.manual_seed(0)
        model = create(spec["model"], weights=spec.get("weights")).to(device).eval()
    rr = create_reranker(spec["name"], model=model, **spec["options"]).to(device)
    store = local_store_for(rr)
    db_paths, q_paths = spec["db_paths"], spec["q_paths"]
    needed = np.unique(ids)
    n_before = len(store)
    t0 = time.perf_counter()
    keys_needed = extract_local(rr, [db_paths[j] for j in needed], store, device, desc="database local")
    t_db = time.perf_counter() - t0
    n_new_db = len(store) - n_before
    keys_db = {int(j): k for j, k in zip(needed, keys_needed)}

    # Query local features: always extracted here, one image at a time (what a live query
    # costs), never read from an earlier run's store, so the timing and peak memory do not
    # depend on the cache state.
    from placerank.data.images import load_tensor

    q_ms, q_feats = [], []
    with torch.inference_mode():
        for p in q_paths:
            t1 = time.perf_counter()
            t, orig = load_tensor(p, rr.preprocess)
            q_feats.append(rr.extract(t[None].to(device), [orig])[0])
            q_ms.append(1000 * (time.perf_counter() - t1))

    # The one re-rank-top-K loop (what eval and localize run), once per K: its per-query time
    # includes the candidates' store reads.
    per_k = {}
    ns = [n for n in (1, 5) if n <= ids.shape[1]]
    with torch.inference_mode():
        for k in spec["top_k"]:
            out = rerank_topk(
                rr, ids, min(k, ids.shape[1]), lambda q: q_feats[q], lambda j: store.get(keys_db[j]), progress=False
            )
            per_k[str(k)] = {
                "top_k": out.top_k,
                "recall_before": recall_at_n(ids, positives, ns),
                "recall_after": recall_at_n(out.ids, positives, ns),
                "ms_per_query_median": round(float(np.median(out.ms_per_query)), 2),
                "ms_per_query_p90": round(float(np.percentile(out.ms_per_query, 90)), 2),
            }
    result = {
        "status": "ok",
        "name": rr.name,
        "signature": rr.signature(),
        "needs_model": bool(spec.get("model")),
        "model": spec.get("model"),
        "model_weights": getattr(model, "weights_source", None) if model is not None else None,
        "per_k": per_k,
        "bytes_per_image": round(store.bytes_per_image(), 1),
        "local_dim": int(rr.dim),
        "query_extract_ms_median": round(float(np.median(q_ms)), 1),
        "db_extract_s": round(t_db, 2) if n_new_db else None,
        "db_images_extracted": int(n_new_db),
        "peak_memory_mb": peak_rss_mb(),
        "device": str(device),
    }
    store.close()
    Path(spec["result"]).write_text(json.dumps(result, indent=2))


# ---------------------------------------------------------------------------------------------
def ransac_options(args) -> dict:
    return {"image_size": list(args.local_size), "max_keypoints": args.max_keypoints}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        run_child(args.child)
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from placerank.rerank.base import list_rerankers
    from placerank.utils import write_json_atomic

    model_for = _kv(args.model_for, "--model-for")
    weights_for = _kv(args.weights_for, "--weights-for")
    entries = {e.name: e for e in list_rerankers()}
    names = args.rerankers or sorted(entries)
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise SystemExit(f"unknown re-ranker(s): {', '.join(unknown)}; registered: {', '.join(sorted(entries))}")
    # The reference runs first so every ratio is against a number from this very run.
    names = sorted(names, key=lambda n: (n != REFERENCE, n))

    print(f"first stage: {args.model} on {args.database} -> {args.queries}", flush=True)
    fs = first_stage(args)
    print(
        f"  {fs['dataset']['num_queries']} queries x {fs['dataset']['num_database']} database, "
        f"rule {fs['dataset']['rule']}, R@1 {fs['recall_first_stage']['1']:.3f}",
        flush=True,
    )

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="placerank-rerank-bench-") as tmp:
        arrays = Path(tmp) / "arrays.npz"
        np.savez(arrays, ids=fs["ids"], **{f"pos_{i}": p for i, p in enumerate(fs["positives"])})
        for name in names:
            entry = entries[name]
            if name in args.exclude:
                results[name] = {"status": "skipped", "reason": "excluded with --exclude"}
                print(f"- {name}: skipped (excluded with --exclude)", flush=True)
                continue
            if entry.needs_model and name not in model_for:
                results[name] = {
                    "status": "skipped",
                    "reason": f"needs a trained model: pass --model-for {name}=MODEL [--weights-for {name}=PATH]",
                }
                print(f"- {name}: skipped ({results[name]['reason']})", flush=True)
                continue
            spec = {
                "name": name,
                "arrays": str(arrays),
                "result": str(Path(tmp) / f"{name}.json"),
                "db_paths": fs["db_paths"],
                "q_paths": fs["q_paths"],
                "top_k": args.top_k,
                "device": args.device,
                "threads": args.threads,
                "model": model_for.get(name),
                "weights": weights_for.get(name),
                "options": ransac_options(args) if name.startswith("ransac-") else {},
            }
            spec_path = Path(tmp) / f"{name}.spec.json"
            spec_path.write_text(json.dumps(spec))
            print(f"- {name}: running", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                lines = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
                results[name] = {"status": "failed", "reason": lines[-1] if lines else f"exit status {proc.returncode}"}
                print(f"  failed: {results[name]['reason']}", flush=True)
                continue
            results[name] = json.loads(Path(spec["result"]).read_text())
            results[name]["wall_s"] = round(time.perf_counter() - t0, 1)
            print(f"  done in {results[name]['wall_s']} s", flush=True)

    add_ratios(results, args.top_k)
    report = {
        "benchmark": "rerank",
        "dataset": fs["dataset"],
        "first_stage": {
            "model": fs["model"],
            "recall": fs["recall_first_stage"],
            "global_extract_s": fs["global_extract_s"],
        },
        "config": {
            "top_k": args.top_k,
            "local_size": list(args.local_size),
            "max_keypoints": args.max_keypoints,
            "quick": bool(args.quick),
            "device": args.device,
            "torch_threads": fs["torch_threads"],
            "cpu_count": os.cpu_count(),
            "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
            "reference": REFERENCE,
            "timing": "ms per query = store reads + score() over the top-K; query local-feature "
            "extraction reported separately (query_extract_ms_median)",
        },
        "rerankers": results,
    }
    write_json_atomic(args.out, report)
    print(format_table(report))
    print(f"wrote {args.out}")
    return 0


def add_ratios(results: dict, top_k: list[int]) -> None:
    """Speed-up and R@1 difference of every re-ranker against the reference in this run; the
    goal flag says whether a learned (non-RANSAC) re-ranker is >= 30x faster at >= R@1."""
    ref = results.get(REFERENCE)
    if not ref or ref.get("status") != "ok":
        return
    for name, r in results.items():
        if r.get("status") != "ok":
            continue
        for k, row in r["per_k"].items():
            base = ref["per_k"].get(k)
            if not base:
                continue
            speedup = base["ms_per_query_median"] / max(row["ms_per_query_median"], 1e-6)
            d_r1 = row["recall_after"]["1"] - base["recall_after"]["1"]
            row["vs_ransac"] = {"speedup_median": round(speedup, 2), "delta_r1": round(d_r1, 4)}
            if not name.startswith("ransac-"):
                row["vs_ransac"]["goal_30x_at_equal_r1"] = bool(speedup >= 30 and d_r1 >= 0)


def format_table(report: dict) -> str:
    fs = report["first_stage"]["recall"]
    lines = [
        f"{report['dataset']['database']} -> {report['dataset']['queries']} ({report['dataset']['rule']}, "
        f"{report['dataset']['num_queries']} queries); first stage {report['first_stage']['model']['name']}: "
        f"R@1 {fs['1']:.3f}" + (f" R@5 {fs['5']:.3f}" if "5" in fs else "")
    ]
    hdr = f"{'re-ranker':28s} {'K':>4s} {'R@1':>6s} {'R@5':>6s} {'ms med':>9s} {'ms p90':>9s} {'q-ext ms':>9s} {'B/img':>9s} {'peak MB':>8s} {'x RANSAC':>9s} {'dR@1':>7s}"
    lines += [hdr, "-" * len(hdr)]
    for name, r in report["rerankers"].items():
        if r.get("status") != "ok":
            lines.append(f"{name:28s} {r['status']}: {r.get('reason', '')}")
            continue
        for k, row in r["per_k"].items():
            ra = row["recall_after"]
            vs = row.get("vs_ransac", {})
            qx = r.get("query_extract_ms_median")
            qx_s = f"{qx:.0f}" if qx is not None else "-"
            sp_s = f"{vs['speedup_median']:.1f}" if vs else "-"
            dr_s = f"{vs['delta_r1']:+.3f}" if vs else "-"
            lines.append(
                f"{name:28s} {row['top_k']:>4d} {ra['1']:>6.3f} {ra.get('5', float('nan')):>6.3f} "
                f"{row['ms_per_query_median']:>9.1f} {row['ms_per_query_p90']:>9.1f} "
                f"{qx_s:>9s} {r['bytes_per_image']:>9.0f} {r['peak_memory_mb']:>8.0f} {sp_s:>9s} {dr_s:>7s}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
