"""Peak RSS of ``placerank extract`` per model at the defaults (``--max-memory-gb 4``,
``--batch-size 16``, the model's input size, DataLoader workers min(4, CPUs)), for the README.

Each model runs ``placerank extract`` on the first 32 GardensPoint ``day_left`` frames in its
own process (``--no-cache``); the peak RSS is that process's ``ru_maxrss`` (the DataLoader
workers are separate processes and reported apart: the largest one). The batch size the budget
chose and the measured per-image forward memory come from :mod:`placerank.descriptors.memory`.

    python benchmarks/scale_memory.py     # -> benchmarks/results/scale_memory.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "scale_memory.json"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "gardenspoint_walking" / "day_left"
MODELS = ("effnet-lite0-gem", "fol-effnet-lite0", "selavpr-effnet-lite0", "sfrs-effnet-lite0")
IMAGES = 32

CHILD = """
import json, resource, sys, torch
from placerank.cli import main
from placerank.descriptors import memory
from placerank.models import create
model, images, out = sys.argv[1:4]
rc = main(["extract", "--images", images, "--model", model, "--no-cache", "--out", out, "--device", "cpu"])
m = create(model).eval()
print(json.dumps({
    "rc": rc,
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    "largest_worker_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    "model_mb": round(memory.model_bytes(m) / 2**20, 1),
    "input_size": list(m.preprocess.size),
    "per_image_forward_mb": round(memory.per_image_bytes(m, torch.device("cpu")) / 2**20, 1),
    "batch_size_chosen": memory.fit_batch_size(m, 16, torch.device("cpu"), memory.workers_for(None)),
}))
"""


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for p in sorted(SHARED.glob("*.jpg"))[:IMAGES]:
            (folder / p.name).symlink_to(p)
        for model in MODELS:
            out = Path(tmp) / model
            done = subprocess.run(
                [sys.executable, "-c", CHILD, model, str(folder), str(out)], capture_output=True, text=True
            )
            if done.returncode != 0:
                results[model] = {"error": done.stderr.strip().splitlines()[-1:]}
            else:
                results[model] = json.loads(done.stdout.strip().splitlines()[-1])
            print(model, results[model], flush=True)
    info = {"images": IMAGES, "max_memory_gb": 4.0, "batch_size": 16, "omp_threads": os.environ.get("OMP_NUM_THREADS")}
    RESULTS.write_text(json.dumps({"setup": info, "models": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
