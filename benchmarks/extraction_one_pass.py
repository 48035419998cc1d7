"""Extraction throughput: the full placerank path vs the bare timm forward, in one process.

Full path = ``placerank.descriptors.extract.extract_global`` with the cache off: DataLoader workers decode
and resize the JPEGs, batched inference, L2-normalisation, copy to NumPy.
Baseline = ``timm`` ``forward_features`` + GeM on already-decoded tensors of the same batch size
and input size (what the network alone costs). Both run side by side, alternating, several
rounds; the ratio (pipeline images/s / bare images/s) is the number to watch (goal >= 0.9).

Local heads (FoL ``fol-region``, SelaVPR ``selavpr-mnn``): the same images through
``extract_features`` three ways, each with the backbone's forward calls counted by a hook:
global only; global + local features into a local-feature store in ONE pass (what eval and
``placerank extract --rerank`` do); and the old two passes (global, then the re-ranker's own
extraction). One pass costs the local head and the store writes, not a second backbone pass.

    python benchmarks/extraction_one_pass.py [--images 140] [--rounds 3] [--batch-size 16] [--local-images 16]
        [--out benchmarks/results/extraction_one_pass.json]   # also writes the .png beside it
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

from placerank.data.images import load_tensor  # noqa: E402
from placerank.data.places import find_shared_data  # noqa: E402
from placerank.descriptors.extract import extract_features, extract_global, extract_local, local_store_for  # noqa: E402
from placerank.models import create  # noqa: E402
from placerank.rerank.base import create_reranker  # noqa: E402
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
    ap.add_argument("--local-images", type=int, default=16, help="images per local-head row (0: no such rows)")
    ap.add_argument(
        "--local-models", nargs="+", default=["fol-effnet-lite0:fol-region", "selavpr-effnet-lite0:selavpr-mnn"]
    )
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "extraction_one_pass.json")
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
    local_rows = [
        local_head_row(spec, paths[: args.local_images], device, bs, args.workers)
        for spec in (args.local_models if args.local_images > 0 else [])
    ]
    if local_rows:
        print()
        print(f"| {'model':22s} | {'extraction':29s} | {'images/s':>8s} | {'backbone passes/image':>21s} |")
        print(f"|{'-' * 24}|{'-' * 31}|{'-' * 10}|{'-' * 23}|")
        for row in local_rows:
            for mode, label in (
                ("global", "global only"),
                ("one_pass", "global + local, one pass"),
                ("two_pass", "global, then local (2 passes)"),
            ):
                r = row[mode]
                print(
                    f"| {row['model']:22s} | {label:29s} | {r['img_s']:8.2f} | {r['backbone_passes_per_image']:21.2f} |"
                )
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
        "local_heads": local_rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    plot(out, args.out.with_suffix(".png"))
    print(f"wrote {args.out}, {args.out.with_suffix('.png').name}")


def local_head_row(spec: str, paths: list[Path], device: torch.device, bs: int, workers: int | None) -> dict:
    """Global only vs global + local in one pass vs two passes, for one model with a local head."""
    import tempfile

    name, rerank = spec.split(":")
    torch.manual_seed(0)
    model = create(name).to(device).eval()
    rr = create_reranker(rerank, model=model).to(device)
    calls = {"images": 0}
    model.backbone.register_forward_hook(lambda m, i, o: calls.__setitem__("images", calls["images"] + len(i[0])))
    row: dict = {"model": name, "reranker": rerank, "input_size": list(model.preprocess.size), "images": len(paths)}
    extract_global(model, paths[:bs], device, batch_size=bs, num_workers=workers, use_cache=False)  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("global", "one_pass", "two_pass"):
            calls["images"] = 0
            store = local_store_for(rr, Path(tmp) / mode)
            t0 = time.perf_counter()
            if mode == "global":
                extract_global(model, paths, device, batch_size=bs, num_workers=workers, use_cache=False)
            elif mode == "one_pass":
                extract_features(model, paths, device, bs, workers, use_cache=False, reranker=rr, store=store)
            else:
                extract_global(model, paths, device, batch_size=bs, num_workers=workers, use_cache=False)
                extract_local(rr, paths, store, device, batch_size=bs, num_workers=workers)
            dt = time.perf_counter() - t0
            row[mode] = {
                "img_s": round(len(paths) / dt, 3),
                "s": round(dt, 2),
                "backbone_passes_per_image": calls["images"] / len(paths),
                "local_bytes_per_image": round(store.bytes_per_image(), 1),
            }
            store.close()
            print(
                f"{name} {mode}: {len(paths) / dt:.2f} img/s, {calls['images'] / len(paths):.0f} backbone passes/image"
            )
    return row


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["bare forward", "extract_global"]
    values = [result["median"]["bare_img_s"], result["median"]["pipeline_img_s"]]
    colors = ["#999999", "#4477aa"]
    for row in result["local_heads"]:
        for mode, label, color in (
            ("global", "global", "#4477aa"),
            ("one_pass", "+local, 1 pass", "#228833"),
            ("two_pass", "+local, 2 passes", "#cc6677"),
        ):
            labels.append(f"{row['model'].replace('-effnet-lite0', '')}\n{label}")
            values.append(row[mode]["img_s"])
            colors.append(color)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 4))
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set_ylabel("images / s")
    ax.set_title(
        f"extraction throughput ({result['device']}, {result['threads']} threads; models on EfficientNet-Lite0)"
    )
    for x, v in enumerate(values):
        ax.annotate(f"{v:.2f}", (x, v), ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
