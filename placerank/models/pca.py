"""PCA-whitening of global descriptors (NetVLAD / SFRS 32,768-d -> 4,096-d).

Learning follows Relja Arandjelovic's ``relja_PCA`` recipe used by NetVLAD and OpenIBL, but with a
numerically stable modern routine: the eigendecomposition runs in float64 with
``torch.linalg.eigh`` (OpenIBL's float32 ``torch.symeig`` no longer exists). When there are fewer
samples than dimensions (the usual case: 10k VLADs of 32k dims) it decomposes the n x n Gram
matrix (the *dual* form) and maps the eigenvectors back; otherwise the D x D covariance.

Applying it: ``y = W x + b`` with ``W = diag(lams^-1/2) U^T`` (whitened) or ``W = U^T``, and
``b = -W mu``; the caller L2-normalises ``y``. :class:`PCAWhitening` stores W and b as buffers,
so they travel in the model's state_dict (and placerank checkpoints) but are never trained.

OpenIBL keeps PCA in an HDF5 file (``pca_params_<ckpt>.h5``: ``U`` (D x k), ``lams`` (k,),
``mu`` (D x 1), ``Utmu`` (k x 1)); :func:`read_openibl_pca_h5` / :func:`write_openibl_pca_h5`
read and write that layout (they need h5py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from placerank.errors import WeightsError


@dataclass
class PCAParams:
    """Principal directions ``U`` (D, k) with unit columns, eigenvalues ``lams`` (k,) in
    descending order, and the data mean ``mu`` (D,). All float64 numpy arrays."""

    U: np.ndarray
    lams: np.ndarray
    mu: np.ndarray

    @property
    def in_dim(self) -> int:
        return int(self.U.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self.U.shape[1])

    def truncate(self, k: int) -> PCAParams:
        if k > self.out_dim:
            raise WeightsError(f"PCA has only {self.out_dim} components, {k} requested")
        return PCAParams(self.U[:, :k], self.lams[:k], self.mu)

    def affine(self, whiten: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(W (k, D), b (k,)) with ``y = W x + b``."""
        W = self.U.T
        if whiten:
            W = W / np.sqrt(self.lams)[:, None]
        b = -W @ self.mu
        return W, b


def learn_pca(features, out_dim: int, eps: float = 1e-9, block: int = 4096) -> PCAParams:
    """PCA of ``features`` (n, D) keeping ``out_dim`` components.

    Float64 throughout; ``features`` may be float32 (it is only converted block by block, so a
    10k x 32k matrix needs no 2.6 GB float64 copy). Eigenvalues are clamped to ``eps`` as in
    ``relja_PCA`` so whitening never divides by zero; components beyond the data's rank
    (``out_dim > min(n - 1, D)``) are refused because their directions would be arbitrary.
    """
    X = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features.detach().cpu())
    if X.ndim != 2:
        raise ValueError(f"learn_pca expects (n, D) features, got shape {tuple(X.shape)}")
    n, D = X.shape
    rank = min(n - 1, D)
    if out_dim < 1 or out_dim > rank:
        raise WeightsError(
            f"PCA to {out_dim} dims needs at least {out_dim + 1} samples of >= {out_dim} dims "
            f"(got {n} samples of {D} dims: at most {max(rank, 0)} components)"
        )
    mu = X.double().mean(dim=0)

    def centred(lo: int, hi: int) -> torch.Tensor:  # columns lo:hi of the centred data, float64
        return X[:, lo:hi].double() - mu[lo:hi]

    if n < D:
        # Dual form: G = Xc Xc^T / (n - 1) is n x n; its eigenvectors V give primal directions
        # U = Xc^T V diag(lam^-1/2) / sqrt(n - 1) (unit columns).
        G = torch.zeros(n, n, dtype=torch.float64)
        for lo in range(0, D, block):
            Xb = centred(lo, min(D, lo + block))
            G += Xb @ Xb.T
        G /= n - 1
        lam, V = torch.linalg.eigh(G)
        order = torch.argsort(lam, descending=True)[:out_dim]
        lam, V = lam[order].clamp_min(eps), V[:, order]
        scale = 1.0 / torch.sqrt(lam * (n - 1))
        U = torch.empty(D, out_dim, dtype=torch.float64)
        for lo in range(0, D, block):
            hi = min(D, lo + block)
            U[lo:hi] = (centred(lo, hi).T @ V) * scale
    else:
        Xc = centred(0, D)
        C = Xc.T @ Xc / (n - 1)
        lam, U = torch.linalg.eigh(C)
        order = torch.argsort(lam, descending=True)[:out_dim]
        lam, U = lam[order].clamp_min(eps), U[:, order]
    # Fix the sign of each direction (eigh's sign is arbitrary): largest |entry| positive, so the
    # same data always gives the same weights (reproducible checkpoints, equal DDP ranks).
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U[idx, torch.arange(U.shape[1])])
    signs[signs == 0] = 1
    U = U * signs
    return PCAParams(U.numpy(), lam.numpy(), mu.numpy())


class PCAWhitening(nn.Module):
    """``y = W x + b`` (a Linear layer without gradients); the caller L2-normalises."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_dim = int(in_dim)
        self.out_dim = int(out_dim)
        self.weight: torch.Tensor
        self.bias: torch.Tensor
        self.register_buffer("weight", torch.zeros(self.out_dim, self.in_dim))
        self.register_buffer("bias", torch.zeros(self.out_dim))

    @classmethod
    def from_params(cls, params: PCAParams, whiten: bool = True) -> PCAWhitening:
        W, b = params.affine(whiten)
        layer = cls(params.in_dim, params.out_dim)
        layer.set_affine(W, b)
        return layer

    @torch.no_grad()
    def set_affine(self, W, b) -> None:
        W = torch.as_tensor(np.asarray(W), dtype=torch.float32)
        b = torch.as_tensor(np.asarray(b), dtype=torch.float32).reshape(-1)
        if tuple(W.shape) != (self.out_dim, self.in_dim) or tuple(b.shape) != (self.out_dim,):
            raise WeightsError(
                f"PCA shapes W {tuple(W.shape)}, b {tuple(b.shape)} do not fit a {self.in_dim} -> {self.out_dim} layer"
            )
        self.weight.copy_(W)
        self.bias.copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_dim} -> {self.out_dim}"


def _h5py():
    try:
        import h5py
    except ImportError:
        raise WeightsError("reading/writing OpenIBL PCA .h5 files needs h5py: pip install h5py") from None
    return h5py


def read_openibl_pca_h5(path: str | Path) -> PCAParams:
    """Read OpenIBL's ``pca_params_*.h5`` (``U`` D x k, ``lams`` k, ``mu`` D x 1, ``Utmu``)."""
    h5py = _h5py()
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: PCA file does not exist")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("U", "lams", "mu") if k not in f]
            if missing:
                raise WeightsError(
                    f"{path}: not an OpenIBL PCA file (missing {', '.join(missing)}; "
                    f"found {', '.join(sorted(f.keys())) or 'nothing'})"
                )
            U = np.asarray(f["U"], dtype=np.float64)
            lams = np.asarray(f["lams"], dtype=np.float64).reshape(-1)
            mu = np.asarray(f["mu"], dtype=np.float64).reshape(-1)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read HDF5 ({str(e).splitlines()[0][:120]})") from None
    if U.ndim != 2 or U.shape[0] != mu.shape[0] or U.shape[1] != lams.shape[0]:
        raise WeightsError(f"{path}: inconsistent PCA shapes U {U.shape}, lams {lams.shape}, mu {mu.shape}")
    return PCAParams(U, lams, mu)


def write_openibl_pca_h5(params: PCAParams, path: str | Path) -> None:
    """Write ``params`` in OpenIBL's HDF5 layout (float32, as OpenIBL saves it)."""
    h5py = _h5py()
    from placerank.utils import atomic_path

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("U", data=params.U.astype(np.float32))
        f.create_dataset("lams", data=params.lams.astype(np.float32))
        f.create_dataset("mu", data=params.mu.astype(np.float32).reshape(-1, 1))
        f.create_dataset("Utmu", data=(params.U.T @ params.mu).astype(np.float32).reshape(-1, 1))
