"""End-to-end ``placerank eval`` over >= 10^5 database images (part of ``benchmarks/scale.py``).

The database: GardensPoint Walking ``day_left`` (140 frames, the real positives) plus
distractor images made from every other real shared photo (not GardensPoint): random crops
(50-100 % of the area, any aspect 3:4-4:3), half of them mirrored, resized to 64x64 and written
once as JPEG q85 to a scratch folder under /tmp (never the repo), ~2 KB each. Queries: GardensPoint
``night_right`` (140), positives |i - j| <= 2 (``--frame-tolerance 2`` on ``path,frame`` CSVs;
distractors get frame numbers far from 0-139).

Warm (the default, ``warm=True``): the run is a re-run after an extraction, its descriptor cache
holding every image's descriptor (:func:`warm_cache`): the GardensPoint frames' real
descriptors and, for the 64x64 distractor files, descriptors drawn from the mixture fitted to the
real ones (the model at 144x256, as ``scale_data``). Why: on this benchmark's 2 shared cores the
model ran at ~7 images/s, so 10^5 forwards would take hours; the extract stage then measures
reading 10^5 cached descriptors into the memory map, and everything after it (index, search,
recall, outputs) is the real pipeline over 10^5 images. Cold (``warm=False``): every image
through the model at ``--image-size 48``, for a machine with the cores for it.

The eval runs as its own process (``python -m placerank eval``); its ``results.json`` gives the
time per stage and the process's peak RSS (``ru_maxrss``); the largest child process's peak
comes from ``RUSAGE_CHILDREN`` of this wrapper.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scale_data import GARDENS, SCRATCH, SHARED, real_images

EVAL_SIZE = 64  # the images, pixels
INPUT_SIZE = 48  # the model's input: 48x48 keeps 10^5 forwards within the CPU budget here


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` 64x64 JPEG crops / flips of the non-GardensPoint real photos (written once)."""
    from PIL import Image, ImageOps

    done = folder / "done.json"
    sources = [p for p in real_images() if GARDENS not in str(p) and "gardenspoint_sfu" not in str(p)]
    per_source = -(-count // len(sources))
    paths = [folder / f"{i // 1000:04d}" / f"{i:07d}.jpg" for i in range(count)]
    if done.exists() and json.loads(done.read_text()).get("count", 0) >= count:
        return paths  # a prefix of the images written for a larger count
    rng = np.random.default_rng(seed)
    i = 0
    for src in sources:
        with Image.open(src) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            w, h = im.size
            for _ in range(per_source):
                if i >= count:
                    break
                area, aspect = rng.uniform(0.5, 1.0) * w * h, rng.uniform(0.75, 4 / 3)
                cw, ch = min(w, int(np.sqrt(area * aspect))), min(h, int(np.sqrt(area / aspect)))
                x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                crop = im.crop((x, y, x + cw, y + ch)).resize((EVAL_SIZE, EVAL_SIZE), Image.BILINEAR)
                # (resized even when the file exists: cheap at 64x64, keeps the code one path)
                flip = rng.random() < 0.5
                if not paths[i].exists():  # an interrupted run's images are the same (same draws)
                    crop = crop.transpose(Image.FLIP_LEFT_RIGHT) if flip else crop
                    paths[i].parent.mkdir(parents=True, exist_ok=True)
                    part = paths[i].with_suffix(".part")  # then renamed: a killed run leaves no empty JPEG
                    crop.save(part, format="JPEG", quality=85)
                    part.replace(paths[i])
                i += 1
    done.write_text(json.dumps({"count": count}))
    return paths


def write_csvs(folder: Path, distractors: list[Path]) -> tuple[Path, Path]:
    gardens = SHARED / GARDENS
    folder.mkdir(parents=True, exist_ok=True)
    db, q = folder / "database.csv", folder / "queries.csv"
    with open(db, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "frame"])
        for k in range(140):
            w.writerow([str(gardens / "day_left" / f"Image{k:03d}.jpg"), k])
        for j, p in enumerate(distractors):
            w.writerow([str(p), 10_000 + j])  # never within 2 frames of a query
    with open(q, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "frame"])
        for k in range(140):
            w.writerow([str(gardens / "night_right" / f"Image{k:03d}.jpg"), k])
    return db, q


def warm_cache(cache_dir: Path, distractors: list[Path]) -> dict:
    """Fill a descriptor cache as a previous extraction would have: the GardensPoint database and
    query frames with their real descriptors (``real.npz``, the same model, input size and code
    path as ``placerank eval`` uses), the distractor images with descriptors drawn from the
    mixture fitted to the real ones (:class:`scale_data.Distractors`)."""
    from scale_data import IMAGE_SIZE, MODEL, Distractors, RealSet, extract_real

    os.environ["PLACERANK_CACHE"] = str(cache_dir)
    from placerank.descriptors.cache import image_key
    from placerank.descriptors.extract import descriptor_cache_for
    from placerank.models import create

    data = np.load(extract_real())
    sources, desc = data["sources"], data["descriptors"]
    gardens = str(SHARED / GARDENS)
    real = [
        (image_key(s), d)
        for s, d, v in zip(sources, desc, data["variants"])
        if s.startswith(gardens) and v == "original"
    ]
    dist = Distractors(RealSet(extract_real()).database)
    cache = descriptor_cache_for(create(MODEL, image_size=IMAGE_SIZE))
    try:
        cache.put_many(real)
        for b, start in enumerate(range(0, len(distractors), 20_000)):
            part = distractors[start : start + 20_000]
            cache.put_many(zip([image_key(p) for p in part], dist.block(1000 + b, len(part))))
    finally:
        cache.close()
    return {"real": len(real), "drawn": len(distractors)}


def run_eval(total: int = 100_000, workers: int = 1, batch_size: int = 64, warm: bool = True) -> dict:
    """Write the images (once), run ``placerank eval`` over ``total`` database images in a
    subprocess, and return its stage times, recall and peak RSS. ``warm``: the descriptor cache
    holds every image's descriptor (:func:`warm_cache`), so the extract stage reads the cache."""
    folder = SCRATCH / f"eval_{total}"
    distractors = write_images(SCRATCH / "eval_images", total - 140)
    db, q = write_csvs(folder, distractors)
    out = folder / "out"
    argv = [sys.executable, "-m", "placerank", "eval", "--database", str(db), "--queries", str(q)]
    argv += ["--frame-tolerance", "2", "--examples", "0"]
    argv += ["--workers", str(workers), "--batch-size", str(batch_size), "--device", "cpu", "--out", str(out)]
    env = dict(os.environ)
    if warm:
        from scale_data import IMAGE_SIZE

        cache_dir = SCRATCH / f"cache_{total}"
        if not cache_dir.exists():
            warm_cache(cache_dir, distractors)
        env["PLACERANK_CACHE"] = str(cache_dir)
        argv += ["--image-size", *map(str, IMAGE_SIZE)]
    else:
        argv += ["--image-size", str(INPUT_SIZE), "--no-cache"]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"placerank eval failed: {done.stderr[-2000:]}")
    res = json.loads((out / "results.json").read_text())
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "database_images": res["num_database"],
        "queries": res["num_queries"],
        "image_size": EVAL_SIZE,
        "model_input": "144x256" if warm else INPUT_SIZE,
        "descriptor_cache": "warm (real GardensPoint + drawn distractors)" if warm else "off",
        "batch_size": batch_size,
        "workers": workers,
        "timing_s": res["timing_s"],
        "wall_s": round(wall, 1),
        "peak_rss_mb": res["peak_memory_mb"],
        "peak_rss_largest_process_mb": round(children_kb / 1024, 1),
        "recall": res["recall"],
        "index": res.get("index"),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
    }


if __name__ == "__main__":
    print(json.dumps(run_eval(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000), indent=1))
