"""Starting the ranks of a sharded extraction (:mod:`placerank.descriptors.shards`): what each
rank runs (:func:`run_job`: its shard, a barrier, rank 0 merges), and :func:`launch`, which starts
``--nproc N`` local ranks with torch's elastic launcher (the engine behind ``torchrun``) instead of
asking the user to type ``torchrun``. Under ``torchrun`` each process calls :func:`run_job`
itself. Gloo on CPU, NCCL on CUDA (rank ``r`` on ``cuda:LOCAL_RANK``); every rank uses
``cores // ranks-on-this-machine`` threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from placerank.descriptors.cache import image_key
from placerank.descriptors.files import DescriptorSet, up_to_date
from placerank.descriptors.shards import World, check_nproc, extract_shard, merge_shards, shard_fingerprint
from placerank.errors import PlaceRankError

TIMEOUT_ENV = "PLACERANK_DIST_TIMEOUT_S"  # how long a rank waits for the slowest at a barrier
DEFAULT_TIMEOUT_S = 24 * 3600


@dataclass
class ShardJob:
    """What every rank extracts: image sets into descriptor folders, with one model."""

    model: Any
    sets: list[tuple[list[Path], Path]]  # (images, descriptor folder) in order
    device: str = "auto"
    batch_size: int = 16
    num_workers: int | None = None
    use_cache: bool = True
    reranker: Any = None
    precision: str = "fp32"
    weights: str | None = None
    local_root: str | None = None  # None: each folder's local/
    progress: bool = True
    max_memory_gb: float | None = None  # None: the budget of the process that launches the ranks


def rank_device(device: str, world: World) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when the device is CUDA with enough GPUs."""
    from placerank.utils import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and torch.cuda.device_count() > world.local_rank:
        dev = torch.device(f"cuda:{world.local_rank}")
        torch.cuda.set_device(dev)
    return dev


def run_job(job: ShardJob, world: World | None = None) -> list[tuple[int, int]]:
    """Every rank: its shard of each set, a barrier, rank 0 merges, a barrier. Joins (or, when
    WORLD_SIZE says so and none exists, starts) the process group. Returns, per set, (rows done
    before this run, rows in this rank's shard)."""
    import torch.distributed as dist

    world = world or World.from_env()
    torch.set_num_threads(threads_per_rank(world.local_size))
    device = rank_device(job.device, world)
    model = job.model.to(device).eval()
    reranker = job.reranker.to(device) if job.reranker is not None else None
    if reranker is not None and getattr(job.reranker, "model", None) is job.model:
        reranker.model = model
    own = world.size > 1 and not dist.is_initialized()
    if own:
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    if world.size > 1:
        _check_same_model(model, world)
    workers = job.num_workers
    if workers is None:
        workers = min(4, max(1, (os.cpu_count() or 1) // max(1, world.local_size)))
    done = []
    try:
        for paths, folder in job.sets:
            if up_to_date(folder, model, paths, reranker, job.precision):
                done.append((-1, len(paths[world.rank :: world.size])))
                continue
            done.append(
                extract_shard(
                    model,
                    paths,
                    device,
                    folder,
                    world.rank,
                    world.size,
                    job.batch_size,
                    workers,
                    job.use_cache,
                    reranker,
                    job.precision,
                    job.progress and world.rank == 0,
                )
            )
            _barrier(world)
            if world.rank == 0:
                merge_shards(folder, world.size, model, paths, reranker, job.precision, job.weights, job.local_root)
            _barrier(world)
    finally:
        if own:
            dist.destroy_process_group()
    return done


def _check_same_model(model, world: World) -> None:
    """Every rank must run the same weights and preprocessing (else the shards would not merge):
    e.g. ranks started with different ``--weights`` files, or a NetVLAD k-means initialised on
    each rank (``--nproc`` initialises once, before starting the ranks)."""
    import torch.distributed as dist

    mine = (model.name, model.weights_id, model.preprocess.signature())
    every: list = [None] * world.size
    dist.all_gather_object(every, mine)
    if len(set(every)) > 1:
        other = next(e for e in every if e != every[0])
        raise PlaceRankError(
            f"the ranks hold different models: rank 0 {every[0][0]} weights {every[0][1]}, another"
            f" {other[0]} weights {other[1]}; give every rank the same --weights (a model initialised"
            " from data, like NetVLAD, must be initialised once: use --nproc, or save its weights first)"
        )


def _barrier(world: World) -> None:
    import torch.distributed as dist

    if world.size > 1:
        dist.barrier()


@record
def _launched(job: ShardJob) -> list[tuple[int, int]]:
    """The entry point of each process :func:`launch` starts (module level: spawn pickles it),
    under the launcher's memory budget (``--max-memory-gb`` holds for each rank)."""
    from placerank.descriptors.memory import memory_budget

    with memory_budget(job.max_memory_gb):
        return run_job(job)


def launch(job: ShardJob, nproc: int) -> dict[int, list[tuple[int, int]]]:
    """Run ``job`` on ``nproc`` local processes with torch's elastic launcher (what torchrun
    runs: a c10d rendezvous on a free localhost port, gloo on CPU, nccl on CUDA) and wait for
    them. The model travels to the processes pickled, on the CPU. A failed rank is one line."""
    import copy

    from placerank.descriptors.memory import max_memory_gb

    check_nproc(nproc)
    on_cpu = copy.copy(job)
    if on_cpu.max_memory_gb is None:
        on_cpu.max_memory_gb = max_memory_gb()
    if any(p.device.type != "cpu" for p in job.model.parameters()):
        model = copy.deepcopy(job.model).cpu()
        reranker = job.reranker
        if reranker is not None:
            reranker = copy.deepcopy(reranker).cpu()
            if getattr(reranker, "model", None) is not None:
                reranker.model = model
        on_cpu.model, on_cpu.reranker = model, reranker
    return launch_local(
        _launched,
        on_cpu,
        nproc,
        lambda rank, text: (
            f"extraction rank {rank} of {nproc} failed: {text} (its finished chunks are kept for a rerun)"
        ),
        _start_method(job.device, nproc),
    )


def launch_local(
    entry: Callable[[Any], Any],
    argument: Any,
    nproc: int,
    failure_line: Callable[[int, str], str],
    start_method: str = "spawn",
) -> dict[int, Any]:
    """``entry(argument)`` in ``nproc`` local processes with torch's elastic launcher (what
    ``torchrun --standalone`` runs: a c10d rendezvous on a free localhost port), waiting for them;
    returns each rank's result. The one launcher of extraction (:func:`launch`) and training
    (``placerank.train.distributed.launch_training``). A failed rank is one
    :class:`PlaceRankError`, ``failure_line(rank, its own message or exit status)``; the
    launcher's loggers stay quiet unless ``PLACERANK_DEBUG`` is set. ``entry`` must be a module-level
    function wrapped in ``record`` (spawn pickles it by name; ``record`` hands the message back)."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
        start_method=start_method,
    )
    quiet = os.environ.get("PLACERANK_DEBUG", "") in ("", "0")
    loggers = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels = [lg.level for lg in loggers]
    if quiet:  # a failure is reported below in one line, not as each logger's traceback
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
    try:
        return elastic_launch(config, entry)(argument)
    except ChildFailedError as e:
        rank, text = _failed_rank(e)
        raise PlaceRankError(failure_line(rank, text)) from None
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def threads_per_rank(ranks_here: int) -> int:
    """Intra-op threads of each rank: the machine's cores shared by the ranks on it."""
    return max(1, (os.cpu_count() or 1) // max(1, ranks_here))


def _start_method(device: str, nproc: int) -> str:
    """``fork`` on Linux for CPU ranks of one thread each: they start at once, sharing the
    parent's imports and model pages (spawn re-imports torch and placerank in every rank: measured
    64 s -> 18 s for a 12-image 2-rank extract on a busy 2-core machine). Otherwise ``spawn``:
    GNU OpenMP hangs in a forked child that runs parallel regions (seen here with 2 threads), and
    CUDA, once initialised, does not survive a fork."""
    import sys

    if not sys.platform.startswith("linux") or threads_per_rank(nproc) > 1 or torch.cuda.is_initialized():
        return "spawn"
    from placerank.utils import resolve_device

    return "fork" if resolve_device(device).type == "cpu" else "spawn"


def _failed_rank(e) -> tuple[int, str]:
    """The first failed rank and its own message (``PlaceRankError: x`` -> ``x``), or its exit status."""
    rank, failure = min(e.failures.items())
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    text = str(message or "").strip()
    for prefix in ("PlaceRankError: ", "DataError: ", "WeightsError: ", "IndexMismatchError: "):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    if not text or text.startswith("To enable traceback"):
        code = failure.exitcode
        text = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
    return rank, text


def extract_in_processes(
    model,
    sets: list[list[Path]],
    nproc: int,
    device: str = "auto",
    batch_size: int = 16,
    num_workers: int | None = None,
    use_cache: bool = True,
    reranker=None,
    precision: str = "fp32",
) -> list[DescriptorSet]:
    """For a caller that goes on in one process (``placerank eval``): the descriptors of each
    image set, extracted by ``nproc`` ranks into scratch folders under ``$PLACERANK_CACHE/shards/``
    (named by what they hold, so a rerun after a kill resumes) and memory-mapped back; the
    folders are removed once mapped (the mapping stays valid on POSIX systems). With
    ``reranker``, its local features go to the cache's store, where the caller's
    :func:`~placerank.descriptors.extract.local_store_for` finds them."""
    from placerank.descriptors.files import load_descriptors
    from placerank.utils import cache_root

    root = cache_root()
    folders = []
    for paths in sets:
        keys = [image_key(p) for p in paths]
        name = hashlib.sha1(shard_fingerprint(model, keys, precision, reranker).encode()).hexdigest()[:24]
        folders.append(root / "shards" / f"{model.name}-{name}")
    job = ShardJob(
        model=model,
        sets=[([Path(p) for p in paths], folder) for paths, folder in zip(sets, folders)],
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        use_cache=use_cache,
        reranker=reranker,
        precision=precision,
        local_root=str(root / "local"),
    )
    launch(job, nproc)
    out = []
    for folder in folders:
        out.append(load_descriptors(folder))
        out[-1].folder = None
        shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):  # the scratch parent too, unless another run is using it
        (root / "shards").rmdir()
    return out
