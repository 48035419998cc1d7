"""Model registry, backbones, aggregators and weight loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import placerank.models as models
from placerank.data.images import load_tensor
from placerank.errors import PlaceRankError, WeightsError
from placerank.models.backbones import DinoV2Backbone
from placerank.models.gem import gem


def test_registry_lists_baselines():
    names = {e.name for e in models.list_models()}
    assert {"effnet-lite0-gem", "effnet-lite0-netvlad", "dinov2-vitl14-gem", "dinov2-vits14-gem"} <= names


def test_unknown_model_error():
    with pytest.raises(PlaceRankError, match=r"^unknown model 'nope'; known models: .*effnet-lite0-gem"):
        models.create("nope")


def test_default_model_descriptor_is_unit_float32(gardens):
    m = models.create("effnet-lite0-gem").eval()
    assert m.descriptor_dim == 1280 and m.preprocess.size == (360, 640)
    x = torch.stack([load_tensor(gardens / "day_right" / f"Image{i:03d}.jpg", m.preprocess)[0] for i in (0, 1, 80)])
    with torch.no_grad():
        d = m(x)
    assert d.dtype == torch.float32 and d.shape == (3, 1280)
    np.testing.assert_allclose(d.norm(dim=1).numpy(), 1.0, atol=1e-5)
    sim = (d @ d.T).numpy()
    assert sim[0, 1] > sim[0, 2]  # neighbouring frames are more alike than distant ones


def test_missing_weights_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PLACERANK_WEIGHTS", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import placerank.models.weights as w

    monkeypatch.setattr(w, "_REPO_ROOT", tmp_path / "repo")
    with pytest.raises(WeightsError) as e:
        models.create("effnet-lite0-gem")
    assert str(e.value) == (
        "EfficientNet-Lite0 ImageNet weights not found: put efficientnet_lite0_in1k_timm.safetensors "
        "in $PLACERANK_WEIGHTS (or ../shared/weights) or pass --weights PATH"
    )


def test_mismatched_weights_file_is_refused(shared_weights):
    with pytest.raises(
        WeightsError, match=r"xfeat.pt: weights do not fit tf_efficientnet_lite0 in timm layout \(missing "
    ):
        models.create("effnet-lite0-gem", weights=shared_weights / "xfeat.pt")


def test_gem_hand_checked():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    p = torch.tensor([3.0])
    expected = ((1 + 8 + 27 + 64) / 4) ** (1 / 3)
    assert gem(x, p).item() == pytest.approx(expected, rel=1e-6)


def test_dinov2_meta_checkpoint_strict_roundtrip(tmp_path):
    """A ViT-S/14 checkpoint in Meta's exact key layout loads strictly and reproduces outputs."""
    src = DinoV2Backbone("vits14")
    sd = src.state_dict()
    assert "mask_token" in sd and "blocks.11.ls2.gamma" in sd and sd["pos_embed"].shape == (1, 1370, 384)
    torch.save(sd, tmp_path / "dinov2_vits14_pretrain.pth")
    m = models.create("dinov2-vits14-gem", weights=tmp_path / "dinov2_vits14_pretrain.pth").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(src(x).feature_map, dim=1)
        assert torch.allclose(m.backbone(x).feature_map, src(x).feature_map)
    sd.pop("blocks.3.mlp.fc1.weight")
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(
        WeightsError, match=r"broken.pth: weights do not fit DINOv2 vits14 \(missing blocks.3.mlp.fc1.weight\)$"
    ):
        models.create("dinov2-vits14-gem", weights=tmp_path / "broken.pth")
    assert ref.shape == (1, 384, 16, 16)


def test_dinov2_position_embedding_uses_dinov2_rule():
    bb = DinoV2Backbone("vits14")
    pos = bb.interpolate_pos_encoding(16, 16)
    grid = bb.pos_embed[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic", antialias=False)
    assert torch.allclose(pos[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 256, -1))
    assert torch.equal(pos[:, :1], bb.pos_embed[:, :1])


def test_packaged_lite0_converts_to_the_shared_file(shared_weights):
    from safetensors.torch import load_file

    from placerank.models.effnet_packages import packaged_effnet_weights

    a = load_file(str(packaged_effnet_weights("tf_efficientnet_lite0")))
    b = load_file(str(shared_weights / "efficientnet_lite0_in1k_timm.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


def test_netvlad_kmeans_init_from_real_features(gardens):
    m = models.create("effnet-lite0-netvlad", image_size=(192, 320)).eval()
    assert m.needs_data_init
    paths = sorted((gardens / "day_left").glob("*.jpg"))[:24]
    m.init_from_images(paths, per_image=40)
    assert not m.needs_data_init and m.aggregator.alpha > 0
    x = torch.stack([load_tensor(p, m.preprocess)[0] for p in paths[:2]])
    with torch.no_grad():
        d = m(x)
    assert d.shape == (2, 64 * 320)
    np.testing.assert_allclose(d.norm(dim=1).numpy(), 1.0, atol=1e-5)
    # assignment weights are alpha * unit centroids
    w = m.aggregator.conv.weight[:, :, 0, 0]
    np.testing.assert_allclose(w.norm(dim=1).detach().numpy(), m.aggregator.alpha, rtol=1e-4)
