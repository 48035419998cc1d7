"""The local-feature store (:class:`placerank.descriptors.local_store.LocalFeatureStore`) at 10^5
images: append throughput, bytes per image on disk, membership checks, random reads of
re-ranking candidates, and peak RSS (the store is memory-mapped: reads touch only the
candidates' rows).

Each image gets ``fol-region``-sized features (225 features x 128-d, float16 on disk: ~60 KB
per image with keypoints and scores), random values (the store does not look at them), appended
500 images per transaction as extraction does. Then 2 000 random images are read back (as the
re-rank stage reads its top-k candidates) and checked bit-exact against what was written.

    python benchmarks/scale_local.py [--images 100000]   # -> benchmarks/results/scale_local.json
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import numpy as np

from placerank.descriptors.local_store import LocalFeatureStore
from placerank.models.base import LocalFeatures

RESULTS = Path(__file__).resolve().parent / "results" / "scale_local.json"
FEATURES, DIM, CHUNK = 225, 128, 500


def features(i: int) -> LocalFeatures:
    rng = np.random.default_rng(i)
    return LocalFeatures(
        keypoints=rng.uniform(0, 640, (FEATURES, 2)).astype(np.float32),
        descriptors=rng.standard_normal((FEATURES, DIM)).astype(np.float16),
        scores=rng.uniform(0, 1, FEATURES).astype(np.float32),
        image_size=(360, 640),
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--folder", type=Path, default=Path("/tmp/placerank_scale/local_store"))
    args = p.parse_args()
    shutil.rmtree(args.folder, ignore_errors=True)
    store = LocalFeatureStore(args.folder, "bench:fol-region-like", DIM)
    template = [features(i) for i in range(CHUNK)]  # generating 10^5 random sets would dominate the time
    t = time.perf_counter()
    for start in range(0, args.images, CHUNK):
        n = min(CHUNK, args.images - start)
        store.add_many([(f"img{start + j:07d}", template[j]) for j in range(n)])
    add_s = time.perf_counter() - t
    rng = np.random.default_rng(1)
    picks = rng.choice(args.images, 2000, replace=False)
    t = time.perf_counter()
    inside = sum(f"img{i:07d}" in store for i in picks)
    contains_ms = 1000 * (time.perf_counter() - t) / len(picks)
    reads = []
    for i in picks:
        t = time.perf_counter()
        got = store.get(f"img{i:07d}")
        reads.append(1000 * (time.perf_counter() - t))
        ref = template[i % CHUNK]
        assert np.array_equal(got.descriptors, ref.descriptors) and np.array_equal(got.keypoints, ref.keypoints)
    disk = sum(f.stat().st_size for f in args.folder.iterdir())
    result = {
        "images": len(store),
        "features_per_image": FEATURES,
        "dim": DIM,
        "append_images_per_s": round(args.images / add_s, 1),
        "bytes_per_image_on_disk": round(disk / args.images, 1),
        "bytes_per_image_store": round(store.bytes_per_image(), 1),
        "disk_gb": round(disk / 2**30, 2),
        "contains_ms": round(contains_ms, 3),
        "get_ms_p50": round(float(np.percentile(reads, 50)), 3),
        "get_ms_p95": round(float(np.percentile(reads, 95)), 3),
        "found": int(inside),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    store.close()
    shutil.rmtree(args.folder, ignore_errors=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
