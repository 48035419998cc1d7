"""Distributed data-parallel helpers for training methods (torchrun / env:// initialisation).

One code path for one process and N processes: :func:`init_distributed` reads torchrun's
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (absent -> a single process, nothing initialised), picks
``nccl`` on CUDA and ``gloo`` on CPU, and the helpers below become no-ops with one process.

Launch on one machine::

    torchrun --standalone --nproc_per_node 4 -m placerank.cli train --method sfrs ...

on two machines (run on each, ``--node_rank`` 0 and 1, the address of node 0 reachable by both)::

    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 4 --master_addr 10.0.0.1 --master_port 29500 \\
        -m placerank.cli train --method sfrs ...

or let ``placerank train --nproc N`` start the N local processes (:func:`launch_training`).

Batch-global losses (FoL): every rank runs the forward on its rows of the global batch
(:func:`shard_rows`), :func:`gather_rows` puts the whole batch's outputs on every rank with
autograd (``torch.distributed.nn.functional.all_gather``), and every rank computes the same
loss on the same full batch. The gather's backward sums the W identical gradients of a rank's
rows (W x dL/d rows) and DDP divides by W, so each parameter gets exactly dL/dθ of the one-process
run. Dropout masks are those of one process too (:class:`ShardDropout`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from placerank.errors import PlaceRankError
from placerank.utils import resolve_device


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owns_group: bool = False  # True when init_distributed created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = "auto", backend: str | None = None) -> DistContext:
    """Join the torchrun process group when launched by torchrun, else a 1-process context.

    On CUDA each process uses ``cuda:LOCAL_RANK``; ``backend`` defaults to nccl (CUDA) or gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world <= 1:
        return DistContext(device=dev)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        if torch.cuda.device_count() <= local_rank:
            raise PlaceRankError(
                f"process {rank} wants cuda:{local_rank} but this machine has "
                f"{torch.cuda.device_count()} GPU(s): lower --nproc_per_node"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    owns = False
    if not dist.is_initialized():
        # rank 0 alone validates and writes files while the others wait at a barrier: allow long
        # waits (the default 30 minutes is shorter than a large validation on CPU)
        wait_s = float(os.environ.get("PLACERANK_DIST_TIMEOUT_S", str(24 * 3600)))
        dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=wait_s))
        owns = True
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=dev,
        backend=backend,
        owns_group=owns,
    )


def run_in_context(train: Callable[[Any, DistContext], Path], config: Any) -> Path:
    """``train(config, ctx)`` in this process's context (torchrun's group, or one process), then
    leave the group: after a barrier when it succeeded, without one when it failed."""
    ctx = init_distributed(config.device)
    ok = False
    try:
        path = train(config, ctx)
        ok = True
        return path
    finally:
        shutdown(ctx, wait=ok)


def shutdown(ctx: DistContext, wait: bool = True) -> None:
    """Leave the process group (after a barrier unless this rank failed: the others would
    wait for it forever)."""
    if ctx.owns_group and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def strided_batches(n: int, batch_size: int, ctx: DistContext) -> list[list[int]]:
    """This rank's batches of ``range(n)``: batch b (items b*bs .. b*bs+bs-1) goes to rank
    b mod world. Every batch holds exactly the images it holds in a 1-process run, so the
    extracted features do not depend on the number of processes."""
    batches = [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]
    return batches[ctx.rank :: ctx.world_size]


def sum_across(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """All-reduce SUM in place (a no-op with one process). Used to assemble a full feature
    matrix from per-rank rows written into zeros: x + 0 is exact, so all ranks get identical
    values."""
    if ctx.distributed:
        if ctx.backend == "nccl" and tensor.device.type != "cuda":
            moved = tensor.to(ctx.device)
            dist.all_reduce(moved)
            tensor.copy_(moved.cpu())
        else:
            dist.all_reduce(tensor)
    return tensor


def broadcast_state(module: torch.nn.Module, ctx: DistContext, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank."""
    if not ctx.distributed:
        return
    for t in list(module.state_dict().values()):
        if ctx.backend == "nccl" and t.device.type != "cuda":
            moved = t.to(ctx.device)
            dist.broadcast(moved, src)
            t.copy_(moved.cpu())
        else:
            dist.broadcast(t, src)


def broadcast_object(obj, ctx: DistContext, src: int = 0):
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=ctx.device if ctx.backend == "nccl" else None)
    return box[0]


def all_true(flag: bool, ctx: DistContext) -> bool:
    """Logical AND of ``flag`` across ranks (e.g. 'every rank's loss was finite')."""
    if not ctx.distributed:
        return bool(flag)
    t = torch.tensor([0.0 if flag else 1.0], device=ctx.device if ctx.backend == "nccl" else "cpu")
    dist.all_reduce(t)
    return bool(t.item() == 0)


def mean_across(values: Sequence[float], ctx: DistContext) -> list[float]:
    """Element-wise mean of per-rank floats (for logging the global loss)."""
    if not ctx.distributed:
        return [float(v) for v in values]
    t = torch.tensor(
        [float(v) for v in values], dtype=torch.float64, device=ctx.device if ctx.backend == "nccl" else "cpu"
    )
    dist.all_reduce(t)
    return (t / ctx.world_size).cpu().tolist()


def wrap_ddp(module: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DistributedDataParallel around ``module`` (gradients averaged over ranks) or the module
    itself with one process. Buffers are not re-broadcast every step: the backbones run with
    frozen batch-norm statistics, so every rank's buffers stay equal."""
    if not ctx.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # buffers are synced from rank 0 once, at construction, and never again
    return DDP(module, device_ids=ids, forward_sync_buffers=False, find_unused_parameters=False)


# ---------------------------------------------------------------------------------------------
# One global batch split over the ranks (FoL, SelaVPR)
# ---------------------------------------------------------------------------------------------


def shard_rows(n: int, ctx: DistContext, what: str = "the batch") -> slice:
    """This rank's contiguous rows of a global batch of ``n``: rank r of W takes rows
    [r n/W, (r+1) n/W). Equal shares (all_gather needs equal shapes, and DDP's mean over ranks
    equals the batch mean only then), so ``n`` must be a multiple of W."""
    if n % ctx.world_size:
        raise PlaceRankError(f"{what}: {n} cannot be split evenly over {ctx.world_size} processes")
    per = n // ctx.world_size
    return slice(ctx.rank * per, (ctx.rank + 1) * per)


class ShardedBatches:
    """A batch sampler cut to this rank's rows of every batch: every rank draws the same global
    batches (same seed and epoch) and loads only its own images."""

    def __init__(self, batches, rows: slice):
        self.batches = batches
        self.rows = rows

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            yield list(batch)[self.rows]


def gather_rows(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order (the global batch), with
    autograd: gradients reaching another rank's rows flow back to that rank (summed over the
    ranks, see the module docstring). The tensor itself with one process."""
    if not ctx.distributed:
        return tensor
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # its suggested successor is private (_functional_collectives)
        warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather", FutureWarning)
        return torch.cat(all_gather(tensor.contiguous()), dim=0)


class ShardDropout(torch.nn.Dropout):
    """Dropout that draws the mask of the whole global batch (W x this rank's rows) and applies
    this rank's rows of it. The generators of all ranks start from the same seed and make the
    same draws, so the masks are those of the one-process run (bit for bit on CPU, where
    ``F.dropout`` is exactly ``x * bernoulli(1 - p) / (1 - p)`` with a mask laid out like ``x``)."""

    def __init__(self, p: float, rank: int, world_size: int):
        super().__init__(p)
        self.rank, self.world_size = rank, world_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        n = x.shape[0]
        fmt = torch.contiguous_format
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            fmt = torch.channels_last
        full = torch.empty((n * self.world_size, *x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=fmt)
        keep = 1.0 - self.p
        mask = full.bernoulli_(keep).div_(keep)[self.rank * n : (self.rank + 1) * n]
        return x * mask


def shard_dropouts(module: torch.nn.Module, ctx: DistContext) -> int:
    """Replace every ``nn.Dropout`` inside ``module`` by a :class:`ShardDropout` (no parameters,
    so checkpoints are unchanged); returns how many. Nothing to do with one process."""
    if not ctx.distributed:
        return 0
    swaps = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Dropout
    ]
    for parent, name, child in swaps:
        setattr(parent, name, ShardDropout(child.p, ctx.rank, ctx.world_size))
    return len(swaps)


# ---------------------------------------------------------------------------------------------
# placerank train --nproc N
# ---------------------------------------------------------------------------------------------


@record
def _launched_training(config) -> str:
    """What each process started by :func:`launch_training` runs (module level: pickled by name;
    ``record`` hands a failure's message back to the launcher)."""
    from placerank.train.common import run_training

    return str(run_training(config))


def launch_training(config, nproc: int) -> Path:
    """Run ``run_training(config)`` in ``nproc`` local processes (the one local launcher,
    :func:`placerank.descriptors.launch.launch_local`: what ``torchrun --standalone
    --nproc-per-node N`` runs; the processes then join with gloo on CPU, nccl on CUDA) and wait for
    them. A failed process is one line (its own error message when it raised one)."""
    from placerank.descriptors.launch import launch_local
    from placerank.descriptors.shards import check_nproc

    check_nproc(nproc)
    results = launch_local(
        _launched_training, config, nproc, lambda rank, text: f"training process {rank} of {nproc} failed: {text}"
    )
    return Path(results[0])
