"""Index kinds from 10^3 to 10^6 database images: build time, bytes per image, query time, recall,
peak RSS; plus an end-to-end ``placerank eval`` over 10^5 images (``scale_eval.py``).

    python benchmarks/scale.py prepare                 # real descriptors, distractors, databases
    python benchmarks/scale.py grid [--sizes 1000 ...] [--specs flat ...]   # one subprocess per cell
    python benchmarks/scale.py eval [--images 100000]  # end-to-end placerank eval
    python benchmarks/scale.py plot                    # scale.png + the table from scale.json

Data (``scale_data.py``): real ``effnet-lite0-gem`` descriptors of every real shared image
(+ flips), the rest distractors drawn from a Gaussian mixture fitted to them. Queries: the 280
real GardensPoint queries (``night_right`` and ``day_right``), positives the ``day_left`` frames
within 2 (in every database). R@N is on those real positives; "vs flat" is the share of queries
whose exact (flat) nearest neighbour the index returns at rank 1 / in the top 5.

Every (size, kind) cell runs in its own process (``cell``) so ``ru_maxrss`` is that index's
peak: the descriptors are streamed from the ``.npy`` file in 65 536-row chunks
(:class:`NpyRows`, no memory map, so file pages do not count as the index's memory), then the
index is built with :func:`placerank.index.factory.build_index`. Query time: each of the first
:data:`TIMED` queries searched alone (k = 20), p50 / p95 in ms. Threads: OMP_NUM_THREADS=1 (the
2 cores were shared with other work at load ~12: 2 OpenMP threads spin against it and single
queries ran ~10-300x slower, measured at 10^3).
Results are merged into ``benchmarks/results/scale.json`` cell by cell (a rerun of one cell
replaces only it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_data import SCRATCH, Distractors, NpyRows, RealSet, distribution_check, extract_real, write_database

RESULTS = Path(__file__).resolve().parent / "results"
JSON = RESULTS / "scale.json"
SIZES = (1_000, 10_000, 100_000, 1_000_000)
TIMED = 50  # queries timed one at a time (at least 10, fewer than 50 once a minute is spent)
K = 20
RESCORE = 100  # PQ kinds: the top-100 re-scored exactly from the memory-mapped descriptors on disk
KMEANS_NITER = 10  # FAISS's default is 25; 10 keeps each cell within the shared CPU budget (module doc)
OPQ_NITER = 20  # FAISS's default is 50
TRAIN_MAX = 20_000  # training rows at most (~20 per list at 10^6; FAISS asks for 39, and warns)


def _fewer_iterations() -> None:
    """k-means (IVF lists) with :data:`KMEANS_NITER` iterations and OPQ with :data:`OPQ_NITER`:
    this benchmark's budget is minutes on 2 shared cores. Fewer iterations give slightly worse
    centroids, so the recall measured is if anything a little low."""
    import faiss

    import placerank.index.spec as spec_module

    make = spec_module.make_index

    def make_index(dimension: int, spec: str):
        index = make(dimension, spec)
        with contextlib.suppress(RuntimeError):  # RuntimeError: not an IVF index
            faiss.extract_index_ivf(index).cp.niter = KMEANS_NITER
        if isinstance(index, faiss.IndexPreTransform):
            for i in range(index.chain.size()):
                opq = faiss.downcast_VectorTransform(index.chain.at(i))
                if isinstance(opq, faiss.OPQMatrix):
                    opq.niter = OPQ_NITER
        return index

    spec_module.make_index = make_index


def nlist_for(n: int) -> int:
    """IVF lists: ~sqrt(N) (4 sqrt(N) below 10^5) as a power of two, >= 39 training points per
    list: 16, 256, 256, 1024 lists at 10^3..10^6 (4096 at 10^6 would need a 160 000-row k-means:
    too slow for this benchmark's CPU budget)."""
    target = 4 * np.sqrt(n) if n < 100_000 else np.sqrt(n)
    nlist = int(2 ** round(np.log2(target)))
    while nlist > 16 and 39 * nlist > n:
        nlist //= 2
    return nlist


def specs_for(n: int) -> list[tuple[str, dict]]:
    """The index kinds measured at size ``n`` (IVF lists scaled to the size). No OPQ: with FAISS
    1.15 here, OPQ64 training on 1280-d descriptors crashed the process (segmentation fault) on
    1 000 rows and took over 5 minutes for 2 iterations on 10 000 rows."""
    nl = nlist_for(n)
    probe = {"nprobe": "16"}  # fixed: with nlist ~ sqrt(N) a query scans ~ sqrt(N) rows
    hnsw = {**probe, "quantizer_efSearch": "64"}
    if n >= 1_000_000:  # an HNSW coarse quantizer: assigning 10^6 rows to 1024 lists by brute force is minutes
        return [  # in order of priority: the CPU budget here may stop the grid after the first ones
            ("flat", {}),
            (f"IVF{nl}_HNSW32,PQ64", hnsw),
            (f"IVF{nl}_HNSW32,PQ256", hnsw),
            ("flat-fp16", {}),
            (f"IVF{nl}_HNSW32,Flat", hnsw),
        ]
    return [
        ("flat", {}),
        ("flat-fp16", {}),
        (f"IVF{nl},Flat", probe),
        (f"IVF{nl},PQ64", probe),
        (f"IVF{nl},PQ256", probe),
        (f"IVF{nl}_HNSW32,PQ64", hnsw),
        ("HNSW32", {"efSearch": "64"}),
    ]


def database_path(n: int) -> Path:
    return SCRATCH / f"db_{n}.npy"


def prepare(sizes=SIZES) -> None:
    real = RealSet(extract_real())
    dist = Distractors(real.database)
    np.savez(SCRATCH / "queries.npz", queries=real.queries, num_real=real.num_real)
    with open(SCRATCH / "positives.json", "w") as f:
        json.dump([p.tolist() for p in real.positives], f)
    for n in sizes:
        t = time.perf_counter()
        write_database(database_path(n), real.database, dist, n)
        print(
            f"database {n}: {min(n, real.num_real)} real + {max(0, n - real.num_real)} drawn ({time.perf_counter() - t:.0f} s)"
        )
    check = distribution_check(real, dist)
    merge({"data": {"num_real_database": real.num_real, "num_queries": len(real.queries), **check}})


def merge(update: dict, cell: str | None = None) -> None:
    RESULTS.mkdir(exist_ok=True)
    data = json.loads(JSON.read_text()) if JSON.exists() else {}
    if cell is None:
        data.update(update)
    else:
        data.setdefault("cells", {})[cell] = update
    tmp = JSON.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, JSON)


def recall(ids: np.ndarray, positives: list[list[int]], ns=(1, 5, 10)) -> dict:
    return {
        str(n): round(100 * float(np.mean([np.isin(ids[i, :n], p).any() for i, p in enumerate(positives)])), 2)
        for n in ns
    }


def cell(n: int, spec: str, options: dict) -> dict:
    """One (size, kind) measurement, in this process (``grid`` starts one process per cell)."""
    from placerank.index.factory import build_index

    _fewer_iterations()
    data = np.load(SCRATCH / "queries.npz")
    queries = data["queries"]
    positives = json.loads((SCRATCH / "positives.json").read_text())
    rows = NpyRows(database_path(n))
    nl = nlist_for(n)
    train = min(n, max(min(39 * nl, TRAIN_MAX), 10_000)) if ("IVF" in spec or "PQ" in spec) else None
    t = time.perf_counter()
    index = build_index(rows, spec, options=options, train_size=train)
    build_s = time.perf_counter() - t
    _, deep = index.search(queries, RESCORE if "PQ" in spec else K)
    ids = deep[:, :K]
    times: list[float] = []
    for i in range(min(TIMED, len(queries))):
        if i >= 10 and sum(times) > 60_000:  # flat at 10^6: 10 queries when a minute is spent
            break
        t = time.perf_counter()
        index.search(queries[i : i + 1], K)
        times.append(1000 * (time.perf_counter() - t))
    flat_file = SCRATCH / f"flat_top_{n}.npy"
    if spec == "flat":
        np.save(flat_file, ids)
    vs_flat = {}
    if flat_file.exists():
        exact = np.load(flat_file)[:, 0]
        vs_flat = {
            "1": round(100 * float(np.mean(ids[:, 0] == exact)), 2),
            "5": round(100 * float(np.mean([exact[i] in ids[i, :5] for i in range(len(ids))])), 2),
        }
    desc = index.describe()
    extra = {}
    if "PQ" in spec:  # exact inner products of the top RESCORE, read from the on-disk descriptors
        disk = np.load(database_path(n), mmap_mode="r")
        exact = np.stack([disk[np.sort(row)] @ q for row, q in zip(deep, queries)])
        order = np.argsort(-exact, axis=1, kind="stable")
        rescored = np.take_along_axis(np.sort(deep, axis=1), order, axis=1)
        extra = {"recall_rescored_top100": recall(rescored, positives)}
    return {
        "size": n,
        "spec": spec,
        "options": index.options,
        "train_size": desc["train_size"],
        "build_s": round(build_s, 2),
        "bytes": desc["bytes"],
        "bytes_per_image": desc["bytes_per_image"],
        "compression": round(n * queries.shape[1] * 4 / max(desc["bytes"], 1), 1),
        "query_ms_p50": round(float(np.percentile(times, 50)), 3),
        "query_ms_p95": round(float(np.percentile(times, 95)), 3),
        "timed_queries": len(times),
        "recall": recall(ids, positives),
        "vs_flat": vs_flat,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        **extra,
    }


def grid(sizes, only: list[str] | None, timeout: float) -> None:
    """Every cell in its own process, flat first (the others are compared with it)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for n in sizes:
        for spec, options in specs_for(n):
            if only and not any(spec.startswith(o) for o in only):
                continue
            argv = [sys.executable, __file__, "cell", str(n), spec, json.dumps(options)]
            t = time.perf_counter()
            try:
                done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
            except subprocess.TimeoutExpired:
                print(f"{n:>8} {spec:<32} skipped: over {timeout:.0f} s", flush=True)
                merge({"size": n, "spec": spec, "skipped": f"build + search over {timeout:.0f} s"}, f"{n}|{spec}")
                continue
            if done.returncode != 0:
                print(f"{n:>8} {spec:<32} failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            res = json.loads(done.stdout.strip().splitlines()[-1])
            merge(res, f"{n}|{spec}")
            print(f"{n:>8} {spec:<32} {time.perf_counter() - t:6.0f} s  {row(res)}", flush=True)


def row(r: dict) -> str:
    if "skipped" in r:
        return f"{r['size']:>9,} {r['spec']:<30} skipped ({r['skipped']})"
    return (
        f"{r['size']:>9,} {r['spec']:<30} {r['build_s']:>8.1f} {r['bytes_per_image']:>8.0f} {r['compression']:>6.1f}x"
        f" {r['query_ms_p50']:>8.2f} {r['query_ms_p95']:>8.2f} {r['recall']['1']:>6.1f} {r['recall']['5']:>6.1f}"
        f" {r['vs_flat'].get('1', float('nan')):>6.1f} {r['vs_flat'].get('5', float('nan')):>6.1f} {r['peak_rss_mb']:>8.0f}"
    )


HEADER = (
    f"{'images':>9} {'index':<30} {'build s':>8} {'B/image':>8} {'compr':>7} {'p50 ms':>8} {'p95 ms':>8}"
    f" {'R@1':>6} {'R@5':>6} {'=flat1':>6} {'=flat5':>6} {'RSS MB':>8}"
)


def table(data: dict) -> str:
    cells = sorted(data.get("cells", {}).values(), key=lambda r: (r["size"], r["spec"] != "flat", r["spec"]))
    return "\n".join([HEADER] + [row(r) for r in cells])


def markdown(data: dict) -> str:
    """The table for docs/scaling.md."""
    lines = [
        "| images | index | build s | bytes/image | compression | query ms p50 / p95 | R@1 | R@5 | = flat @1 / @5 | peak RSS MB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cells = sorted(data.get("cells", {}).values(), key=lambda r: (r["size"], r["spec"] != "flat", r["spec"]))
    for r in cells:
        if "skipped" in r:
            lines.append(f"| {r['size']:,} | `{r['spec']}` | skipped: {r['skipped']} | | | | | | | |")
            continue
        vs = r["vs_flat"]
        if "recall_rescored_top100" in r:  # R@1 / R@5 with the top-100 re-scored from disk
            rs = r["recall_rescored_top100"]
            r = {**r, "recall": {k: f"{r['recall'][k]:.1f} ({rs[k]:.1f})" for k in ("1", "5")}}
        else:
            r = {**r, "recall": {k: f"{r['recall'][k]:.1f}" for k in ("1", "5")}}
        lines.append(
            f"| {r['size']:,} | `{r['spec']}` | {r['build_s']:.1f} | {r['bytes_per_image']:,.0f} | {r['compression']:.1f}x"
            f" | {r['query_ms_p50']:.2f} / {r['query_ms_p95']:.1f} | {r['recall']['1']} | {r['recall']['5']}"
            f" | {vs.get('1', float('nan')):.1f} / {vs.get('5', float('nan')):.1f} | {r['peak_rss_mb']:,.0f} |"
        )
    return "\n".join(lines)


def kind_of(spec: str) -> str:
    """A short label: flat, flat-fp16, HNSW32, IVF-Flat, IVF-PQ64, IVF-HNSW-PQ256, ..."""
    if not spec.startswith("IVF"):
        return spec
    coarse, _, fine = spec.partition(",")
    return ("IVF-HNSW-" if "_HNSW" in coarse else "IVF-") + fine


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    cells = [r for r in data.get("cells", {}).values() if "skipped" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.8))
    sizes = sorted({r["size"] for r in cells})
    markers = dict(zip(sizes, "os^D"))
    kinds = sorted({kind_of(r["spec"]) for r in cells})
    colors = dict(zip(kinds, plt.get_cmap("tab10").colors))
    for ax, key in zip(axes, ("bytes_per_image", "query_ms_p50")):
        for kind in kinds:  # one thin line per kind through its sizes
            mine = sorted((r for r in cells if kind_of(r["spec"]) == kind), key=lambda r: r["size"])
            ax.plot([r[key] for r in mine], [r["recall"]["1"] for r in mine], color=colors[kind], lw=0.8, alpha=0.5)
            for r in mine:
                ax.scatter(
                    r[key], r["recall"]["1"], color=colors[kind], marker=markers[r["size"]], s=60,
                    edgecolor="black", linewidth=0.5, zorder=3,
                )  # fmt: skip
                if "recall_rescored_top100" in r and key == "bytes_per_image":  # hollow: top-100 re-scored
                    ax.scatter(
                        r[key], r["recall_rescored_top100"]["1"], facecolors="none", edgecolors=colors[kind],
                        marker=markers[r["size"]], s=60, linewidth=1.2, zorder=3,
                    )  # fmt: skip
        ax.set_xscale("log")
        ax.set_ylabel("R@1, 280 real GardensPoint queries (%)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_xlabel("bytes per database image (log)")
    axes[1].set_xlabel("query time p50, ms, one query at a time, 1 thread (log)")
    axes[0].set_title("recall vs memory")
    axes[1].set_title("recall vs query time (2 shared, busy cores: p50 is noisy)")
    handles = [Line2D([], [], color=colors[k], marker="o", linestyle="-", label=k) for k in kinds]
    handles += [Line2D([], [], color="gray", marker=markers[s], linestyle="", label=f"{s:,} images") for s in sizes]
    handles.append(
        Line2D(
            [],
            [],
            color="gray",
            marker="o",
            markerfacecolor="none",
            linestyle="",
            label="PQ, top-100 re-scored from disk",
        )
    )
    fig.legend(handles=handles, loc="lower center", ncol=7, fontsize=9, frameon=False)
    fig.suptitle("placerank index kinds: effnet-lite0-gem 1280-d, real descriptors + drawn distractors")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    pg = sub.add_parser("grid")
    pg.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    pg.add_argument("--specs", nargs="+", default=None, help="spec prefixes to run (default: all)")
    pg.add_argument("--timeout", type=float, default=840)
    pc = sub.add_parser("cell")
    pc.add_argument("size", type=int)
    pc.add_argument("spec")
    pc.add_argument("options")
    pe = sub.add_parser("eval")
    pe.add_argument("--images", type=int, default=100_000)
    pe.add_argument("--workers", type=int, default=1)
    sub.add_parser("plot")
    sub.add_parser("markdown")
    args = p.parse_args()
    if args.cmd == "prepare":
        prepare(args.sizes)
    elif args.cmd == "cell":
        print(json.dumps(cell(args.size, args.spec, json.loads(args.options))))
    elif args.cmd == "grid":
        grid(args.sizes, args.specs, args.timeout)
    elif args.cmd == "markdown":
        print(markdown(json.loads(JSON.read_text())))
    elif args.cmd == "eval":
        from scale_eval import run_eval

        merge({"eval": run_eval(args.images, workers=args.workers)})
    if args.cmd in ("grid", "plot", "eval"):
        data = json.loads(JSON.read_text())
        plot(data, RESULTS / "scale.png")
        print(table(data))
        if "eval" in data:
            print("eval:", json.dumps(data["eval"]))


if __name__ == "__main__":
    main()
