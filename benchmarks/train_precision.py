"""Training precision: the same short recipe in fp32 and under bf16 autocast, same seeds.

Per method and seed, two runs that differ only in ``TrainConfig.precision`` (the order alternates
per seed: the machine is shared and its load drifts): the loss of every step, the wall time per
step (the median of the step-to-step differences of ``log.jsonl``'s ``time_s``), and held-out
recall of the trained ``model.pt`` on GardensPoint frames 100-139 (never trained on: training
uses frames 0-99), day_right -> night_right and day_left -> night_right, |i - j| <= 2, evaluated
in fp32 (what the run is judged by does not change with the training precision). The untrained
start of each seed is scored too.

Decision per method (``--precision auto`` in placerank/train/precision.py): bf16 when it is
faster and, averaged over seeds and both pairs, its held-out R@1 is within 0.5 points of fp32 or
within the seed-to-seed spread of fp32 (the standard deviation of fp32's R@1 over the seeds),
and its loss curve tracks fp32's (the mean loss of the last quarter of the steps differs from
fp32's by less than fp32's own seed-to-seed spread of that number).

Runs single-threaded (``OMP_NUM_THREADS=1``, workers 0) under ``nice``: timings on a shared
machine are noisy; the bf16 / fp32 ratio of neighbouring runs is the number to read.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/train_precision.py [--methods fol selavpr]
        [--seeds 0 1 2] [--fol-steps 100] [--selavpr-epochs 2] [--out benchmarks/results/train_precision.json]
        [--timing-rounds 3 --timing-size 240 432] [--selavpr-timing-rounds 4] [--replot]

Each invocation merges into ``--out`` (methods and timings measured before stay). The stored
result: ``--methods fol`` (seeds 0 1 2), then ``--methods selavpr --seeds 0 1``, then
``--methods --selavpr-timing-rounds 4``, then ``--methods --timing-rounds 3 --timing-size 240 432``.
Per-step timings in one process (``*_step_timing``: fp32 and bf16 blocks alternating on a fixed
batch) are the cleaner speed numbers; the runs' own medians drift with the machine's load.
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

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from placerank.data.places import find_shared_data  # noqa: E402
from placerank.eval.evaluate import EvalConfig, evaluate  # noqa: E402
from placerank.train.common import TrainConfig, run_training  # noqa: E402

TRAVERSALS = ("day_left", "day_right", "night_right")
PAIRS = (("day_right", "night_right"), ("day_left", "night_right"))
MODEL = {"fol": "fol-effnet-lite0", "selavpr": "selavpr-effnet-lite0"}


def recipe(method: str, gardens: Path, args) -> dict:
    """The short recipe of ``method`` on frames 0-99 (no validation: the last weights are judged)."""
    common = {"train": [str(gardens / t) for t in TRAVERSALS], "frames": (0, 100), "device": "cpu", "num_workers": 0}
    if method == "fol":  # tests/train/test_fol.py's short run, longer: 128x224, lr 3e-4 decayed over 600 steps
        opts = {"max_steps": str(args.fol_steps), "lr_decay_iters": "600"}
        return {**common, "image_size": (128, 224), "epochs": 1000, "lr": 3e-4, "options": opts}
    # the selavpr-cpu recipe's settings, fewer epochs
    opts = {"queries_per_loop": "120", "negative_pool": "240"}
    return {**common, "image_size": (224, 400), "epochs": args.selavpr_epochs, "lr": 1e-4, "options": opts}


def held_out(work: Path, gardens: Path, method: str, weights: Path, size) -> dict:
    out = {}
    for db, q in PAIRS:
        files = []
        for trav in (db, q):
            f = work / f"{trav}_100_140.csv"
            rows = "".join(f"{gardens / trav / f'Image{k:03d}.jpg'},{k}\n" for k in range(100, 140))
            f.write_text("path,frame\n" + rows)
            files.append(f)
        res = evaluate(
            EvalConfig(
                database=files[0],
                queries=files[1],
                out=work / f"ev_{weights.parent.name}_{db}",
                model=MODEL[method],
                weights=weights,
                image_size=size,
                frame_tolerance=2,
                use_cache=False,
                num_examples=0,
                device="cpu",
                num_workers=0,
            )
        )
        out[f"{db}->{q}"] = {k: round(float(v), 4) for k, v in res.recall.items()}
    return out


def steps_of(run: Path, method: str) -> tuple[list[float], list[float]]:
    """(loss per step, wall seconds per step) from the run's log.jsonl."""
    recs = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines() if l.strip()]
    steps = [r for r in recs if ("ms" in r if method == "fol" else r.get("event") == "step")]
    times = [b["time_s"] - a["time_s"] for a, b in zip(steps, steps[1:])]
    return [float(r["loss"]) for r in steps], times


def one_run(method: str, precision: str, seed: int, work: Path, gardens: Path, args, epochs=None) -> dict:
    settings = recipe(method, gardens, args)
    if epochs is not None:
        settings["epochs"] = epochs
    out = work / (f"{method}_{precision}_s{seed}" + ("" if epochs is None else "_untrained"))
    t0 = time.monotonic()
    model = run_training(TrainConfig(method=method, out=out, seed=seed, precision=precision, **settings))
    wall = time.monotonic() - t0
    rec: dict = {"precision": precision, "seed": seed, "train_wall_s": round(wall, 1)}
    config = json.loads((out / "config.json").read_text())
    rec["config_precision"] = config["precision"]
    if epochs != 0:
        losses, times = steps_of(out, method)
        rec.update(
            steps=len(losses),
            loss=[round(v, 5) for v in losses],
            s_per_step_median=round(statistics.median(times), 4) if times else None,
        )
    rec["held_out"] = held_out(work, gardens, method, model, settings["image_size"])
    print(json.dumps({k: v for k, v in rec.items() if k != "loss"}), flush=True)
    return rec


def fol_step_timing(gardens: Path, size: tuple[int, int], rounds: int, steps: int = 3) -> dict:
    """Seconds per FoL training step (forward, fp32 losses, backward, AdamW) on one fixed batch of
    8 places x 2 real frames, fp32 vs bf16, with and without channels_last, in one process:
    the variants alternate (order reversed every round), one warm-up step before each block;
    the median over rounds of each block's mean is reported (the machine's load drifts)."""
    from placerank.data.images import load_tensor
    from placerank.models import create
    from placerank.train.fol import fol_batch_loss, fol_forward
    from placerank.train.losses.fol import FoLCriterion, FoLLossConfig
    from placerank.train.losses.fol_adapt import adapt_loss_config, head_parameters, shared_parameters
    from placerank.train.precision import TrainPrecision

    torch.manual_seed(0)
    model = create("fol-effnet-lite0", image_size=size).train()
    pairs = [
        (load_tensor(gardens / t / f"Image{10 * p:03d}.jpg", model.preprocess)[0], p)
        for p in range(8)
        for t in TRAVERSALS[:2]
    ]
    images, labels = torch.stack([x for x, _ in pairs]), torch.tensor([p for _, p in pairs])
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-7)
    cfg = adapt_loss_config(FoLLossConfig(grad_log_every=0), "fol-effnet-lite0", {})
    criterion = FoLCriterion(cfg, shared_parameters(model), head_parameters(model))
    cpu = torch.device("cpu")

    def step(prec: TrainPrecision, x: torch.Tensor) -> float:
        t0 = time.perf_counter()
        with prec.autocast():
            out, local_map = fol_forward(model, x)
        with prec.full():
            loss, _ = fol_batch_loss(model, criterion, *prec.fp32((out, local_map)), labels, "center")
        opt.zero_grad(set_to_none=True)
        prec.backward(loss)
        prec.step(opt)
        return time.perf_counter() - t0

    variants = [(p, cl) for cl in (False, True) for p in ("fp32", "bf16")]
    times: dict[str, list[float]] = {}
    for r in range(rounds):
        for p, cl in variants if r % 2 == 0 else variants[::-1]:
            fmt = torch.channels_last if cl else torch.contiguous_format
            model.to(memory_format=fmt)
            x = images.contiguous(memory_format=fmt)
            prec = TrainPrecision(p, cpu)
            step(prec, x)  # warm-up
            name = p + ("+channels_last" if cl else "")
            times.setdefault(name, []).append(statistics.mean(step(prec, x) for _ in range(steps)))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "image_size": list(size),
        "rounds": rounds,
        "steps_per_block": steps,
        "s_per_step_median": {k: round(v, 3) for k, v in med.items()},
        "s_per_step_blocks": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "speedup_vs_fp32": {k: round(med["fp32"] / v, 3) for k, v in med.items()},
        # the same round's blocks side by side (the load drifts between rounds)
        "bf16_speedup_per_round": [round(f / b, 3) for f, b in zip(times["fp32"], times["bf16"])],
    }


def selavpr_step_timing(gardens: Path, rounds: int, steps: int = 3) -> dict:
    """Seconds per SelaVPR training step (``train_step`` from cached frozen-prefix features, 4
    tuples of 4 real frames at the recipe's 224x400), fp32 vs bf16 alternating in one process as
    :func:`fol_step_timing`."""
    from placerank.data.images import load_tensor
    from placerank.models import create
    from placerank.train.losses.selavpr import SelaVPRLossConfig
    from placerank.train.precision import TrainPrecision
    from placerank.train.selavpr_mining import train_step

    torch.manual_seed(0)
    model = create("selavpr-effnet-lite0", image_size=(224, 400))
    frames = [(t, 10 * k) for k in range(8) for t in TRAVERSALS[:2]]
    images = torch.stack([load_tensor(gardens / t / f"Image{f:03d}.jpg", model.preprocess)[0] for t, f in frames])
    with torch.no_grad():
        prefix = model.backbone.forward_prefix(images)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-7)
    cpu, config = torch.device("cpu"), SelaVPRLossConfig()
    times: dict[str, list[float]] = {}
    for r in range(rounds):
        for p in ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32"):
            prec = TrainPrecision(p, cpu)
            train_step(model, prefix, opt, 2, config, True, prec=prec)  # warm-up
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(model, prefix, opt, 2, config, True, prec=prec)
            times.setdefault(p, []).append((time.perf_counter() - t0) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "image_size": [224, 400],
        "rounds": rounds,
        "steps_per_block": steps,
        "s_per_step_median": {k: round(v, 3) for k, v in med.items()},
        "s_per_step_blocks": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "bf16_speedup_per_round": [round(f / b, 3) for f, b in zip(times["fp32"], times["bf16"])],
    }


def r1(rec: dict) -> float:
    return statistics.mean(v["1"] for v in rec["held_out"].values())


def tail(rec: dict) -> float:
    loss = rec["loss"]
    return statistics.mean(loss[len(loss) * 3 // 4 :])


def decide(runs: list[dict], seeds: list[int]) -> dict:
    by = {(r["precision"], r["seed"]): r for r in runs if "loss" in r}
    fp32 = [by["fp32", s] for s in seeds]
    bf16 = [by["bf16", s] for s in seeds]
    r1_diff = [100 * (r1(b) - r1(f)) for f, b in zip(fp32, bf16)]
    tail_rel = [(tail(b) - tail(f)) / abs(tail(f)) for f, b in zip(fp32, bf16)]
    speed = [f["s_per_step_median"] / b["s_per_step_median"] for f, b in zip(fp32, bf16)]
    r1_noise = 100 * statistics.stdev([r1(f) for f in fp32]) if len(seeds) > 1 else 0.0
    tail_noise = statistics.stdev([tail(f) for f in fp32]) / abs(statistics.mean(tail(f) for f in fp32))
    mean_diff = statistics.mean(r1_diff)
    recall_holds = mean_diff >= -0.5 or abs(mean_diff) <= r1_noise
    curve_tracks = abs(statistics.mean(tail_rel)) <= max(tail_noise, 0.02)
    faster = statistics.median(speed) >= 1.05
    return {
        "r1_points_bf16_minus_fp32_per_seed": [round(v, 2) for v in r1_diff],
        "r1_points_mean_diff": round(mean_diff, 2),
        "r1_points_fp32_seed_std": round(r1_noise, 2),
        "last_quarter_loss_rel_diff_per_seed": [round(v, 4) for v in tail_rel],
        "last_quarter_loss_fp32_seed_rel_std": round(tail_noise, 4),
        "speedup_fp32_over_bf16_s_per_step": [round(v, 3) for v in speed],
        "recall_holds": recall_holds,
        "loss_curve_tracks": curve_tracks,
        "faster": faster,
        "auto": "bf16" if (recall_holds and curve_tracks and faster) else "fp32",
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(result["methods"])
    fig, axes = plt.subplots(1, len(methods), figsize=(7 * len(methods), 4.5), squeeze=False)
    for ax, m in zip(axes[0], methods):
        runs = [r for r in result["methods"][m]["runs"] if "loss" in r]
        for r in runs:
            loss = r["loss"]
            k = max(1, len(loss) // 20)  # a running mean: single steps are noisy
            smooth = [statistics.mean(loss[max(0, i - k + 1) : i + 1]) for i in range(len(loss))]
            style = "-" if r["precision"] == "fp32" else "--"
            color = f"C{r['seed'] % 10}"  # one colour per seed: fp32 solid, bf16 dashed
            ax.plot(
                range(1, len(loss) + 1),
                smooth,
                style,
                color=color,
                label=f"{r['precision']} seed {r['seed']} (R@1 {r1(r):.2f})",
            )
        d = result["methods"][m]["decision"]
        ax.set_title(f"{m}: loss per step (running mean of {k}); auto -> {d['auto']}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None)
    ap.add_argument("--methods", nargs="*", default=["fol"], help="fol selavpr (none: only --timing-rounds)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fol-steps", type=int, default=100)
    ap.add_argument("--selavpr-epochs", type=int, default=2)
    ap.add_argument("--timing-rounds", type=int, default=0, help="FoL step timing rounds (0: none)")
    ap.add_argument("--timing-size", type=int, nargs=2, default=[128, 224])
    ap.add_argument("--selavpr-timing-rounds", type=int, default=0, help="SelaVPR step timing rounds (0: none)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train_precision.json")
    ap.add_argument("--replot", action="store_true", help="only redraw the plot of --out")
    args = ap.parse_args()
    if args.replot:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return
    torch.set_num_threads(1)
    gardens = find_shared_data(args.data) / "gardenspoint_walking"
    result: dict = {
        "what": "fp32 vs bf16 autocast training, same seeds; held-out GardensPoint frames 100-139 (fp32 eval)",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "note": "shared 2-core machine, other jobs running: wall times are noisy, read the per-seed ratios",
        },
        "methods": {},
    }
    if args.timing_rounds:
        result["fol_step_timing"] = fol_step_timing(gardens, tuple(args.timing_size), args.timing_rounds)
        print(json.dumps(result["fol_step_timing"]), flush=True)
        save(result, args.out)
    if args.selavpr_timing_rounds:
        result["selavpr_step_timing"] = selavpr_step_timing(gardens, args.selavpr_timing_rounds)
        print(json.dumps(result["selavpr_step_timing"]), flush=True)
        save(result, args.out)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for method in args.methods:
            load_start = os.getloadavg()
            runs = []
            for i, seed in enumerate(args.seeds):
                runs.append(one_run(method, "fp32", seed, work, gardens, args, epochs=0))
                order = ("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")
                for precision in order:
                    runs.append(one_run(method, precision, seed, work, gardens, args))
            result["methods"][method] = {
                "recipe": {k: v for k, v in recipe(method, gardens, args).items() if k != "train"},
                "runs": runs,
                "decision": decide(runs, args.seeds),
                "load_average_start_end": [load_start, os.getloadavg()],
            }
            print(json.dumps({method: result["methods"][method]["decision"]}), flush=True)
            save(result, args.out)  # after every method: a later method's failure keeps this one


def save(result: dict, out: Path) -> None:
    """Write ``out`` (and the plot beside it); methods measured earlier (another invocation,
    e.g. ``--methods selavpr`` after ``--methods fol``) stay in it unless measured again."""
    from placerank.utils import write_json_atomic

    if out.exists():
        old = json.loads(out.read_text())
        result = {**old, **result, "methods": {**old.get("methods", {}), **result["methods"]}}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    if result["methods"]:
        plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}", flush=True)


if __name__ == "__main__":
    main()
