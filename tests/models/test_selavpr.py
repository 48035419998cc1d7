"""SelaVPR model: shapes, adapter placement, zero-init exactness, freezing, parameter counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from placerank.data.images import load_tensor
from placerank.models import create
from placerank.models.backbones import DinoV2Backbone
from placerank.models.selavpr import SelaVPRModel, _build_vit
from placerank.models.selavpr_backbones import SelaEffNetBackbone, SelaViTBackbone

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def vits():
    torch.manual_seed(0)
    return create("selavpr-vits14", pretrained=False).eval()


@pytest.fixture(scope="module")
def effnet():
    return create("selavpr-effnet-lite0").eval()


def test_vit_shapes_and_keypoints(vits):
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        g, dense = vits.forward_train(x)
        g2 = vits(x[:1])
    assert g.shape == (2, 384) and dense.shape == (2, 128, 61, 61)
    assert torch.allclose(g[:1], g2, atol=1e-5)
    assert torch.allclose(g.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(dense.norm(dim=1), torch.ones(2, 61, 61), atol=1e-5)
    with torch.no_grad():
        lfs = vits.local_features(x, [(224, 448), (448, 224)])
    assert len(lfs[0]) == 61 * 61 and lfs[0].descriptors.shape == (3721, 128)
    # cell (u, v) sits at (3.5 v + 7, 3.5 u + 7) in the 224 px input, scaled to the original.
    assert np.allclose(lfs[0].keypoints[0], [7 * 2, 7])
    assert np.allclose(lfs[0].keypoints[-1], [(3.5 * 60 + 7) * 2, 3.5 * 60 + 7])
    assert np.allclose(lfs[1].keypoints[-1], [3.5 * 60 + 7, (3.5 * 60 + 7) * 2])
    assert lfs[1].image_size == (448, 224)
    assert vits.grid_size((224, 224)) == (61, 61) and vits.grid_size((322, 322)) == (89, 89)


def test_vit_zero_init_is_exactly_dinov2(vits):
    torch.manual_seed(1)
    plain = DinoV2Backbone("vits14").eval()
    adapted = SelaViTBackbone("vits14").eval()
    adapted.load_meta_checkpoint(plain.state_dict())  # same frozen weights, adapters at init
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        a, b = plain(x).feature_map, adapted(x).feature_map
    assert torch.equal(a, b)
    # ...and the adapters are really on the path: a non-zero D_fc2 changes the output.
    with torch.no_grad():
        adapted.blocks[5].adapter1.D_fc2.bias.fill_(0.1)
        assert not torch.allclose(adapted(x).feature_map, a)


def test_vit_adapters_inside_layerscale_and_parallel_scale():
    torch.manual_seed(2)
    bb = SelaViTBackbone("vits14").eval()
    blk = bb.blocks[0]
    x = torch.randn(1, 5, 384)
    c = torch.randn(384)
    with torch.no_grad():
        blk.ls1.gamma.copy_(torch.rand(384) + 0.5)
        blk.ls2.gamma.copy_(torch.rand(384) + 0.5)
        base = blk(x)
        # Parallel adapter outputting the constant c: block output moves by ls2 * 0.2 * c.
        blk.adapter2.D_fc2.bias.copy_(c)
        moved = blk(x)
        assert torch.allclose(moved - base, blk.ls2.gamma * 0.2 * c, atol=1e-5)
        blk.adapter2.D_fc2.bias.zero_()
        # Serial adapter: with the MLP silenced, the block output moves by ls1 * c.
        blk.mlp.fc2.weight.zero_()
        blk.mlp.fc2.bias.zero_()
        base = blk(x)
        blk.adapter1.D_fc2.bias.copy_(c)
        assert torch.allclose(blk(x) - base, blk.ls1.gamma * c, atol=1e-5)


def test_vit_freezing_and_vitl_parameter_counts():
    with torch.device("meta"):
        m = _build_vit("selavpr-vitl14", "vitl14", None)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in m.parameters() if not p.requires_grad)
    # Spec §2.6: 304,368,640 frozen DINOv2 parameters; 48 adapters (50,405,376) + LocalAdapt
    # (2,654,592) + GeM p trainable.
    assert frozen == 304_368_640
    assert trainable == 50_405_376 + 2_654_592 + 1
    assert all(("adapter" in n) or not n.startswith("backbone.") for n, p in m.named_parameters() if p.requires_grad)


def test_effnet_shapes_zero_init_and_prefix(effnet, gardens):
    x, _ = load_tensor(gardens / "day_right" / "Image010.jpg", effnet.preprocess)
    x = x[None]
    with torch.no_grad():
        g, dense = effnet.forward_train(x)
        plain = effnet.backbone.net.forward_features(x)  # the frozen ImageNet network
        adapted = effnet.backbone(x).feature_map
        split = effnet.backbone.forward_from_prefix(effnet.backbone.forward_prefix(x)).feature_map
    assert g.shape == (1, 1280) and dense.shape == (1, 128, 45, 77)
    assert effnet.grid_size() == (45, 77)
    assert torch.equal(adapted, plain)
    assert torch.equal(split, adapted)
    lf = effnet.local_features(x, [(540, 960)])[0]
    assert lf.descriptors.shape == (45 * 77, 128)
    assert np.allclose(lf.keypoints[0], [16 * 1.5, 16 * 1.5])  # stride-32 cell centre, 640->960 px
    # 12 rows of 32 px overhang a 360 px input: the last row's centre is clipped to the image.
    assert float(lf.keypoints[:, 0].max()) == pytest.approx((16 + 32 * 19) * 1.5)
    assert float(lf.keypoints[:, 1].max()) == 539.0


def test_effnet_frozen_batchnorm_stays_in_eval(effnet):
    m = create("selavpr-effnet-lite0", image_size=(96, 160))
    m.train()
    bn = m.backbone.net.bn2
    before = bn.running_mean.clone()
    m.forward_train(torch.randn(2, 3, 96, 160))
    assert not bn.training and torch.equal(bn.running_mean, before)
    assert m.LocalAdapt.training  # the heads do switch to train mode
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names and all(n.startswith(("backbone.adapters.", "aggregator.", "LocalAdapt.")) for n in names)
    assert isinstance(m, SelaVPRModel) and isinstance(m.backbone, SelaEffNetBackbone)
