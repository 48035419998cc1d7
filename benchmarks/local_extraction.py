"""Local-feature networks at the hardware's speed: XFeat, ALIKED-n16, DISK side by side in the
ways they can run, against the eager fp32 forward they ran in before issue 19.

    python benchmarks/local_extraction.py                        # XFeat + ALIKED, 48 queries
    python benchmarks/local_extraction.py --features xfeat aliked disk --queries 40
    python benchmarks/local_extraction.py --quick                # smoke: XFeat, 6 queries, 1 round

Variants per network: ``eager`` (fp32, contiguous weights and input, ``no_grad``: the code as it
was), ``channels_last`` (fp32, channels_last weights and input, ``inference_mode``: the default
now), ``bf16`` (channels_last + bfloat16 autocast of the dense CNN), and for XFeat (``--compile``)
``compile`` / ``compile_bf16`` (``torch.compile`` of the CNN's forward; the compile time is the
first call's excess over a warm call).

1. Speed: ms per image *including decode* (JPEG -> resized tensor -> features in original
   pixels, one image at a time, what a live query costs), on ``--timing-images`` day_right
   frames; the variants alternate within each of ``--rounds`` rounds, since the 2-core machine is
   shared and noisy, and the ratios against ``eager`` are taken per round (median reported).
2. Agreement with eager fp32 on those frames: the fraction of eager keypoints with a keypoint of
   the variant within 1 px (network-input pixels), the fraction within 1e-3 px ("identical"; ALIKED
   refines keypoints to sub-pixel positions, so equal positions differ by float noise), and for
   the pairs within 1e-3 px the largest descriptor difference and the smallest cosine.
3. Re-ranked R@1 on GardensPoint ``day_right`` -> ``night_right`` (|i-j| <= 2): the top-20
   candidates of the untrained ``effnet-lite0-gem`` (ImageNet weights) for ``--queries`` evenly
   spaced night queries, re-ranked by MNN + MAGSAC on the variant's features (the
   ``ransac-<features>`` scoring). One query is 100/Q points, the resolution of every R@1 here.

Output: a table and ``benchmarks/results/local_extraction.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("PLACERANK_SHARED", REPO.parent / "shared"))
GARDENS = SHARED / "data" / "gardenspoint_walking"
PRECISION = {"eager": "fp32", "channels_last": "fp32", "compile": "fp32", "bf16": "bf16", "compile_bf16": "bf16"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--features", nargs="+", default=["xfeat", "aliked"], choices=["xfeat", "aliked", "disk"])
    p.add_argument("--queries", type=int, default=48, help="evenly spaced night_right queries for R@1")
    p.add_argument(
        "--query-frames",
        type=int,
        nargs=2,
        default=None,
        metavar=("START", "STOP"),
        help="queries with frame in [START, STOP) instead of evenly spaced ones (100 140: the held-out, "
        "hardest frames of docs/ransac.md, where RANSAC-XFeat R@1 is below 1)",
    )
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--timing-images", type=int, default=8, help="day_right frames timed per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-size", type=int, nargs=2, default=[360, 640], metavar=("H", "W"))
    p.add_argument("--max-keypoints", type=int, default=2048)
    p.add_argument("--compile", nargs="*", default=["xfeat"], help="networks that also get the compile variants")
    p.add_argument(
        "--no-recall",
        nargs="*",
        default=["eager", "compile", "compile_bf16"],
        help="variants whose R@1 is not measured (default: the fp32 ones whose features agree with "
        "channels_last to float noise, and compile_bf16; the re-ranking pass is most of the run time)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="XFeat, 6 queries, 2 timing images, 1 round, no compile")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "local_extraction.json"))
    p.add_argument(
        "--update",
        action="store_true",
        help="keep the other networks already in --out (each network records its own run settings)",
    )
    p.add_argument("--tag", default="", help="suffix of the networks' keys in the report, e.g. '@1thread'")
    args = p.parse_args(argv)
    if args.quick:
        args.features, args.queries, args.timing_images, args.rounds, args.compile = ["xfeat"], 6, 2, 1, []
    return args


# -- first stage --------------------------------------------------------------------------------
def first_stage(args) -> dict:
    """Top-K candidates of the untrained effnet-lite0-gem for evenly spaced night queries."""
    from placerank.data.dataset import Dataset
    from placerank.data.readers import load_dataset
    from placerank.descriptors.extract import extract_global
    from placerank.eval.recall import recall_at_n
    from placerank.index.flat import FlatIndex
    from placerank.models import create

    ds = load_dataset(GARDENS / "day_right", GARDENS / "night_right", frame_tolerance=2)
    if args.query_frames:
        start, stop = args.query_frames
        sel = np.flatnonzero((ds.queries.positions >= start) & (ds.queries.positions < stop))
    else:
        sel = np.unique(np.linspace(0, len(ds.queries) - 1, args.queries).round().astype(int))
    ds = Dataset(ds.database, ds.queries.subset(sel), ds.rule, name=ds.name)
    model = create("effnet-lite0-gem").eval()
    device = torch.device("cpu")
    db = extract_global(model, ds.database.paths, device, desc="database", progress=False)
    q = extract_global(model, ds.queries.paths, device, desc="queries", progress=False)
    _, ids = FlatIndex.build(db, model.name, model.weights_id).search(q, args.top_k)
    return {
        "ids": ids,
        "positives": ds.positives,
        "db_paths": [str(p) for p in ds.database.paths],
        "q_paths": [str(p) for p in ds.queries.paths],
        "recall_first_stage": recall_at_n(ids, ds.positives, [1, 5]),
        "rule": ds.rule.describe(),
    }


# -- variants -------------------------------------------------------------------------------------
def _eager_extract(net):
    """The extraction as it was before issue 19: contiguous float32 input, ``no_grad``."""

    def extract(images: torch.Tensor):
        with torch.no_grad():
            return net.detect(images.to(torch.float32).contiguous())

    return extract


def make_variant(kind: str, variant: str, args):
    """A ``ransac-<kind>`` re-ranker whose network runs as ``variant``; (re-ranker, compile s)."""
    from placerank.rerank.base import create_reranker

    rr = create_reranker(
        f"ransac-{kind}",
        image_size=tuple(args.local_size),
        max_keypoints=args.max_keypoints,
        precision=PRECISION[variant],
    )
    if variant == "eager":
        rr.net.to(memory_format=torch.contiguous_format)
        rr.net.extract = _eager_extract(rr.net)  # instance attribute: only this object
    compile_s = None
    if variant.startswith("compile"):
        from placerank.data.images import load_tensor

        cnn = rr.net.net
        cnn.forward = torch.compile(cnn.forward, dynamic=False)
        t, orig = load_tensor(args.timing_paths[0], rr.preprocess)
        t0 = time.perf_counter()
        rr.extract(t[None], [orig])  # the first call compiles
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        rr.extract(t[None], [orig])
        compile_s = round(first - (time.perf_counter() - t0), 1)
    return rr, compile_s


def timed_pass(rr, paths: list[str]) -> tuple[float, list]:
    """ms per image (decode + features, one at a time) and the features of ``paths``."""
    from placerank.data.images import load_tensor

    feats = []
    t0 = time.perf_counter()
    for p in paths:
        t, orig = load_tensor(p, rr.preprocess)
        feats.append(rr.extract(t[None], [orig])[0])
    return 1000 * (time.perf_counter() - t0) / len(paths), feats


def agreement(ref: list, other: list, input_width: int) -> dict:
    """Keypoints of ``ref`` (eager fp32) found in ``other`` within 1 px / 1e-3 px (input pixels),
    and the descriptors of the keypoints found within 1e-3 px (else within 1 px)."""
    near, same, cos_min, diff_max = [], [], 1.0, 0.0
    for a, b in zip(ref, other):
        scale = input_width / a.image_size[1]  # original -> network-input pixels
        ka, kb = torch.as_tensor(a.keypoints) * scale, torch.as_tensor(b.keypoints) * scale
        d, j = torch.cdist(ka, kb, compute_mode="donot_use_mm_for_euclid_dist").min(1)
        near.append(float((d <= 1.0).float().mean()))
        same.append(float((d <= 1e-3).float().mean()))
        m = d <= 1e-3 if bool((d <= 1e-3).any()) else d <= 1.0
        da = torch.as_tensor(a.descriptors)[m]
        db = torch.as_tensor(b.descriptors)[j[m]]
        cos_min = min(cos_min, float((da * db).sum(-1).min()))
        diff_max = max(diff_max, float((da - db).abs().max()))
    return {
        "keypoints_within_1px": round(float(np.mean(near)), 4),
        "keypoints_within_1px_min": round(float(np.min(near)), 4),
        "keypoints_identical": round(float(np.mean(same)), 4),
        "descriptor_min_cosine": round(cos_min, 6),
        "descriptor_max_diff": float(f"{diff_max:.3g}"),
    }


def rerank_recall(rr, fs: dict) -> dict:
    """Re-ranked R@1/5 over the first-stage top-K, and the inlier counts of the top candidate."""
    from placerank.eval.recall import recall_at_n
    from placerank.rerank.topk import rerank_topk

    ids = fs["ids"]
    needed = np.unique(ids)
    _, db = timed_pass(rr, [fs["db_paths"][j] for j in needed])
    db_feats = dict(zip(needed.tolist(), db))
    q_ms, q_feats = timed_pass(rr, fs["q_paths"])
    out = rerank_topk(rr, ids, ids.shape[1], lambda q: q_feats[q], lambda j: db_feats[int(j)], progress=False)
    top = np.nan_to_num(out.scores[:, 0])
    return {
        "recall_after": recall_at_n(out.ids, fs["positives"], [1, 5]),
        "top_inliers_median": float(np.median(top)),
        "new_order": out.ids,
        "query_ms_per_image": round(q_ms, 1),
    }


def bench_network(kind: str, args, fs: dict) -> dict:
    variants = ["eager", "channels_last", "bf16"]
    if kind in args.compile:
        variants += ["compile", "compile_bf16"]
    made = {v: make_variant(kind, v, args) for v in variants}
    for v in variants:  # warm-up: first-call allocations stay out of the timed rounds
        timed_pass(made[v][0], args.timing_paths[:1])
    ms: dict[str, list[float]] = {v: [] for v in variants}
    feats: dict[str, list] = {}
    for r in range(args.rounds):  # alternate the variants within every round
        for v in variants:
            t, f = timed_pass(made[v][0], args.timing_paths)
            ms[v].append(t)
            feats.setdefault(v, f)
        print(f"  {kind} round {r + 1}: " + ", ".join(f"{v} {ms[v][-1]:.0f}" for v in variants), flush=True)
    width = int(args.local_size[1])
    rows: dict[str, dict] = {}
    orders = {}
    for v in variants:
        ratio = [ms["eager"][i] / ms[v][i] for i in range(args.rounds)]
        row = {
            "precision": PRECISION[v],
            "ms_per_image_median": round(float(np.median(ms[v])), 1),
            "ms_per_image_rounds": [round(x, 1) for x in ms[v]],
            "speedup_vs_eager_median": round(float(np.median(ratio)), 3),
            "compile_s": made[v][1],
            "agreement_vs_eager": agreement(feats["eager"], feats[v], width),
        }
        if v not in args.no_recall:
            t0 = time.perf_counter()
            rec = rerank_recall(made[v][0], fs)
            orders[v] = rec.pop("new_order")
            row.update(rec, recall_s=round(time.perf_counter() - t0, 1))
            print(f"  {kind} {v}: R@1 {rec['recall_after']['1']:.4f} ({row['recall_s']} s)", flush=True)
        rows[v] = row
    for v in orders:  # how many queries' top-1 differs from fp32 channels_last (recall noise)
        rows[v]["top1_changed_vs_channels_last"] = int((orders[v][:, 0] != orders["channels_last"][:, 0]).sum())
    return {"variants": rows, "signature_fp32": made["channels_last"][0].signature()}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from placerank.utils import write_json_atomic

    day = sorted((GARDENS / "day_right").glob("*.jpg"))
    args.timing_paths = [str(day[i]) for i in np.linspace(0, len(day) - 1, args.timing_images).round().astype(int)]
    fs = first_stage(args)
    print(f"first stage: {len(fs['q_paths'])} queries, R@1 {fs['recall_first_stage']['1']:.3f}", flush=True)
    results: dict[str, dict] = {}
    if args.update and Path(args.out).exists():
        results.update(json.loads(Path(args.out).read_text()).get("networks", {}))
    for kind in args.features:
        t0 = time.perf_counter()
        res = bench_network(kind, args, fs)
        res["run"] = run_settings(args, fs)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        results[kind + args.tag] = res
        write_json_atomic(Path(args.out), make_report(args, fs, results))  # a partial run keeps its networks
    report = make_report(args, fs, results)
    print_table(results)
    write_json_atomic(Path(args.out), report)
    print(f"wrote {args.out}")
    return 0


def run_settings(args, fs: dict) -> dict:
    """The settings of one network's run (``--update`` reports may mix runs)."""
    return {
        "num_queries": len(fs["q_paths"]),
        "query_frames": list(args.query_frames) if args.query_frames else "evenly spaced",
        "recall_first_stage": fs["recall_first_stage"],
        "timing_images": args.timing_images,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
    }


def make_report(args, fs: dict, results: dict) -> dict:
    return {
        "benchmark": "local_extraction",
        "dataset": {
            "database": "gardenspoint_walking/day_right",
            "queries": "gardenspoint_walking/night_right",
            "num_queries": len(fs["q_paths"]),
            "rule": fs["rule"],
            "first_stage": "effnet-lite0-gem (ImageNet weights)",
            "recall_first_stage": fs["recall_first_stage"],
            "top_k": args.top_k,
        },
        "config": {
            "local_size": list(args.local_size),
            "max_keypoints": args.max_keypoints,
            "timing_images": args.timing_images,
            "rounds": args.rounds,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
            "quick": bool(args.quick),
        },
        "networks": results,
    }


def print_table(results: dict) -> None:
    for kind, res in results.items():
        print(f"\n{kind}: variant | ms/img | x eager | kp<=1px | kp same | min cos | max diff | R@1 | compile s")
        for v, row in res["variants"].items():
            a = row["agreement_vs_eager"]
            r1 = row.get("recall_after", {}).get("1", float("nan"))
            print(
                f"  {v:14s} {row['ms_per_image_median']:7.1f} {row['speedup_vs_eager_median']:6.2f}x "
                f"{a['keypoints_within_1px']:.4f} {a['keypoints_identical']:.4f} {a['descriptor_min_cosine']:.5f} "
                f"{a['descriptor_max_diff']:.2g} {r1:.4f} {row['compile_s']}"
            )


if __name__ == "__main__":
    raise SystemExit(main())
