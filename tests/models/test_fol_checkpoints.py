"""Official FoL checkpoints (FoL_base.pth / FoL_large.pth, spec fol.md §7) and placerank ones.

The key tables below are read from the spec's table, independently of the model code; the
checkpoints are generated in exactly the official container: a dict with ``model_state_dict``
(DataParallel ``module.`` prefix, full DINOv2 inside) plus the training-time keys.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from placerank.data.images import load_tensor
from placerank.errors import WeightsError
from placerank.models import create

ARCH = {"vitb14": (768, 12), "vitl14": (1024, 24)}


@pytest.fixture(scope="module")
def tables(shared_data) -> dict[str, dict[str, tuple[int, ...]]]:
    spec = shared_data.parent / "docs" / "methods" / "fol.md"
    assert spec.is_file(), f"FoL spec missing: {spec}"
    text = spec.read_text(encoding="utf-8")
    return {arch: official_table(arch, text) for arch in ARCH}


def official_table(arch: str, text: str) -> dict[str, tuple[int, ...]]:
    """The official key -> shape layout, read from the spec's §7 "Key layout" table (so a wrong
    key map in the loader or the model fails here, not just a table checked against itself)."""
    C, depth = ARCH[arch]
    side = 0 if arch == "vitl14" else 1  # shape columns read "ViT-L / ViT-B"
    section = text[text.index("**Key layout**") : text.index("**Mapping to timm")]
    table: dict[str, tuple[int, ...]] = {}
    prefix = ""
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        shapes = re.sub(r"\(.*?\)|\*", "", cells[1]).strip()
        if " / " in shapes:
            shapes = shapes.split(" / ")[side]
        shape_list = [_shape(x, C) for x in shapes.split(", ")]
        for pattern in re.findall(r"`([^`]+)`", cells[0]):
            if ".blocks." in pattern:
                prefix = pattern[: pattern.index(".blocks.")] + ".blocks.{i}."
                pattern = prefix + pattern.split("}.", 1)[1]
            elif pattern.startswith("…."):
                pattern = prefix + pattern[2:]
            names = _expand_braces(pattern)
            if len(shape_list) == 1:
                shape_list = shape_list * len(names)
            for name, shape in zip(names, shape_list, strict=True):
                for i in range(depth) if "{i}" in name else [None]:
                    table[name.replace("{i}", str(i))] = shape
    return table


def _shape(text: str, C: int) -> tuple[int, ...]:
    dims = []
    for d in text.replace("×", "x").split("x"):
        d = d.strip()
        dims.append(C * int(d[:-1] or 1) if d.endswith("C") else int(d))
    return tuple(dims)


def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{(\w+(?:,\w+)+)\}", pattern)
    if not m:
        return [pattern]
    return [pattern[: m.start()] + opt + pattern[m.end() :] for opt in m.group(1).split(",")]


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


def test_spec_key_layout_matches_the_model_and_dinov2(tables):
    """The layout read from the spec has the spec's totals, equals the model's own state dict key
    for key and shape for shape, and its backbone part is timm's DINOv2 (an independent
    implementation) after the spec's mapping: strip ``backbone.model.``, drop ``mask_token``."""
    import timm

    for arch, total, timm_name in (
        ("vitb14", 191, "vit_base_patch14_dinov2"),
        ("vitl14", 359, "vit_large_patch14_dinov2"),
    ):
        table = tables[arch]
        assert len(table) == total
        assert table["upconv.weight"] == (ARCH[arch][0], 256, 3, 3) and table["aggregator.score.3.weight"] == (
            64,
            512,
            1,
            1,
        )
        with torch.device("meta"):
            model = create(f"fol-{arch}", pretrained=False)
            dino = timm.create_model(timm_name, pretrained=False, num_classes=0)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == table
        backbone = {
            k[len("backbone.model.") :]: v
            for k, v in table.items()
            if k.startswith("backbone.model.") and not k.endswith("mask_token")
        }
        theirs = {k: tuple(v.shape) for k, v in dino.state_dict().items()}
        assert backbone == theirs


def test_official_vitb_checkpoint_full_shapes_loads_strictly(tmp_path, gardens, tables):
    gen = torch.Generator().manual_seed(0)
    state = {k: sane_tensor(k, s, gen) for k, s in tables["vitb14"].items()}
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
    lf = model.local_features(img[None], [orig])[0]  # the official set by default: every region cell
    assert model.cfg.local_mode == "dense" and 9 * 225 <= len(lf) <= 16 * 225 and lf.descriptors.shape[1] == 128
    assert len(model.local_features(img[None], [orig], mode="pool3")[0]) == 225


def test_official_vitl_key_table_strict_on_meta(tmp_path, tables):
    """ViT-L: the full 359-key table with the real shapes, stored as stride-0 views of one value
    (a few KB on disk); the model is built on the meta device and the tensors are assigned."""
    state = {k: torch.zeros(1).expand(s) for k, s in tables["vitl14"].items()}
    path = tmp_path / "FoL_large.pth"
    torch.save(official_container(state), path)
    assert path.stat().st_size < 2_000_000
    model = create("fol-vitl14", weights=path)
    sd = model.state_dict()
    assert len(sd) == 359 and {k: tuple(v.shape) for k, v in sd.items()} == tables["vitl14"]
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


def test_official_loader_errors(tmp_path, tables):
    table = tables["vitl14"]
    state = {k: torch.zeros(1).expand(s) for k, s in table.items()}
    missing = dict(state)
    del missing["upconv2.bias"]
    p = tmp_path / "missing.pth"
    torch.save(official_container(missing), p)
    with pytest.raises(
        WeightsError,
        match=r"missing.pth: weights do not fit FoL ViT-L/14 \(missing upconv2\.bias\)$",
    ):
        create("fol-vitl14", weights=p)
    extra = dict(state)
    extra["aggregator.dust_bin"] = torch.ones(())  # SALAD's learned dustbin: not in FoL
    p = tmp_path / "extra.pth"
    torch.save(official_container(extra), p)
    with pytest.raises(
        WeightsError,
        match=r"extra.pth: weights do not fit FoL ViT-L/14 \(unexpected aggregator\.dust_bin\)$",
    ):
        create("fol-vitl14", weights=p)
    bad = dict(state)
    bad["upconv.weight"] = torch.zeros(1).expand(1024, 128, 3, 3)
    p = tmp_path / "shape.pth"
    torch.save(official_container(bad), p)
    with pytest.raises(
        WeightsError,
        match=r"shape.pth: weights do not fit FoL ViT-L/14 \(upconv.weight is \(1024, 128, 3, 3\) in the file "
        r"but \(1024, 256, 3, 3\) in the model\)$",
    ):
        create("fol-vitl14", weights=p)
    p = tmp_path / "junk.pth"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"junk.pth: cannot read weights \(UnpicklingError"):
        create("fol-vitl14", weights=p)
    p = tmp_path / "other.pth"
    torch.save({"model_state_dict": {"module.fc.weight": torch.zeros(2, 2)}}, p)
    with pytest.raises(
        WeightsError,
        match=r"other.pth: weights do not fit FoL ViT-L/14 \(missing .* and 356 more; unexpected fc.weight\)$",
    ):
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
