"""SFRS (Ge et al., ECCV 2020): a CNN cut at a stride-16 map + NetVLAD(64) + PCA-whitening.

Two registry entries:

- ``sfrs-vgg16``: the paper's model. VGG16 ``features[:-2]`` (conv5_3 *before* ReLU, 512 ch,
  stride 16; only conv5_x trainable), NetVLAD(64, 512) bias-free, PCA-whitening to 4096-d, and
  MatConvNet preprocessing (480 x 640, mean (0.4850, 0.4580, 0.4076), std 1/255 — i.e. 0..255
  pixels minus the VGG means; the ImageNet std would silently destroy accuracy). No VGG16
  weights ship here, so ``--weights`` is required and may be:
    * OpenIBL's torch.hub file ``vgg16_netvlad.pth`` (30 tensors, PCA included);
    * an OpenIBL training checkpoint (``model_best.pth.tar``, ``module.``-prefixed, optional
      ``state_dict`` wrapper) plus its PCA ``pca_params_<name>.h5`` found beside it or given as
      ``pca=PATH`` (without one the model gives the 32,768-d VLAD);
    * the MatConvNet VGG16 state_dict ``vd16_offtheshelf_conv5_3_max.pth`` ('0.weight'..'28.bias',
      initialisation only: NetVLAD is then k-means-initialised from data on first use);
    * a placerank checkpoint written by ``placerank train --method sfrs``.
  Every loader is strict: exact key set and shapes, or a one-line :class:`WeightsError`.
- ``sfrs-effnet-lite0``: the same method on EfficientNet-Lite0 (ImageNet weights shipped here),
  cut after its stride-16 stage (``blocks.4``, 112 ch; only that stage trainable). Default input
  352 x 640 gives a 22 x 40 map (even, as the quarters need).

Inference order: backbone -> per-location L2 -> soft-assign -> residual sums -> intra-L2 ->
cluster-major flatten -> L2 -> (PCA-whitening -> L2). Training uses the pre-PCA vector.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from placerank.data.images import Preprocess, normalize_image_size
from placerank.errors import WeightsError
from placerank.models.base import BackboneOutput, VPRModel
from placerank.models.netvlad import NetVLAD
from placerank.models.pca import PCAParams, PCAWhitening, read_openibl_pca_h5
from placerank.models.registry import register_model
from placerank.utils import file_sha256

SFRS_VGG16_PREPROCESS = Preprocess(
    size=(480, 640), mean=(0.48501961, 0.45795686, 0.40760392), std=(1 / 255, 1 / 255, 1 / 255)
)
# timm's tf_ EfficientNets expect [-1, 1] inputs; 352 x 640 -> a 22 x 40 stride-16 map.
SFRS_EFFNET_PREPROCESS = Preprocess(size=(352, 640), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_TRAINABLE_FROM = 24  # conv5_1: modules with index < 24 are frozen ("train_layers=conv5")
VLAD_DIM_VGG16 = 64 * 512
PCA_DIM_VGG16 = 4096


# ---------------------------------------------------------------------------------------------
# Backbones split into a frozen stem and a trainable last stage
# ---------------------------------------------------------------------------------------------


class SFRSBackbone(nn.Module):
    """A CNN cut at a stride-16 map, split so training can run (and cache) the frozen part
    separately: ``forward(x) == trainable_features(frozen_features(x))``.

    The backbone always runs in eval mode: VGG has no batch norm, and EfficientNet's batch norm
    keeps its ImageNet statistics (a tuple of ~20 images from one place is no batch to estimate
    them from). Only :meth:`trainable_parameters` get gradients.
    """

    stride = 16
    out_channels: int

    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def trainable_features(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def trainable_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        return BackboneOutput(self.trainable_features(self.frozen_features(x)))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.trainable_modules() for p in m.parameters()]

    def set_trainable(self) -> None:
        """requires_grad only for the last stage."""
        for p in self.parameters():
            p.requires_grad_(False)
        for p in self.trainable_parameters():
            p.requires_grad_(True)

    def train(self, mode: bool = True):
        return super().train(False)


def _vgg16_features() -> nn.Sequential:
    """torchvision's VGG16 ``features`` (the exact module list ``vgg16(weights=None).features``
    builds, without allocating the 120M-parameter classifier)."""
    from torchvision.models import vgg

    return vgg.make_layers(vgg.cfgs["D"], batch_norm=False)


class VGG16Conv5(SFRSBackbone):
    """VGG16 ``features[:-2]``: 29 modules, ends at conv5_3 before its ReLU (512 ch, stride 16)."""

    out_channels = 512

    def __init__(self):
        super().__init__()
        self.base = nn.Sequential(*list(_vgg16_features().children())[:-2])
        assert len(self.base) == 29

    def frozen_features(self, x):
        return self.base[:VGG16_TRAINABLE_FROM](x)

    def trainable_features(self, y):
        return self.base[VGG16_TRAINABLE_FROM:](y)

    def trainable_modules(self):
        return list(self.base[VGG16_TRAINABLE_FROM:])


class EffNetStride16(SFRSBackbone):
    """EfficientNet-Lite cut after its stride-16 stage (timm ``blocks.4``); that stage trains."""

    def __init__(self, variant: str = "tf_efficientnet_lite0", weights=None, pretrained: bool = True):
        super().__init__()
        from placerank.models.zoo import effnet_backbone

        body, self.source = effnet_backbone(variant, weights, pretrained, out_index=3)
        last = body._last_block
        net = body.net
        net.blocks = net.blocks[: last + 1]  # drop the stride-32 stages and the head: never used
        net.conv_head = nn.Identity()
        net.bn2 = nn.Identity()
        self.body = body
        self.last = last
        self.out_channels = body.out_channels

    def frozen_features(self, x):
        n = self.body.net
        x = n.bn1(n.conv_stem(x))
        for block in n.blocks[: self.last]:
            x = block(x)
        return x

    def trainable_features(self, y):
        return self.body.net.blocks[self.last](y)

    def trainable_modules(self):
        return [self.body.net.blocks[self.last]]


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class SFRSModel(VPRModel):
    """Backbone + NetVLAD + optional PCA-whitening; also gives the 9 SFRS region descriptors.

    ``model_kwargs`` are the registry options that rebuild this exact architecture (written into
    placerank checkpoints: ``pca_dim`` decides whether a PCA layer exists and its size).
    """

    def __init__(
        self,
        name: str,
        backbone: SFRSBackbone,
        vlad: NetVLAD,
        preprocess: Preprocess,
        pca_dim: int | None = None,
        model_kwargs: dict | None = None,
    ):
        super().__init__(name, backbone, vlad, preprocess, pca_dim or vlad.output_dim)
        self.pca = PCAWhitening(vlad.output_dim, pca_dim) if pca_dim else None
        self.model_kwargs = dict(model_kwargs or {})
        self.model_kwargs["pca_dim"] = int(pca_dim or 0)

    @property
    def vlad_dim(self) -> int:
        return self.aggregator.output_dim

    # -- inference ------------------------------------------------------------------------
    def feature_map(self, x: torch.Tensor, frozen_input: bool = False) -> torch.Tensor:
        """Backbone map from images, or from cached :meth:`SFRSBackbone.frozen_features`."""
        if frozen_input:
            return self.backbone.trainable_features(x)
        return self.backbone(x).feature_map

    def forward(self, x: torch.Tensor, output: str = "descriptor", frozen_input: bool = False) -> torch.Tensor:
        """``output``: 'descriptor' (final, PCA-whitened when the model has PCA), 'vlad' (the
        pre-PCA vector training uses) or 'regions' ((B, 9, K*D) region descriptors)."""
        fmap = self.feature_map(x, frozen_input)
        if output == "regions":
            return self.regions_from_map(fmap)
        v = self.aggregator(fmap)
        if output == "vlad" or self.pca is None:
            return v
        if output != "descriptor":
            raise ValueError(f"unknown output '{output}'")
        return F.normalize(self.pca(v), dim=-1)

    def regions_from_map(self, fmap: torch.Tensor) -> torch.Tensor:
        """(B, 9, K*D): global, top, bottom, left, right, TL, TR, BL, BR (spec §2.4); the soft
        assignment is computed once and the quarters are four masked residual sums."""
        from placerank.train.losses.sfrs import quarter_masks, regions_from_quarters

        vlad: NetVLAD = self.aggregator
        x = F.normalize(fmap, dim=1)
        a = vlad.soft_assign(x)
        masks = quarter_masks(x.shape[-2], x.shape[-1], device=x.device)
        quarters = torch.stack([vlad.residual_sums(x, a, m) for m in masks], dim=1)
        return regions_from_quarters(quarters)

    # -- PCA ------------------------------------------------------------------------------
    def set_pca(self, params: PCAParams | None, whiten: bool = True) -> None:
        """Attach (or with None remove) PCA-whitening; updates ``descriptor_dim``."""
        if params is None:
            self.pca = None
            self.descriptor_dim = self.vlad_dim
        else:
            if params.in_dim != self.vlad_dim:
                raise WeightsError(f"PCA input is {params.in_dim}-d but the model's VLAD is {self.vlad_dim}-d")
            ref = next(self.parameters())
            self.pca = PCAWhitening.from_params(params, whiten).to(ref.device)
            self.descriptor_dim = params.out_dim
        self.model_kwargs["pca_dim"] = int(self.pca.out_dim if self.pca is not None else 0)
        self.invalidate_weights_id()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.backbone.trainable_parameters() + list(self.aggregator.parameters())

    def set_trainable(self) -> None:
        self.backbone.set_trainable()
        for p in self.aggregator.parameters():
            p.requires_grad_(True)

    def describe(self) -> dict:
        d = super().describe()
        d["vlad_dim"] = self.vlad_dim
        d["pca"] = f"{self.vlad_dim} -> {self.pca.out_dim}" if self.pca is not None else None
        d["preprocess"] = self.preprocess.signature()
        return d


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


def _safe_torch_load(path: Path):
    """``torch.load(weights_only=True)``, also allowing the numpy scalars OpenIBL stores as
    ``best_recall5``; never unpickles arbitrary code."""
    safe = []
    try:
        core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
        safe = [core.multiarray.scalar, np.dtype]
        safe += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32")]
    except AttributeError:  # pragma: no cover - numpy layout differences
        pass
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(
            f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        ) from None


def _check_exact(path: Path, sd: dict, table: dict, what: str) -> None:
    missing = [k for k in table if k not in sd]
    extra = [k for k in sd if k not in table]
    if missing or extra:
        raise WeightsError(
            f"{path}: not {what} ({len(missing)} missing keys e.g. {missing[:1]}, "
            f"{len(extra)} unexpected e.g. {extra[:1]})"
        )
    for k, shape in table.items():
        if tuple(sd[k].shape) != shape:
            raise WeightsError(f"{path}: {k} has shape {tuple(sd[k].shape)}, expected {shape}")


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


def _load_strict(model: nn.Module, state: dict, path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(
            f"{path}: does not match {getattr(model, 'name', 'the model')} ({str(e).splitlines()[0][:160]})"
        ) from None


def load_openibl_hub(path: str | Path, image_size=None) -> SFRSModel:
    """OpenIBL's ``vgg16_netvlad.pth`` (hub layout, 30 tensors, PCA to 4096 folded in)."""
    path = Path(path)
    sd = _safe_torch_load(path)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    pca_dim = int(sd["pca_layer.weight"].shape[0]) if "pca_layer.weight" in sd else PCA_DIM_VGG16
    _check_exact(
        path, sd, openibl_vgg16_key_table(with_pca=True, pca_dim=pca_dim), "OpenIBL's vgg16_netvlad.pth (hub layout)"
    )
    model = build_sfrs_vgg16(pca_dim=pca_dim, image_size=image_size)
    state = _vgg16_state(sd, "")
    state["pca.weight"] = sd["pca_layer.weight"].reshape(pca_dim, VLAD_DIM_VGG16)
    state["pca.bias"] = sd["pca_layer.bias"]
    _load_strict(model, state, path)
    model.weights_source = f"{path.name} (OpenIBL hub) sha256:{file_sha256(path)[:12]}"
    return model


def load_openibl_training_checkpoint(
    path: str | Path, pca: str | Path | None = None, whiten: bool = True, pca_dim: int = PCA_DIM_VGG16, image_size=None
) -> SFRSModel:
    """An OpenIBL training checkpoint (``state_dict`` wrapper optional, ``module.`` prefix
    optional, no PCA) plus an optional PCA ``.h5`` (``pca`` or ``pca_params_<name>.h5`` beside
    it): W = diag(lams^-1/2) U^T (U^T with ``whiten=False``), b = -W mu over the first
    ``pca_dim`` components."""
    path = Path(path)
    obj = _safe_torch_load(path)
    sd = obj["state_dict"] if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) else obj
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: expected a state_dict, found {type(sd).__name__}")
    prefix = "module." if any(k.startswith("module.") for k in sd) else ""
    _check_exact(
        path, sd, openibl_vgg16_key_table(prefix=prefix, with_pca=False), "an OpenIBL VGG16-NetVLAD training checkpoint"
    )
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
    _load_strict(model, state, path)
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
    from placerank.utils import atomic_path

    with atomic_path(path) as tmp:
        torch.save(out, tmp)


# ---------------------------------------------------------------------------------------------
# Builders and registry entries
# ---------------------------------------------------------------------------------------------


def check_even_map(size: tuple[int, int], stride: int = 16) -> None:
    h, w = size
    if h % (2 * stride) or w % (2 * stride):
        raise WeightsError(
            f"SFRS input {h}x{w} gives a {h // stride}x{w // stride}-ish feature map; the region "
            f"quarters need an even map: use multiples of {2 * stride} px (e.g. 352 640)"
        )


def build_sfrs_vgg16(pca_dim: int | None = None, image_size=None, num_clusters: int = 64) -> SFRSModel:
    """Random-init ``sfrs-vgg16`` of the given shape (loaders fill it)."""
    size = normalize_image_size(image_size) or SFRS_VGG16_PREPROCESS.size
    check_even_map(size)
    kwargs = {"num_clusters": num_clusters}
    if normalize_image_size(image_size):
        kwargs["image_size"] = list(size)
    return SFRSModel(
        "sfrs-vgg16",
        VGG16Conv5(),
        NetVLAD(num_clusters, 512),
        SFRS_VGG16_PREPROCESS.with_size(size),
        pca_dim=pca_dim,
        model_kwargs=kwargs,
    )


def _load_placerank(weights, name, image_size):
    from placerank.models.checkpoints import load_placerank_checkpoint

    model = load_placerank_checkpoint(weights, expected_name=name)
    if normalize_image_size(image_size):
        check_even_map(normalize_image_size(image_size))
        model.preprocess = model.preprocess.with_size(normalize_image_size(image_size))
    return model


VGG16_WEIGHTS_HELP = (
    "sfrs-vgg16 needs --weights: OpenIBL's vgg16_netvlad.pth, an OpenIBL training checkpoint "
    "(+ pca_params_*.h5 beside it), the MatConvNet VGG16 state_dict vd16_offtheshelf_conv5_3_max.pth "
    "('0.weight'..'28.bias') or a placerank sfrs checkpoint"
)


@register_model(
    "sfrs-vgg16",
    "SFRS: VGG16 conv5_3 + NetVLAD(64) + PCA-whitening 4096-d, MatConvNet input 480x640 "
    "(weights: OpenIBL vgg16_netvlad.pth / training checkpoint + PCA h5 / MatConvNet VGG16 via --weights)",
)
def sfrs_vgg16(
    weights=None,
    image_size=None,
    pretrained: bool = True,
    pca_dim: int | None = None,
    num_clusters: int = 64,
    pca: str | None = None,
    whiten: bool = True,
) -> SFRSModel:
    from placerank.models.checkpoints import is_placerank_checkpoint

    if not pretrained:  # architecture only (placerank checkpoint reload)
        return build_sfrs_vgg16(pca_dim=pca_dim or None, image_size=image_size, num_clusters=num_clusters)
    if weights is None:
        raise WeightsError(VGG16_WEIGHTS_HELP)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"{path}: weights file does not exist")
    if is_placerank_checkpoint(path):
        return _load_placerank(path, "sfrs-vgg16", image_size)
    sd = _safe_torch_load(path)
    inner = sd["state_dict"] if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict) else sd
    layout = detect_vgg16_layout(inner) if isinstance(inner, dict) else "unknown"
    if layout == "hub":
        return load_openibl_hub(path, image_size=image_size)
    if layout == "training":
        return load_openibl_training_checkpoint(path, pca=pca, whiten=whiten, image_size=image_size)
    if layout == "matconvnet":
        model = build_sfrs_vgg16(image_size=image_size, num_clusters=num_clusters)
        table = {
            f"{i}.{p}": tuple(model.backbone.base[i].state_dict()[p].shape)
            for i in VGG16_CONV_INDICES
            for p in ("weight", "bias")
        }
        _check_exact(path, inner, table, "a MatConvNet VGG16 state_dict ('0.weight'..'28.bias')")
        try:
            model.backbone.base.load_state_dict(inner, strict=True)
        except RuntimeError as e:
            raise WeightsError(f"{path}: {str(e).splitlines()[0][:160]}") from None
        model.weights_source = f"{path.name} (MatConvNet VGG16) sha256:{file_sha256(path)[:12]}"
        return model
    raise WeightsError(f"{path}: unrecognised weights for sfrs-vgg16 ({VGG16_WEIGHTS_HELP.split(': ', 1)[1]})")


def build_sfrs_effnet(
    variant: str = "tf_efficientnet_lite0",
    name: str = "sfrs-effnet-lite0",
    weights=None,
    pretrained: bool = True,
    pca_dim: int | None = None,
    image_size=None,
    num_clusters: int = 64,
) -> SFRSModel:
    size = normalize_image_size(image_size) or SFRS_EFFNET_PREPROCESS.size
    check_even_map(size)
    bb = EffNetStride16(variant, weights, pretrained)
    kwargs = {"num_clusters": num_clusters}
    if normalize_image_size(image_size):
        kwargs["image_size"] = list(size)
    model = SFRSModel(
        name,
        bb,
        NetVLAD(num_clusters, bb.out_channels),
        SFRS_EFFNET_PREPROCESS.with_size(size),
        pca_dim=pca_dim,
        model_kwargs=kwargs,
    )
    model.weights_source = bb.source
    return model


@register_model(
    "sfrs-effnet-lite0",
    "SFRS on EfficientNet-Lite0 (ImageNet): stride-16 stage (112 ch) + NetVLAD(64) "
    "7168-d (+ PCA after training), input 352x640; trains here",
)
def sfrs_effnet_lite0(
    weights=None, image_size=None, pretrained: bool = True, pca_dim: int | None = None, num_clusters: int = 64
) -> SFRSModel:
    from placerank.models.checkpoints import is_placerank_checkpoint

    if weights is not None and is_placerank_checkpoint(weights):
        return _load_placerank(weights, "sfrs-effnet-lite0", image_size)
    return build_sfrs_effnet(
        weights=weights,
        pretrained=pretrained,
        pca_dim=pca_dim or None,
        image_size=image_size,
        num_clusters=num_clusters,
    )
