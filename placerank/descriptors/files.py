"""The extract stage's output: a descriptor folder the search stage reads.

``DIR/descriptors.npy`` (N, D) float32 L2-normalised global descriptors, row i = ``paths[i]``;
``DIR/descriptors.json`` {format, kind, model, weights, weights_id, preprocess, descriptor_dim,
count, paths, keys, fingerprint, local}; ``DIR/local/<re-ranker namespace>/`` the local-feature
stores (:class:`~placerank.descriptors.local_store.LocalFeatureStore`) of the re-rankers it was
extracted for. The arrays are written first and the JSON last, both atomically, so a folder with a
JSON is complete. The descriptors stream into a memory-mapped ``.npy`` beside the final one during extraction
(never all in RAM) and the folder is read back memory-mapped (``mmap_mode="r"``).
``fingerprint`` identifies the content (model, weights, preprocessing and every
image's path + mtime + size): the next stage records it, and a rerun whose fingerprint matches
skips the work. See ``docs/pipeline.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from placerank.descriptors.cache import image_key
from placerank.descriptors.extract import extract_features, local_numerics, local_store_for
from placerank.descriptors.fast import runtime_of
from placerank.descriptors.runtime import numerics
from placerank.errors import PlaceRankError
from placerank.utils import read_stage_json, save_npy_atomic, write_json_atomic

FORMAT = 1
KIND = "placerank-descriptors"


def fingerprint(model: str, weights_id: str, preprocess: str, keys: list[str], numerics: str = "fp32") -> str:
    """What a folder's descriptors are a function of; ``numerics``: precision and, below fp32, the
    runtime (:func:`~placerank.descriptors.runtime.numerics`; fp32 adds nothing, so folders
    written before precisions existed keep their fingerprint)."""
    made = f"{model}|{weights_id}|{preprocess}" + (f"|{numerics}" if numerics != "fp32" else "")
    h = hashlib.sha256(made.encode())
    for k in keys:
        h.update(k.encode())
    return h.hexdigest()[:32]


def model_fingerprint(model, keys: list[str], precision: str) -> str:
    """The fingerprint of what ``model`` (prepared: its runtime is read off it) makes of ``keys``
    in ``precision``."""
    made = numerics(precision, runtime_of(model))
    return fingerprint(model.name, model.weights_id, model.preprocess.signature(), keys, made)


@dataclass
class DescriptorSet:
    """Global descriptors of an image set, with what made them."""

    descriptors: np.ndarray
    paths: list[str]
    keys: list[str]
    model: str
    weights_id: str
    preprocess: str
    weights: str | None = None
    input_size: tuple[int, int] | None = None
    local: list[dict] = field(default_factory=list)  # [{"reranker", "signature", "store"}]
    folder: Path | None = None
    precision: str = "fp32"  # the model's forward: fp32, or bf16 / fp16 autocast
    runtime: str = "torch"  # what ran it (part of the fingerprint below fp32: --runtime, docs/inference.md)

    @classmethod
    def of_model(
        cls, model, descriptors, paths, keys: list[str], weights, local: list[dict], precision: str, folder=None
    ) -> DescriptorSet:
        """The set ``model`` made of ``paths`` (name, weights id, preprocessing and input size from
        the model): what one process (:func:`extract_descriptors`) and the merged torchrun shards write."""
        return cls(
            descriptors=descriptors,
            paths=[str(p) for p in paths],
            keys=keys,
            model=model.name,
            weights_id=model.weights_id,
            preprocess=model.preprocess.signature(),
            weights=None if weights is None else str(weights),
            input_size=tuple(model.preprocess.size),
            local=local,
            precision=precision,
            runtime=runtime_of(model),
            folder=None if folder is None else Path(folder),
        )

    @property
    def fingerprint(self) -> str:
        return fingerprint(
            self.model, self.weights_id, self.preprocess, self.keys, numerics(self.precision, self.runtime)
        )

    def __len__(self) -> int:
        return len(self.paths)

    def meta(self) -> dict:
        return {
            "format": FORMAT,
            "kind": KIND,
            "model": self.model,
            "weights": self.weights,
            "weights_id": self.weights_id,
            "preprocess": self.preprocess,
            "input_size": list(self.input_size) if self.input_size else None,
            "precision": self.precision,
            "runtime": self.runtime,
            "descriptor_dim": int(self.descriptors.shape[1]),
            "count": len(self.paths),
            "fingerprint": self.fingerprint,
            "local": self.local,
            "paths": self.paths,
            "keys": self.keys,
        }

    def save(self, folder: str | Path) -> None:
        """``descriptors.npy`` then ``descriptors.json``, each atomically. Descriptors already
        streamed into a ``.npy`` memmap in ``folder`` (:func:`extract_to_folder`) are flushed and
        renamed into place, never copied through RAM."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / "descriptors.npy"
        written = getattr(self.descriptors, "filename", None)
        if isinstance(self.descriptors, np.memmap) and written and Path(written).parent.resolve() == folder.resolve():
            self.descriptors.flush()
            os.replace(written, final)
            self.descriptors = np.load(final, mmap_mode="r", allow_pickle=False)
        else:
            save_npy_atomic(final, np.ascontiguousarray(self.descriptors, dtype=np.float32))
        write_json_atomic(folder / "descriptors.json", self.meta())
        self.folder = folder


def open_rows(path: str | Path, rows: int, dim: int) -> np.memmap:
    """A new (rows, dim) float32 ``.npy`` file at ``path``, memory-mapped for writing: extraction
    streams rows into it batch by batch, and only the pages being written stay in RAM."""
    return np.lib.format.open_memmap(Path(path), mode="w+", dtype=np.float32, shape=(rows, dim))


def _bad(folder: Path, why: str) -> PlaceRankError:
    return PlaceRankError(f"{folder}: not a usable descriptor folder ({why}); rerun `placerank extract`")


def read_meta(folder: str | Path) -> dict:
    folder = Path(folder)
    need = ("model", "weights_id", "preprocess", "descriptor_dim", "count", "paths", "keys", "fingerprint")
    return read_stage_json(folder / "descriptors.json", KIND, FORMAT, need, lambda why: _bad(folder, why))


def load_descriptors(folder: str | Path) -> DescriptorSet:
    """Read and validate a descriptor folder; every inconsistency is one :class:`PlaceRankError`."""
    folder = Path(folder)
    meta = read_meta(folder)
    npy = folder / "descriptors.npy"
    if not npy.is_file():
        raise _bad(folder, "descriptors.npy missing")
    try:
        desc = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise _bad(folder, f"descriptors.npy is unreadable: {e}") from None
    count, dim = int(meta["count"]), int(meta["descriptor_dim"])
    if desc.dtype != np.float32 or desc.shape != (count, dim):
        raise _bad(
            folder, f"descriptors.npy is {desc.dtype} {desc.shape}, descriptors.json says float32 ({count}, {dim})"
        )
    if len(meta["paths"]) != count or len(meta["keys"]) != count:
        raise _bad(folder, f"descriptors.json lists {len(meta['paths'])} paths for {count} descriptors")
    ds = DescriptorSet(
        descriptors=np.asarray(desc),
        paths=[str(p) for p in meta["paths"]],
        keys=[str(k) for k in meta["keys"]],
        model=str(meta["model"]),
        weights_id=str(meta["weights_id"]),
        preprocess=str(meta["preprocess"]),
        weights=meta.get("weights"),
        input_size=tuple(meta["input_size"]) if meta.get("input_size") else None,
        local=list(meta.get("local") or []),
        folder=folder,
        precision=str(meta.get("precision", "fp32")),
        runtime=str(meta.get("runtime", "torch")),
    )
    if ds.fingerprint != meta["fingerprint"]:
        raise _bad(folder, "descriptors.json fingerprint does not match its contents")
    return ds


def extract_descriptors(
    model,
    paths: list[str] | list[Path],
    device: torch.device,
    batch_size: int = 16,
    num_workers: int | None = None,
    use_cache: bool = True,
    reranker=None,
    store=None,
    weights: str | None = None,
    desc: str = "extract",
    precision: str = "fp32",
    out: np.ndarray | None = None,
) -> DescriptorSet:
    """The extract stage: global descriptors of ``paths`` (and, with ``reranker`` + ``store``,
    their local features in ``store``, in the same backbone pass when the re-ranker uses the
    model's own head). ``out``: an (N, D) float32 array (a memmap: :func:`open_rows`) the
    descriptors are written into instead of a new array in RAM."""
    d, keys = extract_features(
        model,
        paths,
        device,
        batch_size,
        num_workers,
        use_cache,
        reranker=reranker,
        store=store,
        desc=desc,
        precision=precision,
        out=out,
    )
    local = []
    if reranker is not None and store is not None:
        local.append({"reranker": reranker.name, "signature": reranker.signature(), "store": str(store.folder)})
    return DescriptorSet.of_model(model, d, paths, keys, weights, local, precision)


def up_to_date(folder: str | Path, model, paths: list[Path], reranker=None, precision: str = "fp32") -> bool:
    """True when ``folder`` already holds this model's descriptors of exactly these images (same
    content) and, with ``reranker``, a complete local-feature store for it: a rerun skips them."""
    try:
        meta = read_meta(folder)
    except PlaceRankError:
        return False
    keys = [image_key(p) for p in paths]
    if meta["fingerprint"] != model_fingerprint(model, keys, precision):
        return False
    if not (Path(folder) / "descriptors.npy").is_file():
        return False
    if reranker is None:
        return True
    if not any(e.get("signature") == reranker.signature() for e in meta.get("local") or []):
        return False
    store = local_store_for(reranker, Path(folder) / "local", local_numerics(model, reranker, precision))
    try:
        return all(k in store for k in keys)
    finally:
        store.close()


def extract_to_folder(
    folder: str | Path,
    model,
    paths: list[Path],
    device: torch.device,
    reranker=None,
    batch_size: int = 16,
    num_workers: int | None = None,
    use_cache: bool = True,
    weights: str | None = None,
    precision: str = "fp32",
) -> tuple[DescriptorSet, bool]:
    """``placerank extract``: the extract stage written to ``folder`` (local features, with
    ``reranker``, in ``folder/local/``). Returns (descriptors, skipped): a folder that already
    holds exactly this is left as it is."""
    folder = Path(folder)
    paths = [Path(p) for p in paths]
    if up_to_date(folder, model, paths, reranker, precision):
        return load_descriptors(folder), True
    store = None
    if reranker is not None:
        store = local_store_for(reranker, folder / "local", local_numerics(model, reranker, precision))
    folder.mkdir(parents=True, exist_ok=True)
    # descriptors stream into a memory-mapped file beside the final one, renamed when complete
    partial = folder / f".descriptors-{os.getpid()}.partial.npy"
    rows = open_rows(partial, len(paths), int(model.descriptor_dim))
    try:
        ds = extract_descriptors(
            model,
            paths,
            device,
            batch_size,
            num_workers,
            use_cache,
            reranker=reranker,
            store=store,
            weights=weights,
            precision=precision,
            out=rows,
        )
        _finish(folder, ds)
    finally:
        if store is not None:
            store.close()
        partial.unlink(missing_ok=True)  # still there only when the run failed
    return ds, False


def _finish(folder: Path, ds: DescriptorSet) -> None:
    """Record the local stores relative to ``folder``, keep other re-rankers' stores of the same
    images, and write the folder (the streamed descriptors renamed into place)."""
    for entry in ds.local:
        entry["store"] = str(Path(entry["store"]).relative_to(folder))
    with contextlib.suppress(PlaceRankError):  # no readable previous folder: nothing to keep
        keep_other_stores(ds, read_meta(folder))
    ds.save(folder)


def keep_other_stores(ds: DescriptorSet, old: dict) -> None:
    """When the folder's previous ``descriptors.json`` (``old``) describes these same images, keep
    the local stores other re-rankers already have there beside ``ds``'s own."""
    if old.get("fingerprint") == ds.fingerprint:
        mine = {e["signature"] for e in ds.local}
        ds.local = [e for e in old.get("local") or [] if e.get("signature") not in mine] + ds.local
