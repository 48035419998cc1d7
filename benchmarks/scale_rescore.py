"""IVF-PQ with exact re-scoring (the index option ``rescore=K``) at 10^5 database images: does
IVF-PQ at >= 16x compression lose <= 1 point R@1 against flat (issue 14)?

    python benchmarks/scale_rescore.py run IVF316,PQ64 --rescore 0 100 300 1000 --nprobe 16 32
    python benchmarks/scale_rescore.py run IVF316_HNSW32,PQ64 --nprobe 16 --option quantizer_efSearch=64
    python benchmarks/scale_rescore.py table          # the rows so far (text + markdown)

Same data and protocol as ``scale.py`` (its scratch database ``db_100000.npy``, the 280 real
GardensPoint queries and positives, k-means with 10 iterations, its training-sample rule with
the spec's lists, ``TIMED`` single queries with k = 20, "vs flat" against ``flat_top_100000.npy``).
The index is built once per spec with :func:`placerank.index.factory.build_index` from the
read-only memory map of the database (what ``placerank eval`` gives it), then every
(nprobe, rescore) pair is applied with :meth:`VPRIndex.set_options` and measured. Bytes per image
are the index's in RAM (``describe()``); re-scoring reads the candidates' rows (5 120 bytes each)
from the descriptors file on disk (here in the page cache), which is not counted. Rows are merged
into ``benchmarks/results/scale.json`` under ``rescore_1e5`` keyed ``spec|nprobe|rescore``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import JSON, TIMED, TRAIN_MAX, K, _fewer_iterations, database_path, recall
from scale_data import SCRATCH

N = 100_000
KEY = "rescore_1e5"
FLAT_BYTES = 5120  # 1280 float32


def merge_rows(rows: dict) -> None:
    """Add ``rows`` under :data:`KEY` (other keys untouched), atomically, one writer at a time."""
    with open(SCRATCH / "scale_json.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(JSON.read_text())
        data.setdefault(KEY, {}).update(rows)
        tmp = JSON.with_suffix(".rescore.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, JSON)


def nlist_of(spec: str) -> int:
    coarse = spec.split(",")[0].removeprefix("IVF")
    return int(coarse.split("_")[0])


def measure(index, queries: np.ndarray, positives: list, exact_top: np.ndarray) -> dict:
    """R@N, agreement with flat and single-query times at the index's current options."""
    _, ids = index.search(queries, K)
    times: list[float] = []
    for i in range(min(TIMED, len(queries))):
        t = time.perf_counter()
        index.search(queries[i : i + 1], K)
        times.append(1000 * (time.perf_counter() - t))
    return {
        "recall": recall(ids, positives),
        "vs_flat": {
            "1": round(100 * float(np.mean(ids[:, 0] == exact_top)), 2),
            "5": round(100 * float(np.mean([exact_top[i] in ids[i, :5] for i in range(len(ids))])), 2),
        },
        "query_ms_p50": round(float(np.percentile(times, 50)), 3),
        "query_ms_p95": round(float(np.percentile(times, 95)), 3),
        "timed_queries": len(times),
    }


def run(spec: str, rescores: list[int], nprobes: list[int], extra: dict[str, str]) -> None:
    from placerank.index.factory import build_index

    _fewer_iterations()
    data = np.load(SCRATCH / "queries.npz")
    queries = data["queries"]
    positives = json.loads((SCRATCH / "positives.json").read_text())
    exact_top = np.load(SCRATCH / f"flat_top_{N}.npy")[:, 0]
    database = np.load(database_path(N), mmap_mode="r")
    train = min(N, max(min(39 * nlist_of(spec), TRAIN_MAX), 10_000))
    t = time.perf_counter()
    index = build_index(database, spec, options={**extra, "nprobe": str(nprobes[0])}, train_size=train)
    build_s = round(time.perf_counter() - t, 2)
    desc = index.describe()
    print(f"{spec}: built in {build_s} s, {desc['bytes_per_image']:.1f} B/image", flush=True)
    for nprobe in nprobes:
        for k in rescores:
            opts = {**extra, "nprobe": str(nprobe), **({"rescore": str(k)} if k else {})}
            index.schema.options.pop("rescore", None)  # set_options merges: drop the previous K
            index.set_options(opts)
            res = {
                "size": N,
                "spec": spec,
                "nprobe": nprobe,
                "rescore": k,
                "options": index.options,
                "train_size": desc["train_size"],
                "build_s": build_s,
                "bytes_per_image": desc["bytes_per_image"],
                "compression": round(FLAT_BYTES / desc["bytes_per_image"], 1),
                "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                **measure(index, queries, positives, exact_top),
            }
            merge_rows({f"{spec}|{nprobe}|{k}": res})
            print(row(res), flush=True)


def row(r: dict) -> str:
    return (
        f"{r['spec']:<20} {r['nprobe']:>6} {r['rescore']:>7} {r['bytes_per_image']:>8.1f} {r['compression']:>6.1f}x"
        f" {r['build_s']:>7.0f} {r['query_ms_p50']:>7.2f} {r['query_ms_p95']:>7.2f} {r['recall']['1']:>6.2f}"
        f" {r['recall']['5']:>6.2f} {r['vs_flat']['1']:>6.1f} {r['vs_flat']['5']:>6.1f}"
    )


HEADER = (
    f"{'index':<20} {'nprobe':>6} {'rescore':>7} {'B/image':>8} {'compr':>7} {'build s':>7} {'p50 ms':>7}"
    f" {'p95 ms':>7} {'R@1':>6} {'R@5':>6} {'=flat1':>6} {'=flat5':>6}"
)


def table() -> None:
    data = json.loads(JSON.read_text())
    flat = data["cells"][f"{N}|flat"]
    rows = sorted(data.get(KEY, {}).values(), key=lambda r: (r["spec"], r["nprobe"], r["rescore"]))
    print(f"flat: R@1 {flat['recall']['1']}, R@5 {flat['recall']['5']}, {FLAT_BYTES} B/image")
    print("\n".join([HEADER] + [row(r) for r in rows]))
    print()
    print(
        "| index | nprobe | rescore | bytes/image | compression | build s | query ms p50 / p95 | R@1 | R@5 | = flat @1 / @5 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| `{r['spec']}` | {r['nprobe']} | {r['rescore'] or '-'} | {r['bytes_per_image']:.0f} | {r['compression']:.0f}x"
            f" | {r['build_s']:.0f} | {r['query_ms_p50']:.2f} / {r['query_ms_p95']:.1f} | {r['recall']['1']:.1f}"
            f" | {r['recall']['5']:.1f} | {r['vs_flat']['1']:.1f} / {r['vs_flat']['5']:.1f} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("run")
    pr.add_argument("spec")
    pr.add_argument("--rescore", type=int, nargs="+", default=[0, 100, 300, 1000])
    pr.add_argument("--nprobe", type=int, nargs="+", default=[16, 32])
    pr.add_argument("--option", nargs="*", default=[], help="more search options, e.g. quantizer_efSearch=64")
    sub.add_parser("table")
    args = p.parse_args()
    if args.cmd == "run":
        run(args.spec, args.rescore, args.nprobe, dict(o.split("=", 1) for o in args.option))
    else:
        table()


if __name__ == "__main__":
    main()
