"""One SFRS optimisation step's pieces: the images of each rank's tuples and one tuple's loss."""

from __future__ import annotations

import torch

from placerank.train.distributed import DistContext
from placerank.train.losses.sfrs import (
    hardest_region_negatives,
    image_to_region_similarities,
    sare_ind_loss,
    soft_region_loss,
    teacher_temperature,
)
from placerank.train.precision import TrainPrecision
from placerank.train.sfrs_options import SFRSOptions


def step_items(
    tuples: list[dict], gen: int, ctx: DistContext, batch_tuples: int, jitter_key: tuple | None
) -> tuple[list[tuple[list[int], tuple | None]], list[dict]]:
    """This rank's share of every step's tuples, in order: (image ids, jitter seed) and the tuple.
    Tuple ``pos`` of the chunk gets the seed ``jitter_key + (pos,)`` (None: no jitter), so
    every rank and every run jitters a tuple alike."""
    items, owners = [], []
    for s in range(len(tuples) // batch_tuples):
        for k in range(ctx.rank, batch_tuples, ctx.world_size):
            pos = s * batch_tuples + k
            t = tuples[pos]
            ids = [t["q"], t["p"], *t["negs"].tolist()] + (t["diffs"].tolist() if gen else [])
            items.append((ids, None if jitter_key is None else (*jitter_key, pos)))
            owners.append(t)
    return items, owners


def mixed_forward(model, prec: TrainPrecision, x: torch.Tensor, output: str, frozen: bool) -> torch.Tensor:
    """``model(x, output=output)`` ('vlad' | 'regions') with the backbone under the run's autocast
    and NetVLAD in float32: its soft assignment is a softmax of alpha = 100 x cosine logits, where
    bf16's rounding (~0.4 at 100) would move the assignment; in fp32 exactly the model's forward."""
    with prec.autocast():
        fmap = model.feature_map(x, frozen)
    with prec.full():
        fmap = prec.fp32(fmap)
        return model.regions_from_map(fmap) if output == "regions" else model.aggregator(fmap)


class SFRSForward(torch.nn.Module):
    """:func:`mixed_forward` of the student as a module: what DistributedDataParallel wraps."""

    def __init__(self, model, prec: TrainPrecision):
        super().__init__()
        self.model = model
        self.prec = prec

    def forward(self, x: torch.Tensor, output: str = "vlad", frozen_input: bool = False) -> torch.Tensor:
        if output not in ("vlad", "regions"):
            raise ValueError(f"SFRS training uses output 'vlad' or 'regions', not '{output}'")
        return mixed_forward(self.model, self.prec, x, output, frozen_input)


def tuple_loss(
    student,
    teacher,
    x: torch.Tensor,
    t: dict,
    gen: int,
    opts: SFRSOptions,
    frozen: bool,
    prec: TrainPrecision | None = None,
) -> tuple[torch.Tensor, float, float]:
    """One tuple's loss (and its hard / soft parts): SARE-individual on VLADs in generation 0;
    on regions (negatives by their most confusing region) + ``soft_weight`` x the soft region
    loss against the frozen teacher in generations >= 1. The losses run in float32 on float32
    outputs (``student``: an :class:`SFRSForward`, or the model itself in fp32); ``prec``: the
    teacher's forward precision (default fp32)."""
    o = opts
    temps = opts.temperature_list
    tau0 = temps[0]
    nn_ = len(t["negs"])
    if gen == 0:
        v = student(x[: 2 + nn_], output="vlad", frozen_input=frozen)
        hard = sare_ind_loss(v[0], v[1], v[2:], tau0, o.similarity)
        return hard, float(hard.detach()), 0.0
    r = student(x, output="regions", frozen_input=frozen)
    anchor = r[0, 0]
    negs = hardest_region_negatives(anchor, r[2 : 2 + nn_])
    hard = sare_ind_loss(anchor, r[1, 0], negs, tau0, o.similarity)
    nd = len(t["diffs"])
    if nd == 0 or o.soft_weight == 0:
        return hard, float(hard.detach()), 0.0
    with torch.no_grad():
        sel = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(2 + nn_, 2 + nn_ + nd)]).to(x.device)
        tr = mixed_forward(teacher, prec or TrainPrecision("fp32", x.device), x[sel], "regions", frozen)
        s_t = image_to_region_similarities(tr[0, 0], tr[1:])
    s_s = image_to_region_similarities(anchor, r[2 + nn_ :])
    soft = soft_region_loss(s_s, s_t, tau0, teacher_temperature(gen, temps))
    return hard + o.soft_weight * soft, float(hard.detach()), float(soft.detach())
