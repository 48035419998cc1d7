"""ONNX Runtime (and OpenVINO) vs PyTorch on this CPU: does an exported model earn a `--runtime`?

One model (default effnet-lite0-gem at its 360x640 input), batch 16, real GardensPoint images
decoded up front (not timed: this compares forwards, not decoding). Variants, all bare forwards
returning L2-normalised float32 descriptors:

- PyTorch eager fp32 (NCHW, today's reference), eager fp32 channels_last, bf16 autocast
  channels_last, and (unless --no-compile) torch.compile fp32 / bf16 channels_last;
- ONNX Runtime CPU fp32 on the file ``placerank export`` writes, graph optimisation BASIC and ALL;
- OpenVINO CPU (when ``openvino`` imports) on the same file, precision hint f32 and bf16 (its
  default on AMX-BF16 CPUs).

Every variant uses the same number of intra-op threads (--threads). The machine is shared, so
timings are noisy: each round runs every variant once, in a rotated order, and the report gives
each variant's median ms/image over the rounds and its ratio to the eager fp32 reference measured
in the same rounds. Agreement: max |diff| and min cosine of each variant's descriptors against
eager fp32 over all images. "Equal descriptors" = fp32 class (max |diff| <= 1e-4).

    python benchmarks/onnx_runtime.py [--images 32] [--rounds 3] [--threads 2] [--no-compile]
        [--out benchmarks/results/onnx_runtime.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from placerank.data.images import load_tensor  # noqa: E402
from placerank.data.places import find_shared_data  # noqa: E402
from placerank.models import create  # noqa: E402
from placerank.models.onnx_export import INPUT_NAME, export_onnx  # noqa: E402
from placerank.utils import write_json_atomic  # noqa: E402

FP32_EQUAL = 1e-4  # max |diff| for "equal descriptors" (the export's tested bound)
Runner = Callable[[torch.Tensor], np.ndarray]


def torch_runner(model, channels_last: bool, bf16: bool, compiled: bool) -> Runner:
    net = copy.deepcopy(model).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    fwd = torch.compile(net) if compiled else net

    @torch.inference_mode()
    def run(x: torch.Tensor) -> np.ndarray:
        x = x.contiguous(memory_format=fmt)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = fwd(x)
        return F.normalize(out.float(), dim=-1).numpy()

    return run


def ort_runner(path: Path, level: str, threads: int) -> Runner:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level}")
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # idle threads sleep, as torch's do here (OMP_WAIT_POLICY=PASSIVE): no spinning on a shared CPU
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> np.ndarray:
        return session.run(["global"], {INPUT_NAME: x.numpy()})[0]

    return run


def openvino_runner(path: Path, precision: str, threads: int) -> Runner:
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()
    output = compiled.output("global")

    def run(x: torch.Tensor) -> np.ndarray:
        request.infer({INPUT_NAME: x.numpy()})
        out = np.array(request.get_tensor(output).data, dtype=np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)  # already unit length; float32 re-normalise

    return run


def timed_pass(run: Runner, tensors: torch.Tensor, bs: int) -> tuple[float, np.ndarray]:
    """ms per image of one pass over all images in batches of ``bs`` (the last one padded to ``bs``
    so every call sees the shape it was warmed up / compiled for), and the descriptors."""
    outs = []
    t0 = time.perf_counter()
    for s in range(0, len(tensors), bs):
        x = tensors[s : s + bs]
        n = len(x)
        if n < bs:
            x = torch.cat([x, x[-1:].expand(bs - n, -1, -1, -1)])
        outs.append(run(x)[:n])
    return 1000 * (time.perf_counter() - t0) / len(tensors), np.concatenate(outs)


def agreement(desc: np.ndarray, ref: np.ndarray) -> dict:
    cos = (desc * ref).sum(1) / (np.linalg.norm(desc, axis=1) * np.linalg.norm(ref, axis=1))
    return {"max_abs_diff": float(np.abs(desc - ref).max()), "min_cosine": float(cos.min())}


def recall_at_1(run: Runner, root: Path, pre, bs: int) -> float:
    """R@1 of GardensPoint day_right (database) -> night_right (queries), positives |i - j| <= 2
    (the frames are aligned), with this variant's descriptors (decoding not timed)."""
    desc = []
    for side in ("day_right", "night_right"):
        tensors = torch.stack([load_tensor(p, pre)[0] for p in sorted((root / side).glob("*.jpg"))])
        desc.append(timed_pass(run, tensors, bs)[1])
    db, q = desc
    best = (q @ db.T).argmax(axis=1)
    return float(np.mean(np.abs(best - np.arange(len(q))) <= 2))


def build_variants(model, onnx_path: Path, args) -> dict[str, Callable[[], Runner]]:
    t = args.threads
    v: dict[str, Callable[[], Runner]] = {
        "torch eager fp32": lambda: torch_runner(model, False, False, False),
        "torch eager fp32 channels_last": lambda: torch_runner(model, True, False, False),
        "torch bf16 autocast channels_last": lambda: torch_runner(model, True, True, False),
    }
    if not args.no_compile:
        v["torch compile fp32 channels_last"] = lambda: torch_runner(model, True, False, True)
        v["torch compile bf16 channels_last"] = lambda: torch_runner(model, True, True, True)
    v["onnxruntime fp32 (graph opt BASIC)"] = lambda: ort_runner(onnx_path, "BASIC", t)
    v["onnxruntime fp32 (graph opt ALL)"] = lambda: ort_runner(onnx_path, "ALL", t)
    try:
        import openvino  # noqa: F401
    except ImportError:
        print("openvino not installed: skipped")
    else:
        v["openvino fp32 (precision hint f32)"] = lambda: openvino_runner(onnx_path, "f32", t)
        v["openvino bf16 (precision hint bf16)"] = lambda: openvino_runner(onnx_path, "bf16", t)
    return v


def summarise(results: dict, reference: str) -> dict:
    """Best PyTorch path overall and at fp32-equal descriptors; each runtime's ratio to them."""

    def best(pred) -> str:
        names = [n for n, r in results.items() if pred(n, r)]
        return min(names, key=lambda n: results[n]["ms_per_image"])

    def fp32_equal(r) -> bool:
        return r["agreement"]["max_abs_diff"] <= FP32_EQUAL

    torch_best = best(lambda n, r: n.startswith("torch"))
    torch_fp32 = best(lambda n, r: n.startswith("torch") and fp32_equal(r))
    out: dict = {"reference": reference, "best_torch": torch_best, "best_torch_fp32_equal": torch_fp32}
    for name, r in results.items():
        if name.startswith("torch"):
            continue
        peer = torch_fp32 if fp32_equal(r) else torch_best
        out[name] = {
            "compared_with": peer,
            "speedup_vs_peer": results[peer]["ms_per_image"] / r["ms_per_image"],
            "speedup_vs_best_torch": results[torch_best]["ms_per_image"] / r["ms_per_image"],
            "beats_best_torch": r["ms_per_image"] < results[torch_best]["ms_per_image"],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None)
    ap.add_argument("--model", default="effnet-lite0-gem")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--recall", action="store_true", help="also R@1 day_right -> night_right per variant")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "onnx_runtime.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    folder = find_shared_data(args.data) / "gardenspoint_walking" / "day_right"
    paths = sorted(folder.glob("*.jpg"))[: args.images]
    model = create(args.model).eval()
    tensors = torch.stack([load_tensor(p, model.preprocess)[0] for p in paths])
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / f"{args.model}.onnx"
        t0 = time.perf_counter()
        export = export_onnx(model, onnx_path)
        export_s = time.perf_counter() - t0
        print(f"exported {onnx_path.name} in {export_s:.1f} s (ORT vs PyTorch max |diff| {export['max_abs_diff']:.1e})")
        runners: dict[str, Runner] = {}
        results: dict[str, dict] = {}
        for name, make in build_variants(model, onnx_path, args).items():
            t0 = time.perf_counter()
            runners[name] = make()
            timed_pass(runners[name], tensors[: args.batch_size], args.batch_size)  # warm-up (compiles)
            results[name] = {"setup_and_first_batch_s": time.perf_counter() - t0, "rounds_ms_per_image": []}
            print(f"{name}: ready in {results[name]['setup_and_first_batch_s']:.1f} s", flush=True)
        names = list(runners)
        descs: dict[str, np.ndarray] = {}
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # rotated order
                ms, descs[name] = timed_pass(runners[name], tensors, args.batch_size)
                results[name]["rounds_ms_per_image"].append(ms)
                print(f"round {r + 1} {name}: {ms:.1f} ms/image", flush=True)
        if args.recall:
            root = folder.parent
            for name in names:
                results[name]["gardens_r1"] = recall_at_1(runners[name], root, model.preprocess, args.batch_size)
                print(f"{name}: R@1 {results[name]['gardens_r1']:.3f}", flush=True)
    reference = "torch eager fp32"
    ref = descs[reference]
    for name, res in results.items():
        res["ms_per_image"] = float(np.median(res["rounds_ms_per_image"]))
        ratios = [a / b for a, b in zip(results[reference]["rounds_ms_per_image"], res["rounds_ms_per_image"])]
        res["speedup_vs_eager_fp32"] = float(np.median(ratios))
        res["agreement"] = agreement(descs[name], ref)
    summary = summarise(results, reference)
    report = {
        "what": "bare forwards of one model over pre-decoded real images: PyTorch paths vs the exported ONNX file"
        " under ONNX Runtime / OpenVINO (CPU); median ms/image over alternating rounds on a shared machine",
        "model": args.model,
        "input_size": list(model.preprocess.size),
        "batch_size": args.batch_size,
        "images": len(paths),
        "rounds": args.rounds,
        "threads": args.threads,
        "export_s": export_s,
        "export_max_abs_diff": export["max_abs_diff"],
        "machine": {"platform": platform.platform(), "processor": _cpu_name(), "versions": _versions()},
        "variants": results,
        "summary": summary,
    }
    write_json_atomic(args.out, report)
    print(json.dumps({k: (v["ms_per_image"], v["agreement"]) for k, v in results.items()}, indent=1))
    print(json.dumps(summary, indent=1))


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for mod in ("onnxruntime", "openvino", "onnx"):
        with contextlib.suppress(ImportError):
            out[mod] = __import__(mod).__version__
    return out


if __name__ == "__main__":
    main()
