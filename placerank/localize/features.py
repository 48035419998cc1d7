"""The database's use of the shared extraction (:mod:`placerank.descriptors.extract`): global
descriptors of new photos, and re-ranker local features kept in a LocalFeatureStore inside the
database folder (``DB/local/<name>-<hash>/``, keyed by photo sha256, so a moved or copied photo
is never extracted twice).

Photos are described in chunks of a few batches; each chunk is committed by the caller before the
next starts, so an interrupted run keeps every finished chunk. A chunk that holds an unreadable
photo is retried photo by photo, so the others still get in and each failure has its reason.

Everything is extracted in the database's precision (:mod:`.model`): global descriptors, and the
local features of a re-ranker that scores the model's own head (those come from the same
autocast pass, so their store folder is named with the precision unless fp32, and photos whose
features were not stored in that pass are described again in it rather than in fp32).
``--compile auto`` is decided once for a whole ``index`` run (:func:`compile_for`): each chunk
alone is too small to repay a compile."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from placerank.descriptors.cache import image_key, namespace
from placerank.descriptors.extract import extract_features, extract_local, local_precision, shared_local_options
from placerank.descriptors.fast import compile_mode, prepare_inference, runtime_of, should_compile
from placerank.descriptors.local_store import LocalFeatureStore
from placerank.errors import DataError
from placerank.models.base import LocalFeatures

CHUNK_BATCHES = 4  # batches per committed chunk


def _reason(path: Path, e: Exception) -> str:
    if isinstance(e, DataError):
        return str(e)
    return f"{path}: cannot read file ({getattr(e, 'strerror', None) or e})"


def _chunks(
    paths: Sequence[Path], size: int, fn: Callable[[list[Path]], object], min_last: int = 1, retry=None
) -> Iterator[tuple[list, list, list]]:
    """(indices done, their results, [(index, reason)] failed) per chunk of ``size`` paths; a last
    chunk shorter than ``min_last`` joins the one before (a compiled graph keeps its batch size).
    A chunk that fails is retried photo by photo with ``retry`` (default ``fn``)."""
    starts = list(range(0, len(paths), size))
    if len(starts) > 1 and len(paths) - starts[-1] < min_last:
        starts.pop()
    for n, start in enumerate(starts):
        part = list(range(start, starts[n + 1] if n + 1 < len(starts) else len(paths)))
        failed: list[tuple[int, str]] = []
        try:
            result = fn([paths[i] for i in part])
            done, outs = part, [result]
        except (DataError, OSError):  # one bad photo: find it (and keep the others)
            done, outs = [], []
            for i in part:
                try:
                    outs.append((retry or fn)([paths[i]]))
                    done.append(i)
                except (DataError, OSError) as e:
                    failed.append((i, _reason(paths[i], e)))
        yield done, outs, failed


def describe(
    model,
    paths: Sequence[Path],
    device,
    batch_size: int,
    num_workers: int | None,
    reranker=None,
    store=None,
    progress: bool = True,
    precision: str = "fp32",
) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, str]]]]:
    """Global descriptors of ``paths`` chunk by chunk, in ``precision``: (indices, (n, D)
    descriptors, failures). With a ``reranker`` on the model's own local head and its ``store``,
    the same backbone pass also stores the photos' local features. Photos retried one by one
    after a failed chunk run eagerly (a batch of one would be a graph of its own to compile)."""

    def run(part: list[Path]) -> np.ndarray:
        return extract_features(
            model,
            part,
            device,
            batch_size,
            num_workers,
            use_cache=False,
            reranker=reranker,
            store=store,
            desc="index",
            progress=progress,
            precision=precision,
        )[0]

    def one(part: list[Path]) -> np.ndarray:
        with compile_as(model, device, "off"):
            return run(part)

    size = max(1, batch_size)
    for done, outs, failed in _chunks(list(paths), size * CHUNK_BATCHES, run, min_last=size, retry=one):
        descs = np.concatenate(outs) if outs else np.zeros((0, model.descriptor_dim), np.float32)
        yield done, descs, failed


@contextlib.contextmanager
def compile_as(model, device, mode: str) -> Iterator[None]:
    """``model`` with the compile mode ``mode`` for a while, then its own again (unless a failed
    compile turned it off meanwhile: then it stays off)."""
    before, runtime = compile_mode(model), runtime_of(model)
    prepare_inference(model, device, mode, runtime=runtime)
    try:
        yield
    finally:
        if compile_mode(model) == mode:
            prepare_inference(model, device, before, runtime=runtime)


def compile_for(model, images: int, batch_size: int, precision: str, device) -> contextlib.AbstractContextManager:
    """A model prepared with ``--compile auto`` compiles (or not) for a run of ``images`` photos,
    decided once here (:func:`~placerank.descriptors.fast.should_compile`); ``on`` / ``off`` are
    kept."""
    if compile_mode(model) != "auto":
        return contextlib.nullcontext()
    decided = should_compile(model, images, batch_size, precision, device)
    return compile_as(model, device, "on" if decided else "off")


def image_sizes(paths: Sequence[Path]) -> list[tuple[int, int]]:
    """(H, W) of each photo as decoded (EXIF orientation applied), from its header only."""
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            w, h = im.size
            try:
                turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
            except Exception:  # a damaged EXIF block: the pixels were readable, keep their size
                turned = False
        out.append((w, h) if turned else (h, w))
    return out


class _ByContent:
    """A sha256-keyed store seen through the extraction's path keys (``image_key``)."""

    def __init__(self, store: LocalFeatureStore, sha_of: dict[str, str]):
        self.store, self.sha_of = store, sha_of

    def __contains__(self, key: str) -> bool:
        return self.sha_of[key] in self.store

    def add_many(self, items: list[tuple[str, LocalFeatures]]) -> None:
        self.store.add_many([(self.sha_of[k], f) for k, f in items])


class MemoryStore(dict):
    """Local features of photos that are not stored (the query; candidates indexed without them)."""

    def add_many(self, items: list[tuple[str, LocalFeatures]]) -> None:
        self.update(items)


class LocalFeatureCache:
    """Re-rankers built for one database (by name + options) and their stores in ``DB/local/``."""

    def __init__(self, folder: Path, model: Callable, device, precision: Callable[[], str] = lambda: "fp32"):
        self.folder, self._model, self.device, self._precision = folder, model, device, precision
        self._built: dict[tuple, object] = {}

    def precision(self, reranker) -> str:
        """The precision ``reranker``'s features are in here: the database's for the model's own
        local head (the same autocast pass as the global descriptors), else fp32."""
        return local_precision(self._model(), reranker, self._precision())

    def extract(self, reranker, paths: list[Path], sink, batch_size: int, num_workers: int | None, progress: bool):
        """Local features of ``paths`` into ``sink``, in :meth:`precision`; returns their keys."""
        precision = self.precision(reranker)
        if precision == "fp32":
            return extract_local(
                reranker, paths, sink, self.device, batch_size=batch_size, num_workers=num_workers, progress=progress
            )
        model = self._model()  # the model's own head, under autocast: its backbone pass, run eagerly
        with compile_as(model, self.device, "off"):
            return extract_features(
                model, paths, self.device, batch_size, num_workers, use_cache=False, reranker=reranker,
                store=sink, desc="local features", progress=progress, precision=precision,
            )[1]  # fmt: skip

    def extract_now(self, reranker, paths: Sequence[Path]) -> list[LocalFeatures]:
        """Local features of photos that are not stored (candidates indexed without them)."""
        mem = MemoryStore()
        keys = self.extract(reranker, list(paths), mem, max(1, len(paths)), 0, progress=False)
        return [mem[k] for k in keys]

    def reranker(self, name: str, options: dict | None):
        key = (name, json.dumps(options or {}, sort_keys=True, default=str))
        if key not in self._built:
            from placerank.rerank.base import create_reranker

            self._built[key] = create_reranker(name, model=self._model(), **(options or {})).to(self.device)
        return self._built[key]

    def one_pass(self, reranker, model, sha_of_path: dict[Path, str]):
        """(store, view for the extraction) when ``reranker`` scores ``model``'s own local head,
        so indexing stores local features in the same backbone pass; else (None, None)."""
        if shared_local_options(model, reranker) is None:
            return None, None
        store = self.store(reranker, create=True)
        assert store is not None
        return store, _ByContent(store, {image_key(p): sha for p, sha in sha_of_path.items()})

    def count(self, reranker) -> int:
        store = self.store(reranker, create=True)
        assert store is not None
        try:
            return len(store)
        finally:
            store.close()

    def store(self, reranker, create: bool) -> LocalFeatureStore | None:
        precision = self.precision(reranker)
        extra = [f"precision={precision}"] if precision != "fp32" else []  # fp32: the folder it always had
        folder = self.folder / "local" / namespace(reranker.name, reranker.signature(), *extra)
        if not create and not (folder / "meta.json").exists():
            return None
        return LocalFeatureStore(folder, reranker.signature(), reranker.dim)

    def fill(
        self, reranker, need: dict[str, str], num_workers: int | None, progress: bool = True
    ) -> tuple[int, list[tuple[str, str]]]:
        """Store local features for ``need`` (sha256 -> a path with that content); returns
        (photos extracted, [(path, reason)] failed)."""
        store = self.store(reranker, create=True)
        assert store is not None
        try:
            todo = {sha: Path(p) for sha, p in need.items() if sha not in store}
            paths = list(todo.values())
            view = _ByContent(store, {image_key(p): sha for sha, p in todo.items()})
            done = 0
            failures: list[tuple[str, str]] = []

            def run(part: list[Path]) -> None:
                self.extract(reranker, part, view, 8, num_workers, progress)

            for ok, _, failed in _chunks(paths, 8 * CHUNK_BATCHES, run):
                done += len(ok)
                failures += [(str(paths[i]), why) for i, why in failed]
            return done, failures
        finally:
            store.close()
