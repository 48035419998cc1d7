"""``placerank train --method selavpr``: SelaVPR training with cached-feature hard mining.

Spec §4, adapted from metric positions to place labels:

- each *loop* samples ``queries_per_loop`` query images (of places with 2+ views) and a random
  ``negative_pool`` of images, computes their global descriptors (and those of all the queries'
  positives) with the current model (eval mode, no gradients), then per query takes the
  **nearest positive** (same place) and the ``num_negatives`` **nearest negatives** from the pool
  (other places; on frame-labelled routes, frames within ``neighbour_exclusion`` of the query's
  frame are neither positives nor negatives — they play the role of the official 25 m "soft
  positives");
- it then trains on those tuples in batches of ``batch_tuples`` (shuffle off, drop_last), loss
  global triplet (m = 0.1) + MNN local loss (:mod:`placerank.train.losses.selavpr`);
- Adam, no weight decay, no scheduler; only adapters, GeM ``p`` and the up-convolutions train.

An epoch is ``loops_per_epoch`` loops. Every epoch writes ``RUN_DIR/checkpoint.pt`` (trainable
tensors + optimizer, for resume) and ``RUN_DIR/model.pt`` (a placerank checkpoint for
``--weights``); ``log.jsonl`` gets one line per step and per epoch. ``--max-minutes`` stops
cleanly after the current step and saves both files. With a validation pair
(``--option val_database=... --option val_queries=...``) recall is measured after every epoch
and ``model.pt`` is the best epoch so far (R@``val_select_n``, default 5; ties: R@1, then the
earlier epoch). DINOv2 backbones select as the official code: on the **re-ranked** recall (the
global top-``val_rerank_top_k`` = 100 re-ordered by the MNN count) and stop after
``val_patience`` = 3 validations without improvement; the CNN recipe keeps its measured setting
(global recall, every epoch run); ``val_rerank`` / ``val_patience`` override either. ``last.pt``
is then the latest epoch.

Method options (``--option KEY=VALUE``): see :class:`SelaVPROptions`. The options, the backbone
table and :func:`build_model` live in :mod:`.selavpr_options`; this module re-exports them.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from placerank.data.places import read_route_places
from placerank.errors import DataError, PlaceRankError
from placerank.models.checkpoints import save_placerank_checkpoint
from placerank.train.common import (
    RunDir,
    TrainConfig,
    register_method,
    seed_everything,
)
from placerank.train.distributed import (
    DistContext,
    all_true,
    broadcast_object,
    mean_across,
    run_in_context,
    shard_rows,
    wrap_ddp,
)
from placerank.train.losses.selavpr import SelaVPRLossConfig
from placerank.train.precision import TrainPrecision
from placerank.train.selavpr_mining import (
    FeatureSource,
    SelaVPRForward,
    compute_descriptors,
    mine_tuples,
    reranked_validation_recall,
    train_step,
    trainable_state,
)
from placerank.train.selavpr_options import (  # also re-exported: tests, callers
    BACKBONES,
    DEFAULT_LR,
    OFFICIAL_LR,
    SelaVPROptions,
    build_model,
)
from placerank.train.validation import ValidationSet

# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@register_method("selavpr")
def train_selavpr(config: TrainConfig) -> Path:
    """Entry point of ``placerank train --method selavpr`` (one process or under torchrun: DDP,
    each rank on an equal share of every batch's tuples; see :mod:`.selavpr_mining`)."""
    return run_in_context(_train_selavpr, config)


def _train_selavpr(config: TrainConfig, ctx: DistContext) -> Path:
    from tqdm import tqdm

    opts = SelaVPROptions.parse(config.options)
    if config.backbone not in BACKBONES:
        raise PlaceRankError(f"selavpr cannot train on backbone '{config.backbone}'; known: {', '.join(BACKBONES)}")
    rows = shard_rows(opts.batch_tuples, ctx, "selavpr option batch_tuples")
    seed_everything(config.seed)
    run = RunDir(config)
    main = ctx.is_main
    log = run.log if main else (lambda record: None)
    device = ctx.device
    places = read_route_places(config.train, config.frames)
    n_images = len(places.images)
    counts = np.bincount(places.labels)
    queryable = np.flatnonzero(counts[places.labels] >= 2)
    if len(queryable) == 0:
        raise DataError("no place has 2 or more images: SelaVPR needs positive pairs (several traversals or views)")
    exclusion = opts.neighbour_exclusion
    if exclusion < 0:
        exclusion = 2 if (places.routes >= 0).any() else 0

    model, model_kwargs = build_model(config)
    model.to(device)
    lr = config.lr if config.lr is not None else DEFAULT_LR.get(config.backbone, OFFICIAL_LR)
    params = model.trainable_parameters()
    optimizer = torch.optim.Adam(params, lr=lr)
    loss_config = SelaVPRLossConfig(margin=opts.margin, local_weight=opts.local_weight)
    prec = TrainPrecision.of(config, device)  # the training step's forward; mining and validation stay fp32

    val_rerank, val_patience = opts.official_selection(config.backbone)
    val = ValidationSet.from_options(
        opts.val_database,
        opts.val_queries,
        opts.val_frame_tolerance,
        opts.val_radius,
        opts.val_select_n,
        opts.val_frames,
    )
    start_epoch, step, best, not_improved = 0, 0, None, 0
    state = run.load_checkpoint()
    if state is not None:
        own = trainable_state(model)
        if set(state["trainable"]) != set(own) or any(state["trainable"][k].shape != own[k].shape for k in own):
            raise PlaceRankError(
                f"{run.checkpoint_path}: checkpoint does not match this model; use another --out or --no-resume"
            )
        model.load_state_dict({**model.state_dict(), **state["trainable"]}, strict=True)
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step = int(state["epoch_done"]), int(state["step"])
        best = state.get("best")
        not_improved = int(state.get("not_improved", 0))
        model.invalidate_weights_id()
        if main:
            print(f"resuming {run.path} after epoch {start_epoch} (step {step})", file=sys.stderr)

    info = {
        "event": "start",
        "images": n_images,
        "places": len(counts),
        "queryable": len(queryable),
        "lr": lr,
        "device": str(device),
        "precision": prec.precision,
        "processes": ctx.world_size,
        "neighbour_exclusion": exclusion,
        "options": asdict(opts),
        "trainable_params": int(sum(p.numel() for p in params)),
        "model": model.name,
        "input_size": list(model.preprocess.size),
    }
    log(info)
    forward = wrap_ddp(SelaVPRForward(model), ctx)
    paths = places.images.paths
    source = FeatureSource(model, paths, device, opts.prefix_cache_mb, opts.cache_batch, config.num_workers)
    stopped = False

    val_source = None
    if val is not None:
        val_paths = list(val.dataset.database.paths) + list(val.dataset.queries.paths)
        val_source = FeatureSource(model, val_paths, device, opts.prefix_cache_mb, opts.cache_batch, config.num_workers)

    def validate(epochs_done: int) -> dict[str, float] | None:
        """Recall on the validation pair (rank 0 only: the others get None)."""
        assert val is not None and val_source is not None
        if not main:
            return None
        n_db = len(val.dataset.database)
        if val_rerank:
            rec = reranked_validation_recall(
                model, val, device, opts.val_rerank_top_k, opts.cache_batch, config.num_workers
            )
        else:
            desc = compute_descriptors(model, val_source, np.arange(len(val_source.paths)), opts.cache_batch)
            rec = val.recall(desc[:n_db], desc[n_db:])
        log({"event": "validation", "epochs_done": epochs_done, "step": step, "recall": rec})
        return rec

    def save(epoch_done: int, partial: bool, recall: dict | None = None) -> None:
        """Rank 0 writes the files; every rank then holds its selection state (patience)."""
        nonlocal best, not_improved
        if main:
            write(epoch_done, partial, recall)
        best, not_improved = broadcast_object((best, not_improved), ctx)

    def write(epoch_done: int, partial: bool, recall: dict | None) -> None:
        nonlocal best, not_improved
        extra = {
            "method": "selavpr",
            "epochs_done": epoch_done,
            "steps": step,
            "partial_epoch": partial,
            "train": [str(s) for s in config.train],
        }
        if val is None:
            save_placerank_checkpoint(model, run.model_path, model_kwargs=model_kwargs, extra=extra)
        else:
            save_placerank_checkpoint(model, run.path / "last.pt", model_kwargs=model_kwargs, extra=extra)
            if recall is not None and val.improves(recall, None if best is None else best["recall"]):
                best = {"epoch": epoch_done, "step": step, "recall": recall}
                not_improved = 0
                save_placerank_checkpoint(
                    model, run.model_path, model_kwargs=model_kwargs, extra={**extra, "validation": best}
                )
            elif recall is not None:
                not_improved += 1
        run.save_checkpoint(
            {
                "epoch_done": epoch_done,
                "step": step,
                "partial": partial,
                "trainable": trainable_state(model),
                "optimizer": optimizer.state_dict(),
                "options": asdict(opts),
                "model_kwargs": model_kwargs,
                "best": best,
                "not_improved": not_improved,
            }
        )

    if val is not None and state is None:
        # The starting point (zero-initialised adapters == the frozen backbone) is a candidate
        # too: if training never beats it on validation, model.pt stays the backbone.
        save(0, partial=False, recall=validate(0))
    for epoch in range(start_epoch, config.epochs):
        epoch_losses = []
        for loop in range(opts.loops_per_epoch):
            rng = np.random.default_rng([config.seed, epoch, loop])
            queries = rng.choice(queryable, min(opts.queries_per_loop, len(queryable)), replace=False)
            pool = rng.choice(n_images, min(opts.negative_pool, n_images), replace=False)
            same = [np.flatnonzero(places.labels == l) for l in np.unique(places.labels[queries])]
            need = np.unique(np.concatenate([queries, pool, *same]))
            t0 = time.monotonic()
            desc = compute_descriptors(model, source, need, opts.cache_batch, ctx)
            descriptors = {int(i): desc[k] for k, i in enumerate(need)}
            tuples = mine_tuples(places, descriptors, queries, pool, opts.num_negatives, exclusion)
            log(
                {
                    "event": "mined",
                    "epoch": epoch,
                    "loop": loop,
                    "tuples": len(tuples),
                    "cached_images": len(need),
                    "mining_s": round(time.monotonic() - t0, 2),
                    "prefix_cache_mb": round(source.bytes / 2**20, 1),
                }
            )
            n_steps = len(tuples) // opts.batch_tuples
            if n_steps == 0:
                raise DataError(
                    f"mining produced {len(tuples)} tuples, fewer than one batch of {opts.batch_tuples}; "
                    f"add places or lower --option batch_tuples"
                )
            bar = tqdm(
                range(n_steps),
                desc=f"selavpr epoch {epoch + 1}/{config.epochs} loop {loop + 1}",
                unit="step",
                mininterval=2.0,
                file=sys.stderr,
                disable=not main,
            )
            for b in bar:
                batch = tuples[b * opts.batch_tuples : (b + 1) * opts.batch_tuples][rows].reshape(-1)
                inputs = source.get(batch)
                parts = train_step(model, inputs, optimizer, opts.num_negatives, loss_config, True, forward, prec)
                if ctx.distributed:  # the mean over equal shares of per-tuple means: the batch's
                    parts = dict(zip(parts, mean_across(list(parts.values()), ctx)))
                step += 1
                epoch_losses.append(parts["loss"])
                log(
                    {
                        "event": "step",
                        "epoch": epoch,
                        "loop": loop,
                        "step": step,
                        **parts,
                        "gem_p": round(float(cast(Any, model.aggregator).p.detach().item()), 5),
                    }
                )
                bar.set_postfix(loss=f"{parts['loss']:.4f}")
                if not all_true(not run.out_of_time(), ctx):  # every rank stops after the same step
                    stopped = True
                    break
            bar.close()
            if stopped:
                break
        if stopped:
            save(
                epoch, partial=True, recall=validate(epoch) if val is not None else None
            )  # partial: step tells it apart
            log({"event": "stopped", "reason": "max-minutes", "epoch": epoch, "step": step})
            break
        save(epoch + 1, partial=False, recall=validate(epoch + 1) if val is not None else None)
        log(
            {
                "event": "epoch",
                "epoch": epoch,
                "step": step,
                "mean_loss": float(np.mean(epoch_losses)) if epoch_losses else math.nan,
            }
        )
        if val is not None and val_patience > 0 and not_improved >= val_patience:
            log({"event": "stopped", "reason": "patience", "epoch": epoch, "not_improved": not_improved})
            break
    if broadcast_object(not run.model_path.exists(), ctx):  # e.g. resumed a finished run: still hand back a model
        done = max(start_epoch, config.epochs)
        save(done, partial=False, recall=validate(done) if val is not None else None)
    if best is not None:
        log({"event": "selected", "epoch": best["epoch"], "step": best["step"], "recall": best["recall"]})
    return run.model_path
