"""Extraction over several processes (``torchrun`` / ``--nproc N``): each rank extracts its own
shard of the images, resumably; rank 0 merges the shards into the normal descriptor folder.

Rank ``r`` of ``W`` takes images ``r::W`` (strided, so ranks get equal work whatever the order)
and runs the one extraction loop (:func:`~placerank.descriptors.extract.extract_features`) on
them chunk by chunk into ``OUT/shards/rank-r-of-W/``:

- ``descriptors.npy``: (rows, D) float32, a memory-mapped ``.npy`` the chunks are written into;
- ``progress.json``: {kind, rank, world, total, rows, done, dim, fingerprint}, rewritten
  atomically after each chunk once its rows are flushed: rows ``[0, done)`` are final;
- ``local/<re-ranker namespace>/``: with a re-ranker, the rank's own
  :class:`~placerank.descriptors.local_store.LocalFeatureStore` (one store per process: the
  store's appends are not safe across processes).

A killed rank resumes: rerunning the same command skips the rows its ``progress.json`` counts as
done. A shard made for another image list, model, weights, preprocessing, precision or re-ranker
(``fingerprint``) is not mixed in: it is discarded and restarted, with one warning line (shards are
scratch work; the descriptor cache, if on, makes a restart cheap). Another ``W`` uses other
folder names, so its shards are never read. After a barrier, rank 0 writes the merged
``descriptors.npy`` (rows in the original order, streamed through a memory map) and then
``descriptors.json`` (both atomically; JSON last, so the folder is complete once it has one),
copies the shards' local features into ``OUT/local/``, and only then removes ``OUT/shards/``.
The result is exactly what single-process ``placerank extract`` writes.

Fault injection (tests): ``PLACERANK_SHARD_STOP_AFTER=K`` (or ``K@R``, rank R only) makes a rank
kill itself with SIGKILL after committing K chunks, as ``kill -9`` would.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from placerank.descriptors.cache import image_key
from placerank.descriptors.extract import extract_features, local_numerics, local_store_for
from placerank.descriptors.files import DescriptorSet, keep_other_stores, read_meta
from placerank.errors import PlaceRankError, warn
from placerank.utils import atomic_path, write_json_atomic

KIND = "placerank-shard"
FORMAT = 1
MAX_NPROC = 64
CHUNK_BATCHES = 8  # batches per committed chunk: a killed rank loses at most this much work
MERGE_ROWS = 4096  # rows copied at a time when merging (bounded memory)
STOP_ENV = "PLACERANK_SHARD_STOP_AFTER"


@dataclass(frozen=True)
class World:
    """This process's place: rank ``rank`` of ``size`` (``local_rank`` / ``local_size`` on its machine)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @classmethod
    def from_env(cls) -> World:
        """What torchrun (or :func:`launch`) puts in the environment; one process without it."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
        return cls(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")), local_size)


def world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not started by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_nproc(nproc: int) -> int:
    if not 1 <= nproc <= MAX_NPROC:
        raise PlaceRankError(f"--nproc must be a whole number from 1 to {MAX_NPROC}, got {nproc}")
    if nproc > 1 and world_size() > 1:
        raise PlaceRankError(
            f"--nproc {nproc} launches its own processes; under torchrun (WORLD_SIZE={world_size()}) drop --nproc"
        )
    return nproc


def shard_folder(folder: str | Path, rank: int, size: int) -> Path:
    return Path(folder) / "shards" / f"rank-{rank}-of-{size}"


def shard_fingerprint(model, keys: list[str], precision: str, reranker=None) -> str:
    """What a shard's rows depend on: the merged folder's fingerprint plus the re-ranker."""
    from placerank.descriptors.files import model_fingerprint

    base = model_fingerprint(model, keys, precision)
    return base if reranker is None else f"{base}|{reranker.signature()}"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _stop_after(rank: int) -> int | None:
    """The fault-injection knob (module docstring) for this rank, or None."""
    text = os.environ.get(STOP_ENV, "").strip()
    if not text:
        return None
    count, _, only = text.partition("@")
    if not count.isdigit() or (only and not only.isdigit()):
        raise PlaceRankError(f"{STOP_ENV}={text}: expected K or K@RANK (whole numbers), a fault-injection knob")
    if only and int(only) != rank:
        return None
    return int(count)


def _open_shard(shard: Path, progress: dict, dim: int) -> tuple[np.memmap, int]:
    """The shard's memory map and its rows done; a shard of other work is discarded (restart)."""
    npy, meta = shard / "descriptors.npy", shard / "progress.json"
    rows = progress["rows"]
    if meta.is_file():
        import json

        try:
            old = json.loads(meta.read_text())
            same = {k: old.get(k) for k in progress if k != "done"} == {
                k: v for k, v in progress.items() if k != "done"
            }
            done = int(old.get("done", 0)) if same else -1
            if same and 0 <= done <= rows:
                mm = open_memmap(npy, mode="r+")
                if mm.shape == (rows, dim) and mm.dtype == np.float32:
                    return mm, done
        except (ValueError, OSError, TypeError):
            pass
        warn(f"{shard} holds a shard of other work (another image list, model or re-ranker); restarting it")
    shutil.rmtree(shard, ignore_errors=True)
    shard.mkdir(parents=True, exist_ok=True)
    mm = open_memmap(npy, mode="w+", dtype=np.float32, shape=(rows, dim))
    write_json_atomic(meta, {**progress, "done": 0})
    return mm, 0


def extract_shard(
    model,
    paths: list[Path],
    device: torch.device,
    folder: str | Path,
    rank: int,
    size: int,
    batch_size: int = 16,
    num_workers: int | None = None,
    use_cache: bool = True,
    reranker=None,
    precision: str = "fp32",
    progress: bool = True,
    chunk_batches: int = CHUNK_BATCHES,
) -> tuple[int, int]:
    """Extract rank ``rank`` of ``size``'s shard (images ``rank::size``) into
    ``shard_folder(folder, rank, size)``, resuming after its last committed chunk. Returns
    (rows done before this run, rows in the shard)."""
    paths = [Path(p) for p in paths]
    mine = paths[rank::size]
    keys = [image_key(p) for p in paths]
    shard = shard_folder(folder, rank, size)
    info = {
        "kind": KIND,
        "format": FORMAT,
        "rank": rank,
        "world": size,
        "total": len(paths),
        "rows": len(mine),
        "dim": int(model.descriptor_dim),
        "fingerprint": shard_fingerprint(model, keys, precision, reranker),
    }
    mm, done = _open_shard(shard, info, int(model.descriptor_dim))
    if 0 < done < len(mine):
        print(f"placerank: rank {rank} of {size}: resuming {shard} at row {done} of {len(mine)}", file=sys.stderr)
    started, stop, chunks = done, _stop_after(rank), 0
    store = None
    if reranker is not None:
        store = local_store_for(reranker, shard / "local", local_numerics(model, reranker, precision))
    chunk = _chunk_rows(len(mine), max(1, batch_size), max(1, chunk_batches))
    bar = tqdm(
        total=len(mine),
        initial=done,
        desc=f"extract rank {rank}/{size} ({model.name})",
        unit="img",
        disable=not progress,
    )
    try:
        while done < len(mine):
            part = mine[done : done + chunk]
            extract_features(  # the rows go straight into the shard's memory map
                model,
                part,
                device,
                batch_size,
                num_workers,
                use_cache,
                reranker,
                store,
                progress=False,
                precision=precision,
                out=mm[done : done + len(part)],
            )
            mm.flush()
            done += len(part)
            write_json_atomic(shard / "progress.json", {**info, "done": done})
            bar.update(len(part))
            chunks += 1
            if stop is not None and chunks >= stop and done < len(mine):
                _die()
    finally:
        bar.close()
        if store is not None:
            store.close()
        del mm
    return started, len(mine)


def _chunk_rows(rows: int, batch: int, most: int) -> int:
    """Rows per committed chunk: ``most`` batches, but at least ~8 chunks a shard (a resume then
    loses little even on small shards), in whole batches."""
    eighth = -(-rows // 8)
    return batch * max(1, min(most, -(-eighth // batch)))


def _shard_rows(folder: Path, rank: int, size: int, expect: int, fingerprint: str) -> np.ndarray:
    """A complete shard's rows (memory-mapped), or one line saying why it cannot be merged."""
    import json

    shard = shard_folder(folder, rank, size)
    try:
        prog = json.loads((shard / "progress.json").read_text())
        rows = np.load(shard / "descriptors.npy", mmap_mode="r")
    except (OSError, ValueError) as e:
        raise PlaceRankError(f"{shard}: shard unreadable ({e}); rerun the same command to redo it") from None
    if prog.get("fingerprint") != fingerprint:
        raise PlaceRankError(f"{shard}: shard of other work (images, model or re-ranker); rerun the same command")
    if int(prog.get("done", -1)) != expect or rows.shape[0] != expect:
        raise PlaceRankError(f"{shard}: shard has {prog.get('done')} of {expect} rows; rerun the same command")
    return rows


def merge_shards(
    folder: str | Path,
    size: int,
    model,
    paths: list[Path],
    reranker=None,
    precision: str = "fp32",
    weights: str | None = None,
    local_root: str | Path | None = None,
) -> DescriptorSet:
    """Rank 0, after every shard is complete: the descriptor folder ``folder`` (rows in the
    order of ``paths``), local features into ``local_root`` (default ``folder/local``), then the
    shards removed."""
    folder = Path(folder)
    paths = [Path(p) for p in paths]
    n, dim = len(paths), int(model.descriptor_dim)
    keys = [image_key(p) for p in paths]
    fp = shard_fingerprint(model, keys, precision, reranker)
    shards = [_shard_rows(folder, r, size, len(range(r, n, size)), fp) for r in range(size)]
    try:
        old = read_meta(folder)
    except PlaceRankError:
        old = {}
    (folder / "descriptors.json").unlink(missing_ok=True)  # never a new array beside an old JSON
    with atomic_path(folder / "descriptors.npy") as tmp:
        out = open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
        for r, rows in enumerate(shards):
            for a in range(0, rows.shape[0], MERGE_ROWS):
                b = min(rows.shape[0], a + MERGE_ROWS)
                out[r + a * size : r + b * size : size] = rows[a:b]
        out.flush()
        del out
    del shards
    local = []
    if reranker is not None:
        target = _merge_local(folder, size, keys, reranker, local_numerics(model, reranker, precision), local_root)
        local.append({"reranker": reranker.name, "signature": reranker.signature(), "store": target})
    descriptors = np.load(folder / "descriptors.npy", mmap_mode="r")
    ds = DescriptorSet.of_model(model, descriptors, paths, keys, weights, local, precision, folder)
    keep_other_stores(ds, old)
    write_json_atomic(folder / "descriptors.json", ds.meta())
    shutil.rmtree(folder / "shards", ignore_errors=True)  # every W's: only after the folder is whole
    return ds


def _merge_local(folder: Path, size: int, keys: list[str], reranker, numerics: str, root) -> str:
    """Copy every shard's local features into the final store, in image order; returns the
    store's path (relative to ``folder`` when inside it, as ``placerank extract`` records it)."""
    target = local_store_for(reranker, folder / "local" if root is None else root, numerics)
    parts = [local_store_for(reranker, shard_folder(folder, r, size) / "local", numerics) for r in range(size)]
    try:
        for a in range(0, len(keys), 256):
            batch = [(i, k) for i, k in enumerate(keys[a : a + 256], start=a) if k not in target]
            target.add_many([(k, parts[i % size].get(k)) for i, k in batch])
    finally:
        for s in parts:
            s.close()
        target.close()
    path = target.folder
    return str(path.relative_to(folder)) if path.is_relative_to(folder) else str(path)
