"""Is ``placerank serve --compile on`` worth it? Per-query latency of the service's query path
(``Database.localize`` on one photo: decode, describe, search, estimate), eager vs the backbone
compiled for a batch of one at the database's input size, after warm-up, per precision.

    python benchmarks/serve_compile.py                       # fp32 and bf16, 30 queries each way
    python benchmarks/serve_compile.py --precisions bf16 --pairs 20 --image-size 240 320

It builds one small database per precision from ../shared/data/geotagged_photos (EfficientNet-
Lite0 + GeM) in a temporary folder, opens it with ``compile="on"`` and runs the service's warm-up
(:func:`placerank.serve.service.warm_up`: the compile, timed, cold: inductor's cache is a fresh
temporary folder), then alternates eager and compiled query by query over the 12 photos, so load
from other processes on a shared machine hits both alike; the model's forward alone on a decoded
photo is timed the same way. Reports the median ms per query and per forward of each, their
ratio, the compile time, the number of queries that repays it, and the largest descriptor
difference compiled vs eager. Writes ``benchmarks/results/serve_compile.json`` (runs of other
precisions already there are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PLACERANK_SHARED", REPO.parent / "shared"))
GEOTAGGED = SHARED / "data" / "geotagged_photos"


def timed_queries(db, photos: list[Path]) -> list[float]:
    out = []
    for p in photos:
        t = time.perf_counter()
        db.localize(p, top_k=5)
        out.append(time.perf_counter() - t)
    return out


def timed_forwards(model, x, precision: str, compiled: bool, n: int) -> list[float]:
    """The model's forward alone on a decoded batch of one (no decode, no search)."""
    import torch

    from placerank.descriptors.extract import autocast_for
    from placerank.descriptors.fast import CompiledBackbone

    out = []
    with torch.inference_mode(), CompiledBackbone(model, 1, precision, x.device, compiled):
        for _ in range(n):
            t = time.perf_counter()
            with autocast_for(precision, x.device):
                model(x)
            out.append(time.perf_counter() - t)
    return out


def measure(precision: str, photos: list[Path], pairs: int, image_size, root: Path) -> dict:
    import numpy as np
    import torch

    import placerank
    from placerank.descriptors.extract import extract_features
    from placerank.descriptors.fast import prepare_inference
    from placerank.serve.service import warm_up

    path = root / f"{precision}.db"
    with placerank.Database.create(path, image_size=image_size, device="cpu", precision=precision) as db:
        db.add_folder(GEOTAGGED, allow_no_gps=True, progress=False)
    db = placerank.Database.open(path, device="cpu", read_only=True, compile="on")
    model, cpu = db.model, torch.device("cpu")
    t = time.perf_counter()
    warm_up(db, log=lambda msg: None)
    compile_s = time.perf_counter() - t
    from placerank.data.images import load_tensor

    x = load_tensor(photos[0], model.preprocess)[0][None].contiguous(memory_format=torch.channels_last)
    timed_queries(db, photos[:2])  # compiled path warm
    prepare_inference(model, cpu, "off")
    timed_queries(db, photos[:2])  # eager path warm
    # Eager and compiled alternate query by query (the order flipping every pair), so a change in
    # the machine's load hits both alike.
    query_s: dict[bool, list[float]] = {False: [], True: []}
    fwd: dict[bool, list[float]] = {False: [], True: []}
    for i in range(pairs):
        for on in (False, True) if i % 2 == 0 else (True, False):
            prepare_inference(model, cpu, "on" if on else "off")
            query_s[on].extend(timed_queries(db, [photos[i % len(photos)]]))
            fwd[on].extend(timed_forwards(model, x, precision, on, 1))
    eager, compiled = query_s[False], query_s[True]
    descs = {}
    for mode in ("off", "on"):
        prepare_inference(model, cpu, mode)
        descs[mode] = np.concatenate(
            [extract_features(model, [p], cpu, 1, 0, use_cache=False, progress=False, precision=precision)[0]
             for p in photos]
        )  # fmt: skip
    db.close()
    e_ms, c_ms = 1000 * statistics.median(eager), 1000 * statistics.median(compiled)
    saved = (e_ms - c_ms) / 1000
    return {
        "precision": precision,
        "image_size": list(model.preprocess.size),
        "queries_each": len(eager),
        "eager_ms_median": round(e_ms, 1),
        "compiled_ms_median": round(c_ms, 1),
        "eager_over_compiled": round(e_ms / c_ms, 2),
        "forward_only_eager_ms_median": round(1000 * statistics.median(fwd[False]), 1),
        "forward_only_compiled_ms_median": round(1000 * statistics.median(fwd[True]), 1),
        "forward_only_eager_over_compiled": round(statistics.median(fwd[False]) / statistics.median(fwd[True]), 2),
        "compile_s_cold": round(compile_s, 1),
        "queries_to_repay_compile": (round(compile_s / saved) if saved > 0 else None),
        "max_abs_diff_compiled_vs_eager": float(np.abs(descs["on"] - descs["off"]).max()),
        "min_cosine_compiled_vs_eager": float((descs["on"] * descs["off"]).sum(1).min()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--pairs", type=int, default=30, help="eager + compiled queries (and forwards) timed, each")
    ap.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve_compile.json")
    args = ap.parse_args()
    if not GEOTAGGED.is_dir():
        sys.exit(f"serve_compile: error: {GEOTAGGED} not found (set PLACERANK_SHARED)")
    os.environ.setdefault("PLACERANK_WEIGHTS", str(SHARED / "weights"))
    photos = sorted(p for p in GEOTAGGED.rglob("*.jpg") if p.parent.name in ("opensfm_berlin", "exif_samples_arezzo"))
    runs = []
    with tempfile.TemporaryDirectory(prefix="placerank-serve-compile-") as tmp:
        os.environ["PLACERANK_CACHE"] = str(Path(tmp) / "cache")  # cold inductor cache, no descriptor cache
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
        for precision in args.precisions:
            run = measure(precision, photos, args.pairs, args.image_size, Path(tmp))
            print(json.dumps(run), flush=True)
            runs.append(run)
    import torch

    result = {
        "about": "placerank serve query path (Database.localize, one photo) eager vs backbone compiled for batch 1, "
        "after warm-up; eager and compiled alternated query by query on a shared, busy machine (ratios, not absolute times)",
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "runs": runs,
    }
    if args.out.is_file():  # keep the other precisions' runs (one precision per invocation fits a busy machine)
        done = {r["precision"] for r in runs}
        runs[:0] = [r for r in json.loads(args.out.read_text()).get("runs", []) if r["precision"] not in done]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
