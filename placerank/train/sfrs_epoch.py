"""One epoch of ``placerank train --method sfrs``: anchors in random order, in chunks of
``cache_size``; before each chunk every training image's VLAD is re-extracted with the current
student and the tuples re-mined, then each rank runs its share of every step's tuples (gradients
accumulated over them, DDP-synchronised on the last one), stopping on a non-finite loss or the
time limit.

Split out of :mod:`placerank.train.sfrs` so the trainer there holds the setup, the generation
schedule, validation and saving: :class:`SFRSEpochLoop` is a base class of
:class:`~placerank.train.sfrs.SFRSTrainer`, which sets every attribute declared below, so
``SFRSTrainer.train_epoch`` is unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Any, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from placerank.errors import DataError, PlaceRankError
from placerank.train.common import RunDir, TrainConfig
from placerank.train.distributed import DistContext, all_true, mean_across
from placerank.train.precision import TrainPrecision
from placerank.train.sfrs_data import SFRSData, TupleImages, make_loader
from placerank.train.sfrs_features import SFRSFeatures
from placerank.train.sfrs_mining import SFRSMiner
from placerank.train.sfrs_options import SFRSOptions
from placerank.train.sfrs_step import step_items, tuple_loss


class SFRSEpochLoop:
    """:meth:`train_epoch` of :class:`~placerank.train.sfrs.SFRSTrainer`, which sets these:"""

    config: TrainConfig
    opts: SFRSOptions
    ctx: DistContext
    device: torch.device
    run: RunDir
    data: SFRSData
    num_workers: int
    model: Any
    pre: Any
    features: SFRSFeatures
    miner: SFRSMiner
    student: torch.nn.Module
    teacher: Any
    prec: TrainPrecision
    history: list[dict]

    def train_epoch(self, gen: int, epoch: int, optimizer) -> str:
        ctx, o, data = self.ctx, self.opts, self.data
        rng = np.random.default_rng([self.config.seed, 43, gen, epoch])
        anchors = rng.permutation(data.queries)
        if o.queries_per_epoch:
            anchors = anchors[: o.queries_per_epoch]
        chunks = [anchors[s : s + o.cache_size] for s in range(0, len(anchors), o.cache_size)]
        student = self.student
        frozen = self.features.frozen_cache is not None
        per_rank = o.batch_tuples // ctx.world_size
        if per_rank * ctx.world_size != o.batch_tuples:
            raise PlaceRankError(
                f"sfrs option batch_tuples={o.batch_tuples} must be a multiple of the {ctx.world_size} processes"
            )
        sums = {"loss": 0.0, "loss_hard": 0.0, "loss_soft": 0.0, "steps": 0}
        for ci, chunk in enumerate(chunks):
            feats = self.features.extract_vlads(self.model, desc=f"gen {gen} epoch {epoch}: features")
            tuples = self.miner.mine(feats, chunk, gen, np.random.default_rng([self.config.seed, 44, gen, epoch, ci]))
            if len(tuples) % o.batch_tuples:  # pad with the chunk's first tuples: equal steps on all ranks
                tuples += tuples[: o.batch_tuples - len(tuples) % o.batch_tuples]
            steps = len(tuples) // o.batch_tuples
            jitter = o.augment and not frozen
            items, owners = step_items(
                tuples, gen, ctx, o.batch_tuples, (self.config.seed, gen, epoch, ci) if jitter else None
            )
            self.model.eval()
            if self.features.frozen_cache is None:
                stream = iter(make_loader(TupleImages(data.paths, self.pre, items), self.num_workers, batch_size=None))
            else:
                stream = iter((self.features.frozen_cache[ids], "") for ids, _ in items)
            bar = tqdm(
                range(steps),
                desc=f"sfrs gen {gen} epoch {epoch} chunk {ci + 1}/{len(chunks)}",
                unit="step",
                leave=False,
                disable=not ctx.is_main,
            )
            k = 0
            for s in bar:
                optimizer.zero_grad(set_to_none=True)
                hard_sum = soft_sum = loss_sum = 0.0
                finite = True
                for j in range(per_rank):
                    x, err = next(stream)
                    if err:
                        raise DataError(err)
                    t = owners[k]
                    k += 1
                    last = j == per_rank - 1 or not ctx.distributed
                    sync = contextlib.nullcontext() if last else cast(Any, student).no_sync()
                    with sync:
                        loss, h, sft = tuple_loss(
                            student, self.teacher, x.to(self.device), t, gen, o, frozen, self.prec
                        )
                        finite &= bool(torch.isfinite(loss))
                        self.prec.backward(loss / per_rank)
                    loss_sum += float(loss.detach()) / per_rank
                    hard_sum += h / per_rank
                    soft_sum += sft / per_rank
                if not all_true(finite, ctx):
                    return "collapsed"
                self.prec.step(optimizer)
                loss_g, hard_g, soft_g = mean_across([loss_sum, hard_sum, soft_sum], ctx)
                sums["loss"] += loss_g
                sums["loss_hard"] += hard_g
                sums["loss_soft"] += soft_g
                sums["steps"] += 1
                if ctx.is_main:
                    bar.set_postfix(loss=f"{loss_g:.4f}", hard=f"{hard_g:.4f}", soft=f"{soft_g:.3f}")
                    self.run.log(
                        {
                            "gen": gen,
                            "epoch": epoch,
                            "chunk": ci,
                            "step": s,
                            "loss": round(loss_g, 6),
                            "loss_hard": round(hard_g, 6),
                            "loss_soft": round(soft_g, 6),
                        }
                    )
                if not all_true(not self.run.out_of_time(), ctx):
                    if ctx.is_main:
                        self.run.log({"event": "time_limit", "gen": gen, "epoch": epoch, "step": s})
                    return "time"
            bar.close()
        n = max(1, sums["steps"])
        rec = {
            "event": "epoch_end",
            "gen": gen,
            "epoch": epoch,
            "steps": sums["steps"],
            "loss": round(sums["loss"] / n, 6),
            "loss_hard": round(sums["loss_hard"] / n, 6),
            "loss_soft": round(sums["loss_soft"] / n, 6),
        }
        self.history.append(rec)
        if ctx.is_main:
            self.run.log(rec)
        return "ok"
