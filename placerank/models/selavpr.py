"""SelaVPR (ICLR 2024): a frozen backbone with small trainable adapters, GeM on L2-normalised
features for the global descriptor, and an up-convolution head for dense local features.

Spec: ``shared/docs/methods/selavpr.md``. Two backbones, one method:

- **DINOv2 ViT** (``selavpr-vit{s,b,l}14``), the paper's model. Each transformer block gets a
  serial adapter right after attention (with its own skip) and a parallel adapter beside the
  MLP (scaled by 0.2, fed the same LN2 output); both sit *inside* the block's LayerScale.
  Adapters are bottleneck MLPs (ratio 0.5) whose output layer ``D_fc2`` starts at zero, so the
  adapted network is exactly DINOv2 at step 0. Parameter names match the released checkpoints
  (``backbone.blocks.N.adapter1.D_fc1.weight`` ...), which :func:`load_official_selavpr`
  loads strictly.
- **EfficientNet-Lite0** (``selavpr-effnet-lite0``), what trains on a CPU here. The CNN
  counterpart of the global adapters: a parallel bottleneck of 1x1 convolutions beside every
  block of the last stages (and beside ``conv_head``), scaled by 0.2, output conv zero-initialised
  — again the adapted network starts exactly at the ImageNet backbone.

Both give a (B, C, h, w) map; the global descriptor is GeM over the L2-normalised map (then L2),
and ``LocalAdapt`` (two stride-2 transposed convs, C -> 256 -> 128) gives a (4h-3) x (4w-3) grid
of L2-normalised 128-d local features used by the ``selavpr-mnn`` re-ranker.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from placerank.data.images import Preprocess, normalize_image_size
from placerank.errors import WeightsError
from placerank.models.backbones import DINOV2_CONFIGS, DinoV2Backbone, EfficientNetBackbone
from placerank.models.base import BackboneOutput, LocalFeatures, VPRModel
from placerank.models.gem import GeM
from placerank.models.local_head import UpConvLocalHead, grid_positions
from placerank.models.registry import register_model
from placerank.models.weights import resolve_weights
from placerank.utils import file_sha256

ADAPTER_RATIO = 0.5  # bottleneck width / block width (every official instantiation passes 0.5)
PARALLEL_SCALE = 0.2  # constant factor on the parallel adapter's output
EFFNET_VARIANT = "tf_efficientnet_lite0"
# timm's tf_ EfficientNets expect inputs in [-1, 1]; 360x640 keeps the 16:9 street-view aspect
# and gives a 12x20 stride-32 map, i.e. a 45x77 grid (3,465 features, close to SelaVPR's 3,721).
EFFNET_PREPROCESS = Preprocess(size=(360, 640), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
VIT_PREPROCESS = Preprocess(size=(224, 224))


def is_trainable_name(name: str) -> bool:
    """SelaVPR's freezing rule: inside the backbone only adapters train; everything outside it
    (GeM ``p``, the up-convolutions) trains."""
    return "adapter" in name or not name.startswith("backbone.")


# ---------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------


class Adapter(nn.Module):
    """Bottleneck MLP ``D_fc2(ReLU(D_fc1(h)))``, plus ``h`` when ``skip`` (the serial adapter).

    ``D_fc1``: truncated normal (std 0.02), bias 0; ``D_fc2``: all zeros, so a serial adapter
    starts as the identity and a parallel one as zero.
    """

    def __init__(self, dim: int, ratio: float = ADAPTER_RATIO, skip: bool = False):
        super().__init__()
        hidden = int(dim * ratio)
        self.skip = skip
        self.D_fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.D_fc2 = nn.Linear(hidden, dim)
        nn.init.trunc_normal_(self.D_fc1.weight, std=0.02)
        nn.init.zeros_(self.D_fc1.bias)
        nn.init.zeros_(self.D_fc2.weight)
        nn.init.zeros_(self.D_fc2.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.D_fc2(self.act(self.D_fc1(h)))
        return h + y if self.skip else y


def _adapted_block_forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
    # x'  = x  + ls1(A1(Attn(LN1(x))))                   serial adapter, inside LayerScale
    # x'' = x' + ls2(MLP(LN2(x')) + 0.2 * A2(LN2(x')))   parallel adapter beside the MLP
    kw = {}
    if attn_mask is not None or is_causal:
        kw = dict(attn_mask=attn_mask, is_causal=is_causal)
    x = x + self.drop_path1(self.ls1(self.adapter1(self.attn(self.norm1(x), **kw))))
    h = self.norm2(x)
    return x + self.drop_path2(self.ls2(self.mlp(h) + self.adapter_scale * self.adapter2(h)))


class SelaViTBlock(nn.Module):
    """Marker base for a timm ViT ``Block`` with SelaVPR's two adapters (see :func:`adapt_vit_block`)."""


_ADAPTED_CLASSES: dict[type, type] = {}


def adapt_vit_block(
    block: nn.Module, dim: int, ratio: float = ADAPTER_RATIO, scale: float = PARALLEL_SCALE
) -> nn.Module:
    """Add ``adapter1``/``adapter2`` to an already-built timm ``Block`` in place.

    The block keeps its own class and parameter names (``norm1``, ``attn.qkv``, ``ls1.gamma``...,
    i.e. Meta's and the SelaVPR checkpoints' names); only its forward changes, through a
    per-instance subclass. Building the adapters around existing blocks avoids constructing a
    second 300 M-parameter ViT-L.
    """
    block.adapter1 = Adapter(dim, ratio, skip=True)
    block.adapter2 = Adapter(dim, ratio, skip=False)
    block.adapter_scale = float(scale)
    cls = type(block)
    if not issubclass(cls, SelaViTBlock):
        if cls not in _ADAPTED_CLASSES:
            _ADAPTED_CLASSES[cls] = type(
                f"SelaVPR{cls.__name__}", (cls, SelaViTBlock), {"forward": _adapted_block_forward}
            )
        block.__class__ = _ADAPTED_CLASSES[cls]
    return block


class SelaViTBackbone(DinoV2Backbone):
    """DINOv2 ViT (Meta's parameter names) with SelaVPR adapters in every block."""

    def __init__(
        self,
        arch: str = "vitl14",
        num_register_tokens: int = 0,
        ratio: float = ADAPTER_RATIO,
        scale: float = PARALLEL_SCALE,
    ):
        super().__init__(arch, num_register_tokens=num_register_tokens, interpolate_offset=0.1)
        for blk in self.blocks:
            adapt_vit_block(blk, self.embed_dim, ratio, scale)

    # Every block has adapters, so nothing but the input can be cached.
    frozen_prefix = False

    def forward_prefix(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_from_prefix(self, x: torch.Tensor) -> BackboneOutput:
        return self.forward(x)

    def load_meta_checkpoint(self, path: str | Path | dict) -> None:
        """Strict load of Meta's ``dinov2_vit*14[_reg4]_pretrain.pth`` into the frozen part;
        the adapters keep their (zero-output) initialisation."""
        from placerank.models.backbones import load_state_dict_file

        sd = path if isinstance(path, dict) else load_state_dict_file(path)
        own = self.state_dict()
        frozen = {k for k in own if "adapter" not in k}
        missing, unexpected = sorted(frozen - set(sd)), sorted(set(sd) - frozen)
        bad_shape = sorted(k for k in frozen & set(sd) if tuple(sd[k].shape) != tuple(own[k].shape))
        if missing or unexpected or bad_shape:
            raise WeightsError(
                f"{_name(path)}: not a DINOv2 {self.arch} checkpoint ({_diff_text(missing, unexpected, bad_shape)})"
            )
        full = {k: (sd[k] if k in sd else v) for k, v in own.items()}
        self.load_state_dict(full, strict=True)


class ConvAdapter(nn.Module):
    """CNN counterpart of the parallel adapter: ``D_fc2(ReLU(D_fc1(x)))`` with 1x1 convs.

    ``D_fc1`` (c_in -> ratio * c_out, stride of the block it sits beside, so shapes match the
    block output; a 1x1 stride-2 conv gives ceil(H/2) like TF-"same" padding) is initialised like
    the ViT adapter; ``D_fc2`` is all zeros so the adapter starts as zero.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, ratio: float = ADAPTER_RATIO):
        super().__init__()
        hidden = max(8, int(round(c_out * ratio)))
        self.D_fc1 = nn.Conv2d(c_in, hidden, 1, stride=stride)
        self.act = nn.ReLU()
        self.D_fc2 = nn.Conv2d(hidden, c_out, 1)
        nn.init.trunc_normal_(self.D_fc1.weight, std=0.02)
        nn.init.zeros_(self.D_fc1.bias)
        nn.init.zeros_(self.D_fc2.weight)
        nn.init.zeros_(self.D_fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.D_fc2(self.act(self.D_fc1(x)))


def _block_io(block: nn.Module) -> tuple[int, int, int]:
    """(in channels, out channels, stride) of a timm EfficientNet block."""
    if hasattr(block, "conv_pw"):  # InvertedResidual
        c_in, c_out = block.conv_pw.in_channels, block.conv_pwl.out_channels
    else:  # DepthwiseSeparableConv
        c_in, c_out = block.conv_dw.in_channels, block.conv_pw.out_channels
    return c_in, c_out, int(block.conv_dw.stride[0])


class SelaEffNetBackbone(nn.Module):
    """Frozen EfficientNet-Lite with parallel conv adapters beside the blocks of
    ``adapt_stages`` and (``adapt_head``) beside ``conv_head``+``bn2``:
    ``y = block(x) + 0.2 * adapter(x)``.

    Default: the two stride-32 stages (5: 4 blocks, 6: 1 block) plus the head, i.e. the last
    stages, where a CPU can afford the backward pass (adding the stride-16 stage 4 made a
    training step several times slower here for no measured gain).

    The frozen network's BatchNorms always run in eval mode (their ImageNet statistics are
    part of the frozen backbone; batches of 16 street images would corrupt them).
    """

    def __init__(
        self,
        variant: str = EFFNET_VARIANT,
        adapt_stages: Sequence[int] = (5, 6),
        adapt_head: bool = True,
        ratio: float = ADAPTER_RATIO,
        scale: float = PARALLEL_SCALE,
        base: EfficientNetBackbone | None = None,
    ):
        super().__init__()
        self.net = (base or EfficientNetBackbone(variant)).net
        self.variant = variant
        self.out_channels = self.net.num_features
        self.stride = 32
        self.scale = float(scale)
        self.adapt_stages = tuple(int(s) for s in adapt_stages)
        n_stages = len(self.net.blocks)
        if any(s < 0 or s >= n_stages for s in self.adapt_stages):
            raise WeightsError(f"adapt_stages must be in 0..{n_stages - 1}, got {list(self.adapt_stages)}")
        self.adapters = nn.ModuleDict()
        for s in self.adapt_stages:
            for j, blk in enumerate(self.net.blocks[s]):
                c_in, c_out, stride = _block_io(blk)
                self.adapters[f"{s}_{j}"] = ConvAdapter(c_in, c_out, stride, ratio)
        self.first_adapted = min(self.adapt_stages) if self.adapt_stages else n_stages
        self.adapt_head = bool(adapt_head)
        if adapt_head:
            self.adapters["head"] = ConvAdapter(self.net.conv_head.in_channels, self.out_channels, 1, ratio)

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()
        return self

    # The stages before the first adapter are frozen and see no adapter output, so their result
    # per image never changes during training: the trainer caches it (``frozen_prefix``).
    frozen_prefix = True

    def forward_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and the stages before the first adapted one (no trainable parameter inside)."""
        n = self.net
        x = n.bn1(n.conv_stem(x))
        for s in range(self.first_adapted):
            x = n.blocks[s](x)
        return x

    def forward_from_prefix(self, x: torch.Tensor) -> BackboneOutput:
        n = self.net
        for s in range(self.first_adapted, len(n.blocks)):
            for j, blk in enumerate(n.blocks[s]):
                key = f"{s}_{j}"
                y = blk(x)
                if key in self.adapters:
                    y = y + self.scale * self.adapters[key](x)
                x = y
        y = n.bn2(n.conv_head(x))
        if self.adapt_head:
            y = y + self.scale * self.adapters["head"](x)
        return BackboneOutput(y)

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        return self.forward_from_prefix(self.forward_prefix(x))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class SelaVPRModel(VPRModel):
    """Adapted backbone + GeM (L2 before pool) + ``LocalAdapt`` up-convolution head.

    ``forward`` gives the global descriptor (as every :class:`VPRModel`); :meth:`forward_train`
    gives global and dense local features from one backbone pass; :meth:`local_features`
    gives per-image :class:`LocalFeatures` with keypoints in original-image pixels.
    """

    local_dim = 128

    def __init__(self, name: str, backbone: nn.Module, preprocess: Preprocess):
        super().__init__(name, backbone, GeM(p=3.0, eps=1e-6, normalize_input=True), preprocess, backbone.out_channels)
        self.LocalAdapt = UpConvLocalHead(backbone.out_channels, 256, self.local_dim, names=("upconv1", "upconv2"))
        self.freeze_backbone()

    # -- training helpers ---------------------------------------------------------------------
    def freeze_backbone(self) -> None:
        for name, p in self.named_parameters():
            p.requires_grad_(is_trainable_name(name))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if is_trainable_name(n)]

    def forward_train(self, images: torch.Tensor, from_prefix: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(global (B, D) L2-normalised, dense (B, 128, gh, gw) L2-normalised per cell).

        ``from_prefix``: ``images`` are ``backbone.forward_prefix`` outputs (cached frozen stages).
        """
        out = self.backbone.forward_from_prefix(images) if from_prefix else self.backbone(images)
        fmap = out.feature_map
        g = F.normalize(self.aggregator(fmap).float(), dim=-1)
        return g, self.LocalAdapt(fmap)

    def global_from_prefix(self, prefix: torch.Tensor) -> torch.Tensor:
        fmap = self.backbone.forward_from_prefix(prefix).feature_map
        return F.normalize(self.aggregator(fmap).float(), dim=-1)

    # -- local features -----------------------------------------------------------------------
    def grid_size(self, input_size: tuple[int, int] | None = None) -> tuple[int, int]:
        """Dense grid (rows, cols) for an input of ``input_size`` (default: the preprocess size)."""
        h, w = input_size or self.preprocess.size
        s = self.backbone.stride
        fh, fw = (h // s, w // s) if s == 14 else (-(-h // s), -(-w // s))
        return 4 * fh - 3, 4 * fw - 3

    @torch.no_grad()
    def local_features(self, images: torch.Tensor, original_sizes: Sequence[tuple[int, int]]) -> list[LocalFeatures]:
        """Dense local features of a preprocessed batch; keypoints are the grid cells' centres
        in each original image (``grid_positions``), clipped to the image."""
        fmap = self.backbone(images).feature_map
        dense = self.LocalAdapt(fmap)
        B, C, gh, gw = dense.shape
        desc = dense.permute(0, 2, 3, 1).reshape(B, gh * gw, C).float().cpu().numpy()
        in_size = tuple(images.shape[-2:])
        out = []
        for b in range(B):
            size = tuple(int(v) for v in original_sizes[b])
            kp = grid_positions(gh, gw, float(self.backbone.stride), size, in_size).numpy()
            # With TF-"same" padding a 360 px input gives 12 stride-32 rows, the last centred
            # past the bottom edge; keep every keypoint inside the image it describes.
            kp[:, 0] = kp[:, 0].clip(0, size[1] - 1)
            kp[:, 1] = kp[:, 1].clip(0, size[0] - 1)
            out.append(LocalFeatures(keypoints=kp.astype(np.float32), descriptors=desc[b], image_size=size))
        return out

    def describe(self) -> dict:
        d = super().describe()
        gh, gw = self.grid_size()
        d.update(
            local_dim=self.local_dim,
            local_grid=[gh, gw],
            trainable_params=sum(p.numel() for p in self.trainable_parameters()),
        )
        return d


# ---------------------------------------------------------------------------------------------
# Official checkpoint (SelaVPR_msls.pth, SelaVPR_pitts30k.pth, SelaVPR_reg4_msls.pth)
# ---------------------------------------------------------------------------------------------


def _numpy_safe_globals() -> list:
    """The numpy objects inside the official container (``recalls`` array, ``best_r5`` scalar).

    Files written with NumPy 1.x name ``numpy.core.multiarray.*``; NumPy 2 writes
    ``numpy._core.multiarray.*``. Both spellings are allow-listed for the same functions.
    """
    try:
        from numpy._core import multiarray as ma  # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core import multiarray as ma
    out = [np.ndarray, np.dtype]
    for fn in ("_reconstruct", "scalar"):
        obj = getattr(ma, fn)
        out += [(obj, f"numpy.core.multiarray.{fn}"), (obj, f"numpy._core.multiarray.{fn}")]
    # dtype classes (np.dtypes.Float64DType ...) appear in pickles of some NumPy versions.
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and isinstance(getattr(dtypes, n), type)]
    return out


def allow_pickle_default() -> bool:
    return os.environ.get("PLACERANK_ALLOW_PICKLE", "") in ("1", "true", "yes")


def read_torch_file(path: str | Path, allow_pickle: bool | None = None):
    """``torch.load`` for trusted-format checkpoints, safe by default.

    Choice (PyTorch >= 2.6 defaults to ``weights_only=True``): we keep ``weights_only=True`` and
    allow-list exactly the numpy globals the SelaVPR container needs, so a file that carries any
    other pickled object is refused (in one line naming those objects) instead of executing it.
    ``allow_pickle=True`` (or ``PLACERANK_ALLOW_PICKLE=1``) loads with ``weights_only=False`` for
    files you trust. Zip-format files are memory-mapped, so a 1.4 GB ViT-L file is not copied
    into RAM before being assigned to the model.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: weights file does not exist")
    if allow_pickle is None:
        allow_pickle = allow_pickle_default()

    def _load(weights_only: bool, mmap: bool):
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)

    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            try:
                return _load(True, True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                return _load(True, False)  # legacy (non-zip) format cannot be memory-mapped
    except pickle.UnpicklingError as e:
        if allow_pickle:
            try:
                return _load(False, False)
            except Exception as e2:
                raise WeightsError(
                    f"{path}: cannot read weights ({type(e2).__name__}: {str(e2).splitlines()[0][:120]})"
                ) from None
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            allowed = {
                f"{o.__module__}.{o.__qualname__}" if not isinstance(o, tuple) else o[1] for o in _numpy_safe_globals()
            }
            names = [n for n in names if n not in allowed]
        except Exception:
            names = []
        what = ", ".join(names[:3]) if names else str(e).splitlines()[0][:100]
        raise WeightsError(
            f"{path}: file holds pickled objects that weights_only loading refuses ({what}); "
            f"if you trust it, set PLACERANK_ALLOW_PICKLE=1 to load it with weights_only=False"
        ) from None
    except WeightsError:
        raise
    except Exception as e:
        raise WeightsError(
            f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        ) from None


def _name(path) -> str:
    return "state dict" if isinstance(path, dict) else str(path)


def _diff_text(missing: list[str], unexpected: list[str], bad_shape: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys e.g. {unexpected[0]}")
    if bad_shape:
        parts.append(f"{len(bad_shape)} wrong shapes e.g. {bad_shape[0]}")
    return ", ".join(parts)


def official_state_dict(obj, path: str | Path) -> dict[str, torch.Tensor]:
    """The model tensors of an official SelaVPR file: ``model_state_dict`` of the container (or
    a bare state dict), with DataParallel's ``module.`` prefix removed."""
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: not a SelaVPR checkpoint (expected a dict with 'model_state_dict')")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def looks_like_official(obj) -> bool:
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        return True
    return isinstance(obj, dict) and any(str(k).endswith("blocks.0.adapter1.D_fc1.weight") for k in obj)


def official_arch(sd: dict[str, torch.Tensor], path) -> tuple[str, int]:
    """(arch, number of register tokens) from the shapes in an official state dict."""
    if "backbone.pos_embed" not in sd:
        raise WeightsError(f"{path}: not a SelaVPR checkpoint (no 'backbone.pos_embed' key)")
    dim = int(sd["backbone.pos_embed"].shape[-1])
    depth = len({k.split(".")[2] for k in sd if k.startswith("backbone.blocks.")})
    for arch, cfg in DINOV2_CONFIGS.items():
        if cfg["embed_dim"] == dim and cfg["depth"] == depth:
            regs = sd.get("backbone.register_tokens")
            return arch, 0 if regs is None else int(regs.shape[1])
    raise WeightsError(f"{path}: SelaVPR checkpoint has a {dim}-d, {depth}-block ViT, not a DINOv2 ViT-S/B/L")


def map_official_keys(sd: dict[str, torch.Tensor], arch: str, path) -> dict[str, torch.Tensor]:
    """Official names -> placerank names; checks the adapters and LocalAdapt are all there.

    The only renamed key is the GeM exponent ``aggregation.1.p`` -> ``aggregator.p``
    (``aggregation.0``/``.2`` are the parameter-free L2-norm and flatten).
    """
    depth = DINOV2_CONFIGS[arch]["depth"]
    for i in range(depth):
        for a in ("adapter1", "adapter2"):
            if f"backbone.blocks.{i}.{a}.D_fc2.weight" not in sd:
                raise WeightsError(f"{path}: SelaVPR checkpoint has no {a} in block {i} (a plain DINOv2 file?)")
    if "LocalAdapt.upconv1.weight" not in sd or "LocalAdapt.upconv2.weight" not in sd:
        raise WeightsError(f"{path}: SelaVPR checkpoint has no LocalAdapt up-convolutions")
    return {("aggregator.p" if k == "aggregation.1.p" else k): v for k, v in sd.items()}


def load_official_selavpr(
    path: str | Path, arch: str = "vitl14", image_size=None, allow_pickle: bool | None = None, obj=None
) -> SelaVPRModel:
    """Build ``selavpr-<arch>`` from a released SelaVPR ``.pth`` and load it strictly.

    The model is built on the ``meta`` device and the checkpoint's (memory-mapped) tensors are
    assigned to it, so no random initialisation of 300 M parameters happens and the weights are
    not held twice. Every key must land: missing, unexpected and wrong-shaped keys are reported
    in one line.
    """
    if obj is None:
        obj = read_torch_file(path, allow_pickle)
    sd = official_state_dict(obj, path)
    found, regs = official_arch(sd, path)
    if found != arch:
        raise WeightsError(f"{path}: SelaVPR checkpoint is for DINOv2 {found}, not {arch}; use --model selavpr-{found}")
    sd = map_official_keys(sd, arch, path)
    with torch.device("meta"):
        model = _build_vit(f"selavpr-{arch}", arch, image_size, num_register_tokens=regs)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad_shape = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or bad_shape:
        raise WeightsError(
            f"{path}: checkpoint does not match selavpr-{arch} ({_diff_text(missing, unexpected, bad_shape)})"
        )
    sd = {k: (v if v.dtype == own[k].dtype else v.to(own[k].dtype)) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # a buffer outside the state dict would stay uninitialised
        raise WeightsError(f"{path}: {len(leftover)} tensors not initialised by the checkpoint, e.g. {leftover[0]}")
    model.freeze_backbone()
    model.weights_source = f"{Path(path).name} sha256:{file_sha256(path)[:12]} (official SelaVPR)"
    model.official_sanity = {
        "gem_p": float(model.aggregator.p.detach().float().item()),
        "adapters_nonzero": bool(
            any(float(b.adapter1.D_fc2.weight.detach().abs().max()) > 0 for b in model.backbone.blocks)
        ),
    }
    model.invalidate_weights_id()
    return model


# ---------------------------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------------------------


def _build_vit(name: str, arch: str, image_size, num_register_tokens: int = 0) -> SelaVPRModel:
    size = normalize_image_size(image_size) or VIT_PREPROCESS.size
    if size[0] % 14 or size[1] % 14:
        raise WeightsError(f"DINOv2 input size must be a multiple of 14 px, got {size[0]}x{size[1]}")
    bb = SelaViTBackbone(arch, num_register_tokens=num_register_tokens)
    return SelaVPRModel(name, bb, VIT_PREPROCESS.with_size(size))


def _placerank_ckpt(weights) -> bool:
    from placerank.models.checkpoints import is_placerank_checkpoint

    return weights is not None and is_placerank_checkpoint(weights)


def _load_trained(weights, name: str, image_size) -> SelaVPRModel:
    """A placerank checkpoint (training output); ``image_size`` overrides the trained input
    size (adapters, GeM and up-convolutions are size-agnostic)."""
    from placerank.models.checkpoints import load_placerank_checkpoint

    model = load_placerank_checkpoint(weights, expected_name=name)
    size = normalize_image_size(image_size)
    if size is not None:
        if model.backbone.stride == 14 and (size[0] % 14 or size[1] % 14):
            raise WeightsError(f"DINOv2 input size must be a multiple of 14 px, got {size[0]}x{size[1]}")
        model.preprocess = model.preprocess.with_size(size)
    return model


def _vit_factory(
    name: str,
    arch: str,
    weights=None,
    image_size=None,
    pretrained: bool = True,
    num_register_tokens: int = 0,
    allow_pickle: bool | None = None,
) -> SelaVPRModel:
    """``weights``: a placerank checkpoint, an official SelaVPR ``.pth`` or Meta's DINOv2
    ``.pth`` (adapters then start at zero). Default: ``SelaVPR_msls.pth`` for ViT-L, else Meta's
    ``dinov2_<arch>_pretrain.pth``, from the weights folder."""
    if not pretrained and weights is None:
        return _build_vit(name, arch, image_size, num_register_tokens)
    if weights is None:
        if arch == "vitl14":
            try:
                weights = resolve_weights("SelaVPR_msls.pth", None, "SelaVPR ViT-L/14")
            except WeightsError:
                raise WeightsError(
                    "selavpr-vitl14 weights not found: put SelaVPR_msls.pth (released model) or "
                    "dinov2_vitl14_pretrain.pth (to train) in $PLACERANK_WEIGHTS, or pass --weights PATH"
                ) from None
        else:
            weights = resolve_weights(f"dinov2_{arch}_pretrain.pth", None, f"DINOv2 {arch}")
    # One (memory-mapped) read decides what the file is; a 1.4 GB official file is never read twice.
    obj = read_torch_file(weights, allow_pickle)
    if isinstance(obj, dict) and "placerank" in obj:
        del obj
        return _load_trained(weights, name, image_size)
    if looks_like_official(obj):
        return load_official_selavpr(weights, arch, image_size, allow_pickle, obj=obj)
    if not isinstance(obj, dict):
        raise WeightsError(f"{weights}: expected a state_dict, found {type(obj).__name__}")
    regs = int(obj["register_tokens"].shape[1]) if "register_tokens" in obj else num_register_tokens
    model = _build_vit(name, arch, image_size, regs)
    model.backbone.load_meta_checkpoint(obj)
    model.weights_source = (
        f"{Path(weights).name} sha256:{file_sha256(weights)[:12]} (DINOv2 backbone; adapters and heads untrained)"
    )
    model.invalidate_weights_id()
    return model


def _effnet_factory(
    name: str,
    weights=None,
    image_size=None,
    pretrained: bool = True,
    adapt_stages: Sequence[int] = (5, 6),
    adapt_head: bool = True,
) -> SelaVPRModel:
    """``weights``: a placerank checkpoint (a trained run's ``model.pt``) or ImageNet
    EfficientNet-Lite0 weights in timm layout (default: from the weights folder)."""
    from placerank.models.zoo import effnet_backbone

    if _placerank_ckpt(weights):
        return _load_trained(weights, name, image_size)
    base, source = effnet_backbone(EFFNET_VARIANT, weights, pretrained)
    bb = SelaEffNetBackbone(EFFNET_VARIANT, adapt_stages, adapt_head, base=base)
    model = SelaVPRModel(name, bb, EFFNET_PREPROCESS.with_size(normalize_image_size(image_size)))
    model.weights_source = source if source == "random-init" else f"{source} (adapters and heads untrained)"
    return model


for _arch in ("vits14", "vitb14", "vitl14"):

    def _f(weights=None, image_size=None, pretrained=True, num_register_tokens=0, allow_pickle=None, _arch=_arch):
        return _vit_factory(
            f"selavpr-{_arch}", _arch, weights, image_size, pretrained, num_register_tokens, allow_pickle
        )

    register_model(
        f"selavpr-{_arch}",
        f"SelaVPR: DINOv2 {_arch} + in-block adapters, GeM {DINOV2_CONFIGS[_arch]['embed_dim']}-d + dense 128-d"
        f" local features (weights: {'SelaVPR_msls.pth or ' if _arch == 'vitl14' else ''}"
        f"Meta dinov2_{_arch}_pretrain.pth via --weights)",
        trainable_here=False,
    )(_f)


@register_model(
    "selavpr-effnet-lite0",
    "SelaVPR on EfficientNet-Lite0 (ImageNet, frozen) + parallel conv adapters, GeM 1280-d + dense 128-d local features",
)
def _selavpr_effnet(weights=None, image_size=None, pretrained=True, adapt_stages=(5, 6), adapt_head=True):
    return _effnet_factory("selavpr-effnet-lite0", weights, image_size, pretrained, adapt_stages, adapt_head)
