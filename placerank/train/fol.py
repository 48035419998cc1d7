"""``placerank train --method fol``: FoL training (spec ``fol.md`` §3–§4) on any backbone.

Batches are P places x K images ordered by place (:class:`PlaceBatchSampler`); the loss is
:class:`placerank.train.losses.fol.FoLCriterion` (MS + local MNN triplet + SAL + CEL +
pseudo-correspondences); AdamW (lr 6e-5 for ViTs, 1e-4 for the CNN; weight decay 9.5e-9) with
the official linear decay of the lr factor from 1 to 0.1 over 10,000 iterations, stepped every
iteration. ``--precision`` (train/precision.py): the forward under bf16 / fp16 autocast, losses in fp32
(``amp=false``: fp32 whatever it says). Per-epoch resumable checkpoints, one JSON
line per step in ``RUN_DIR/log.jsonl``, a tqdm bar, and ``RUN_DIR/model.pt`` (a placerank
checkpoint: ``placerank eval --model fol-effnet-lite0 --weights RUN_DIR/model.pt``).

Training data: CSV manifests / traversal folders / Nordland roots and GSV-Cities folders
(``Dataframes/`` + ``Images/``), read by :func:`placerank.data.places.read_training_set`.

``--option KEY=VALUE`` keys: ``num_regions``, ``local_mode`` (test-time region features:
pool3 | center | dense; default dense for fol-vit*, pool3 for the CNN), ``train_local_mode``
(the triplet loss's; default dense for fol-vit* as the official code, center for the CNN),
``train_blocks``, ``weight_decay``, ``lr_decay_iters``, ``lr_final_factor``, ``amp``,
``max_steps``, ``gsv_cities`` (comma-separated city names), ``gsv_min_images``, ``gsv_recent``
(GSV-Cities: the K most recent images per place, official; default true), and every field
of :class:`FoLLossConfig` (``w_ms``, ``w_local``, ``w_sal``, ``w_cel``, ``w_ws``, thresholds …).
Deviation from the official script, recorded here: images are normalised with the model's
preprocessing (the official training feeds raw [0, 1] pixels but evaluates normalised ones,
pitfall 3), and no model selection on a test set is done (pitfall 12): without a validation pair
(``val_*`` options; ``placerank train`` holds one out automatically) the last weights are saved.

Runs in one process or under torchrun / ``placerank train --nproc N`` (DDP): each rank runs the
forward on its rows of every batch, the batch-global losses run on the all-gathered outputs, and
N processes end with the weights of one (docs/fol.md, "Several GPUs / processes").

The options and their resolution live in :mod:`.fol_options`, the per-step forward / loss /
gather in :mod:`.fol_step`; this module re-exports their public names.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from placerank.errors import PlaceRankError
from placerank.train.common import (
    PlaceBatchSampler,
    PlaceImageDataset,
    RunDir,
    TrainConfig,
    place_groups,
    register_method,
    seed_everything,
)
from placerank.train.distributed import (
    DistContext,
    ShardedBatches,
    all_true,
    barrier,
    gather_rows,
    run_in_context,
    shard_dropouts,
    shard_rows,
    wrap_ddp,
)
from placerank.train.fol_options import (  # noqa: F401  (re-exported: tests, callers)
    BACKBONE_MODELS,
    FoLOptions,
    FoLTrainOptions,
    fol_options,
    model_name_for,
    read_places,
    resolve_local_modes,
)
from placerank.train.fol_step import (  # noqa: F401  (re-exported: tests, benchmarks)
    FoLForward,
    fol_batch_loss,
    fol_forward,
    fol_step_loss,
    gather_output,
)
from placerank.train.losses.fol import FoLCriterion, FoLLossConfig  # noqa: F401  (FoLLossConfig: re-exported)
from placerank.train.losses.fol_adapt import adapt_loss_config, head_parameters, shared_parameters
from placerank.train.precision import TrainPrecision
from placerank.train.validation import EpochSelector


def lr_factor(step: int, decay_iters: int, final: float) -> float:
    """Linear decay of the lr factor from 1 to ``final`` over ``decay_iters`` steps, then constant."""
    if decay_iters <= 0:
        return 1.0
    t = min(step, decay_iters) / decay_iters
    return 1.0 + (final - 1.0) * t


@register_method("fol")
def train_fol(config: TrainConfig) -> Path:
    """Entry point of ``placerank train --method fol`` (one process or under torchrun: DDP over
    the ranks, each on its rows of every P x K batch; N processes train as one does)."""
    return run_in_context(_train_fol, config)


def _train_fol(config: TrainConfig, ctx: DistContext) -> Path:
    from placerank.models.checkpoints import save_placerank_checkpoint
    from placerank.models.registry import create

    opts, loss_cfg = fol_options(config.options)
    name = model_name_for(config.backbone)
    local_mode, train_local_mode = resolve_local_modes(name, opts)
    if config.images_per_place < 2:
        raise PlaceRankError("fol needs --images-per-place >= 2 (positives for the MS, local, CEL and WS losses)")
    batch = config.batch_places * config.images_per_place
    rows = shard_rows(batch, ctx, "fol batch (--places-per-batch x --images-per-place)")
    seed_everything(config.seed)
    device = ctx.device
    run = RunDir(config)
    main = ctx.is_main
    log = run.log if main else (lambda record: None)

    model = create(
        name,
        weights=config.weights,
        image_size=config.image_size,
        num_regions=opts.num_regions,
        local_mode=local_mode,
        train_blocks=opts.train_blocks,
    )
    model_kwargs = {
        "image_size": list(model.preprocess.size),
        "num_regions": model.cfg.num_regions,
        "local_mode": model.cfg.local_mode,
        "train_blocks": model.cfg.train_blocks,
    }
    model.to(device)
    shard_dropouts(model, ctx)  # N processes draw the one-process dropout masks

    places = read_places(config, opts)
    groups = place_groups(places, min_images=config.images_per_place)
    sampler = PlaceBatchSampler(groups, config.batch_places, config.images_per_place, seed=config.seed)
    workers = config.num_workers if config.num_workers is not None else min(2, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(
        PlaceImageDataset(places, model.preprocess),
        batch_sampler=ShardedBatches(sampler, rows),
        num_workers=workers,
        persistent_workers=False,
    )

    lr = config.lr if config.lr is not None else (1e-4 if name.startswith("fol-effnet") else 6e-5)
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=opts.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, opts.lr_decay_iters, opts.lr_final_factor)
    )
    prec = TrainPrecision.of(config, device) if opts.amp else TrainPrecision("fp32", device)
    loss_cfg = adapt_loss_config(loss_cfg, name, config.options)  # CNN: relative miner (losses/fol_adapt.py)
    criterion = FoLCriterion(loss_cfg, shared_parameters(model), head_parameters(model))

    start_epoch, step = 0, 0
    selector = EpochSelector.from_options(opts, config.max_minutes, main, log)

    def save_best(best: dict) -> None:
        model.invalidate_weights_id()
        save_placerank_checkpoint(model, run.model_path, model_kwargs, extra={"method": "fol", "validation": best})

    state = run.load_checkpoint()
    if state is not None:
        model.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        prec.load_state_dict(state.get("scaler"))
        criterion.rng.setstate(state["criterion_rng"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        selector.load(state.get("selection"))
        log({"event": "resume", "epoch": start_epoch, "step": step})
    else:
        log(
            {
                "event": "start",
                "model": name,
                "images": len(places),
                "places": len(groups),
                "batches_per_epoch": len(sampler),
                "lr": lr,
                "device": str(device),
                "precision": prec.precision,
                "processes": ctx.world_size,
                "trainable_params": int(sum(p.numel() for p in params)),
                "options": {**asdict(opts), "local_mode": local_mode, "train_local_mode": train_local_mode},
                "loss": asdict(loss_cfg),
            }
        )
    forward = wrap_ddp(FoLForward(model, train_local_mode), ctx)
    if state is None:  # the starting weights are a candidate too (training may never beat them)
        selector.validate(model, device, {"epoch": 0, "step": 0}, save_best)

    stop_reason = None
    for epoch in range(start_epoch, config.epochs):
        if opts.max_steps and step >= opts.max_steps:
            stop_reason = "max_steps"
            break
        model.train()
        sampler.set_epoch(epoch)
        totals: list[float] = []
        bar = tqdm(
            loader, desc=f"fol epoch {epoch + 1}/{config.epochs}", unit="batch", dynamic_ncols=True, disable=not main
        )
        for images, labels in bar:
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            with prec.autocast():
                out, local_map = forward(images)
                if ctx.distributed:  # the batch-global losses see the whole batch on every rank
                    out, local_map = gather_output(out, local_map, ctx)
                    labels = gather_rows(labels, ctx)
            with prec.full():  # the losses in float32 on float32 inputs
                loss, record = fol_batch_loss(model, criterion, *prec.fp32((out, local_map)), labels, train_local_mode)
            if not math.isfinite(float(loss.detach())):  # the same loss on every rank: all stop
                raise PlaceRankError(f"fol training diverged at step {step} (loss {float(loss)}); lower --lr")
            optimizer.zero_grad(set_to_none=True)
            prec.backward(loss)
            prec.step(optimizer)
            scheduler.step()
            step += 1
            totals.append(record["loss"])
            log({"epoch": epoch, "step": step, "lr": scheduler.get_last_lr()[0], **record})
            bar.set_postfix(loss=f"{record['loss']:.3f}", ms=f"{record['ms']:.3f}", local=f"{record['local']:.2f}")
            if selector.due(epoch_end=False):
                selector.validate(model, device, {"epoch": epoch, "step": step}, save_best)
            if opts.max_steps and step >= opts.max_steps:
                stop_reason = "max_steps"
            elif not all_true(not run.out_of_time(), ctx):  # every rank stops after the same step
                stop_reason = "max_minutes"
            elif not all_true(not selector.should_stop, ctx):
                stop_reason = "patience"
            if stop_reason:
                break
        bar.close()
        if selector.due(epoch_end=True) or (stop_reason and selector.pending(step)):
            selector.validate(model, device, {"epoch": epoch + 1, "step": step}, save_best)
        if not stop_reason and not all_true(not selector.should_stop, ctx):
            stop_reason = "patience"
        if main:
            run.save_checkpoint(
                {
                    "epoch": epoch + 1,
                    "step": step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": prec.state_dict(),
                    "criterion_rng": criterion.rng.getstate(),
                    "selection": selector.state(),
                }
            )
        barrier(ctx)
        log(
            {
                "event": "epoch_end",
                "epoch": epoch,
                "step": step,
                "mean_loss": float(np.mean(totals)) if totals else None,
                "stopped": stop_reason,
            }
        )
        if stop_reason:
            break

    model.eval()
    model.invalidate_weights_id()
    if main and selector.best is None:  # without validation: the last weights
        save_placerank_checkpoint(
            model, run.model_path, model_kwargs, extra={"method": "fol", "steps": step, "stopped": stop_reason}
        )
    elif main and selector.best is not None:
        log({"event": "selected", **selector.best})
    if main:
        log({"event": "done", "step": step, "model": str(run.model_path)})
    barrier(ctx)
    return run.model_path
