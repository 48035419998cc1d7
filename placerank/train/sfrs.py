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
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from placerank.data.images import check_batch_errors, open_image, to_tensor
from placerank.errors import DataError, PlaceRankError
from placerank.train.common import (
    RunDir,
    TrainConfig,
    ValidationSet,
    read_training_places,
    register_method,
    seed_everything,
)
from placerank.train.distributed import (
    DistContext,
    all_true,
    barrier,
    broadcast_object,
    broadcast_state,
    init_distributed,
    mean_across,
    shutdown,
    strided_batches,
    sum_across,
    wrap_ddp,
)
from placerank.train.losses.sfrs import (
    hardest_region_negatives,
    image_to_region_similarities,
    k_reciprocal_rerank,
    sare_ind_loss,
    select_difficult_positives,
    soft_region_loss,
    teacher_temperature,
)

BACKBONE_MODELS = {
    "effnet-lite0": "sfrs-effnet-lite0",
    "sfrs-effnet-lite0": "sfrs-effnet-lite0",
    "vgg16": "sfrs-vgg16",
    "sfrs-vgg16": "sfrs-vgg16",
}


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


@dataclass
class SFRSOptions:
    """``--option key=value`` settings of ``--method sfrs`` (defaults: the paper's run)."""

    generations: int = 4  # generation 0 (hard loss only) + 3 self-supervised ones
    gen0_epochs: int = 1  # generation 0 trains one epoch; later ones use --epochs
    batch_tuples: int = 4  # tuples per optimizer step, over all processes (4 GPUs x 1)
    neg_num: int = 10
    neg_pool: int = 1000
    pos_pool: int = 20
    pos_num: int = 10
    cache_size: int = 1000  # anchors per feature-cache refresh
    queries_per_epoch: int = 0  # 0: every anchor each epoch; N: a random N (CPU budgets)
    temperatures: str = "0.07,0.07,0.06,0.05"  # [0]: student/SARE tau; [g]: teacher tau of gen g
    soft_weight: float = 0.5
    similarity: str = "dot"  # dot (SFRS) | euclidean (NetVLAD/SARE baselines)
    k1: int = 20
    k2: int = 1
    rerank_lambda: float = 0.1
    rerank_gallery: int = 2000  # re-rank against every image up to this many, else candidates
    momentum: float = 0.9
    weight_decay: float = 0.001
    pos_tolerance: int = 0  # frame labels: positives within this many frames
    neg_exclusion: int = 5  # frame labels: negatives more than this many frames away
    augment: bool = True  # ColorJitter(0.7, 0.7, 0.7, 0.5) before the resize
    cache_frozen: bool = False  # run the frozen stem once per image (CPU speed-up; no augmentation)
    pca_dim: int = 4096  # 0: no PCA (descriptor = VLAD)
    pca_samples: int = 10000
    whiten: bool = True
    kmeans_images: int = 500
    kmeans_per_image: int = 100
    extract_batch: int = 16
    save_untrained: bool = True  # RUN_DIR/untrained.pt: the initial model with PCA (a baseline)
    val_database: str = ""
    val_queries: str = ""
    val_frame_tolerance: int = -1  # -1: the eval default for the data's positions
    val_radius: float = -1.0

    @classmethod
    def from_dict(cls, options: dict) -> SFRSOptions:
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for key, value in options.items():
            name = key.replace("-", "_")
            if name not in known:
                raise PlaceRankError(f"unknown sfrs option '{key}'; known: {', '.join(sorted(known))}")
            default = known[name].default
            try:
                if isinstance(default, bool):
                    value = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
                elif isinstance(default, int):
                    value = int(value)
                elif isinstance(default, float):
                    value = float(value)
                else:
                    value = str(value)
            except (TypeError, ValueError):
                raise PlaceRankError(f"sfrs option {key}={value!r} is not a {type(default).__name__}") from None
            kwargs[name] = value
        opts = cls(**kwargs)
        opts.validate()
        return opts

    @property
    def temperature_list(self) -> list[float]:
        return [float(t) for t in self.temperatures.split(",") if t.strip()]

    def validate(self) -> None:
        try:
            temps = self.temperature_list
        except ValueError:
            raise PlaceRankError(
                f"sfrs option temperatures={self.temperatures!r}: give comma-separated numbers"
            ) from None
        if not temps or min(temps) <= 0:
            raise PlaceRankError("sfrs option temperatures: need at least one positive temperature")
        if self.generations < 1:
            raise PlaceRankError("sfrs option generations must be >= 1")
        if self.similarity not in ("dot", "euclidean"):
            raise PlaceRankError(f"sfrs option similarity must be dot or euclidean, got '{self.similarity}'")
        for name in (
            "batch_tuples",
            "neg_num",
            "neg_pool",
            "pos_pool",
            "pos_num",
            "cache_size",
            "k1",
            "k2",
            "extract_batch",
        ):
            if getattr(self, name) < 1:
                raise PlaceRankError(f"sfrs option {name} must be >= 1")
        if self.neg_exclusion < self.pos_tolerance:
            raise PlaceRankError(
                f"sfrs option neg_exclusion ({self.neg_exclusion}) must be >= pos_tolerance "
                f"({self.pos_tolerance}): a positive cannot also be a negative"
            )


# ---------------------------------------------------------------------------------------------
# Place-labelled data: positives and allowed negatives
# ---------------------------------------------------------------------------------------------


@dataclass
class SFRSData:
    paths: list[Path]
    kind: str  # 'frame' or 'place'
    labels: np.ndarray  # frame index (int) or place id (int code)
    sequence: np.ndarray  # which --train spec each image came from
    positives: list[np.ndarray]  # per image
    negative_ok: np.ndarray  # (N, N) bool: j may be a negative of i
    queries: np.ndarray  # anchors: images with a positive and negatives


def _spec_kind(spec: Path) -> str:
    from placerank.data.readers import read_csv_manifest

    if spec.suffix.lower() == ".csv":
        return "frame" if read_csv_manifest(spec).kind == "frame" else "place"
    return "frame"


def build_sfrs_data(specs, frames, opts: SFRSOptions) -> SFRSData:
    """Read every ``--train`` spec and derive positives / allowed negatives from the labels."""
    paths, labels, seq, kinds = [], [], [], set()
    for s_idx, spec in enumerate(specs):
        part = read_training_places([spec], frames)
        paths += part.paths
        labels += part.positions.tolist()
        seq += [s_idx] * len(part)
        kinds.add(_spec_kind(Path(spec)))
    kind = "frame" if kinds == {"frame"} else "place"
    seq = np.array(seq, dtype=np.int64)
    n = len(paths)
    if kind == "frame":
        lab = np.array([int(v) for v in labels], dtype=np.int64)
        delta = np.abs(lab[:, None] - lab[None, :])
        pos = (delta <= opts.pos_tolerance) & ((seq[:, None] != seq[None, :]) | (delta == 0))
        neg_ok = delta > opts.neg_exclusion
    else:
        codes = {v: i for i, v in enumerate(sorted(set(map(str, labels))))}
        lab = np.array([codes[str(v)] for v in labels], dtype=np.int64)
        pos = lab[:, None] == lab[None, :]
        neg_ok = ~pos
    np.fill_diagonal(pos, False)
    np.fill_diagonal(neg_ok, False)
    positives = [np.flatnonzero(pos[i]) for i in range(n)]
    queries = np.array([i for i in range(n) if len(positives[i]) and neg_ok[i].any()], dtype=np.int64)
    if len(queries) == 0:
        raise DataError(
            "no training image has both a positive (another view of its place) and a negative: "
            "give two or more traversals / images per place"
        )
    return SFRSData(paths, kind, lab, seq, positives, neg_ok, queries)


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def color_jitter(im, rng: np.random.Generator):
    """ColorJitter(brightness=0.7, contrast=0.7, saturation=0.7, hue=0.5) with factors drawn
    from ``rng`` (so the same tuple gets the same jitter on every rank / in every run)."""
    import torchvision.transforms.functional as TF

    ops = [
        lambda x, f=rng.uniform(0.3, 1.7): TF.adjust_brightness(x, f),
        lambda x, f=rng.uniform(0.3, 1.7): TF.adjust_contrast(x, f),
        lambda x, f=rng.uniform(0.3, 1.7): TF.adjust_saturation(x, f),
        lambda x, f=rng.uniform(-0.5, 0.5): TF.adjust_hue(x, f),
    ]
    for k in rng.permutation(4):
        im = ops[k](im)
    return im


class TupleImages(torch.utils.data.Dataset):
    """item k -> (n, 3, H, W) tensor of one tuple's images (jittered when a seed is given).
    Errors come back as a string so the user sees the one-line DataError, not a worker trace."""

    def __init__(self, paths, pre, items: list[tuple[list[int], tuple | None]]):
        self.paths, self.pre, self.items = paths, pre, items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        ids, seed = self.items[k]
        rng = np.random.default_rng(list(seed)) if seed is not None else None
        try:
            out = []
            for i in ids:
                im = open_image(self.paths[i], self.pre.min_side)
                if rng is not None:
                    im = color_jitter(im, rng)
                out.append(to_tensor(im, self.pre))
            return torch.stack(out), ""
        except DataError as e:
            return torch.zeros(0), str(e)


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, paths, pre):
        self.paths, self.pre = paths, pre

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, to_tensor(open_image(self.paths[i], self.pre.min_side), self.pre), ""
        except DataError as e:
            h, w = self.pre.size
            return i, torch.zeros(3, h, w), str(e)


def _loader(dataset, num_workers: int, **kw):
    return torch.utils.data.DataLoader(
        dataset, num_workers=num_workers, persistent_workers=False, prefetch_factor=2 if num_workers else None, **kw
    )


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


class SFRSTrainer:
    def __init__(self, config: TrainConfig, ctx: DistContext):
        from placerank.models import create

        self.config = config
        self.opts = SFRSOptions.from_dict(config.options)
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
        self.frozen_cache: torch.Tensor | None = None
        init_path = self.run.path / "init.pt"
        # rank 0 decides (another rank could see the init.pt rank 0 is about to write)
        fresh = broadcast_object(not (init_path.exists() and config.resume), ctx)
        if not fresh:
            self.init_state = torch.load(init_path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(self.init_state)
        if self.opts.cache_frozen:
            self.frozen_cache = self.compute_frozen_cache()
        if fresh:
            if self.model.needs_data_init and ctx.is_main:
                self.kmeans_init()
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
        self.student = wrap_ddp(self.model, ctx)
        self.teacher = None
        self.neg_cache: dict[int, np.ndarray] = {}
        o = self.opts  # read the validation pair now: a bad path fails before any training
        self.val = ValidationSet.from_options(o.val_database, o.val_queries, o.val_frame_tolerance, o.val_radius)
        self.best: dict | None = None
        self.best_state: dict | None = None
        self.history: list[dict] = []

    @torch.no_grad()
    def kmeans_init(self) -> None:
        """NetVLAD initialisation from real training features (the NetVLAD/OpenIBL recipe: up
        to ``kmeans_images`` images, ``kmeans_per_image`` random L2-normalised locations each,
        k-means; alpha from the top-2 gap). With the frozen-stem cache the images are not
        decoded again."""
        o = self.opts
        if self.frozen_cache is None:
            self.model.init_from_images(
                self.data.paths, max_images=o.kmeans_images, per_image=o.kmeans_per_image, seed=self.config.seed + 43
            )
            return
        rng = np.random.default_rng(self.config.seed + 43)
        n = len(self.data.paths)
        idx = np.arange(n) if n <= o.kmeans_images else np.sort(rng.choice(n, o.kmeans_images, replace=False))
        chunks = []
        for s in range(0, len(idx), o.extract_batch):
            y = self.frozen_cache[torch.as_tensor(idx[s : s + o.extract_batch])].to(self.device)
            fmap = F.normalize(self.model.backbone.trainable_features(y).float(), dim=1)
            for f in fmap.flatten(2).transpose(1, 2).cpu().numpy():
                chunks.append(f[rng.choice(f.shape[0], min(o.kmeans_per_image, f.shape[0]), replace=False)])
        self.model.aggregator.init_from_descriptors(np.concatenate(chunks))
        self.model.invalidate_weights_id()

    # -- features -------------------------------------------------------------------------
    @torch.no_grad()
    def compute_frozen_cache(self) -> torch.Tensor:
        """Frozen-stem outputs of every training image (identical in every generation, since the
        stem never trains and the student restarts from the same weights)."""
        bb = self.model.backbone
        n = len(self.data.paths)
        out = None
        loader = _loader(
            _Indexed(self.data.paths, self.pre),
            self.num_workers,
            batch_sampler=strided_batches(n, self.opts.extract_batch, self.ctx),
        )
        for idx, images, errors in tqdm(
            loader, desc="frozen stem", unit="batch", leave=False, disable=not self.ctx.is_main
        ):
            check_batch_errors(errors)
            y = bb.frozen_features(images.to(self.device)).cpu()
            if out is None:
                out = torch.zeros((n,) + tuple(y.shape[1:]))
            out[idx] = y
        if out is None:  # this rank had no batch: learn the shape from one image
            y = bb.frozen_features(to_tensor(open_image(self.data.paths[0]), self.pre)[None].to(self.device)).cpu()
            out = torch.zeros((n,) + tuple(y.shape[1:]))
        return sum_across(out, self.ctx)

    @torch.no_grad()
    def extract_vlads(self, model, paths=None, desc: str = "features") -> torch.Tensor:
        """(N, D) pre-PCA VLADs of ``paths`` (default: the training images), sharded by batches
        over ranks and summed back so every rank holds the same full matrix."""
        use_cache = paths is None and self.frozen_cache is not None
        paths = self.data.paths if paths is None else paths
        n = len(paths)
        batches = strided_batches(n, self.opts.extract_batch, self.ctx)
        out = torch.zeros(n, model.vlad_dim)
        model.eval()
        if use_cache:
            for b in batches:
                out[b] = model(self.frozen_cache[b].to(self.device), output="vlad", frozen_input=True).float().cpu()
        else:
            loader = _loader(_Indexed(paths, self.pre), self.num_workers, batch_sampler=batches)
            for idx, images, errors in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not self.ctx.is_main):
                check_batch_errors(errors)
                out[idx] = model(images.to(self.device), output="vlad").float().cpu()
        return sum_across(out, self.ctx)

    # -- mining ---------------------------------------------------------------------------
    def mine(self, feats: torch.Tensor, chunk: np.ndarray, gen: int, rng: np.random.Generator) -> list[dict]:
        """Tuples for the anchors in ``chunk`` from the current features (identical on all ranks)."""
        o, data = self.opts, self.data
        f = feats.float()
        dist = (2.0 - 2.0 * (f[torch.as_tensor(chunk)] @ f.T)).clamp_min(0).double().numpy()  # squared L2
        tuples = []
        pools = []
        for r, q in enumerate(chunk):
            pos = data.positives[q]
            order = np.argsort(dist[r, pos], kind="stable")
            pools.append(pos[order[: o.pos_pool]])
            cand = np.flatnonzero(data.negative_ok[q])
            cand = cand[np.argsort(dist[r, cand], kind="stable")]
            take = rng.choice(len(cand), min(o.neg_pool, len(cand)), replace=False)
            union = np.union1d(cand[take], self.neg_cache.get(int(q), np.zeros(0, dtype=np.int64)))
            negs = union[np.argsort(dist[r, union], kind="stable")][: o.neg_num]
            self.neg_cache[int(q)] = negs
            tuples.append({"q": int(q), "p": int(pools[-1][0]), "negs": negs})
        if gen == 0:
            for t, pool in zip(tuples, pools):
                t["diffs"] = select_difficult_positives(pool, None, o.pos_num)
            return tuples
        reranked = self._rerank_pools(f, chunk, dist, pools)
        for t, pool, rd in zip(tuples, pools, reranked):
            t["diffs"] = select_difficult_positives(pool, rd, o.pos_num)
        return tuples

    def _rerank_pools(self, f, chunk, dist, pools) -> list[np.ndarray]:
        """k-reciprocal re-ranked distances of every anchor's positive pool. The gallery is every
        training image when there are at most ``rerank_gallery``, else the union of each anchor's
        nearest images and its pool (the re-ranking only needs their neighbourhoods)."""
        o = self.opts
        n = f.shape[0]
        if n <= o.rerank_gallery:
            gallery = np.arange(n)
        else:
            near = np.argsort(dist, axis=1, kind="stable")[:, : max(2 * o.k1, 50)]
            gallery = np.unique(np.concatenate([near.ravel()] + list(pools)))
        g = torch.as_tensor(gallery)
        q_g = dist[:, gallery]
        fq = f[torch.as_tensor(chunk)]
        q_q = (2.0 - 2.0 * (fq @ fq.T)).clamp_min(0).double().numpy()
        fg = f[g]
        g_g = (2.0 - 2.0 * (fg @ fg.T)).clamp_min(0).double().numpy()
        final = k_reciprocal_rerank(q_g, q_q, g_g, k1=o.k1, k2=o.k2, lambda_value=o.rerank_lambda)
        col = {int(j): c for c, j in enumerate(gallery)}
        return [final[r, [col[int(j)] for j in pool]] for r, pool in enumerate(pools)]

    # -- one tuple ------------------------------------------------------------------------
    def tuple_loss(self, student, x: torch.Tensor, t: dict, gen: int) -> tuple[torch.Tensor, float, float]:
        o = self.opts
        tau0 = self.temps[0]
        nn_ = len(t["negs"])
        frozen = self.frozen_cache is not None
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
            tr = self.teacher(x[sel], output="regions", frozen_input=frozen)
            s_t = image_to_region_similarities(tr[0, 0], tr[1:])
        s_s = image_to_region_similarities(anchor, r[2 + nn_ :])
        soft = soft_region_loss(s_s, s_t, tau0, teacher_temperature(gen, self.temps))
        return hard + o.soft_weight * soft, float(hard.detach()), float(soft.detach())

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
            "neg_cache": {k: v.tolist() for k, v in self.neg_cache.items()},
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
            self.neg_cache = {int(k): np.asarray(v, dtype=np.int64) for k, v in ckpt["neg_cache"].items()}
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
                self.model.load_state_dict(self.teacher.state_dict())  # keep the teacher (issue #2/#14)
                if ctx.is_main:
                    self.run.log({"event": "collapse", "gen": gen, "action": "generation aborted, teacher kept"})
            if stopped:
                break
            done = gen + 1
            targets = [(self.run.path / f"gen{gen}.pt", {"generation": gen})]
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

    def train_epoch(self, gen: int, epoch: int, optimizer) -> str:
        ctx, o, data = self.ctx, self.opts, self.data
        rng = np.random.default_rng([self.config.seed, 43, gen, epoch])
        anchors = rng.permutation(data.queries)
        if o.queries_per_epoch:
            anchors = anchors[: o.queries_per_epoch]
        chunks = [anchors[s : s + o.cache_size] for s in range(0, len(anchors), o.cache_size)]
        student = self.student
        per_rank = o.batch_tuples // ctx.world_size
        if per_rank * ctx.world_size != o.batch_tuples:
            raise PlaceRankError(
                f"sfrs option batch_tuples={o.batch_tuples} must be a multiple of the {ctx.world_size} processes"
            )
        sums = {"loss": 0.0, "loss_hard": 0.0, "loss_soft": 0.0, "steps": 0}
        for ci, chunk in enumerate(chunks):
            feats = self.extract_vlads(self.model, desc=f"gen {gen} epoch {epoch}: features")
            tuples = self.mine(feats, chunk, gen, np.random.default_rng([self.config.seed, 44, gen, epoch, ci]))
            if len(tuples) % o.batch_tuples:  # pad with the chunk's first tuples: equal steps on all ranks
                tuples += tuples[: o.batch_tuples - len(tuples) % o.batch_tuples]
            steps = len(tuples) // o.batch_tuples
            items, owners = [], []
            for s in range(steps):
                for k in range(ctx.rank, o.batch_tuples, ctx.world_size):
                    pos = s * o.batch_tuples + k
                    t = tuples[pos]
                    ids = [t["q"], t["p"], *t["negs"].tolist()] + (t["diffs"].tolist() if gen else [])
                    seed = (
                        (self.config.seed, gen, epoch, ci, pos) if (o.augment and self.frozen_cache is None) else None
                    )
                    items.append((ids, seed))
                    owners.append(t)
            self.model.eval()
            if self.frozen_cache is None:
                stream = iter(_loader(TupleImages(data.paths, self.pre, items), self.num_workers, batch_size=None))
            else:
                stream = iter((self.frozen_cache[ids], "") for ids, _ in items)
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
                    sync = contextlib.nullcontext() if (j == per_rank - 1 or not ctx.distributed) else student.no_sync()
                    with sync:
                        loss, h, sft = self.tuple_loss(student, x.to(self.device), t, gen)
                        finite &= bool(torch.isfinite(loss))
                        (loss / per_rank).backward()
                    loss_sum += float(loss.detach()) / per_rank
                    hard_sum += h / per_rank
                    soft_sum += sft / per_rank
                if not all_true(finite, ctx):
                    return "collapsed"
                optimizer.step()
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

    # -- validation, PCA, saving ------------------------------------------------------------
    def validate(self, gen: int, epoch: int) -> None:
        """Recall@1/5/10 of the pre-PCA VLAD on the optional validation pair; the best R@5 over
        all generations becomes model.pt (the paper's selection, on validation data only)."""
        val = self.val
        if val is None:
            return
        db = self.extract_vlads(self.model, val.dataset.database.paths, "validation database").numpy()
        q = self.extract_vlads(self.model, val.dataset.queries.paths, "validation queries").numpy()
        rec = val.recall(db, q)
        if val.improves(rec, None if self.best is None else self.best["recall"]):
            self.best = {"gen": gen, "epoch": epoch, "recall": rec}
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        if self.ctx.is_main:
            self.run.log({"event": "validation", "gen": gen, "epoch": epoch, "recall": rec})

    def learn_pca(self, model) -> None:
        from placerank.models.pca import learn_pca

        o = self.opts
        if o.pca_dim <= 0:
            model.set_pca(None)
            return
        feats = self.extract_vlads(model, desc="PCA features").double().numpy()
        if len(feats) > o.pca_samples:
            take = np.random.default_rng([self.config.seed, 45]).choice(len(feats), o.pca_samples, replace=False)
            feats = feats[np.sort(take)]
        dim = min(o.pca_dim, len(feats) - 1, feats.shape[1])
        if dim < o.pca_dim and self.ctx.is_main:
            self.run.log(
                {
                    "event": "pca_dim_reduced",
                    "requested": o.pca_dim,
                    "used": dim,
                    "reason": f"only {len(feats)} training images",
                }
            )
        model.set_pca(learn_pca(feats, dim), whiten=o.whiten)

    def save_model(self, model, targets: list[tuple[Path, dict]]) -> None:
        """Learn PCA-whitening for ``model`` (a copy: the student keeps training on the VLAD) and
        write it as a placerank checkpoint to every target path."""
        from placerank.models.checkpoints import save_placerank_checkpoint

        model = self.copy_of(model.state_dict()) if model is self.model else model
        self.learn_pca(model)
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
