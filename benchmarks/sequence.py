"""Sequence matching (``--sequence-length L``): Recall@1 and cost against L, K and database size.

    python benchmarks/sequence.py            # Nordland 2,800 x 2,800 + GardensPoint 140 x 140
    python benchmarks/sequence.py --quick    # CI smoke: Nordland frames 2000-2299, L in 1, 5, 10

Model: the default ``effnet-lite0-gem`` (ImageNet weights, never trained on these places); input
64x128 for the 64x32 Nordland thumbnails (the native 640x360 upsamples them 10x for no gain, and
costs 28x more), 640x360 for GardensPoint. Descriptors come through the placerank descriptor
cache (a rerun extracts nothing). First stage: FAISS flat inner product, top-400 per frame, once.

1. R@1 / R@5 against L (1 = single frame) with K = 100 candidates per frame, velocities
   0.8..1.2 (the defaults): Nordland winter -> summer, strict (j == i) and lenient (|i-j| <= 1);
   GardensPoint day_left -> night_right, |i-j| <= 2 (its standard) and strict.
2. K (candidates per frame) at L = 10 and 20 on Nordland: R@1 and ms per query.
3. Variants at L = 10 / 20 on Nordland: one velocity (1.0) and per-frame z-score normalisation;
   the whole L sweep again with one velocity (``--sequence-velocity 1``: the traversals are
   frame-aligned).
   And, as separate curves, the same L sweep on *per-traversal centred* descriptors (each side's
   mean descriptor subtracted, then L2-normalised again; Schubert et al., ICRA 2020, standardise
   each traversal the same way): not part of ``--sequence-length``, measured here to show what a
   condition-robust first stage adds.
4. Cost against database size: the Nordland database plus distractor traversals (copies of its
   descriptors with Gaussian noise, each its own sequence) up to 16x: FAISS flat search ms and
   sequence ms per query at L = 10 (the sequence step reads only the top-K, so it should not grow).

Times are wall-clock on this machine, single-threaded (OMP_NUM_THREADS=1), and include the load
of whatever else runs; the numbers to compare are within one run. Writes
``benchmarks/results/sequence.json`` and ``sequence.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PLACERANK_SHARED", REPO.parent / "shared"))
RESULTS = REPO / "benchmarks" / "results"
NORDLAND = SHARED / "data" / "nordland_seqslam_64x32"
GARDENS = SHARED / "data" / "gardenspoint_walking"


def describe(folder: Path, image_size, frames=None) -> np.ndarray:
    import torch

    from placerank.data.readers import list_images
    from placerank.descriptors.extract import extract_features
    from placerank.models import create

    model = create("effnet-lite0-gem", image_size=image_size).eval()
    paths = list_images(folder, recursive=False)
    paths = paths if frames is None else [paths[i] for i in frames]
    desc, _ = extract_features(model, paths, torch.device("cpu"), 32, 0, use_cache=True, desc=folder.name)
    return desc


def centred(desc: np.ndarray) -> np.ndarray:
    """A traversal's descriptors minus their mean, L2-normalised again."""
    out = desc - desc.mean(axis=0, keepdims=True)
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def one_traversal(n: int):
    from placerank.data.sequences import FrameOrder

    return FrameOrder.from_keys(np.arange(n), [0] * n, "frame index")


def recall(ids: np.ndarray, tol: int, n: int = 1) -> float:
    truth = np.arange(len(ids))[:, None]
    return round(float((np.abs(ids[:, :n] - truth) <= tol).any(axis=1).mean()), 4)


def run(ids, sims, length, k=100, db_order=None, **options) -> tuple[np.ndarray, float]:
    from placerank.rerank.sequence import SequenceOptions, sequence_match

    opts = SequenceOptions(length=length, candidates=k, **options)
    db_order = db_order or one_traversal(int(ids.max()) + 1)
    t0 = time.perf_counter()
    m = sequence_match(ids[:, :k], sims[:, :k], one_traversal(len(ids)), db_order, opts, 10, progress=False)
    return m.ids, 1000 * (time.perf_counter() - t0) / len(ids)


def search(db: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    import faiss

    index = faiss.IndexFlatIP(db.shape[1])
    index.add(db)
    t0 = time.perf_counter()
    sims, ids = index.search(q, min(k, len(db)))
    return sims, ids, 1000 * (time.perf_counter() - t0) / len(q)


def sweep_length(name, ids, sims, lengths, tolerances, **options) -> list[dict]:
    rows = []
    for length in lengths:
        top, ms = run(ids, sims, length, **options)
        row = {"length": length, "ms_per_query": round(ms, 3)}
        for label, tol in tolerances.items():
            row[f"R@1 {label}"] = recall(top, tol)
            row[f"R@5 {label}"] = recall(top, tol, 5)
        rows.append(row)
        print(name, row, flush=True)
    return rows


def database_sizes(db, q, factors, length=10, k=100) -> list[dict]:
    from placerank.data.sequences import FrameOrder

    rng = np.random.default_rng(0)
    rows = []
    for factor in factors:
        copies = [db]
        for _ in range(factor - 1):
            noisy = db + rng.normal(0, 0.02, size=db.shape).astype(np.float32)
            copies.append(noisy / np.linalg.norm(noisy, axis=1, keepdims=True))
        big = np.concatenate(copies)
        sims, ids, search_ms = search(big, q, k)
        order = FrameOrder.from_keys(np.arange(len(big)), np.arange(len(big)) // len(db), "copies")
        top, ms = run(ids, sims, length, k, db_order=order)
        row = {
            "database": len(big),
            "search_ms_per_query": round(search_ms, 3),
            "sequence_ms_per_query": round(ms, 3),
            "R@1 strict": recall(np.where(top < len(db), top, -(10**9)), 0),
        }
        rows.append(row)
        print("size", row, flush=True)
        del big, copies
    return rows


def short(name: str) -> str:
    """``Nordland winter->summer (2,800 x 2,800), centred`` -> ``Nordland, centred``."""
    head, _, rest = name.partition(" (")
    return head.split()[0] + rest.partition(")")[2]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for name, rows in result["recall_vs_length"].items():
        lengths = [r["length"] for r in rows]
        for key in [k for k in rows[0] if k.startswith("R@1")][:1]:  # strict (Nordland), |i-j|<=2 (GP)
            axes[0].plot(lengths, [r[key] for r in rows], marker="o", label=f"{short(name)} {key}")
        axes[1].plot(lengths, [r["ms_per_query"] for r in rows], marker="o", label=short(name))
    axes[0].axhline(0.30, color="grey", ls=":", lw=1, label="issue goal, Nordland 0.30")
    axes[0].set(
        xlabel="sequence length L (frames)", ylabel="Recall@1", title="R@1 vs L (K=100; v 0.8..1.2 unless named)"
    )
    axes[0].legend(fontsize=7, loc="upper right")
    axes[1].set(xlabel="sequence length L", ylabel="ms per query", title="sequence step cost vs L (K=100)")
    axes[1].legend(fontsize=8)
    sizes = result.get("cost_vs_database", [])
    if sizes:
        n = [r["database"] for r in sizes]
        axes[2].plot(n, [r["search_ms_per_query"] for r in sizes], marker="o", label="FAISS flat search (top-100)")
        axes[2].plot(n, [r["sequence_ms_per_query"] for r in sizes], marker="o", label="sequence step (L=10)")
        axes[2].set_xscale("log")
        axes[2].set_xticks(n, [f"{v:,}" for v in n])
        axes[2].minorticks_off()
        axes[2].legend(fontsize=8)
    axes[2].set(xlabel="database images", ylabel="ms per query", title="cost vs database size (Nordland + copies)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"sequence matching, {result['model']} (not trained on these places); {result['note']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def main() -> None:
    from placerank.utils import atomic_path, write_json_atomic

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="300 Nordland frames, L in 1, 5, 10 (CI smoke)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--plot-only", action="store_true", help="redraw sequence.png from sequence.json")
    args = ap.parse_args()
    if args.plot_only:
        with atomic_path(args.out / "sequence.png") as tmp:
            plot(json.loads((args.out / "sequence.json").read_text()), tmp)
        return
    frames = range(2000, 2300) if args.quick else None
    lengths = [1, 5, 10] if args.quick else [1, 2, 3, 5, 8, 10, 15, 20, 30, 40]
    t_start = time.perf_counter()
    nl_db = describe(NORDLAND / "database_summer", (64, 128), frames)
    nl_q = describe(NORDLAND / "queries_winter", (64, 128), frames)
    sims, ids, _ = search(nl_db, nl_q, 400)
    result: dict = {
        "model": "effnet-lite0-gem",
        "note": "times single-threaded on a shared 2-core CPU",
        "algorithm": "placerank.rerank.sequence.sequence_match (top-K votes, docs/sequence.md)",
        "recall_vs_length": {},
    }
    nordland = "Nordland winter->summer" + (" (frames 2000-2299)" if args.quick else " (2,800 x 2,800)")
    tol_nl = {"strict": 0, "lenient |i-j|<=1": 1}
    result["recall_vs_length"][nordland] = sweep_length(nordland, ids, sims, lengths, tol_nl)
    if not args.quick:
        result["candidates_per_frame"] = []
        for length in (10, 20):
            for k in (25, 50, 100, 200, 400):
                top, ms = run(ids, sims, length, k)
                row = {"length": length, "K": k, "R@1 strict": recall(top, 0), "ms_per_query": round(ms, 3)}
                result["candidates_per_frame"].append(row)
                print("K", row, flush=True)
        result["variants"] = []
        for length in (10, 20):
            for label, opts in (
                ("default (v 0.8..1.2, no normalisation)", {}),
                ("one velocity 1.0", {"v_min": 1.0, "v_max": 1.0}),
                ("z-score per frame", {"normalize": "zscore"}),
            ):
                top, ms = run(ids, sims, length, **opts)
                row = {"length": length, "variant": label, "R@1 strict": recall(top, 0), "ms_per_query": round(ms, 3)}
                result["variants"].append(row)
                print("variant", row, flush=True)
        result["recall_vs_length"][nordland + ", velocity 1.0"] = sweep_length(
            nordland + ", velocity 1.0", ids, sims, lengths, tol_nl, v_min=1.0, v_max=1.0
        )
        c_sims, c_ids, _ = search(centred(nl_db), centred(nl_q), 100)
        result["recall_vs_length"][nordland + ", centred"] = sweep_length(
            nordland + ", centred", c_ids, c_sims, lengths, tol_nl
        )
        result["cost_vs_database"] = database_sizes(nl_db, nl_q, (1, 4, 16))
        gp_db = describe(GARDENS / "day_left", None)
        gp_q = describe(GARDENS / "night_right", None)
        g_sims, g_ids, _ = search(gp_db, gp_q, 100)
        gardens = "GardensPoint day_left->night_right (140 x 140, 640x360)"
        gp_lengths = [r for r in lengths if r <= 20]
        tol_gp = {"|i-j|<=2": 2, "strict": 0}
        result["recall_vs_length"][gardens] = sweep_length(gardens, g_ids, g_sims, gp_lengths, tol_gp)
        g_sims, g_ids, _ = search(centred(gp_db), centred(gp_q), 100)
        result["recall_vs_length"][gardens + ", centred"] = sweep_length(
            gardens + ", centred", g_ids, g_sims, gp_lengths, tol_gp
        )
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "sequence_quick" if args.quick else "sequence"
    write_json_atomic(args.out / f"{name}.json", result)
    with atomic_path(args.out / f"{name}.png") as tmp:
        plot(result, tmp)
    print(f"wrote {args.out / (name + '.json')} and {name}.png")


if __name__ == "__main__":
    main()
