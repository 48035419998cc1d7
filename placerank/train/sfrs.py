"""``placerank train --method sfrs``: SFRS self-supervised region-similarity training over
generations (Ge et al., ECCV 2020), written from the spec (docs/methods/sfrs.md).

Schedule (defaults = the paper's reference run):

- generation 0: ``gen0_epochs`` (1) epoch(s) of SARE-individual hard loss only;
- generations 1..G-1: ``--epochs`` each; the teacher is the previous generation's *last* epoch
  (frozen), the student is re-initialised from scratch (ImageNet/MatConvNet backbone + the cached
  k-means NetVLAD) with a new optimizer; loss = L_hard (negatives represented by their most
  confusing region) + 0.5 x L_soft (joint softmax over difficult positives x 9 regions, teacher
  temperature 0.07 / 0.06 / 0.05 ...).
- Each epoch: anchors in random order, in chunks of ``cache_size``; before each chunk every
  training image's VLAD is re-extracted with the current student and the tuples are re-mined:
  easiest positive, 10 hard negatives (nearest of a random ``neg_pool`` of allowed images plus
  the anchor's cached negatives from its previous visit), 10 difficult positives (the 20 nearest
  positives re-ranked by k-reciprocal Jaccard distance in generations >= 1).
- After each generation the student learns PCA-whitening on training VLADs and is saved as a
  placerank checkpoint ``RUN_DIR/gen{g}.pt``; ``RUN_DIR/model.pt`` is the final one (or the best on
  the optional validation set by R@5, tracked over all generations, as the paper selects).

Place labels: positives are other images of the same place; with frame labels (traversal folders
or ``frame`` CSVs) positives are frames within ``pos_tolerance`` of the anchor from another
traversal (or the same frame), and negatives must be more than ``neg_exclusion`` frames away.

Runs in one process or under torchrun (DDP, gloo on CPU, nccl on GPU): every rank mines the same
tuples from the same gathered features, takes its share of each step's tuples, and DDP averages the
gradients, so N processes give the result of one process with the same ``batch_tuples``.

One epoch's loop (:meth:`SFRSTrainer.train_epoch`) is inherited from
:class:`~placerank.train.sfrs_epoch.SFRSEpochLoop`.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from placerank.errors import PlaceRankError
from placerank.train.common import (
    RunDir,
    TrainConfig,
    register_method,
    seed_everything,
)
from placerank.train.distributed import (
    DistContext,
    barrier,
    broadcast_object,
    broadcast_state,
    init_distributed,
    shutdown,
    wrap_ddp,
)
from placerank.train.losses.sfrs import teacher_temperature
from placerank.train.precision import TrainPrecision
from placerank.train.sfrs_data import build_sfrs_data
from placerank.train.sfrs_epoch import SFRSEpochLoop
from placerank.train.sfrs_features import SFRSFeatures
from placerank.train.sfrs_mining import SFRSMiner
from placerank.train.sfrs_options import SFRSOptions
from placerank.train.sfrs_step import SFRSForward
from placerank.train.validation import ValidationSet

BACKBONE_MODELS = {
    "effnet-lite0": "sfrs-effnet-lite0",
    "sfrs-effnet-lite0": "sfrs-effnet-lite0",
    "effnet-lite1": "sfrs-effnet-lite1",
    "sfrs-effnet-lite1": "sfrs-effnet-lite1",
    "effnet-lite2": "sfrs-effnet-lite2",
    "sfrs-effnet-lite2": "sfrs-effnet-lite2",
    "vgg16": "sfrs-vgg16",
    "sfrs-vgg16": "sfrs-vgg16",
}


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


class SFRSTrainer(SFRSEpochLoop):
    def __init__(self, config: TrainConfig, ctx: DistContext):
        from placerank.models import create

        self.config = config
        self.opts = SFRSOptions.parse(config.options)
        self.ctx = ctx
        self.device = ctx.device
        name = BACKBONE_MODELS.get(config.backbone)
        if name is None:
            raise PlaceRankError(
                f"sfrs trains on backbones {', '.join(sorted(set(BACKBONE_MODELS)))}; got '{config.backbone}'"
            )
        self.run = RunDir(config)
        self.data = build_sfrs_data(config.train, config.frames, self.opts)
        self.temps = self.opts.temperature_list
        self.lr = 0.001 if config.lr is None else float(config.lr)
        self.num_workers = 0 if config.num_workers is None else int(config.num_workers)
        seed_everything(config.seed)

        model = create(name, weights=config.weights, image_size=config.image_size)
        if getattr(model, "pca", None) is not None:
            model.set_pca(None)  # training and mining use the pre-PCA VLAD
        self.model = model.to(self.device).eval()
        self.pre = model.preprocess
        self.features = SFRSFeatures(self.data.paths, self.pre, self.opts, ctx, self.num_workers, config.seed)
        self.miner = SFRSMiner(self.data, self.opts)
        init_path = self.run.path / "init.pt"
        # rank 0 decides (another rank could see the init.pt rank 0 is about to write)
        fresh = broadcast_object(not (init_path.exists() and config.resume), ctx)
        if not fresh:
            self.init_state = torch.load(init_path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(self.init_state)
        if self.opts.cache_frozen:
            self.features.compute_frozen_cache(self.model)
        if fresh:
            if self.model.needs_data_init and ctx.is_main:
                self.features.kmeans_init(self.model)
            broadcast_state(self.model, ctx)
            self.init_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            if ctx.is_main:
                from placerank.utils import atomic_path

                with atomic_path(init_path) as tmp:
                    torch.save(self.init_state, tmp)
        self.model.set_trainable()
        # Copies (teacher, saved models) are made from this untouched template, never from the
        # DDP-wrapped student (whose parameters carry the reducer's hooks).
        self._template = copy.deepcopy(self.model)
        self.prec = TrainPrecision.of(config, self.device)  # the step's forward; mining, k-means, PCA: fp32
        self.student = wrap_ddp(SFRSForward(self.model, self.prec), ctx)
        self.teacher = None
        o = self.opts  # read the validation pair now: a bad path fails before any training
        self.val = ValidationSet.from_options(
            o.val_database, o.val_queries, o.val_frame_tolerance, o.val_radius, frames=o.val_frames
        )
        self.best: dict | None = None
        self.best_state: dict | None = None
        self.history: list[dict] = []

    # -- one tuple ------------------------------------------------------------------------
    # -- schedule -------------------------------------------------------------------------
    def epochs_of(self, gen: int) -> int:
        return self.opts.gen0_epochs if gen == 0 else int(self.config.epochs)

    def start_generation(self, gen: int) -> torch.optim.Optimizer:
        """Teacher <- the current student (gens >= 1); student <- the initial weights."""
        if gen >= 1:
            self.teacher = self.copy_of(self.model.state_dict())
        self.model.load_state_dict(self.init_state)
        self.model.set_trainable()
        return self.make_optimizer()

    def copy_of(self, state: dict):
        """A frozen eval-mode model of the student's architecture holding ``state``."""
        m = copy.deepcopy(self._template)
        m.load_state_dict(state)
        for p in m.parameters():
            p.requires_grad_(False)
        return m.to(self.device).eval()

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            [p for p in self.model.trainable_parameters()],
            lr=self.lr,
            momentum=self.opts.momentum,
            weight_decay=self.opts.weight_decay,
        )

    def checkpoint_state(self, gen, epoch, optimizer) -> dict:
        return {
            "gen": gen,
            "epoch": epoch,
            "student": self.model.state_dict(),
            "teacher": None if self.teacher is None else self.teacher.state_dict(),
            "optimizer": optimizer.state_dict(),
            "neg_cache": {k: v.tolist() for k, v in self.miner.neg_cache.items()},
            "best": self.best,
            "best_state": self.best_state,
            "history": self.history,
        }

    def train(self) -> Path:
        ctx, o = self.ctx, self.opts
        gen, epoch, optimizer = 0, 0, None
        ckpt = self.run.load_checkpoint()
        if ckpt is not None:
            self.model.load_state_dict(ckpt["student"])
            if ckpt["teacher"] is not None:
                self.teacher = self.copy_of(ckpt["teacher"])
            self.miner.neg_cache = {int(k): np.asarray(v, dtype=np.int64) for k, v in ckpt["neg_cache"].items()}
            self.best, self.best_state, self.history = ckpt["best"], ckpt["best_state"], ckpt.get("history", [])
            gen, epoch = ckpt["gen"], ckpt["epoch"] + 1
            optimizer = self.make_optimizer()
            optimizer.load_state_dict(ckpt["optimizer"])
            if epoch >= self.epochs_of(gen):
                if not (self.run.path / f"gen{gen}.pt").exists():  # interrupted before it was written
                    self.save_model(self.model, [(self.run.path / f"gen{gen}.pt", {"generation": gen})])
                gen, epoch, optimizer = gen + 1, 0, None
            if ctx.is_main:
                self.run.log({"event": "resume", "gen": gen, "epoch": epoch})
        elif o.save_untrained:
            # The starting point of every generation (ImageNet backbone + k-means NetVLAD, PCA from
            # the same training images): the fair "untrained" baseline for evaluations.
            self.save_model(self.model, [(self.run.path / "untrained.pt", {"generation": None, "untrained": True})])
        stopped = model_written = False
        done = gen  # generations completed
        while gen < o.generations and not stopped:
            if optimizer is None:
                optimizer = self.start_generation(gen)
                if ctx.is_main:
                    self.run.log(
                        {
                            "event": "generation_start",
                            "gen": gen,
                            "epochs": self.epochs_of(gen),
                            "precision": self.prec.precision,
                            "teacher_temperature": teacher_temperature(gen, self.temps) if gen else None,
                        }
                    )
            collapsed = False
            while epoch < self.epochs_of(gen):
                status = self.train_epoch(gen, epoch, optimizer)
                if status == "collapsed":
                    collapsed = True
                    break
                if status == "time":
                    stopped = True
                    break
                self.validate(gen, epoch)
                barrier(ctx)
                if ctx.is_main:
                    self.run.save_checkpoint(self.checkpoint_state(gen, epoch, optimizer))
                epoch += 1
            if collapsed:
                if gen == 0:
                    raise PlaceRankError("sfrs: the loss became NaN/inf in generation 0; lower --lr")
                assert self.teacher is not None  # generations >= 1 have a teacher
                self.model.load_state_dict(self.teacher.state_dict())  # keep the teacher (issue #2/#14)
                if ctx.is_main:
                    self.run.log({"event": "collapse", "gen": gen, "action": "generation aborted, teacher kept"})
            if stopped:
                break
            done = gen + 1
            targets: list[tuple[Path, dict]] = [(self.run.path / f"gen{gen}.pt", {"generation": gen})]
            if done == o.generations and self.best_state is None:  # the final model: one PCA for both files
                targets.append((self.run.model_path, {"generations_done": done, "stopped_early": False, "best": None}))
                model_written = True
            self.save_model(self.model, targets)
            gen, epoch, optimizer = gen + 1, 0, None
        if not model_written:
            final = self.model if self.best_state is None else self.copy_of(self.best_state)
            self.save_model(
                final, [(self.run.model_path, {"generations_done": done, "stopped_early": stopped, "best": self.best})]
            )
        return self.run.model_path

    # -- validation, PCA, saving ------------------------------------------------------------
    def validate(self, gen: int, epoch: int) -> None:
        """Recall@1/5/10 of the pre-PCA VLAD on the optional validation pair; the best R@5 over
        all generations becomes model.pt (the paper's selection, on validation data only)."""
        val = self.val
        if val is None:
            return
        db = self.features.extract_vlads(self.model, val.dataset.database.paths, "validation database").numpy()
        q = self.features.extract_vlads(self.model, val.dataset.queries.paths, "validation queries").numpy()
        rec = val.recall(db, q)
        if val.improves(rec, None if self.best is None else self.best["recall"]):
            self.best = {"gen": gen, "epoch": epoch, "recall": rec}
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        if self.ctx.is_main:
            self.run.log({"event": "validation", "gen": gen, "epoch": epoch, "recall": rec})

    def save_model(self, model, targets: list[tuple[Path, dict]]) -> None:
        """Learn PCA-whitening for ``model`` (a copy: the student keeps training on the VLAD) and
        write it as a placerank checkpoint to every target path."""
        from placerank.models.checkpoints import save_placerank_checkpoint

        model = self.copy_of(model.state_dict()) if model is self.model else model
        self.features.learn_pca(model, self.run.log)
        if self.ctx.is_main:
            model = model.cpu()
            for path, extra in targets:
                save_placerank_checkpoint(
                    model,
                    path,
                    model_kwargs=model.model_kwargs,
                    extra={**extra, "method": "sfrs", "options": asdict(self.opts)},
                )
        barrier(self.ctx)


@register_method("sfrs")
def train_sfrs(config: TrainConfig) -> Path:
    """Entry point of ``placerank train --method sfrs`` (one process or under torchrun)."""
    ctx = init_distributed(config.device)
    ok = False
    try:
        path = SFRSTrainer(config, ctx).train()
        ok = True
        return path
    finally:
        shutdown(ctx, wait=ok)
