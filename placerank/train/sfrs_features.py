"""Features of the SFRS trainer: the frozen-stem cache, the k-means NetVLAD initialisation and
the (sharded) pre-PCA VLAD pass over the training or validation images."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from placerank.data.images import check_batch_errors, open_image, to_tensor
from placerank.train.distributed import DistContext, strided_batches, sum_across
from placerank.train.sfrs_data import IndexedImages, make_loader
from placerank.train.sfrs_options import SFRSOptions


class SFRSFeatures:
    """Feature passes over ``paths`` (the training images), sharded over the ranks of ``ctx``."""

    def __init__(self, paths, pre, opts: SFRSOptions, ctx: DistContext, num_workers: int = 0, seed: int = 0):
        self.paths, self.pre, self.opts, self.ctx = paths, pre, opts, ctx
        self.device = ctx.device
        self.num_workers, self.seed = num_workers, seed
        self.frozen_cache: torch.Tensor | None = None

    @torch.no_grad()
    def kmeans_init(self, model) -> None:
        """NetVLAD initialisation from real training features (the NetVLAD/OpenIBL recipe: up
        to ``kmeans_images`` images, ``kmeans_per_image`` random L2-normalised locations each,
        k-means; alpha from the top-2 gap). With the frozen-stem cache the images are not
        decoded again."""
        o = self.opts
        if self.frozen_cache is None:
            model.init_from_images(
                self.paths, max_images=o.kmeans_images, per_image=o.kmeans_per_image, seed=self.seed + 43
            )
            return
        rng = np.random.default_rng(self.seed + 43)
        n = len(self.paths)
        idx = np.arange(n) if n <= o.kmeans_images else np.sort(rng.choice(n, o.kmeans_images, replace=False))
        chunks = []
        for s in range(0, len(idx), o.extract_batch):
            y = self.frozen_cache[torch.as_tensor(idx[s : s + o.extract_batch])].to(self.device)
            fmap = F.normalize(model.backbone.trainable_features(y).float(), dim=1)
            for f in fmap.flatten(2).transpose(1, 2).cpu().numpy():
                chunks.append(f[rng.choice(f.shape[0], min(o.kmeans_per_image, f.shape[0]), replace=False)])
        model.aggregator.init_from_descriptors(np.concatenate(chunks))
        model.invalidate_weights_id()

    @torch.no_grad()
    def compute_frozen_cache(self, model) -> None:
        """Frozen-stem outputs of every training image (identical in every generation, since the
        stem never trains and the student restarts from the same weights)."""
        bb = model.backbone
        n = len(self.paths)
        out = None
        loader = make_loader(
            IndexedImages(self.paths, self.pre),
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
            y = bb.frozen_features(to_tensor(open_image(self.paths[0]), self.pre)[None].to(self.device)).cpu()
            out = torch.zeros((n,) + tuple(y.shape[1:]))
        self.frozen_cache = sum_across(out, self.ctx)

    @torch.no_grad()
    def extract_vlads(self, model, paths=None, desc: str = "features") -> torch.Tensor:
        """(N, D) pre-PCA VLADs of ``paths`` (default: the training images), sharded by batches
        over ranks and summed back so every rank holds the same full matrix."""
        cache = self.frozen_cache if paths is None else None
        paths = self.paths if paths is None else paths
        n = len(paths)
        batches = strided_batches(n, self.opts.extract_batch, self.ctx)
        out = torch.zeros(n, model.vlad_dim)
        model.eval()
        if cache is not None:
            for b in batches:
                out[b] = model(cache[b].to(self.device), output="vlad", frozen_input=True).float().cpu()
        else:
            loader = make_loader(IndexedImages(paths, self.pre), self.num_workers, batch_sampler=batches)
            for idx, images, errors in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not self.ctx.is_main):
                check_batch_errors(errors)
                out[idx] = model(images.to(self.device), output="vlad").float().cpu()
        return sum_across(out, self.ctx)

    def learn_pca(self, model, log) -> None:
        """PCA-whitening learned on ``model``'s training VLADs (``log``: the run's logger)."""
        from placerank.models.pca import learn_pca

        o = self.opts
        if o.pca_dim <= 0:
            model.set_pca(None)
            return
        feats = self.extract_vlads(model, desc="PCA features").double().numpy()
        if len(feats) > o.pca_samples:
            take = np.random.default_rng([self.seed, 45]).choice(len(feats), o.pca_samples, replace=False)
            feats = feats[np.sort(take)]
        dim = min(o.pca_dim, len(feats) - 1, feats.shape[1])
        if dim < o.pca_dim and self.ctx.is_main:
            log(
                {
                    "event": "pca_dim_reduced",
                    "requested": o.pca_dim,
                    "used": dim,
                    "reason": f"only {len(feats)} training images",
                }
            )
        model.set_pca(learn_pca(feats, dim), whiten=o.whiten)
