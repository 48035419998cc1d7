"""EfficientNet-Lite0 vs Lite2 for every method (issue 16 item 6): speed, size and untrained accuracy.

For each model pair (plain GeM, FoL, SelaVPR, SFRS on Lite0 and on Lite2):

- **ms per image**: CPU, 2 threads, batch 8 of the model's default input size, global descriptor
  only and (models with a local head) global + local features in one pass (what eval does with
  a learned re-ranker); ``--warmup`` passes, then the median of ``--runs`` timed passes;
- **parameters**: all of them, and those the method trains;
- **accuracy, untrained** (ImageNet backbone, method heads at their seeded init): GardensPoint
  ``day_left`` database vs ``night_right`` queries, frames 100-139 (the shared copy has frames 0-139;
  the CPU presets train on 0-99), |i-j| <= 2, R@1/R@5 of the
  global descriptor and, for FoL / SelaVPR, after the method's re-ranker on the top 20.

``--trained RUN_DIR`` adds the held-out protocol of ``benchmarks/recipes/fol_eval.py`` (the one
behind ``benchmarks/results/fol_recipe_preset.json``) for a trained FoL run: ``day_right`` vs
``night_right`` frames 100-139, |i-j| <= 2, top 20, the run's own input size, global and
``fol-region`` (pool3, center), next to the Lite0 preset's numbers read from that file.

    python benchmarks/backbones.py [--only fol selavpr] [--runs 5] [--trained RUN_DIR]
        [--out benchmarks/results/backbones.json]

Rows already in ``--out`` are kept (``--only`` re-measures some); the table is printed at the end.
The machine's load average is recorded: timings on a shared CPU are only comparable within a run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from placerank.data.places import find_shared_data  # noqa: E402
from placerank.eval.evaluate import EvalConfig, evaluate  # noqa: E402
from placerank.models import create  # noqa: E402
from placerank.utils import write_json_atomic  # noqa: E402

# family -> (Lite0 model, Lite2 model, the method's re-ranker or None)
FAMILIES = {
    "gem": ("effnet-lite0-gem", "effnet-lite2-gem", None),
    "fol": ("fol-effnet-lite0", "fol-effnet-lite2", "fol-region"),
    "selavpr": ("selavpr-effnet-lite0", "selavpr-effnet-lite2", "selavpr-mnn"),
    "sfrs": ("sfrs-effnet-lite0", "sfrs-effnet-lite2", None),
}
PRESET_RESULTS = REPO / "benchmarks" / "results" / "fol_recipe_preset.json"


def write_manifest(folder: Path, gardens: Path, traversal: str, frames: tuple[int, int]) -> Path:
    path = folder / f"{traversal}_{frames[0]}_{frames[1]}.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "frame"])
        for k in range(*frames):
            w.writerow([str(gardens / traversal / f"Image{k:03d}.jpg"), k])
    return path


def time_models(models: dict, batch: int, warmup: int, runs: int, local: bool) -> dict[str, float]:
    """Median ms per image of one batched forward (global, or global + local in one pass) per
    model; the models' timed passes alternate, so a shared CPU's changing load hits both alike."""
    inputs = {}
    for name, model in models.items():
        h, w = model.preprocess.size
        inputs[name] = (torch.randn(batch, 3, h, w), [(h, w)] * batch)

    def once(name: str) -> float:
        x, sizes = inputs[name]
        t0 = time.perf_counter()
        with torch.inference_mode():
            if local:
                models[name].encode(x, sizes, local_options={})
            else:
                models[name](x)
        return time.perf_counter() - t0

    for name in models:
        for _ in range(warmup):
            once(name)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(runs):
        for name in models:
            times[name].append(once(name))
    return {name: round(1000 * statistics.median(t) / batch, 1) for name, t in times.items()}


def count_parameters(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = model.trainable_parameters() if hasattr(model, "trainable_parameters") else list(model.parameters())
    return {"total": int(total), "trained_by_method": int(sum(p.numel() for p in trainable))}


def recall_row(r) -> dict:
    keep = ("1", "5", "10")
    row = {
        "global": {k: round(v, 4) for k, v in r.recall_first_stage.items() if k in keep},
        "final": {k: round(v, 4) for k, v in r.recall.items() if k in keep},
    }
    if r.rerank:
        row["rerank"] = {k: r.rerank[k] for k in ("bytes_per_image", "ms_per_query_median", "top_k")}
    return row


def measure_family(names: list[str], rerank: str | None, db: Path, q: Path, tmp: Path, args) -> dict:
    torch.set_num_threads(args.threads)
    models, entries = {}, {}
    for name in names:
        torch.manual_seed(0)  # untrained method heads: the same init for every run
        models[name] = model = create(name).eval()
        entries[name] = {
            "input_size": list(model.preprocess.size),
            "descriptor_dim": int(model.descriptor_dim),
            "feature_channels": int(model.backbone.out_channels),
            "weights": model.weights_source,
            "parameters": count_parameters(model),
            "load_average_1min": round(os.getloadavg()[0], 1),
        }
    ms = time_models(models, args.batch, args.warmup, args.runs, local=False)
    local = {n: m for n, m in models.items() if getattr(m, "has_local_head", False)}
    ms_local = time_models(local, args.batch, args.warmup, args.runs, local=True) if local else {}
    for name in names:
        entries[name]["ms_per_image"] = {"global": ms[name]}
        if name in ms_local:
            entries[name]["ms_per_image"]["global_and_local"] = ms_local[name]
        t0 = time.perf_counter()
        torch.manual_seed(0)
        cfg = EvalConfig(
            database=db,
            queries=q,
            out=tmp / name,
            model=name,
            rerank=rerank,
            frame_tolerance=2,
            top_k=20,
            device="cpu",
            num_examples=0,
            use_cache=False,
        )
        entries[name]["untrained"] = recall_row(evaluate(cfg))
        entries[name]["eval_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {json.dumps(entries[name])}", flush=True)
    return entries


def trained_heldout(run: Path, tmp: Path, gardens: Path) -> dict:
    """fol_eval.py's held-out protocol for a trained FoL run (any backbone)."""
    config = json.loads((run / "config.json").read_text())
    name = f"fol-{config['backbone']}"  # the fol trainer's BACKBONE_MODELS rule for effnet-*
    size = tuple(config["image_size"]) if config.get("image_size") else None
    frames = (100, 140)
    db = write_manifest(tmp, gardens, "day_right", frames)
    q = write_manifest(tmp, gardens, "night_right", frames)
    out: dict = {
        "protocol": "day_right db vs night_right queries, frames 100-139, |i-j| <= 2, top 20 (fol_eval.py)",
        "model": name,
        "input_size": list(size) if size else None,
    }
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in log if "ms" in r]
    out["training"] = {
        "steps": len(steps),
        "first_loss": steps[0]["loss"] if steps else None,
        "last_loss": steps[-1]["loss"] if steps else None,
        "mean_loss_last_20": sum(r["loss"] for r in steps[-20:]) / max(1, len(steps[-20:])),
    }
    # the global row is the first stage of the re-ranked runs (same model, same descriptors)
    for label, mode in (("fol_region_pool3", "pool3"), ("fol_region_center", "center")):
        torch.manual_seed(0)
        cfg = EvalConfig(
            database=db,
            queries=q,
            out=tmp / f"trained_{label}",
            model=name,
            weights=run / "model.pt",
            rerank="fol-region",
            rerank_options={"mode": mode},
            frame_tolerance=2,
            top_k=20,
            device="cpu",
            num_examples=0,
            use_cache=False,
            image_size=size,
        )
        out[label] = recall_row(evaluate(cfg))
    out["global"] = {"final": out["fol_region_pool3"]["global"]}
    if PRESET_RESULTS.exists():
        ref = json.loads(PRESET_RESULTS.read_text())
        out["lite0_preset_reference"] = {
            "file": str(PRESET_RESULTS.relative_to(REPO)),
            "steps": ref.get("training", {}).get("steps"),
            "global": ref.get("trained_global", {}).get("recall"),
            "fol_region_pool3": ref.get("trained_fol_region_pool3", {}).get("recall"),
            "fol_region_center": ref.get("trained_fol_region_center", {}).get("recall"),
        }
    return out


def fmt(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def print_table(results: dict) -> None:
    head = f"{'model':22s} {'params M':>8s} {'ms/img':>7s} {'+local':>7s} {'R@1':>6s} {'R@5':>6s} {'rr R@1':>7s} {'rr R@5':>7s}"
    print(head)
    print("-" * len(head))
    for fam, (a, b, rerank) in FAMILIES.items():
        for name in (a, b):
            e = results["models"].get(name)
            if not e:
                continue
            u = e["untrained"]
            rr = u["final"] if rerank else {}
            print(
                f"{name:22s} {e['parameters']['total'] / 1e6:8.2f} {e['ms_per_image']['global']:7.1f} "
                f"{fmt(e['ms_per_image'].get('global_and_local'), 1):>7s} {fmt(u['global'].get('1')):>6s} "
                f"{fmt(u['global'].get('5')):>6s} {fmt(rr.get('1')):>7s} {fmt(rr.get('5')):>7s}"
            )
    t = results.get("trained_fol_lite2")
    if t:
        ref = t.get("lite0_preset_reference", {})
        print(
            f"\ntrained (held-out frames 100-139): {t['model']} {t['training']['steps']} steps vs Lite0 preset {ref.get('steps')} steps"
        )
        for label in ("global", "fol_region_pool3", "fol_region_center"):
            r0 = (ref.get(label) or {}).get("1")
            print(f"  {label:18s} R@1 Lite2 {fmt(t[label]['final'].get('1'))}  Lite0 {fmt(r0)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="shared data folder (default ../shared/data)")
    p.add_argument("--only", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--variants", nargs="+", choices=["lite0", "lite2"], default=["lite0", "lite2"])
    p.add_argument("--frames", type=int, nargs=2, default=[100, 140])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--trained", type=Path, default=None, help="a FoL training run folder to evaluate held-out")
    p.add_argument("--skip-untrained", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "backbones.json")
    args = p.parse_args(argv)

    gardens = find_shared_data(args.data) / "gardenspoint_walking"
    results: dict = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.setdefault("models", {})
    results["protocol"] = {
        "timing": f"CPU, {args.threads} threads, batch {args.batch}, default input size, "
        f"{args.warmup} warm-up + median of {args.runs} runs",
        "accuracy": f"untrained; gardenspoint_walking day_left db vs night_right queries, frames "
        f"{args.frames[0]}-{args.frames[1] - 1}, |i-j| <= 2, re-ranking top 20",
    }
    frames = (args.frames[0], args.frames[1])
    with tempfile.TemporaryDirectory(prefix="backbones_") as tmp_name:
        tmp = Path(tmp_name)
        if not args.skip_untrained:
            db = write_manifest(tmp, gardens, "day_left", frames)
            q = write_manifest(tmp, gardens, "night_right", frames)
            for fam in args.only:
                lite0, lite2, rerank = FAMILIES[fam]
                names = [n for n, v in ((lite0, "lite0"), (lite2, "lite2")) if v in args.variants]
                results["models"].update(measure_family(names, rerank, db, q, tmp, args))
                write_json_atomic(args.out, results)
        if args.trained is not None:
            results["trained_fol_lite2"] = trained_heldout(args.trained, tmp, gardens)
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}
    write_json_atomic(args.out, results)
    print_table(results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
