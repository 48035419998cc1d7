"""SelaVPR hard mining (spec §4.2) on cached global descriptors: the frozen-prefix feature
source, the descriptor pass, the tuple miner and the optimisation step of
``placerank train --method selavpr``.

Several processes (DDP): the descriptor pass splits its batches over the ranks and sums the rows
back (:func:`compute_descriptors`), so every rank mines the same tuples; each rank then trains on
its equal share of every batch's tuples. SelaVPR's loss is a mean of per-tuple terms (global
triplet and MNN local loss, each averaged over the B·k triplets), so the mean of the W ranks'
losses over B/W tuples each is the batch loss, and DDP's gradient average is its gradient:
no tuple needs another rank's images, nothing is gathered.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch

from placerank.data.images import check_batch_errors, make_loader
from placerank.data.places import TrainingPlaces
from placerank.models.selavpr import SelaVPRModel, is_trainable_name
from placerank.train.distributed import DistContext, sum_across
from placerank.train.losses.selavpr import SelaVPRLossConfig, selavpr_loss
from placerank.train.precision import TrainPrecision


class FeatureSource:
    """Inputs of the trainable part of the model, per training image.

    For a backbone with a frozen prefix (EfficientNet: the stages before the first adapter),
    the prefix output of each image is computed once and kept in RAM (up to ``limit_mb``):
    SelaVPR trains without augmentation and the prefix is frozen (BatchNorm in eval mode), so it
    never changes, and both mining passes and training steps then only run the adapted stages.
    For ViTs (adapters in every block) this is just the preprocessed image, not cached.
    """

    def __init__(
        self,
        model: SelaVPRModel,
        paths,
        device,
        limit_mb: float = 2048.0,
        batch_size: int = 16,
        num_workers: int | None = None,
    ):
        self.model = model
        self.paths = paths
        self.device = device
        self.enabled = bool(getattr(model.backbone, "frozen_prefix", False))
        self.limit = float(limit_mb) * 2**20 if self.enabled else 0.0
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache: dict[int, torch.Tensor] = {}
        self.bytes = 0

    @torch.no_grad()
    def _compute(self, indices: list[int]) -> dict[int, torch.Tensor]:
        out = {}
        loader = make_loader(
            [self.paths[i] for i in indices],
            self.model.preprocess,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
        )
        for idx, images, _, errors in loader:
            check_batch_errors(errors)
            prefix = cast(Any, self.model.backbone).forward_prefix(images.to(self.device))
            for k, t in zip(idx.tolist(), prefix):
                out[indices[k]] = t
        return out

    def get(self, indices) -> torch.Tensor:
        """(n, ...) prefix inputs of images ``indices`` on the device."""
        indices = [int(i) for i in indices]
        missing = sorted({i for i in indices if i not in self.cache})
        fresh = self._compute(missing) if missing else {}
        for i, t in fresh.items():
            size = t.numel() * t.element_size()
            if self.bytes + size <= self.limit:
                self.cache[i] = t.cpu()
                self.bytes += size
        return torch.stack([(fresh[i] if i in fresh else self.cache[i]).to(self.device) for i in indices])


@torch.no_grad()
def compute_descriptors(
    model: SelaVPRModel,
    source: FeatureSource,
    indices: np.ndarray,
    batch_size: int = 16,
    ctx: DistContext | None = None,
) -> np.ndarray:
    """Global descriptors of training images with the current model (eval mode, no grad).
    With several processes rank r computes batches r, r+W, ... (the batches of one process)
    and the rows are summed over the ranks (x + 0 is exact): every rank gets the same array."""
    was_training = model.training
    model.eval()
    out = np.zeros((len(indices), model.descriptor_dim), dtype=np.float32)
    starts = list(range(0, len(indices), batch_size))
    if ctx is not None:
        starts = starts[ctx.rank :: ctx.world_size]
    for start in starts:
        chunk = indices[start : start + batch_size]
        out[start : start + len(chunk)] = model.global_from_prefix(source.get(chunk)).cpu().numpy()
    if ctx is not None:
        sum_across(torch.from_numpy(out), ctx)  # in place: the tensor shares out's memory
    model.train(was_training)
    return out


def trainable_state(model: SelaVPRModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if is_trainable_name(k)}


class SelaVPRForward(torch.nn.Module):
    """``model.forward_train`` as a module: what DistributedDataParallel wraps."""

    def __init__(self, model: SelaVPRModel):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, from_prefix: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_train(inputs, from_prefix=from_prefix)


def train_step(
    model: SelaVPRModel,
    inputs: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    num_negatives: int,
    loss_config: SelaVPRLossConfig,
    from_prefix: bool = False,
    forward: torch.nn.Module | None = None,
    prec: TrainPrecision | None = None,
) -> dict[str, float]:
    """One optimisation step on a tuple-ordered batch of B*(2+k) images (or their cached
    frozen-prefix features when ``from_prefix``). ``forward``: the DDP-wrapped
    :class:`SelaVPRForward` of ``model`` when this rank holds a share of the batch. ``prec``:
    the forward under its autocast, the losses in float32 (default: all float32)."""
    prec = prec or TrainPrecision("fp32", inputs.device)
    model.train()
    with prec.autocast():
        g, dense = (forward or model.forward_train)(inputs, from_prefix=from_prefix)
    with prec.full():
        loss, parts = selavpr_loss(*prec.fp32((g, dense)), num_negatives, loss_config)
    optimizer.zero_grad(set_to_none=True)
    prec.backward(loss)
    prec.step(optimizer)
    model.invalidate_weights_id()
    return parts


def mine_tuples(
    places: TrainingPlaces,
    descriptors: dict[int, np.ndarray],
    queries: np.ndarray,
    pool: np.ndarray,
    num_negatives: int,
    exclusion: int,
) -> np.ndarray:
    """(T, 2 + num_negatives) image indices: query, nearest positive, nearest negatives.

    ``descriptors`` maps image index -> L2-normalised global descriptor for every query, every
    positive of a query and every pool image. Queries without a positive or without enough
    negatives in the pool are dropped.
    """
    labels, routes, frames = places.labels, places.routes, places.frames
    members: dict[int, list[int]] = {}
    for i, l in enumerate(labels.tolist()):
        members.setdefault(l, []).append(i)
    by_place = {k: np.array(v, dtype=np.int64) for k, v in members.items()}
    P = np.stack([descriptors[int(i)] for i in pool]) if len(pool) else np.zeros((0, 1), np.float32)
    tuples = []
    for q in queries.tolist():
        pos = by_place[int(labels[q])]
        pos = pos[pos != q]
        if len(pos) == 0:
            continue
        dq = descriptors[q]
        Dp = np.stack([descriptors[int(i)] for i in pos])
        best_pos = int(pos[np.argmin(((Dp - dq) ** 2).sum(1))])
        ok = (labels[pool] != labels[q]) & (pool != q)
        if exclusion > 0 and routes[q] >= 0:
            near = (routes[pool] == routes[q]) & (np.abs(frames[pool] - frames[q]) <= exclusion)
            ok &= ~near
        cand = pool[ok]
        if len(cand) < num_negatives:
            continue
        d = ((P[ok] - dq) ** 2).sum(1)
        nearest = np.argsort(d, kind="stable")[:num_negatives]
        tuples.append([q, best_pos, *[int(cand[i]) for i in nearest]])
    return np.array(tuples, dtype=np.int64).reshape(-1, 2 + num_negatives)


# ---------------------------------------------------------------------------------------------
# Validation as the official code selects its model: recall after MNN re-ranking
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_global_and_local(
    model: SelaVPRModel, paths, device, batch_size: int = 16, num_workers: int | None = None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Global descriptors (n, D) and dense local descriptors (float16, as the eval store keeps
    them) of images ``paths``, from one :meth:`SelaVPRModel.encode` pass each (eval mode)."""
    was_training = model.training
    model.eval()
    g = np.zeros((len(paths), model.descriptor_dim), dtype=np.float32)
    local: list[np.ndarray] = [np.zeros((0, model.local_dim), np.float16)] * len(paths)
    for idx, images, _, errors in make_loader(list(paths), model.preprocess, batch_size, num_workers):
        check_batch_errors(errors)
        gb, lb = model.encode(images.to(device), None, {})
        assert lb is not None
        for k, i in enumerate(idx.tolist()):
            g[i] = gb[k].cpu().numpy()
            local[i] = lb[k].descriptors.astype(np.float16)
    model.train(was_training)
    return g, local


def reranked_validation_recall(
    model: SelaVPRModel, val, device, top_k: int = 100, batch_size: int = 16, num_workers: int | None = None
) -> dict[str, float]:
    """Recall@1/5/10 of a :class:`~placerank.train.common.ValidationSet` after re-ranking each
    query's global top-``top_k`` by SelaVPR's MNN count (``--rerank selavpr-mnn``, official
    settings: a single mutual match scores 0, ties keep the global order) — the metric the
    official training selects its model on (R@5, patience 3)."""
    from placerank.models.base import LocalFeatures
    from placerank.rerank.selavpr_mnn import SelaVPRMNNReranker
    from placerank.rerank.topk import rerank_topk

    paths = list(val.dataset.database.paths) + list(val.dataset.queries.paths)
    g, local = encode_global_and_local(model, paths, device, batch_size, num_workers)
    n_db = len(val.dataset.database)
    reranker = SelaVPRMNNReranker(model, device=device)

    def feats(i: int) -> LocalFeatures:
        return LocalFeatures(keypoints=np.zeros((len(local[i]), 2), np.float32), descriptors=local[i])

    def rerank(ids: np.ndarray) -> np.ndarray:
        return rerank_topk(reranker, ids, top_k, lambda q: feats(n_db + q), feats, progress=False).ids

    return val.recall(g[:n_db], g[n_db:], rerank=rerank, top_k=top_k)
