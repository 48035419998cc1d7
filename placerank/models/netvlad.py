"""NetVLAD (bias-free, MatConvNet "vlad_preL2_intra" form) with k-means initialisation.

Forward: per-location L2 -> soft-assignment ``softmax_k(w_k . x)`` -> residual sums
``V = A^T X - (sum_i a_ik) c_k`` (no N x K x D x HW tensor) -> intra-L2 -> cluster-major
flatten -> L2. Initialisation from real features: k-means centroids ``c``, assignment weights
``alpha * c / |c|`` with ``alpha = -ln(0.01) / mean(top1 - top2 dot product)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from placerank.data.images import check_batch_errors, make_loader
from placerank.errors import PlaceRankError
from placerank.models.base import BackboneOutput


class NetVLAD(nn.Module):
    def __init__(self, num_clusters: int = 64, dim: int = 512, alpha: float = 100.0):
        super().__init__()
        self.num_clusters = num_clusters
        self.dim = dim
        self.alpha = alpha
        self.conv = nn.Conv2d(dim, num_clusters, kernel_size=1, bias=False)
        self.centroids = nn.Parameter(torch.rand(num_clusters, dim))
        self.initialised: torch.Tensor
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @property
    def output_dim(self) -> int:
        return self.num_clusters * self.dim

    def soft_assign(self, x: torch.Tensor) -> torch.Tensor:
        """x: L2-normalised (B, D, h, w) -> (B, K, h, w) soft assignment."""
        return F.softmax(self.conv(x), dim=1)

    def residual_sums(self, x: torch.Tensor, a: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalised VLAD (B, K, D) of L2-normalised ``x`` given assignment ``a``; ``mask``
        (h, w) restricts the sums to some locations (SFRS region VLADs)."""
        B, D = x.shape[:2]
        xf = x.flatten(2)  # (B, D, HW)
        af = a.flatten(2)  # (B, K, HW)
        if mask is not None:
            af = af * mask.flatten().to(af.dtype)
        return torch.bmm(af, xf.transpose(1, 2)) - af.sum(-1, keepdim=True) * self.centroids.unsqueeze(0)

    @staticmethod
    def normalise(v: torch.Tensor) -> torch.Tensor:
        """(B, K, D) -> intra-L2, cluster-major flatten, global L2 -> (B, K*D)."""
        v = F.normalize(v, dim=2)
        return F.normalize(v.flatten(1), dim=1)

    def forward(self, out: BackboneOutput | torch.Tensor) -> torch.Tensor:
        x = out.feature_map if isinstance(out, BackboneOutput) else out
        x = F.normalize(x, dim=1)
        return self.normalise(self.residual_sums(x, self.soft_assign(x)))

    @torch.no_grad()
    def init_from_descriptors(self, descriptors: np.ndarray, seed: int = 43, niter: int = 100) -> None:
        """k-means on L2-normalised local descriptors (M, D); sets centroids and alpha."""
        import faiss

        desc = np.ascontiguousarray(descriptors, dtype=np.float32)
        if desc.shape[0] < self.num_clusters:
            raise PlaceRankError(
                f"NetVLAD init needs at least {self.num_clusters} local descriptors, got {desc.shape[0]}"
            )
        km = faiss.Kmeans(desc.shape[1], self.num_clusters, niter=niter, seed=seed, verbose=False)
        km.train(desc)
        assert km.centroids is not None
        centroids = km.centroids.astype(np.float32)
        c_hat = centroids / np.linalg.norm(centroids, axis=1, keepdims=True).clip(1e-12)
        dots = desc @ c_hat.T
        top2 = -np.sort(-dots, axis=1)[:, :2]
        gap = float(np.mean(top2[:, 0] - top2[:, 1]))
        self.alpha = -math.log(0.01) / max(gap, 1e-6)
        self.centroids.copy_(torch.from_numpy(centroids))
        self.conv.weight.copy_(torch.from_numpy(self.alpha * c_hat)[:, :, None, None])
        self.initialised.fill_(True)

    def init_from_images(self, model: nn.Module, paths: Sequence[str | Path], **kwargs: Any) -> None:
        """k-means initialisation from ``model``'s backbone features of unlabeled images (what
        :meth:`VPRModel.init_from_images` calls); ``kwargs`` go to :func:`sample_local_descriptors`."""
        self.init_from_descriptors(sample_local_descriptors(model, paths, **kwargs))


@torch.no_grad()
def sample_local_descriptors(
    model,
    paths: Sequence[str | Path],
    max_images: int = 500,
    per_image: int = 100,
    seed: int = 43,
    batch_size: int = 16,
) -> np.ndarray:
    """L2-normalised backbone descriptors at ``per_image`` random locations of up to
    ``max_images`` random images (the NetVLAD clustering recipe)."""
    rng = np.random.default_rng(seed)
    paths = list(paths)
    if len(paths) > max_images:
        paths = [paths[i] for i in sorted(rng.choice(len(paths), max_images, replace=False))]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    for _, images, _, errors in tqdm(
        make_loader(paths, model.preprocess, batch_size), desc="NetVLAD k-means features", unit="batch", leave=False
    ):
        check_batch_errors(errors)
        fmap = F.normalize(model.backbone(images.to(device)).feature_map.float(), dim=1)
        flat = fmap.flatten(2).transpose(1, 2).cpu().numpy()  # (B, HW, D)
        for f in flat:
            take = rng.choice(f.shape[0], min(per_image, f.shape[0]), replace=False)
            chunks.append(f[take])
    model.train(was_training)
    return np.concatenate(chunks, axis=0)
