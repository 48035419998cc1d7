"""The one extraction loop: batched inference over a DataLoader (decode + resize in workers),
with the on-disk descriptor cache and local-feature store in front of it.

:func:`extract_features` gives global descriptors and, when a re-ranker and a store are given,
fills the store with each image's local features. A re-ranker that scores the model's own local
head (FoL's ``fol-region``, SelaVPR's ``selavpr-mnn``) gets them from the same
``model.encode(images, sizes, local_options=...)`` call as the global descriptor: one backbone
pass per image. A re-ranker with its own network (RANSAC on XFeat, ...) runs its own loop
(:func:`extract_local`), since it sees other pixels. :func:`extract_global` and
:func:`extract_local` are the two halves on their own.

``precision`` (``fp32`` default, ``bf16``, ``fp16``) runs the model's forward under
``torch.autocast`` (:func:`autocast_for`); descriptors are still float32 and L2-normalised, and
the precision is part of the descriptor-cache namespace, so descriptors of two precisions never
mix. ``fp16`` needs CUDA. Pinned host memory is used for loading when the device is CUDA.

The batch size is cut to the memory budget (``--max-memory-gb``, :mod:`placerank.descriptors.memory`),
and the rows can go straight into a caller's memory-mapped file (``out=``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from placerank.data.images import check_batch_errors, make_loader
from placerank.descriptors.cache import DescriptorCache, cache_root, image_key, namespace
from placerank.descriptors.fast import (
    CompiledBackbone,
    as_input,
    check_precision,
    is_prepared,
    runtime_of,
    should_compile,
)
from placerank.descriptors.local_store import LocalFeatureStore
from placerank.descriptors.memory import fit_batch_size, workers_for
from placerank.descriptors.runtime import exported_encoder, numerics
from placerank.errors import PlaceRankError
from placerank.models.base import LocalFeatures

CACHE_CHUNK = 8192  # cached descriptors read per SQLite round (8192 x 1280-d = 40 MB)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class FeatureSink(Protocol):
    """Where extraction puts local features: the on-disk :class:`LocalFeatureStore`, or an
    in-memory mapping (a query that is localized, not stored)."""

    def __contains__(self, key: str, /) -> bool: ...

    def add_many(self, items: list[tuple[str, LocalFeatures]]) -> None: ...


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context the model's forward runs in: ``torch.autocast`` for bf16 / fp16, else nothing."""
    if check_precision(precision, device) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def descriptor_namespace(model, precision: str = "fp32") -> str:
    """The descriptor-cache namespace: model, weights, preprocessing and (unless fp32, so
    existing caches keep working) the inference precision; a reduced precision run by another
    runtime than PyTorch (``--runtime openvino``) also names the runtime: bf16 descriptors of two
    runtimes differ as much as each differs from fp32 (cosine ~0.99), while fp32 ones agree to
    1e-5 and share the cache."""
    parts = [model.name, model.weights_id, model.preprocess.signature()]
    if precision == "fp32":
        return namespace(*parts)
    runtime = runtime_of(model)
    return namespace(*parts, f"precision={precision}", *([f"runtime={runtime}"] if runtime != "torch" else []))


def descriptor_cache_for(model, precision: str = "fp32") -> DescriptorCache:
    return DescriptorCache(descriptor_namespace(model, precision), model.descriptor_dim)


def local_store_for(reranker, root: str | Path | None = None, numerics: str = "fp32") -> LocalFeatureStore:
    """The re-ranker's local-feature store: under ``root`` (a descriptor folder's ``local/``) or
    the cache; one sub-folder per re-ranker signature, so several re-rankers live side by side.
    ``numerics`` (:func:`local_numerics`: features from the model's own head under autocast, on
    PyTorch or another runtime) gets its own sub-folder unless fp32."""
    base = Path(root) if root is not None else cache_root() / "local"
    extra = [f"precision={numerics}"] if numerics != "fp32" else []
    folder = base / namespace(reranker.name, reranker.signature(), *extra)
    return LocalFeatureStore(folder, reranker.signature(), reranker.dim)


def local_precision(model, reranker, precision: str) -> str:
    """The precision ``reranker``'s local features are extracted in: the model's when they come
    from the model's own head in the same pass, else the re-ranker's own network's (its
    ``precision``: RANSAC re-rankers take ``--rerank-option precision=...``; fp32 without one)."""
    if shared_local_options(model, reranker) is not None:
        return precision
    return str(getattr(reranker, "precision", "fp32"))


def local_numerics(model, reranker, precision: str) -> str:
    """:func:`local_precision` and, for the model's own head below fp32, the runtime that ran it
    (:func:`~placerank.descriptors.runtime.numerics`): the label of the store the features go to."""
    runtime = runtime_of(model) if shared_local_options(model, reranker) is not None else "torch"
    return numerics(local_precision(model, reranker, precision), runtime)


def shared_local_options(model, reranker) -> dict | None:
    """``local_options`` for ``model.encode`` when ``reranker`` scores the model's own local
    features with the model's preprocessing (then one pass gives both); otherwise None."""
    if reranker is None or getattr(reranker, "model", None) is not model:
        return None
    options = reranker.local_options()
    if options is None or getattr(reranker, "preprocess", None) != getattr(model, "preprocess", None):
        return None
    return dict(options)


def _encode(model, images: torch.Tensor, sizes, local_options: dict | None, precision: str = "fp32"):
    with autocast_for(precision, images.device):
        if hasattr(model, "encode"):
            g, local = model.encode(images, sizes, local_options=local_options)
        else:
            g, local = model(images), None
    if precision != "fp32":  # the forward ran in lower precision: back to float32, unit length
        g = torch.nn.functional.normalize(g.float(), dim=-1)
        if local is not None:
            local = [_float32_local(f) for f in local]
    return g, local


def _float32_local(f: LocalFeatures) -> LocalFeatures:
    def as32(a):
        return None if a is None else np.asarray(a, dtype=np.float32)

    f.keypoints, f.descriptors, f.scores = as32(f.keypoints), as32(f.descriptors), as32(f.scores)
    return f


def _output_rows(out: np.ndarray | None, rows: int, dim: int) -> np.ndarray:
    """``out`` checked to be a writable (rows, dim) float32 array, or a new zeroed one."""
    if out is None:
        return np.zeros((rows, dim), dtype=np.float32)
    if out.shape != (rows, dim) or out.dtype != np.float32 or not out.flags.writeable:
        raise PlaceRankError(
            f"extract_features: out must be a writable float32 array of shape ({rows}, {dim}),"
            f" got {out.dtype} {out.shape}"
        )
    return out


def _budgeted_batch(model, batch_size: int, device: torch.device, num_workers: int | None, todo: int) -> int:
    """``batch_size`` cut to the memory budget (``--max-memory-gb``, :mod:`.memory`); the workers
    counted are the ones ``make_loader`` starts for ``todo`` images."""
    workers = workers_for(num_workers) if todo >= 2 * batch_size else 0
    return fit_batch_size(model, min(batch_size, todo), device, workers)


@torch.inference_mode()
def extract_features(
    model,
    paths: Sequence[str | Path],
    device: torch.device,
    batch_size: int = 16,
    num_workers: int | None = None,
    use_cache: bool = True,
    reranker=None,
    store: FeatureSink | None = None,
    desc: str = "extract",
    progress: bool = True,
    precision: str = "fp32",
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, list[str]]:
    """(N, D) float32 L2-normalised descriptors of ``paths`` in order, and the images' keys.

    Cached images are read from the descriptor cache, the rest extracted and committed batch by
    batch (an interrupted run resumes after the last finished batch). With ``reranker`` and
    ``store``, every image also gets its local features in ``store`` (images already there are
    not extracted again). ``progress=False`` hides the progress bar. ``precision``: the model's
    forward under autocast (see the module docstring); the cache is per precision.

    ``out``: a caller's (N, D) float32 array the rows are written into (and returned), e.g. an
    ``np.memmap`` on disk, so a city-sized database never has all its descriptors in RAM; by
    default a new in-memory array."""
    check_precision(precision, device)
    paths = [Path(p) for p in paths]
    out = _output_rows(out, len(paths), model.descriptor_dim)
    keys = [image_key(p) for p in paths]
    options = shared_local_options(model, reranker) if store is not None else None
    cache = descriptor_cache_for(model, precision) if use_cache else None
    try:
        need_global = set(range(len(paths)))
        if cache is not None:  # read in chunks: a city's cached vectors are not held at once
            for start in range(0, len(keys), CACHE_CHUNK):
                hits = cache.get_many(keys[start : start + CACHE_CHUNK])
                for i, k in enumerate(keys[start : start + CACHE_CHUNK], start):
                    if k in hits:
                        out[i] = hits[k]
                        need_global.discard(i)
        need_local = (
            {i for i, k in enumerate(keys) if k not in store} if store is not None and options is not None else set()
        )
        todo = sorted(need_global | need_local)
        if todo:
            model.eval()
            batch_size = _budgeted_batch(model, batch_size, device, num_workers, len(todo))
            loader = make_loader(
                [paths[i] for i in todo], model.preprocess, batch_size, num_workers, pin_memory=device.type == "cuda"
            )
            bar = tqdm(total=len(todo), desc=f"{desc} ({model.name})", unit="img", leave=False, disable=not progress)
            exported = exported_encoder(model, runtime_of(model), precision)
            if cache is not None and exported is None and cache.path.stem != descriptor_namespace(model, precision):
                cache.close()  # the runtime fell back to torch: its descriptors go to torch's namespace
                cache = descriptor_cache_for(model, precision)
            compiled = exported is None and should_compile(model, len(todo), batch_size, precision, device)
            with CompiledBackbone(model, batch_size, precision, device, compiled) as runner:
                for idx, images, sizes, errors in loader:
                    check_batch_errors(errors)
                    rows = [todo[int(i)] for i in idx]
                    local_rows = [j for j, r in enumerate(rows) if r in need_local]
                    opts = options if local_rows else None
                    encode = (
                        functools.partial(_encode, model, local_options=opts, precision=precision)
                        if exported is None
                        else functools.partial(exported.encode, local_options=opts)
                    )
                    # channels_last only for PyTorch's prepared weights: the exported runtime takes
                    # the loader's contiguous NCHW batch as it is (no copy there and back)
                    channels_last = exported is None and is_prepared(model)
                    g, local = runner.run(
                        encode, as_input(images, device, channels_last), [(int(s[0]), int(s[1])) for s in sizes]
                    )
                    d = g.float().cpu().numpy()
                    out[rows] = d
                    if cache is not None:
                        cache.put_many((keys[r], d[j]) for j, r in enumerate(rows))
                    if local_rows and store is not None and local is not None:
                        store.add_many([(keys[rows[j]], local[j]) for j in local_rows])
                    bar.update(len(rows))
            bar.close()
    finally:
        if cache is not None:
            cache.close()
    if store is not None and reranker is not None and options is None:
        extract_local(reranker, paths, store, device, num_workers=num_workers, desc=f"{desc} local", progress=progress)
    return out, keys


def extract_global(
    model,
    paths: Sequence[str | Path],
    device: torch.device,
    batch_size: int = 16,
    num_workers: int | None = None,
    use_cache: bool = True,
    desc: str = "extract",
    progress: bool = True,
    precision: str = "fp32",
) -> np.ndarray:
    """(N, D) float32 L2-normalised global descriptors of ``paths`` in order (cached, resumable)."""
    return extract_features(
        model, paths, device, batch_size, num_workers, use_cache, desc=desc, progress=progress, precision=precision
    )[0]


@torch.inference_mode()
def extract_local(
    reranker,
    paths: Sequence[str | Path],
    store: FeatureSink,
    device: torch.device,
    batch_size: int = 8,
    num_workers: int | None = None,
    desc: str = "local features",
    progress: bool = True,
) -> list[str]:
    """Make sure every image in ``paths`` has local features in ``store``; returns their keys."""
    paths = [Path(p) for p in paths]
    keys = [image_key(p) for p in paths]
    todo = [i for i, k in enumerate(keys) if k not in store]
    if todo:
        loader = make_loader(
            [paths[i] for i in todo], reranker.preprocess, batch_size, num_workers, pin_memory=device.type == "cuda"
        )
        bar = tqdm(total=len(todo), desc=f"{desc} ({reranker.name})", unit="img", leave=False, disable=not progress)
        for idx, images, sizes, errors in loader:
            check_batch_errors(errors)
            feats = reranker.extract(as_input(images, device), [tuple(int(v) for v in s) for s in sizes])
            store.add_many([(keys[todo[int(i)]], f) for i, f in zip(idx, feats)])
            bar.update(len(idx))
        bar.close()
    return keys
