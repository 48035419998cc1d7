"""Distributed data-parallel helpers for training methods (torchrun / env:// initialisation).

One code path for one process and N processes: :func:`init_distributed` reads torchrun's
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (absent -> a single process, nothing initialised), picks
``nccl`` on CUDA and ``gloo`` on CPU, and the helpers below become no-ops with one process.

Launch on one machine::

    torchrun --standalone --nproc_per_node 4 -m placerank.cli train --method sfrs ...

on two machines (run on each, ``--node_rank`` 0 and 1, the address of node 0 reachable by both)::

    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 4 --master_addr 10.0.0.1 --master_port 29500 \\
        -m placerank.cli train --method sfrs ...
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

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
        dist.init_process_group(backend=backend, init_method="env://")
        owns = True
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=dev,
        backend=backend,
        owns_group=owns,
    )


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
    return DDP(module, device_ids=ids, broadcast_buffers=False, find_unused_parameters=False)
