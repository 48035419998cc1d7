"""The VPR model a database was built with: built from its stored name, weights file and input
size, and checked against the stored weights hash and preprocessing, so descriptors from another
model never meet the stored ones.

The same holds for the inference **precision** (fp32, or bf16 / fp16 autocast): a bf16
descriptor is ~0.999 cosine of the fp32 one, enough to move a ranking, so a database is built in
one precision (recorded in its ``precision`` meta row; a database without the row predates it and
is fp32) and every photo added later and every query is extracted in it; below fp32 also on the
same **runtime** (``runtime`` row: torch or openvino; none = torch). Models are prepared
for inference here (:func:`~placerank.descriptors.fast.prepare_inference`: eval mode,
channels_last, the ``--compile`` mode)."""

from __future__ import annotations

from pathlib import Path

from placerank.errors import IndexMismatchError, PlaceRankError


def build_model(model, weights, image_size, device, compile: str = "off", runtime: str = "torch"):
    """``model``: a registry name (built with ``weights``/``image_size``) or a built VPRModel;
    prepared for inference on ``device`` with the ``compile`` mode (auto / on / off) and runtime."""
    from placerank.descriptors.fast import prepare_inference

    if not isinstance(model, str):
        return prepare_inference(model, device, compile, runtime=runtime)
    from placerank.models import create

    kwargs = (
        {"image_size": tuple(image_size) if not isinstance(image_size, int) else (image_size, image_size)}
        if image_size is not None
        else {}
    )
    return prepare_inference(create(model, weights=weights, **kwargs), device, compile, runtime=runtime)


def stored_precision(meta: dict[str, str]) -> str:
    """The precision a database's descriptors were extracted in (fp32 before it was recorded)."""
    return meta.get("precision") or "fp32"


def stored_runtime(meta: dict[str, str]) -> str:
    """The runtime a database's descriptors were extracted with (torch before it was recorded)."""
    return meta.get("runtime") or "torch"


def database_runtime(folder: Path, meta: dict[str, str], requested: str) -> str:
    """The runtime this database's model runs on. fp32 descriptors of every runtime agree to 1e-5:
    the requested one (``auto`` decided as for any job). Below fp32 the stored one, since bf16
    descriptors of two runtimes differ as much as each differs from fp32: ``auto`` takes it,
    another explicit runtime is refused (one line)."""
    precision = stored_precision(meta)
    if precision == "fp32":
        return requested
    stored = stored_runtime(meta)
    if requested not in ("auto", stored):
        raise IndexMismatchError(
            f"{folder}: database was built at precision {precision} with --runtime {stored}, not {requested}; "
            f"use --runtime {stored} (or auto) or a new --db"
        )
    return stored


def check_runtime_made(folder: Path, meta: dict[str, str], runtime: str) -> None:
    """Refuse (one line) to store or search descriptors that ``runtime`` made when the database's
    are another runtime's below fp32: a runtime that could not run the model fell back to PyTorch
    meanwhile (in this process, or in a ``--nproc`` rank)."""
    from placerank.descriptors.runtime import numerics

    precision, stored = stored_precision(meta), stored_runtime(meta)
    if numerics(precision, runtime) != numerics(precision, stored):
        raise IndexMismatchError(
            f"{folder}: database descriptors are {precision} from --runtime {stored}, but the model"
            f" now runs on {runtime} (it could not run on {stored}); not mixing them"
        )


def database_precision(folder: Path, meta: dict[str, str], requested: str | None, device=None) -> str:
    """The precision new photos and queries of this database are extracted in: its own.
    ``requested`` None or ``auto`` takes it; another explicit value is refused (one line), as
    is (with ``device``) a stored precision the device cannot run."""
    from placerank.descriptors.fast import PRECISIONS

    stored = stored_precision(meta)
    if requested not in (None, "auto") and requested != stored:
        if requested not in PRECISIONS:
            raise PlaceRankError(f"--precision {requested}: use one of auto, {', '.join(PRECISIONS)}")
        raise IndexMismatchError(
            f"{folder}: database was built with precision {stored}, not {requested}; "
            f"use --precision {stored} (or auto) or a new --db"
        )
    if device is not None and stored == "fp16" and getattr(device, "type", str(device)) != "cuda":
        raise PlaceRankError(
            f"{folder}: database was built with precision fp16, which needs a CUDA device (the device is {device})"
        )
    return stored


def model_meta(m, weights, radius: float, created: str, precision: str = "fp32") -> dict[str, str]:
    """The ``meta`` rows of a new database built with model ``m`` (prepared for inference: its
    runtime is recorded) in ``precision``."""
    from placerank.descriptors.fast import runtime_of

    if m.needs_data_init:
        # Its k-means initialisation depends on data and is not part of any weights file, so a
        # database built with it could never be reopened with the same model.
        raise PlaceRankError(
            f"model '{m.name}' needs data-driven initialisation (NetVLAD k-means) before a database can store "
            f"its descriptors; train or initialise it, save a placerank checkpoint and pass it with --weights"
        )
    from placerank.localize.metadata import FORMAT

    return {
        "format": str(FORMAT),
        "created": created,
        "model": m.name,
        "weights_id": m.weights_id,
        "weights_source": m.weights_source,
        "weights_path": str(Path(weights).resolve()) if isinstance(weights, (str, Path)) else "",
        "descriptor_dim": str(m.descriptor_dim),
        "preprocess": m.preprocess.signature(),
        "precision": precision,
        "runtime": runtime_of(m),
        "image_size": f"{m.preprocess.size[0]},{m.preprocess.size[1]}",
        "frame": "",
        "radius": repr(float(radius)),
        "generation": "0",
        "rerankers": "{}",
    }


def check_request(folder: Path, meta: dict[str, str], model, image_size) -> None:
    """Refuse at open a model name or input size other than the stored ones (cheap: no model
    is built)."""
    from placerank.localize.metadata import FORMAT

    if meta.get("format") != str(FORMAT):
        raise IndexMismatchError(f"{folder}: database format {meta.get('format')} is not supported (expected {FORMAT})")
    name = model if isinstance(model, str) else getattr(model, "name", None)
    if name is not None and name != meta["model"]:
        raise IndexMismatchError(
            f"{folder}: database was built with model '{meta['model']}', not '{name}'; use a new --db for another model"
        )
    if image_size is not None and (model is None or isinstance(model, str)):
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(v) for v in image_size)
        stored = tuple(int(v) for v in meta["image_size"].split(","))
        if size != stored:
            raise IndexMismatchError(
                f"{folder}: database was built at image size {stored[0]}x{stored[1]}, not {size[0]}x{size[1]}"
            )


def load_model(
    folder: Path, meta: dict[str, str], req_model, req_weights, device, compile: str = "off", runtime: str = "torch"
):
    """The database's model: the requested one (an object, or the stored name with the requested
    weights) or the stored one; refused unless name, weights hash and preprocessing all match."""
    database_precision(folder, meta, None, device)  # an fp16 database on a CPU: one line, no model built
    size = tuple(int(v) for v in meta["image_size"].split(","))
    if req_model is not None and not isinstance(req_model, str):
        m = build_model(req_model, None, None, device, compile, runtime)
    else:
        weights = req_weights if req_weights is not None else (meta["weights_path"] or None)
        if weights is not None and not Path(weights).exists():
            raise PlaceRankError(
                f"{folder}: the weights file it was built with is gone ({weights}); pass --weights with a copy of it"
            )
        m = build_model(meta["model"], weights, size, device, compile, runtime)
    if m.name != meta["model"]:
        raise IndexMismatchError(
            f"{folder}: database was built with model '{meta['model']}', not '{m.name}'; use a new --db for another model"
        )
    if m.weights_id != meta["weights_id"]:
        raise IndexMismatchError(
            f"{folder}: database was built with other weights (id {meta['weights_id']}) than the ones "
            f"given ({m.weights_id}, {m.weights_source}); use the original weights or a new --db"
        )
    if m.preprocess.signature() != meta["preprocess"]:
        raise IndexMismatchError(
            f"{folder}: database was built with preprocessing {meta['preprocess']}, not {m.preprocess.signature()}"
        )
    return m
