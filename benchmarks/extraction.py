"""Extraction at the hardware's speed, per model: every inference path side by side.

For each model, GardensPoint Walking day_right (database, 140) -> night_right (queries, 140),
positives |i-j| <= 2, at the model's default input size, batch 16:

- **bare forward** paths on images decoded once up front (what the network alone costs):
  ``eager_fp32`` (today's path before the fast one: contiguous weights and input),
  ``channels_last``, ``compile`` (torch.compile of the backbone, fp32), ``bf16`` (autocast,
  channels_last), ``compile_bf16``, and ``onnxruntime`` (the ``placerank export`` file on ONNX
  Runtime's CPU provider, fp32). Each row: ms per image (median of ``--rounds`` alternating
  rounds over all 280 images), compile time (cold: a fresh inductor cache; warm: the same graph
  again after ``torch._dynamo.reset()``), descriptor agreement with eager fp32 (min cosine, max
  abs difference) and R@1.
- **pipeline** rows (``extract_features``: DataLoader decode + resize in workers, batching,
  normalisation, copy out), ms per image *including decode*: ``today`` (an unprepared model in
  eager fp32: the old default), ``torch_fast`` (PyTorch's default path, what a job below the
  export's break-even or on a GPU runs: channels_last, ``--precision auto`` = the model's check,
  the backbone compiled where ``--compile auto`` would: fp32, or a reduced precision whose
  compiled check held) and ``openvino`` (``--runtime auto``'s choice for a large CPU job: the
  exported model at OpenVINO's checked precision), plus ``pipeline / fastest bare forward``
  (goal >= 0.9) and ``vs today`` (goal >= 4x).

``--write-checks`` turns the channels_last fp32 and bf16 rows into the records ``--precision auto``
ships (``placerank/descriptors/precision_checks.json``). The machine is shared and has 2 cores:
read ratios of paths measured in the same rounds, not absolute times.

    python benchmarks/extraction.py [--models effnet-lite0-gem ...] [--rounds 2] [--write-checks]
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from placerank.data.images import load_tensor  # noqa: E402
from placerank.data.layouts import LayoutOptions, open_dataset  # noqa: E402
from placerank.data.places import find_shared_data  # noqa: E402
from placerank.descriptors.extract import extract_features  # noqa: E402
from placerank.descriptors.fast import (  # noqa: E402
    choose_precision,
    compiled_precision_holds,
    device_class,
    prepare_inference,
)
from placerank.descriptors.memory import DEFAULT_MAX_MEMORY_GB, memory_budget, resident_bytes  # noqa: E402
from placerank.eval.recall import recall_at_n  # noqa: E402
from placerank.index.flat import FlatIndex  # noqa: E402
from placerank.models import create  # noqa: E402

MODELS = ["effnet-lite0-gem", "effnet-lite2-gem", "fol-effnet-lite0", "selavpr-effnet-lite0", "sfrs-effnet-lite0"]
BARE = ["eager_fp32", "channels_last", "compile", "bf16", "compile_bf16", "onnxruntime", "openvino", "openvino_bf16"]
CHECKS = REPO / "placerank" / "descriptors" / "precision_checks.json"


def recall_at_1(desc: np.ndarray, n_db: int, positives) -> float:
    ids = FlatIndex.build(desc[:n_db]).search(desc[n_db:], 1)[1]
    return recall_at_n(ids, positives, ns=[1])["1"]


FOREIGN = {"onnxruntime": "onnxruntime", "openvino": "openvino", "openvino_bf16": "openvino"}


def _runtime_child(model_file: str, npy_path: str, batch: int, threads: int, folder: str, conn) -> None:
    """One foreign runtime's rows (bare paths and the pipeline) in their own spawned process.
    ONNX Runtime and OpenVINO each beside the other, or OpenVINO beside torch.compile, crashed
    this benchmark's process (a corrupted heap, found nondeterministically); every PyTorch row
    stays in the parent, which never loads either runtime. Times only the work itself. Its
    DataLoaders fork their workers, as in a command's main process: a spawned process's default
    start method is spawn, whose workers re-import torch and placerank on every loader (measured:
    the OpenVINO bf16 pipeline 22-25 ms an image here against 17 ms in a main process)."""
    mp.set_start_method("fork", force=True)
    torch.set_num_threads(threads)
    os.environ["PLACERANK_CACHE"] = str(Path(folder) / "cache")  # the export lands in a scratch cache
    model = torch.load(model_file, weights_only=False)
    bare: dict[str, BarePath] = {}
    while (msg := conn.recv()) is not None:
        kind, arg = msg
        if kind == "bare":
            bare.setdefault(arg, BarePath(arg, model, batch, Path(folder)))
            conn.send(bare[arg].run(torch.from_numpy(np.load(npy_path))))
        else:  # ("pipeline", (paths, workers, precision)): extract_features on the exported model
            paths, workers, precision = arg
            conn.send(pipeline_row(model, paths, batch, workers, precision, "off", "openvino"))


class RuntimeChild:
    """The parent's handle on :func:`_runtime_child`: ``bare(name)``, ``pipeline(...)``."""

    def __init__(self, model, tensors: torch.Tensor, batch: int, folder: Path, runtime: str):
        folder = folder / runtime
        folder.mkdir(parents=True, exist_ok=True)
        model_file, npy = folder / "model.pt", folder / "images.npy"
        torch.save(model, model_file)
        np.save(npy, tensors.contiguous().numpy())
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        args = (str(model_file), str(npy), batch, torch.get_num_threads(), str(folder), child)
        self.process = ctx.Process(target=_runtime_child, args=args)  # not daemonic: its DataLoader forks workers
        self.process.start()

    def ask(self, kind: str, arg) -> tuple[np.ndarray, float]:
        self.conn.send((kind, arg))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(timeout=60)


class ChildPath:
    """A bare path that runs in a :class:`RuntimeChild`."""

    def __init__(self, name: str, child: RuntimeChild):
        self.name, self.child = name, child
        self.compile_s: dict[str, float] = {}

    def run(self, tensors: torch.Tensor) -> tuple[np.ndarray, float]:
        return self.child.ask("bare", self.name)


class BarePath:
    """One bare-forward path of one model: ``run(tensors) -> (descriptors, seconds)``."""

    def __init__(self, name: str, model, batch: int, onnx_dir: Path):
        self.name, self.batch = name, batch
        self.compile_s: dict[str, float] = {}
        self.model = model if name == "eager_fp32" else prepare_inference(copy.deepcopy(model), "cpu")
        self.dtype = torch.bfloat16 if "bf16" in name else None
        self.session = self.encoder = None
        if name == "onnxruntime":
            self.session = self._onnx_session(model, onnx_dir)
        if name.startswith("openvino"):
            from placerank.descriptors.runtime import exported_encoder

            self.encoder = exported_encoder(model, "openvino", "bf16" if "bf16" in name else "fp32")
            self.dtype = None
        if "compile" in name:
            self._compile(onnx_dir)

    def _onnx_session(self, model, folder: Path):
        import onnxruntime as ort

        from placerank.models.onnx_export import export_onnx

        path = folder / f"{model.name}.onnx"
        export_onnx(copy.deepcopy(model), path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def _compile(self, folder: Path) -> None:
        """Cold compile in a fresh inductor cache, then warm (same cache, dynamo reset)."""
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / f"inductor-{self.name}")
        x = torch.zeros(self.batch, 3, *self.model.preprocess.size).contiguous(memory_format=torch.channels_last)
        for state in ("cold", "warm"):
            torch._dynamo.reset()
            self.model.backbone.__dict__.pop("forward", None)
            self.model.backbone.forward = torch.compile(self.model.backbone.forward, dynamic=False)
            t0 = time.perf_counter()
            self._forward(x)
            self.compile_s[state] = time.perf_counter() - t0

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor) -> np.ndarray:
        if self.session is not None:
            return self.session.run(["global"], {"images": x.contiguous().numpy()})[0]
        if self.encoder is not None:
            return self.encoder.encode(x.contiguous(), [(0, 0)] * len(x))[0].numpy()
        if self.name != "eager_fp32":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            g = self.model(x)
        return torch.nn.functional.normalize(g.float(), dim=-1).numpy()

    def run(self, tensors: torch.Tensor) -> tuple[np.ndarray, float]:
        out, t0 = [], time.perf_counter()
        for s in range(0, len(tensors), self.batch):
            x = tensors[s : s + self.batch]
            n = len(x)
            if n < self.batch and "compile" in self.name:  # the compiled graph's static shape
                x = torch.cat([x, x.new_zeros((self.batch - n, *x.shape[1:]))])
            out.append(self._forward(x)[:n])
        return np.concatenate(out), time.perf_counter() - t0


def pipeline_row(model, paths: list[Path], batch: int, workers: int | None, precision: str, compile_: str,
                 runtime: str, prepared: bool | None = None) -> tuple:  # fmt: skip
    """``extract_features`` over ``paths`` (decode in workers): an unprepared model for today's
    path (``prepared=False``; default: unprepared only for eager torch), else prepared with
    ``compile_`` and ``runtime``; a warm-up batch first (compile, export)."""
    m = copy.deepcopy(model)
    if prepared is None:
        prepared = (compile_, runtime) != ("off", "torch")
    if prepared:
        prepare_inference(m, "cpu", compile=compile_, runtime=runtime)
    cpu = torch.device("cpu")
    # The default memory budget on top of what this benchmark process already holds (every bare
    # path's model and the decoded images): a CLI run does not hold those, and without this the
    # budget cut the pipeline's batch (to one image for SelaVPR) and timed that instead.
    with memory_budget(resident_bytes() / 2**30 + DEFAULT_MAX_MEMORY_GB):
        extract_features(m, paths[:batch], cpu, batch, workers, use_cache=False, progress=False, precision=precision)
        t0 = time.perf_counter()
        d, _ = extract_features(m, paths, cpu, batch, workers, use_cache=False, progress=False, precision=precision)
    return d, time.perf_counter() - t0


def bench_model(name: str, ds, args, tmp: Path) -> dict:
    torch.manual_seed(0)
    model = create(name, **({"image_size": tuple(args.image_size)} if args.image_size else {})).eval()
    paths = list(ds.database.paths) + list(ds.queries.paths)
    if model.needs_data_init:
        model.init_from_images(list(ds.database.paths))
    t0 = time.perf_counter()
    tensors = torch.stack([load_tensor(p, model.preprocess)[0] for p in paths])
    decode_ms = (time.perf_counter() - t0) * 1000 / len(paths)
    n_db = len(ds.database)
    children = {
        rt: RuntimeChild(model, tensors, args.batch_size, tmp, rt)
        for rt in sorted({FOREIGN[v] for v in args.variants if v in FOREIGN})
    }
    paths_by = {
        v: ChildPath(v, children[FOREIGN[v]]) if v in FOREIGN else BarePath(v, model, args.batch_size, tmp)
        for v in args.variants
    }
    # Each compiled path measured its compile after torch._dynamo.reset(), which dropped the
    # graphs of the paths compiled before it: one untimed batch each recompiles them (warm
    # inductor cache) here, not inside round 0's timing.
    for v, bare in paths_by.items():
        if "compile" in v:
            bare.run(tensors[: args.batch_size])
    times: dict[str, list[float]] = {v: [] for v in paths_by}
    desc: dict[str, np.ndarray] = {}
    for r in range(args.rounds):
        for v, bare in paths_by.items():
            desc[v], s = bare.run(tensors)
            times[v].append(s * 1000 / len(paths))
            print(f"{name} round {r} {v}: {times[v][-1]:.1f} ms/image", flush=True)
    ref = desc.get("eager_fp32")
    rows = {}
    for v, bare in paths_by.items():
        row = {"ms_per_image": float(np.median(times[v])), "recall_at_1": recall_at_1(desc[v], n_db, ds.positives)}
        if ref is not None:
            row["min_cosine"] = float(np.min(np.sum(desc[v] * ref, axis=1)))
            row["max_abs_diff"] = float(np.max(np.abs(desc[v] - ref)))
        if bare.compile_s:
            row["compile_s"] = {k: round(s, 1) for k, s in bare.compile_s.items()}
        rows[v] = row
    out = {"model": name, "input_size": list(model.preprocess.size), "decode_ms_per_image": decode_ms, "bare": rows}
    load = os.getloadavg()[0]
    out["measured"] = f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {load:.1f} at the end"
    for key, runtime in (("check", "torch"), ("check_openvino", "openvino")):
        record = check_record(out, runtime)
        if record is not None:
            out[key] = record
    n = len(paths)
    configs = {"today": ("torch", "fp32", "off")}
    configs["torch_fast"] = ("torch", _chosen(out.get("check")), _auto_compile(out.get("check")))
    if "openvino" in rows:
        configs["openvino"] = ("openvino", _chosen(out.get("check_openvino")), "off")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "inductor-pipeline")
    seconds: dict[str, list[float]] = {k: [] for k in configs}
    found: dict[str, np.ndarray] = {}
    for r in range(args.rounds):  # alternating rounds, as the bare rows: the machine's noise hits every path
        for key, (runtime, precision, compile_) in configs.items():
            if runtime == "openvino":
                d, s = children["openvino"].ask("pipeline", (paths, args.workers, precision))
            else:
                d, s = pipeline_row(
                    model, paths, args.batch_size, args.workers, precision, compile_, runtime,
                    prepared=key != "today",  # the old default: an unprepared model in eager fp32
                )  # fmt: skip
            seconds[key].append(s)
            found[key] = d
            print(f"{name} pipeline round {r} {key}: {s * 1000 / n:.1f} ms/image", flush=True)
    s_today = float(np.median(seconds["today"]))
    pipe: dict = {}
    for key, (runtime, precision, compile_) in configs.items():
        s = float(np.median(seconds[key]))
        pipe[key] = {
            "runtime": runtime,
            "precision": precision,
            "compile": compile_ == "on",
            "ms_per_image": s * 1000 / n,
            "recall_at_1": recall_at_1(found[key], n_db, ds.positives),
            "vs_today": s_today / s,
        }
        same = _bare_row_of(runtime, precision, compile_ == "on") if key != "today" else "eager_fp32"
        if same in rows:  # the pipeline against the bare forward of the same path
            pipe[key]["bare_row"] = same
            pipe[key]["vs_own_bare"] = rows[same]["ms_per_image"] / pipe[key]["ms_per_image"]
    for child in children.values():
        child.close()
    fastest = min(rows, key=lambda v: rows[v]["ms_per_image"])
    best = min((k for k in pipe if k != "today"), key=lambda k: pipe[k]["ms_per_image"])
    pipe["fastest_bare"] = fastest
    pipe["best_pipeline"] = best
    pipe["best_vs_fastest_bare"] = rows[fastest]["ms_per_image"] / pipe[best]["ms_per_image"]
    out["pipeline"] = pipe
    return out


def _bare_row_of(runtime: str, precision: str, compiled: bool) -> str:
    if runtime == "openvino":
        return "openvino_bf16" if precision == "bf16" else "openvino"
    if precision == "bf16":
        return "compile_bf16" if compiled else "bf16"
    return "compile" if compiled else "channels_last"


def _chosen(record: dict | None) -> str:
    return record["chosen"] if record is not None else "fp32"


def _auto_compile(record: dict | None) -> str:
    """What ``--compile auto`` does for a large job at the check's chosen precision."""
    return "on" if compiled_precision_holds(record, _chosen(record)) else "off"


def check_record(result: dict, runtime: str = "torch") -> dict | None:
    """The ``--precision auto`` record of ``runtime`` from its fp32 and bf16 bare rows."""
    bare = result["bare"]
    fp32, bf16 = ("channels_last", "bf16") if runtime == "torch" else ("openvino", "openvino_bf16")
    if fp32 not in bare or bf16 not in bare:
        return None
    record = {
        "model": result["model"],
        "device_class": device_class(torch.device("cpu")),
        "runtime": runtime,
        "input_size": result["input_size"],
        "dataset": "gardenspoint_walking/day_right -> gardenspoint_walking/night_right, |i-j| <= 2",
        "queries": 140,
        "database": 140,
        "source": f"benchmarks/extraction.py (bare forward, rows {fp32} and {bf16})",
        "precisions": {
            "fp32": {k: bare[fp32][k] for k in ("recall_at_1", "ms_per_image")},
            "bf16": {k: bare[bf16][k] for k in ("recall_at_1", "ms_per_image", "min_cosine", "max_abs_diff")},
        },
        "torch": torch.__version__,
    }
    if runtime == "torch" and "compile_bf16" in bare:  # what --compile auto reads (compiled_precision_holds)
        record["compiled"] = {"bf16": {k: bare["compile_bf16"][k] for k in ("recall_at_1", "ms_per_image")}}
        record["source"] += " and compile_bf16"
    record["chosen"] = choose_precision(record)
    return record


def write_checks(results: list[dict]) -> None:
    shipped = json.loads(CHECKS.read_text())

    def key(c: dict) -> tuple:
        return c["model"], c["device_class"], c.get("runtime", "torch")

    new = {key(r[k]): r[k] for r in results for k in ("check", "check_openvino") if k in r}
    kept = [c for c in shipped["checks"] if key(c) not in new]
    shipped["checks"] = kept + list(new.values())
    CHECKS.write_text(json.dumps(shipped, indent=2) + "\n")
    print(f"wrote {len(new)} check(s) into {CHECKS}")


def print_table(results: list[dict]) -> None:
    print(f"\n| model | path | ms/image | vs eager | R@1 | min cos | compile s (cold/warm) |\n|{'---|' * 7}")
    for res in results:
        eager = res["bare"].get("eager_fp32", {}).get("ms_per_image")
        for v, row in res["bare"].items():
            speed = f"{eager / row['ms_per_image']:.2f}x" if eager else ""
            c = row.get("compile_s", {})
            comp = f"{c['cold']:.0f} / {c['warm']:.0f}" if c else ""
            cos = f"{row['min_cosine']:.5f}" if "min_cosine" in row else ""
            print(f"| {res['model']} | {v} | {row['ms_per_image']:.1f} | {speed} | {100 * row['recall_at_1']:.1f} | {cos} | {comp} |")  # fmt: skip
        p = res["pipeline"]
        for k in ("today", "torch_fast", "openvino"):
            if k in p:
                x = p[k]
                what = f" {x['runtime']} {x['precision']}{' compiled' if x['compile'] else ''}" if k != "today" else ""
                speed = f"{x['vs_today']:.2f}x" if k != "today" else "1.00x"
                own = f", {x['vs_own_bare']:.2f} of bare {x['bare_row']}" if "vs_own_bare" in x else ""
                print(f"| {res['model']} | pipeline {k}{what} (+decode{own}) | {x['ms_per_image']:.1f} | {speed} | {100 * x['recall_at_1']:.1f} | | |")  # fmt: skip
        print(f"| {res['model']} | best pipeline / fastest bare ({p['fastest_bare']}): {p['best_vs_fastest_bare']:.2f} | | | | | |")  # fmt: skip


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.4 * len(results), 3.8), squeeze=False)
    for ax, res in zip(axes[0], results):
        pipes = [k for k in ("today", "torch_fast", "openvino") if k in res["pipeline"]]
        labels = [*res["bare"], *(f"pipe {k}" for k in pipes)]
        values = [r["ms_per_image"] for r in res["bare"].values()]
        values += [res["pipeline"][k]["ms_per_image"] for k in pipes]
        colors = ["#999999"] + ["#4477aa"] * (len(res["bare"]) - 1) + ["#cc6677"] + ["#228833"] * (len(pipes) - 1)
        ax.bar(range(len(values)), values, color=colors)
        ax.set_xticks(range(len(values)), labels, rotation=60, ha="right", fontsize=7)
        when = res.get("measured", "")
        cores = "busy cores" if "shared" in when else "idle cores" if "idle" in when else when.split(", ")[-1]
        ax.set_title(f"{res['model']} {res['input_size'][0]}x{res['input_size'][1]}, {cores}", fontsize=8)
        ax.set_ylabel("ms / image (lower is better)", fontsize=7)
        for x, v in enumerate(values):
            ax.annotate(f"{v:.0f}", (x, v), ha="center", va="bottom", fontsize=6)
    fig.suptitle(f"extraction per model, CPU {torch.get_num_threads()} threads, batch 16", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--variants", nargs="+", default=BARE, choices=BARE)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--image-size", type=int, nargs=2, default=None, help="smoke runs only (default: the model's)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--write-checks", action="store_true", help="update placerank/descriptors/precision_checks.json")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "extraction.json")
    args = ap.parse_args()
    root = find_shared_data(args.data) / "gardenspoint_walking"
    ds = open_dataset(root / "day_right", root / "night_right", options=LayoutOptions(frame_tolerance=2))
    results = []
    with tempfile.TemporaryDirectory(prefix="placerank-bench-") as tmp:
        for name in args.models:
            results.append(bench_model(name, ds, args, Path(tmp)))
            print_table(results[-1:])
            save(results, args)
    print_table(results)
    if args.write_checks:
        write_checks(results)


def save(results: list[dict], args) -> None:
    """Write ``results`` into ``--out``, keeping the models an earlier run measured and this one did
    not (one model can be re-measured without losing the others' rows)."""
    earlier = json.loads(args.out.read_text())["models"] if args.out.is_file() else []
    fresh = {r["model"]: r for r in results}
    seen = {r["model"] for r in earlier}
    results = [fresh.get(r["model"], r) for r in earlier] + [r for r in results if r["model"] not in seen]
    out = {
        "benchmark": "extraction",
        "dataset": "GardensPoint day_right (140) -> night_right (140), |i-j| <= 2",
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "device_class": device_class(torch.device("cpu")),
        "models": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
