"""ONNX export of a placerank VPR model, for deployment outside Python (ONNX Runtime, TensorRT,
OpenVINO), as robotics users deploy VPR models.

What goes into the graph is exactly the model's tensor work; what stays out is the per-image
numpy post-processing of :meth:`VPRModel.encode` (top-N selection, pixel keypoints), which
:mod:`placerank.models.onnx_outputs` reproduces from the outputs and the file's metadata. One
graph, named outputs (``docs/inference.md`` has the table):

- every model: ``global`` (B, D) float32, L2-normalised — ``model(images)``;
- FoL (``fol-*``): ``region_score`` (B, h, w), the test-time region score Mᵃ over the backbone's
  patch grid; ``local_map`` (B, 128, 4h-3, 4w-3), the up-conv head's output L2-normalised per
  cell; with local mode ``pool3`` or ``center`` also ``patch_descriptors`` (B, 128, h, w), each
  patch's L2-normalised descriptor in that mode (the re-ranker's features are its top-N patches);
- SelaVPR (``selavpr-*``): ``local_map`` (B, 128, gh, gw), the dense L2-normalised local features.

The exporter is torch's ``torch.export``-based one (``dynamo=True``, opset 18): the TorchScript
exporter fails on GeM's whole-map pooling (the kernel size is traced as a tensor). The batch axis
is dynamic; height and width are the model's input size, recorded in the metadata with the
mean/std preprocessing so a deployment knows how to feed it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from placerank.errors import PlaceRankError
from placerank.models.base import VPRModel
from placerank.models.fol import FoLModel
from placerank.models.selavpr import SelaVPRModel
from placerank.utils import atomic_path, check_writable_parent
from placerank.version import __version__

FORMATS = ("onnx",)
OPSET = 18
INPUT_NAME = "images"
#: batch of the example input the graph is traced with (the axis stays dynamic)
EXAMPLE_BATCH = 2

OUTPUT_MEANING = {
    "global": "(B, D) float32 global descriptor, L2-normalised: placerank's retrieval descriptor",
    "region_score": "(B, h, w) FoL test-time region score M^a over the backbone's patch grid (row-major"
    " patch index r*w + c); the top num_regions patches form the region",
    "local_map": "(B, 128, H', W') up-conv local head output, L2-normalised per cell; cell (u, v) sits at"
    " feature-map position (u/4, v/4)",
    "patch_descriptors": "(B, 128, h, w) FoL per-patch local descriptor in local_mode (pool3: 3x3 mean of"
    " local_map around cell (4r, 4c); center: local_map cell (4r, 4c)), L2-normalised",
}


def require_onnx(check_with: str = "onnxruntime") -> None:
    """The export needs ``onnx`` and ``onnxscript`` (torch's exporter) and verifies the file with
    ``check_with`` (``onnxruntime`` or ``openvino``): one line naming what is missing and the
    extra that installs it. Only the checker asked for is imported: importing a runtime loads its
    native libraries, and ONNX Runtime and OpenVINO are never loaded into one process."""
    missing = []
    for module in ("onnx", "onnxscript", check_with):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise PlaceRankError(
            f"ONNX export needs the Python package(s) {', '.join(missing)}:"
            f" pip install 'placerank[export]' (or pip install onnx onnxscript {check_with})"
        )


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise PlaceRankError(f"unsupported --format '{fmt}' (supported: {', '.join(FORMATS)})")
    return fmt


def check_out_file(target: str | os.PathLike, flag: str = "--out") -> Path:
    """Before any work: ``target`` must be a file path (not a folder) in a writable folder."""
    target = Path(target)
    if target.is_dir():
        raise PlaceRankError(f"{flag} {target} is a folder; give a file name such as model.onnx")
    check_writable_parent(target, flag)
    return target


class ExportGraph(nn.Module):
    """The exported computation: ``model``'s tensors up to the numpy post-processing, as a tuple in
    :meth:`output_names` order (ONNX outputs are positional)."""

    def __init__(self, model: VPRModel):
        super().__init__()
        if getattr(model, "needs_data_init", False):
            raise PlaceRankError(
                f"model '{model.name}' has an uninitialised NetVLAD layer; pass --weights of a trained model"
            )
        self.model = model

    def output_names(self) -> list[str]:
        if isinstance(self.model, FoLModel):
            names = ["global", "region_score", "local_map"]
            return names + (["patch_descriptors"] if self.model.cfg.local_mode in ("pool3", "center") else [])
        if isinstance(self.model, SelaVPRModel):
            return ["global", "local_map"]
        return ["global"]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self.model
        if isinstance(model, FoLModel):
            out = model.run(images, local_map=True)
            assert out.local_map is not None
            h, w = out.grid
            L = F.normalize(out.local_map.float(), dim=1)
            outputs = [out.descriptor, out.map_a.reshape(-1, h, w), L]
            if model.cfg.local_mode == "pool3":  # FoLModel.region_sets' pool3 branch, at every patch
                pooled = F.avg_pool2d(L, 3, stride=1, padding=1, count_include_pad=False)
                outputs.append(F.normalize(pooled[:, :, ::4, ::4], dim=1))
            elif model.cfg.local_mode == "center":  # cell (4r, 4c) equals FoLModel._center_descriptors
                outputs.append(L[:, :, ::4, ::4])
            return tuple(outputs)
        if isinstance(model, SelaVPRModel):
            fmap = model.backbone(images).feature_map
            g = F.normalize(model.aggregator(fmap).float(), dim=-1)  # exactly SelaVPRModel.encode
            return g, model.LocalAdapt(fmap)
        return (model(images),)


def onnx_metadata(model: VPRModel, graph: ExportGraph) -> dict[str, str]:
    """What a deployment needs to feed the graph and read its outputs (ONNX ``metadata_props``:
    string values, JSON where structured)."""
    pre = model.preprocess
    meta: dict[str, Any] = {
        "placerank_version": __version__,
        "model": model.name,
        "weights_id": model.weights_id,
        "weights_source": str(model.weights_source),
        "input_name": INPUT_NAME,
        "input_size": list(pre.size),
        "mean": list(pre.mean),
        "std": list(pre.std),
        "grayscale": bool(pre.grayscale),
        "preprocessing": "RGB, resized (bilinear, aspect not kept) to input_size (height, width), pixels / 255,"
        " then (x - mean) / std per channel; float32 NCHW; any batch size",
        "descriptor_dim": model.descriptor_dim,
        "backbone_stride": int(getattr(model.backbone, "stride", 0) or 0),
        "outputs": {name: OUTPUT_MEANING[name] for name in graph.output_names()},
    }
    if isinstance(model, FoLModel):
        meta.update(local_mode=model.cfg.local_mode, num_regions=int(model.cfg.num_regions))
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def example_input(model: VPRModel, batch: int = EXAMPLE_BATCH, seed: int = 0) -> torch.Tensor:
    """A deterministic batch of normalised-image-like noise at the model's input size."""
    h, w = model.preprocess.size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _to_onnx(graph: ExportGraph, example: torch.Tensor) -> Any:
    """torch.export -> ONNX ModelProto, quietly (the exporter prints progress and warnings)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                graph,
                (example,),
                None,
                input_names=[INPUT_NAME],
                output_names=graph.output_names(),
                opset_version=OPSET,
                dynamo=True,
                dynamic_shapes={"images": {0: batch}},
                external_data=False,
                verbose=False,
            )
        except Exception as e:
            raise PlaceRankError(
                f"ONNX export of '{graph.model.name}' failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            ) from e
    assert program is not None
    return program.model_proto


def run_onnxruntime(path: str | os.PathLike, images: np.ndarray, threads: int | None = None) -> dict[str, np.ndarray]:
    """All outputs of an exported file for one batch, on ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)})))


def run_openvino(path: str | os.PathLike, images: np.ndarray) -> dict[str, np.ndarray]:
    """All outputs of an exported file for one batch, on OpenVINO's CPU plugin in fp32."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(np.ascontiguousarray(images, dtype=np.float32))
    return {o.get_any_name(): np.asarray(result[o]) for o in compiled.outputs}


def export_onnx(model: VPRModel, out: str | os.PathLike, check_with: str = "onnxruntime") -> dict[str, Any]:
    """Write ``model`` as an ONNX file at ``out`` (atomically) and check it: the outputs of
    ``check_with`` (ONNX Runtime, or OpenVINO for ``--runtime openvino``, so that one process never
    holds both: together they corrupted the heap here) on a batch of 1 and of 3 (the dynamic axis)
    against PyTorch's. Returns the metadata, the output names and ``max_abs_diff`` (largest over
    outputs and batches)."""
    require_onnx(check_with)
    import onnx

    out = check_out_file(out)
    model = model.float().eval().cpu()
    graph = ExportGraph(model).eval()
    example = example_input(model)
    with torch.inference_mode():
        graph(example)  # model errors (input too small, ...) as placerank's own line, before tracing
    proto = _to_onnx(graph, example)
    meta = onnx_metadata(model, graph)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"placerank {__version__} export of {model.name} (weights {model.weights_id})"
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
        run = run_openvino if check_with == "openvino" else run_onnxruntime
        diff = max(_max_diff(graph, tmp, example_input(model, batch, seed=batch), run) for batch in (1, 3))
    return {"metadata": meta, "outputs": graph.output_names(), "max_abs_diff": diff}


def _max_diff(graph: ExportGraph, path: Path, images: torch.Tensor, run: Callable = run_onnxruntime) -> float:
    with torch.inference_mode():
        ref = [t.float().numpy() for t in graph(images)]
    got = run(path, images.numpy())
    return max(float(np.abs(got[name] - r).max()) for name, r in zip(graph.output_names(), ref))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """An exported file's ``metadata_props``, JSON values decoded."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    meta: dict[str, Any] = {}
    for p in proto.metadata_props:
        try:
            meta[p.key] = json.loads(p.value)
        except json.JSONDecodeError:
            meta[p.key] = p.value
    return meta
