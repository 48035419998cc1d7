"""FoL's aggregator (spec ``shared/docs/methods/fol.md`` §2.4-§2.5): SALAD-style optimal transport
whose dustbin is ``1 - Ã`` (the thresholded CLS attention, or a learned per-patch head on a CNN),
64 clusters x 128 + a 256-d global token = 8448-d, and the region maps Cᵣ, Mᵃ, Mᵉ."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from placerank.errors import WeightsError
from placerank.models.base import BackboneOutput

LOCAL_MODES = ("center", "pool3", "dense")


@dataclass(frozen=True)
class FoLConfig:
    """Architecture and selection options (defaults = the official code)."""

    num_clusters: int = 64
    cluster_dim: int = 128
    token_dim: int = 256
    hidden_dim: int = 512
    dropout: float = 0.3
    sinkhorn_iters: int = 3
    attention_threshold: float = 0.01  # Ã = A where A >= 0.01, else 0 (§2.4)
    num_regions: int = 225  # top-N patches of the region score (§2.5)
    local_mode: str = "pool3"  # the CNN default; fol-vit* builders pass "dense" (the official set)
    train_blocks: int = 4  # trainable last blocks (ViT blocks / CNN inverted-residual blocks)
    clip_fraction: float = 0.05  # percentile clipping position (§2.5)
    clip_top: int = 3
    cnn_dustbin_init: float = 0.15  # CNN learned-dustbin head starts at this constant "attention"


# ---------------------------------------------------------------------------------------------
# Optimal transport and region maps
# ---------------------------------------------------------------------------------------------


def sinkhorn_log(scores: torch.Tensor, dustbin: torch.Tensor, iters: int = 3) -> torch.Tensor:
    """SuperGlue-style log-domain optimal transport with a per-patch dustbin row (§2.4).

    ``scores`` (B, K, N) cluster logits, ``dustbin`` (B, N) dustbin logits. Row marginals
    1/(K+N) per cluster and (N-K)/(K+N) for the dustbin, column marginals 1/(K+N); returns
    log P (B, K+1, N) scaled by K+N so every column of the full plan sums to 1.
    """
    B, K, N = scores.shape
    if N <= K:
        raise WeightsError(
            f"FoL's optimal transport needs more patches than clusters: {N} patches, {K} clusters; use a larger input size"
        )
    Z = torch.cat([scores, dustbin.unsqueeze(1)], dim=1).float()
    norm = -math.log(K + N)
    log_mu = torch.full((K + 1,), norm, device=Z.device, dtype=Z.dtype)
    log_mu[-1] = math.log(N - K) + norm
    log_nu = torch.full((N,), norm, device=Z.device, dtype=Z.dtype)
    u = torch.zeros(B, K + 1, device=Z.device, dtype=Z.dtype)
    v = torch.zeros(B, N, device=Z.device, dtype=Z.dtype)
    for _ in range(iters):
        u = log_mu[None] - torch.logsumexp(Z + v[:, None, :], dim=2)
        v = log_nu[None] - torch.logsumexp(Z + u[:, :, None], dim=1)
    return Z + u[:, :, None] + v[:, None, :] - norm


def clip_softmax(values: torch.Tensor, fraction: float = 0.05, top: int = 3) -> torch.Tensor:
    """Percentile clipping then softmax over positions (§2.5): per row, the ``top`` largest
    entries are overwritten with the value at 0-based position floor(fraction * N) of the
    descending sort. Order-preserving, so the top-N selection of Mᵃ equals that of Cᵣ."""
    N = values.shape[1]
    sorted_vals, order = values.sort(dim=1, descending=True)
    q = sorted_vals[:, min(int(fraction * N), N - 1)]
    k = min(top, N)
    clipped = values.scatter(1, order[:, :k], q[:, None].expand(-1, k))
    return clipped.softmax(dim=1)


@dataclass
class FoLOutput:
    """Everything one FoL forward produces (§2.7); maps are (B, N) over the h x w patch grid."""

    descriptor: torch.Tensor  # (B, D) L2-normalised global descriptor
    feature_map: torch.Tensor  # (B, C, h, w) backbone patch features
    attention: torch.Tensor  # (B, N) raw attention A (ViT) / learned dustbin head (CNN)
    attention_thr: torch.Tensor  # (B, N) Ã
    plan: torch.Tensor  # (B, K, N) Sinkhorn plan without the dustbin row
    keep_mass: torch.Tensor  # (B, N) Cᵣ = sum_k P / K
    map_a: torch.Tensor  # (B, N) Mᵃ = softmax(clip(Cᵣ))
    map_e: torch.Tensor  # (B, N) Mᵉ = softmax(clip(A))
    local_map: torch.Tensor | None = None  # (B, 128, 4h-3, 4w-3) un-normalised up-conv output

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.feature_map.shape[-2]), int(self.feature_map.shape[-1])

    def region_score(self, training: bool) -> torch.Tensor:
        """R = Mᵃ + Mᵉ in training, Mᵃ at inference (pitfall 7)."""
        return self.map_a + self.map_e if training else self.map_a


class FoLAggregator(nn.Module):
    """SALAD-style aggregator whose dustbin is ``1 - Ã`` (§2.4).

    ``attention_source="vit"`` reads A from the backbone's CLS attention and the global token
    from its CLS token; ``"learned"`` (CNN counterpart) predicts A with ``dustbin_head`` and
    uses the mean feature as the global token.
    """

    def __init__(self, in_channels: int, cfg: FoLConfig, attention_source: str = "vit"):
        super().__init__()
        self.cfg = cfg
        self.attention_source = attention_source
        h, K, d = cfg.hidden_dim, cfg.num_clusters, cfg.cluster_dim
        self.token_features = nn.Sequential(nn.Linear(in_channels, h), nn.ReLU(), nn.Linear(h, cfg.token_dim))
        self.cluster_features = nn.Sequential(
            nn.Conv2d(in_channels, h, 1), nn.Dropout(cfg.dropout), nn.ReLU(), nn.Conv2d(h, d, 1)
        )
        self.score = nn.Sequential(nn.Conv2d(in_channels, h, 1), nn.Dropout(cfg.dropout), nn.ReLU(), nn.Conv2d(h, K, 1))
        if attention_source == "learned":
            self.dustbin_head = nn.Conv2d(in_channels, 1, 1)
            nn.init.zeros_(self.dustbin_head.weight)
            bias = self.dustbin_head.bias
            assert bias is not None
            nn.init.constant_(bias, math.log(cfg.cnn_dustbin_init / (1 - cfg.cnn_dustbin_init)))
        elif attention_source != "vit":
            raise ValueError(f"attention_source must be 'vit' or 'learned', got {attention_source!r}")

    @property
    def output_dim(self) -> int:
        return self.cfg.token_dim + self.cfg.num_clusters * self.cfg.cluster_dim

    def assign(self, out: BackboneOutput) -> FoLOutput:
        cfg = self.cfg
        x = out.feature_map
        if self.attention_source == "vit":
            if out.attention is None or out.cls_token is None:
                raise ValueError("FoL's ViT aggregator needs the backbone's CLS token and CLS attention")
            A, token = out.attention, out.cls_token
        else:
            A = torch.sigmoid(self.dustbin_head(x)).flatten(1)
            token = x.mean(dim=(2, 3))
        A = A.float()
        A_thr = A * (cfg.attention_threshold <= A).to(A.dtype)
        f = self.cluster_features(x).flatten(2).float()  # (B, d, N)
        s = self.score(x).flatten(2).float()  # (B, K, N)
        log_p = sinkhorn_log(s, 1.0 - A_thr, cfg.sinkhorn_iters)
        P = log_p[:, :-1].exp()  # (B, K, N)
        V = F.normalize(torch.einsum("bdn,bkn->bdk", f, P), dim=1).flatten(1)  # channel-major c*K + k
        g = F.normalize(self.token_features(token).float(), dim=-1)
        desc = F.normalize(torch.cat([g, V], dim=-1), dim=-1)
        keep = P.sum(dim=1) / cfg.num_clusters
        return FoLOutput(
            descriptor=desc,
            feature_map=x,
            attention=A,
            attention_thr=A_thr,
            plan=P,
            keep_mass=keep,
            map_a=clip_softmax(keep, cfg.clip_fraction, cfg.clip_top),
            map_e=clip_softmax(A, cfg.clip_fraction, cfg.clip_top),
        )

    def forward(self, out: BackboneOutput) -> torch.Tensor:
        return self.assign(out).descriptor
