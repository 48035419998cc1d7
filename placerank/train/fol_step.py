"""One FoL optimisation step's pieces: the per-image forward (what DDP wraps), the batch-global
loss over its outputs, and the all-gather that gives every rank the whole batch's outputs.

Split out of :mod:`placerank.train.fol` (which re-exports every name) so the trainer there is
the training loop only; the precision tests and benchmark call these pieces directly.
"""

from __future__ import annotations

from dataclasses import fields

import torch

from placerank.train.distributed import DistContext, gather_rows
from placerank.train.losses.fol import FoLCriterion


def fol_forward(model, images: torch.Tensor, train_local_mode: str = "center"):
    """The per-image part of a step: (FoL output, dense local map for the CEL/pseudo-correspondence
    losses). With ``train_local_mode="center"`` (default) nothing needs the dense local map's
    gradient (CEL detaches it, the triplet loss's region features are the patch-centre cells, and
    the pseudo-correspondence 3 x 3 cells are recomputed from small windows by
    ``model.pooled_cells``), so the dense map is computed without autograd: ~2x cheaper per step
    on CPU. "pool3"/"dense" (the official choice for the triplet loss) keep the dense map's graph."""
    if train_local_mode == "center":
        out = model.run(images, local_map=False)
        with torch.no_grad():
            local_map = model._head(out.feature_map, normalize=False)
        return out, local_map
    out = model.run(images, local_map=True)
    return out, out.local_map


def fol_batch_loss(model, criterion: FoLCriterion, out, local_map, labels: torch.Tensor, train_local_mode: str):
    """The batch part of a step: every FoL loss over the whole batch (MS pairs, batch-hard
    triplets, CEL and pseudo-correspondence partners are batch-global)."""
    import torch.nn.functional as F

    cells = None
    if train_local_mode == "center":
        cells = lambda b, r, c: model.pooled_cells(out.feature_map, b, r, c)  # noqa: E731
    sets = model.region_sets(out, training=True, mode=train_local_mode)
    return criterion(out, [s.descriptors.float() for s in sets], labels, F.normalize(local_map.float(), dim=1), cells)


def fol_step_loss(
    model, criterion: FoLCriterion, images: torch.Tensor, labels: torch.Tensor, train_local_mode: str = "center"
):
    """One batch's FoL loss in one process (:func:`fol_forward` then :func:`fol_batch_loss`)."""
    out, local_map = fol_forward(model, images, train_local_mode)
    return fol_batch_loss(model, criterion, out, local_map, labels, train_local_mode)


class FoLForward(torch.nn.Module):
    """:func:`fol_forward` as a module: what DistributedDataParallel wraps (its forward runs on
    this rank's rows; the batch loss then runs on the gathered outputs, see
    :mod:`placerank.train.distributed`)."""

    def __init__(self, model, train_local_mode: str):
        super().__init__()
        self.model = model
        self.train_local_mode = train_local_mode

    def forward(self, images: torch.Tensor):
        return fol_forward(self.model, images, self.train_local_mode)


def gather_output(out, local_map: torch.Tensor, ctx: DistContext):
    """Every tensor of a rank's FoL output gathered into the global batch's (with autograd)."""
    from dataclasses import replace

    full = {f.name: getattr(out, f.name) for f in fields(out)}
    full = {k: None if v is None else gather_rows(v, ctx) for k, v in full.items()}
    return replace(out, **full), gather_rows(local_map, ctx)
