"""Official FoL checkpoints (FoL_base.pth / FoL_large.pth, spec fol.md §7) and placerank ones.

The key tables below are written from the spec's table, independently of the model code; the
checkpoints are generated in exactly the official container: a dict with ``model_state_dict``
(DataParallel ``module.`` prefix, full DINOv2 inside) plus the training-time keys.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from placerank.data.images import load_tensor
from placerank.errors import WeightsError
from placerank.models import create

ARCH = {"vitb14": (768, 12), "vitl14": (1024, 24)}


def official_table(arch: str) -> dict[str, tuple[int, ...]]:
    C, depth = ARCH[arch]
    t = {
        "backbone.model.cls_token": (1, 1, C),
        "backbone.model.pos_embed": (1, 1370, C),
        "backbone.model.mask_token": (1, C),
        "backbone.model.patch_embed.proj.weight": (C, 3, 14, 14),
        "backbone.model.patch_embed.proj.bias": (C,),
    }
    for i in range(depth):
        b = f"backbone.model.blocks.{i}."
        t.update(
            {
                b + "norm1.weight": (C,),
                b + "norm1.bias": (C,),
                b + "attn.qkv.weight": (3 * C, C),
                b + "attn.qkv.bias": (3 * C,),
                b + "attn.proj.weight": (C, C),
                b + "attn.proj.bias": (C,),
                b + "ls1.gamma": (C,),
                b + "ls2.gamma": (C,),
                b + "norm2.weight": (C,),
                b + "norm2.bias": (C,),
                b + "mlp.fc1.weight": (4 * C, C),
                b + "mlp.fc1.bias": (4 * C,),
                b + "mlp.fc2.weight": (C, 4 * C),
                b + "mlp.fc2.bias": (C,),
            }
        )
    t.update(
        {
            "backbone.model.norm.weight": (C,),
            "backbone.model.norm.bias": (C,),
            "aggregator.token_features.0.weight": (512, C),
            "aggregator.token_features.0.bias": (512,),
            "aggregator.token_features.2.weight": (256, 512),
            "aggregator.token_features.2.bias": (256,),
            "aggregator.cluster_features.0.weight": (512, C, 1, 1),
            "aggregator.cluster_features.0.bias": (512,),
            "aggregator.cluster_features.3.weight": (128, 512, 1, 1),
            "aggregator.cluster_features.3.bias": (128,),
            "aggregator.score.0.weight": (512, C, 1, 1),
            "aggregator.score.0.bias": (512,),
            "aggregator.score.3.weight": (64, 512, 1, 1),
            "aggregator.score.3.bias": (64,),
            "upconv.weight": (C, 256, 3, 3),
            "upconv.bias": (256,),
            "upconv2.weight": (256, 128, 3, 3),
            "upconv2.bias": (128,),
        }
    )
    return t


def sane_tensor(key: str, shape, gen: torch.Generator) -> torch.Tensor:
    if key.endswith("norm1.weight") or key.endswith("norm2.weight") or key.endswith("norm.weight"):
        return torch.ones(shape)
    if key.endswith("gamma"):
        return torch.full(shape, 0.1)
    return torch.randn(shape, generator=gen) * 0.02


def official_container(state: dict, prefix: str = "module.") -> dict:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=6e-5, weight_decay=9.5e-9)
    return {
        "epoch_num": 5,
        "model_state_dict": {prefix + k: v for k, v in state.items()},
        "optimizer_state_dict": opt.state_dict(),
        "recalls": np.array([94.5, 97.4, 98.2]),
        "best_r5": np.float64(97.4),
        "not_improved_num": 0,
    }


def test_key_tables_have_spec_sizes():
    assert len(official_table("vitb14")) == 191 and len(official_table("vitl14")) == 359


def test_official_vitb_checkpoint_full_shapes_loads_strictly(tmp_path, gardens):
    gen = torch.Generator().manual_seed(0)
    state = {k: sane_tensor(k, s, gen) for k, s in official_table("vitb14").items()}
    path = tmp_path / "FoL_base.pth"
    torch.save(official_container(state), path)
    model = create("fol-vitb14", weights=path, image_size=224).eval()
    sd = model.state_dict()
    assert set(sd) == set(state)
    for k in (
        "backbone.model.blocks.11.mlp.fc2.weight",
        "upconv.weight",
        "aggregator.score.3.bias",
        "backbone.model.pos_embed",
    ):
        assert torch.equal(sd[k], state[k])
    assert "official FoL" in model.weights_source and model.preprocess.size == (224, 224)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert (
        "backbone.model.blocks.8.attn.qkv.weight" in trainable
        and "backbone.model.blocks.7.attn.qkv.weight" not in trainable
    )
    img, orig = load_tensor(gardens / "day_left" / "Image030.jpg", model.preprocess)
    with torch.no_grad():
        d = model(img[None])
    assert d.shape == (1, 8448) and torch.isfinite(d).all() and float(d.norm()) == pytest.approx(1.0, abs=1e-5)
    lf = model.local_features(img[None], [orig])[0]
    assert len(lf) == 225 and lf.descriptors.shape == (225, 128)


def test_official_vitl_key_table_strict_on_meta(tmp_path):
    """ViT-L: the full 359-key table with the real shapes, stored as stride-0 views of one value
    (a few KB on disk); the model is built on the meta device and the tensors are assigned."""
    state = {k: torch.zeros(1).expand(s) for k, s in official_table("vitl14").items()}
    path = tmp_path / "FoL_large.pth"
    torch.save(official_container(state), path)
    assert path.stat().st_size < 2_000_000
    model = create("fol-vitl14", weights=path)
    sd = model.state_dict()
    assert len(sd) == 359 and {k: tuple(v.shape) for k, v in sd.items()} == official_table("vitl14")
    assert model.preprocess.size == (504, 504) and model.descriptor_dim == 8448
    assert not any(p.is_meta for p in model.parameters())
    # a flat dict without the container and without the module. prefix loads too
    flat = tmp_path / "flat.pth"
    torch.save(state, flat)
    assert len(create("fol-vitl14", weights=flat).state_dict()) == 359
    # the same file refused by the ViT-B model, in one line
    with pytest.raises(
        WeightsError, match=r"^.*FoL_large.pth: checkpoint holds FoL ViT-L/14, not ViT-B/14; use --model fol-vitl14$"
    ):
        create("fol-vitb14", weights=path)


def test_official_loader_errors(tmp_path):
    table = official_table("vitl14")
    state = {k: torch.zeros(1).expand(s) for k, s in table.items()}
    missing = dict(state)
    del missing["upconv2.bias"]
    p = tmp_path / "missing.pth"
    torch.save(official_container(missing), p)
    with pytest.raises(
        WeightsError,
        match=r"missing.pth: not an official FoL ViT-L/14 checkpoint \(1 missing keys, "
        r"e\.g\. upconv2\.bias; 0 unexpected\)$",
    ):
        create("fol-vitl14", weights=p)
    extra = dict(state)
    extra["aggregator.dust_bin"] = torch.ones(())  # SALAD's learned dustbin: not in FoL
    p = tmp_path / "extra.pth"
    torch.save(official_container(extra), p)
    with pytest.raises(
        WeightsError,
        match=r"extra.pth: not an official FoL ViT-L/14 checkpoint \(0 missing keys; "
        r"1 unexpected, e\.g\. aggregator\.dust_bin\)$",
    ):
        create("fol-vitl14", weights=p)
    bad = dict(state)
    bad["upconv.weight"] = torch.zeros(1).expand(1024, 128, 3, 3)
    p = tmp_path / "shape.pth"
    torch.save(official_container(bad), p)
    with pytest.raises(
        WeightsError,
        match=r"shape.pth: upconv.weight has shape \(1024, 128, 3, 3\) in the checkpoint, "
        r"\(1024, 256, 3, 3\) in FoL ViT-L/14$",
    ):
        create("fol-vitl14", weights=p)
    p = tmp_path / "junk.pth"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"junk.pth: cannot read weights \(UnpicklingError"):
        create("fol-vitl14", weights=p)
    p = tmp_path / "other.pth"
    torch.save({"model_state_dict": {"module.fc.weight": torch.zeros(2, 2)}}, p)
    with pytest.raises(WeightsError, match=r"other.pth: not an official FoL ViT-L/14 checkpoint \(359 missing keys"):
        create("fol-vitl14", weights=p)


def test_default_official_weights_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PLACERANK_WEIGHTS", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import placerank.models.weights as w

    monkeypatch.setattr(w, "_REPO_ROOT", tmp_path)
    with pytest.raises(
        WeightsError,
        match=r"^FoL ViT-L/14 \(official FoL_large.pth\) weights not found: put "
        r"FoL_large.pth in \$PLACERANK_WEIGHTS \(or \.\./shared/weights\) or pass --weights PATH$",
    ):
        create("fol-vitl14")


def test_placerank_checkpoint_roundtrip_with_overrides(tmp_path):
    from placerank.models.checkpoints import save_placerank_checkpoint

    torch.manual_seed(0)
    model = create("fol-effnet-lite0", image_size=(128, 224), num_regions=100)
    path = tmp_path / "model.pt"
    save_placerank_checkpoint(
        model, path, {"image_size": [128, 224], "num_regions": 100, "local_mode": "center", "train_blocks": 4}
    )
    back = create("fol-effnet-lite0", weights=path)
    assert back.weights_id == model.weights_id and back.cfg.num_regions == 100 and back.preprocess.size == (128, 224)
    again = create("fol-effnet-lite0", weights=path, image_size=(360, 640), local_mode="pool3")
    assert again.preprocess.size == (360, 640) and again.cfg.local_mode == "pool3" and again.cfg.num_regions == 100
    assert again.weights_id == model.weights_id
    with pytest.raises(WeightsError, match=r"model.pt: checkpoint is for model 'fol-effnet-lite0', not 'fol-vitb14'$"):
        create("fol-vitb14", weights=path)
