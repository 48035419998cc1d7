"""OpenIBL's VGG16-NetVLAD files for ``sfrs-vgg16``, loaded strictly (exact key set and shapes,
or a one-line :class:`WeightsError`): the torch.hub file ``vgg16_netvlad.pth`` (PCA folded in), a
training checkpoint (+ its ``pca_params_*.h5``), and the export back to the hub layout."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from placerank.errors import WeightsError
from placerank.models.checkpoints import check_state, read_weights, state_dict_of, strict_load
from placerank.models.pca import read_openibl_pca_h5
from placerank.models.sfrs import (
    PCA_DIM_VGG16,
    VGG16_CONV_INDICES,
    VLAD_DIM_VGG16,
    SFRSModel,
    VGG16Conv5,
    build_sfrs_vgg16,
)
from placerank.utils import atomic_path, file_sha256

# ---------------------------------------------------------------------------------------------
# OpenIBL checkpoints (strict)
# ---------------------------------------------------------------------------------------------


def openibl_vgg16_key_table(
    prefix: str = "", with_pca: bool = True, num_clusters: int = 64, pca_dim: int = PCA_DIM_VGG16
) -> dict[str, tuple[int, ...]]:
    """The exact key -> shape table of OpenIBL's VGG16-NetVLAD state_dicts (hub layout with
    ``with_pca``; training checkpoints use ``prefix='module.'`` and no PCA)."""
    table: dict[str, tuple[int, ...]] = {}
    cin = 3
    for idx, cout in zip(VGG16_CONV_INDICES, (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)):
        table[f"{prefix}base_model.base.{idx}.weight"] = (cout, cin, 3, 3)
        table[f"{prefix}base_model.base.{idx}.bias"] = (cout,)
        cin = cout
    table[f"{prefix}net_vlad.conv.weight"] = (num_clusters, 512, 1, 1)
    table[f"{prefix}net_vlad.centroids"] = (num_clusters, 512)
    if with_pca:
        table[f"{prefix}pca_layer.weight"] = (pca_dim, num_clusters * 512, 1, 1)
        table[f"{prefix}pca_layer.bias"] = (pca_dim,)
    return table


def detect_vgg16_layout(sd: dict) -> str:
    """'matconvnet' | 'hub' | 'training' | 'unknown' from the key names."""
    keys = set(sd)
    if keys and all(re.fullmatch(r"\d+\.(weight|bias)", k) for k in keys):
        return "matconvnet"
    if any(k.startswith("module.") for k in keys):
        return "training"
    if "pca_layer.weight" in keys:
        return "hub"
    if any(k.startswith("base_model.") or k.startswith("net_vlad.") for k in keys):
        return "training"
    return "unknown"


def _pca_h5_beside(path: Path) -> Path | None:
    """OpenIBL names the PCA of ``X.pth.tar`` ``pca_params_X.h5`` (same folder)."""
    stem = path.name
    for suffix in (".pth.tar", ".pth", ".pt", ".tar"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    cand = path.parent / f"pca_params_{stem}.h5"
    return cand if cand.is_file() else None


def _vgg16_state(sd: dict, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for idx in VGG16_CONV_INDICES:
        for p in ("weight", "bias"):
            out[f"backbone.base.{idx}.{p}"] = sd[f"{prefix}base_model.base.{idx}.{p}"]
    out["aggregator.conv.weight"] = sd[f"{prefix}net_vlad.conv.weight"]
    out["aggregator.centroids"] = sd[f"{prefix}net_vlad.centroids"]
    out["aggregator.initialised"] = torch.ones((), dtype=torch.bool)
    return out


def load_openibl_hub(path: str | Path, image_size=None, obj: Any = None) -> SFRSModel:
    """OpenIBL's ``vgg16_netvlad.pth`` (hub layout, 30 tensors, PCA to 4096 folded in); ``obj``:
    the file's content when the caller has read it already."""
    path = Path(path)
    sd = state_dict_of(read_weights(path) if obj is None else obj, path)
    pca_dim = int(sd["pca_layer.weight"].shape[0]) if "pca_layer.weight" in sd else PCA_DIM_VGG16
    table = openibl_vgg16_key_table(with_pca=True, pca_dim=pca_dim)
    check_state(table, sd, path, "OpenIBL's vgg16_netvlad.pth (hub layout)")
    model = build_sfrs_vgg16(pca_dim=pca_dim, image_size=image_size)
    state = _vgg16_state(sd, "")
    state["pca.weight"] = sd["pca_layer.weight"].reshape(pca_dim, VLAD_DIM_VGG16)
    state["pca.bias"] = sd["pca_layer.bias"]
    strict_load(model, state, path, model.name)
    model.weights_source = f"{path.name} (OpenIBL hub) sha256:{file_sha256(path)[:12]}"
    return model


def load_openibl_training_checkpoint(
    path: str | Path,
    pca: str | Path | None = None,
    whiten: bool = True,
    pca_dim: int = PCA_DIM_VGG16,
    image_size=None,
    obj: Any = None,
) -> SFRSModel:
    """An OpenIBL training checkpoint (``state_dict`` wrapper optional, ``module.`` prefix
    optional, no PCA) plus an optional PCA ``.h5`` (``pca`` or ``pca_params_<name>.h5`` beside
    it): W = diag(lams^-1/2) U^T (U^T with ``whiten=False``), b = -W mu over the first
    ``pca_dim`` components."""
    path = Path(path)
    if obj is None:
        obj = read_weights(path)
    sd = state_dict_of(obj, path)
    prefix = "module." if any(k.startswith("module.") for k in sd) else ""
    table = openibl_vgg16_key_table(prefix=prefix, with_pca=False)
    check_state(table, sd, path, "an OpenIBL VGG16-NetVLAD training checkpoint")
    pca_path = Path(pca) if pca is not None else _pca_h5_beside(path)
    params = None
    if pca_path is not None:
        params = read_openibl_pca_h5(pca_path)
        if params.in_dim != VLAD_DIM_VGG16:
            raise WeightsError(f"{pca_path}: PCA input is {params.in_dim}-d, expected {VLAD_DIM_VGG16}")
        params = params.truncate(min(pca_dim, params.out_dim))
    model = build_sfrs_vgg16(pca_dim=params.out_dim if params else None, image_size=image_size)
    state = _vgg16_state(sd, prefix)
    if params is not None:
        W, b = params.affine(whiten)
        state["pca.weight"] = torch.from_numpy(W.astype(np.float32))
        state["pca.bias"] = torch.from_numpy(b.astype(np.float32))
    strict_load(model, state, path, model.name)
    meta = []
    if isinstance(obj, dict):
        meta = [f"{k}={obj[k]}" for k in ("generation", "epoch") if k in obj]
    pca_txt = f" + {pca_path.name}{'' if whiten else ' (no whitening)'}" if pca_path else " (no PCA: 32768-d)"
    model.weights_source = f"{path.name} (OpenIBL training checkpoint{', ' + ', '.join(meta) if meta else ''}){pca_txt}"
    return model


def export_openibl_hub(model: SFRSModel, path: str | Path) -> None:
    """Write a ``sfrs-vgg16`` model (with PCA) in OpenIBL's hub layout."""
    if model.pca is None or not isinstance(model.backbone, VGG16Conv5):
        raise WeightsError("only an sfrs-vgg16 model with PCA can be exported in OpenIBL's hub layout")
    sd = model.state_dict()
    out = {}
    for idx in VGG16_CONV_INDICES:
        for p in ("weight", "bias"):
            out[f"base_model.base.{idx}.{p}"] = sd[f"backbone.base.{idx}.{p}"].clone()
    out["net_vlad.conv.weight"] = sd["aggregator.conv.weight"].clone()
    out["net_vlad.centroids"] = sd["aggregator.centroids"].clone()
    out["pca_layer.weight"] = sd["pca.weight"].reshape(model.pca.out_dim, model.pca.in_dim, 1, 1).clone()
    out["pca_layer.bias"] = sd["pca.bias"].clone()
    with atomic_path(path) as tmp:
        torch.save(out, tmp)
