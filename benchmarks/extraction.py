"""Extraction throughput: the full placerank path vs the bare timm forward, in one process.

Full path = ``placerank.descriptors.extract.extract_global`` with the cache off: DataLoader workers decode
and resize the JPEGs, batched inference, L2-normalisation, copy to NumPy.
Baseline = ``timm`` ``forward_features`` + GeM on already-decoded tensors of the same batch size
and input size (what the network alone costs). Both run side by side, alternating, several
rounds; the ratio (pipeline images/s / bare images/s) is the number to watch (goal >= 0.9).

    python benchmarks/extraction.py [--images 140] [--rounds 3] [--batch-size 16] [--out benchmarks/results/extraction.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from placerank.commands.demo import find_shared_data  # noqa: E402
from placerank.data.images import load_tensor  # noqa: E402
from placerank.descriptors.extract import extract_global  # noqa: E402
from placerank.models import create  # noqa: E402
from placerank.utils import resolve_device  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None)
    ap.add_argument("--model", default="effnet-lite0-gem")
    ap.add_argument("--images", type=int, default=140)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "extraction.json")
    args = ap.parse_args()

    device = resolve_device(args.device)
    folder = find_shared_data(args.data) / "gardenspoint_walking" / "day_right"
    paths = sorted(folder.glob("*.jpg"))[: args.images]
    model = create(args.model).to(device).eval()
    pre = model.preprocess
    bs = args.batch_size
    # Baseline input: the same images, decoded once up front (not timed).
    tensors = torch.stack([load_tensor(p, pre)[0] for p in paths])

    @torch.inference_mode()
    def bare() -> float:
        t0 = time.perf_counter()
        for s in range(0, len(tensors), bs):
            x = tensors[s : s + bs].to(device)
            fmap = model.backbone.net.forward_features(x)
            torch.nn.functional.normalize(model.aggregator(fmap), dim=-1).cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return len(tensors) / (time.perf_counter() - t0)

    def pipeline() -> float:
        t0 = time.perf_counter()
        extract_global(model, paths, device, batch_size=bs, num_workers=args.workers, use_cache=False, desc="bench")
        return len(paths) / (time.perf_counter() - t0)

    bare()  # warm-up (allocator, kernels)
    rows = []
    for r in range(args.rounds):
        b, p = bare(), pipeline()
        rows.append({"round": r, "bare_img_s": b, "pipeline_img_s": p, "ratio": p / b})
        print(f"round {r}: bare {b:6.2f} img/s   pipeline {p:6.2f} img/s   ratio {p / b:.3f}", flush=True)
    med = {k: float(np.median([row[k] for row in rows])) for k in ("bare_img_s", "pipeline_img_s", "ratio")}
    print()
    print(f"| {'path':32s} | {'images/s (median)':>17s} |")
    print(f"|{'-' * 34}|{'-' * 19}|")
    print(f"| {'bare timm forward + GeM':32s} | {med['bare_img_s']:17.2f} |")
    print(f"| {'placerank extract_global':32s} | {med['pipeline_img_s']:17.2f} |")
    print(f"| {'ratio (goal >= 0.9)':32s} | {med['ratio']:17.3f} |")
    out = {
        "benchmark": "extraction",
        "model": args.model,
        "input_size": list(pre.size),
        "batch_size": bs,
        "images": len(paths),
        "rounds": rows,
        "median": med,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
