"""FoL model: optimal transport, region maps, aggregator layout, local sets (spec fol.md §2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from placerank.data.images import load_tensor
from placerank.errors import WeightsError
from placerank.models import create
from placerank.models.base import BackboneOutput
from placerank.models.fol_aggregator import FoLAggregator, FoLConfig, clip_softmax, sinkhorn_log
from placerank.models.fol_backbones import FoLViTBackbone
from placerank.models.fol_factories import build_fol_cnn, build_fol_vit


def test_sinkhorn_hand_solution_and_marginals():
    # Zero scores and dustbin: the plan is 1/N for every cluster entry and (N-K)/N for the dustbin.
    K, N = 2, 5
    P = sinkhorn_log(torch.zeros(1, K, N), torch.zeros(1, N), iters=3).exp()[0]
    assert torch.allclose(P[:K], torch.full((K, N), 1 / N), atol=1e-6)
    assert torch.allclose(P[K], torch.full((N,), (N - K) / N), atol=1e-6)
    # Random logits: every column of the full plan sums to exactly 1, cluster rows to ~1.
    torch.manual_seed(0)
    P = sinkhorn_log(torch.randn(3, 64, 300), torch.rand(3, 300), iters=3).exp()
    assert torch.allclose(P.sum(dim=1), torch.ones(3, 300), atol=1e-5)
    assert torch.allclose(P[:, :64].sum(dim=2), torch.ones(3, 64), atol=0.05)
    with pytest.raises(
        WeightsError, match="^FoL's optimal transport needs more patches than clusters: 40 patches, 64 clusters"
    ):
        sinkhorn_log(torch.zeros(1, 64, 40), torch.zeros(1, 40))


def test_clip_softmax_hand_value():
    v = torch.arange(20, dtype=torch.float32).flip(0)[None]  # 19, 18, ..., 0
    out = clip_softmax(v)
    # q = value at position floor(0.05 * 20) = 1 of the descending sort = 18; the top 3 become 18.
    clipped = torch.tensor([18.0, 18.0, 18.0] + list(range(16, -1, -1)))[None]
    assert torch.allclose(out, clipped.softmax(dim=1))
    assert out.sum().item() == pytest.approx(1.0)


def test_aggregator_layout_channel_major_and_attention_dustbin():
    torch.manual_seed(0)
    cfg = FoLConfig()
    agg = FoLAggregator(32, cfg, "vit").eval()
    keys = sorted(agg.state_dict())
    assert keys == sorted(
        f"{b}.{i}.{p}"
        for b, idx in (("token_features", (0, 2)), ("cluster_features", (0, 3)), ("score", (0, 3)))
        for i in idx
        for p in ("weight", "bias")
    )
    fmap = torch.randn(2, 32, 10, 12)
    attn = 0.01 + torch.rand(2, 120) * 0.05
    attn[:, :10] = 0.005  # below the 0.01 threshold -> Ã = 0
    out = agg.assign(BackboneOutput(fmap, cls_token=torch.randn(2, 32), attention=attn))
    assert out.descriptor.shape == (2, 8448)
    assert torch.allclose(out.descriptor.norm(dim=1), torch.ones(2))
    assert torch.all(out.attention_thr[:, :10] == 0) and torch.equal(out.attention_thr[:, 10:], attn[:, 10:])
    # re-derive the descriptor by hand: V[c, k] = sum_i P[k, i] f[c, i]; flatten index c * 64 + k
    with torch.no_grad():
        f = agg.cluster_features(fmap).flatten(2)
        s = agg.score(fmap).flatten(2)
        P = sinkhorn_log(s, 1 - out.attention_thr, 3)[:, :64].exp()
        assert torch.allclose(P, out.plan, atol=1e-6)
        V = torch.zeros(2, 128, 64)
        for k in range(64):
            V[:, :, k] = (f * P[:, k : k + 1, :]).sum(-1)
        V = F.normalize(V, dim=1).reshape(2, -1)
    assert torch.allclose(
        out.descriptor[:, 256:] / out.descriptor[:, 256:].norm(dim=1, keepdim=True),
        V / V.norm(dim=1, keepdim=True),
        atol=1e-5,
    )
    assert torch.allclose(out.keep_mass, out.plan.sum(1) / 64)
    # the region score at inference is Mᵃ only and ranks like the keep-mass (clip + softmax keep order)
    top = out.region_score(training=False).topk(20, dim=1).indices.sort(1).values
    assert torch.equal(top, out.keep_mass.topk(20, dim=1).indices.sort(1).values)


def test_vit_split_forward_equals_plain_dinov2_forward():
    torch.manual_seed(0)
    bb = FoLViTBackbone("vits14", train_blocks=4).eval()
    x = torch.randn(1, 3, 112, 140)
    with torch.no_grad():
        ours = bb(x)
        ref = bb.model(x, return_attention=True)
    assert torch.allclose(ours.feature_map, ref.feature_map, atol=1e-5)
    assert torch.allclose(ours.attention, ref.attention, atol=1e-6)
    assert ours.attention.shape == (1, 80) and float(ours.attention.sum()) <= 6.0 + 1e-4  # summed over 6 heads
    trainable = {
        ".".join(n.split(".")[:2]) if n.startswith("blocks") else n.split(".")[0]
        for n, p in bb.model.named_parameters()
        if p.requires_grad
    }
    assert trainable == {"blocks.8", "blocks.9", "blocks.10", "blocks.11", "norm"}


def test_vitl14_parameter_counts_match_spec():
    with torch.device("meta"):
        m = build_fol_vit("vitl14")
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable == pytest.approx(54.9e6, rel=0.005)  # spec §2.7: 4 blocks + aggregator + upconvs
    assert sum(p.numel() for p in m.aggregator.parameters()) == 1_804_224
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(309e6, rel=0.01)
    assert m.descriptor_dim == 8448 and m.preprocess.size == (504, 504)
    assert tuple(m.state_dict()["upconv.weight"].shape) == (1024, 256, 3, 3)


def test_center_features_equal_dense_map_cells(gardens):
    torch.manual_seed(0)
    model = build_fol_cnn(pretrained=True, image_size=(128, 224)).eval()
    img, _ = load_tensor(gardens / "day_left" / "Image005.jpg", model.preprocess)
    with torch.no_grad():
        out = model.run(img[None], local_map=True)
        center = model.region_sets(out, training=False, mode="center")[0]
        L = out.local_map[0]
        dense_at = F.normalize(L[:, center.cells[:, 0], center.cells[:, 1]].t(), dim=1)
    assert torch.allclose(center.descriptors, dense_at, atol=1e-5)
    assert out.grid == (8, 14) and L.shape[-2:] == (29, 53)
    assert len(center.descriptors) == 112  # 225 asked, only 8 x 14 patches exist
    pool = model.region_sets(out, training=False, mode="pool3", num_regions=30)[0]
    assert len(pool.descriptors) == 30 and torch.allclose(pool.descriptors.norm(dim=1), torch.ones(30))


@pytest.fixture(scope="module")
def vits_dense():
    torch.manual_seed(0)
    return create("fol-vits14", pretrained=False, local_mode="dense").eval()


@pytest.mark.parametrize("size", [(224, 224), (224, 308)])
def test_variable_length_sets_at_any_resolution(gardens, vits_dense, size):
    """The official code pads to T=1000 at 224 px and crashes (issue #10); here the dense set has
    its real length and a position per feature."""
    model = vits_dense
    img, orig = load_tensor(gardens / "day_right" / "Image020.jpg", model.preprocess.with_size(size))
    lf = model.local_features(img[None], [orig])[0]
    h, w = size[0] // 14, size[1] // 14
    Hl, Wl = 4 * h - 3, 4 * w - 3
    src_r = np.arange(Hl) * h // Hl
    src_c = np.arange(Wl) * w // Wl
    cells_per_patch = np.bincount((src_r[:, None] * w + src_c[None, :]).ravel(), minlength=h * w)
    assert len(lf) == lf.descriptors.shape[0] == lf.keypoints.shape[0] == lf.scores.shape[0]
    assert np.allclose(np.linalg.norm(lf.descriptors, axis=1), 1.0, atol=1e-5)
    assert lf.image_size == orig == (540, 960)
    assert (lf.keypoints[:, 0] >= 0).all() and (lf.keypoints[:, 0] < 960).all()
    assert (lf.keypoints[:, 1] >= 0).all() and (lf.keypoints[:, 1] < 540).all()
    center = model.local_features(img[None], [orig], mode="center")[0]
    assert len(center) == 225
    # centre keypoints are patch centres: x = (14 c + 7) * 960 / W, y = (14 r + 7) * 540 / H
    cols = (center.keypoints[:, 0] / (960 / size[1]) - 7) / 14
    rows = (center.keypoints[:, 1] / (540 / size[0]) - 7) / 14
    assert np.allclose(cols, np.round(cols), atol=1e-3) and np.allclose(rows, np.round(rows), atol=1e-3)
    patches = np.round(rows).astype(int) * w + np.round(cols).astype(int)
    # the dense set is exactly the up-conv cells whose nearest patch is one of those 225
    assert len(lf) == int(cells_per_patch[patches].sum())
    if size == (224, 224):
        assert len(lf) > 1000  # more than the official pad length T=1000 at this size


def test_effnet_model_shapes_and_registry(gardens):
    model = create("fol-effnet-lite0").eval()
    assert model.preprocess.size == (360, 640) and model.descriptor_dim == 8448
    assert "efficientnet_lite0_in1k_timm.safetensors" in model.weights_source
    keys = model.state_dict().keys()
    assert {"upconv.weight", "upconv.bias", "upconv2.weight", "upconv2.bias"} <= set(keys)
    assert "aggregator.dustbin_head.weight" in keys
    assert not any("conv_head" in k or ".blocks.5." in k for k in keys)  # unused stride-32 tail dropped
    img, orig = load_tensor(gardens / "night_right" / "Image050.jpg", model.preprocess)
    with torch.no_grad():
        out = model.run(img[None])
    assert out.grid == (23, 40)  # stride 16 at 360 x 640: 920 patches, 225 of them form the region
    lf = model.local_features(img[None], [orig])[0]
    assert len(lf) == 225 and lf.descriptors.shape == (225, 128)
    assert lf.image_size == (360, 640) == orig
    assert (lf.keypoints >= 0).all() and (lf.keypoints[:, 0] <= 639).all() and (lf.keypoints[:, 1] <= 359).all()
    # CNN counterpart of the attention: a learned head, constant 0.15 at init (a SALAD-like scalar dustbin)
    assert torch.allclose(out.attention, torch.full_like(out.attention, 0.15), atol=1e-6)
    with pytest.raises(WeightsError, match="^unknown FoL local_mode 'sparse' \\(known: center, pool3, dense\\)$"):
        create("fol-effnet-lite0", local_mode="sparse")
    with pytest.raises(WeightsError, match="^DINOv2 input size must be a multiple of 14 px, got 100x100$"):
        create("fol-vits14", pretrained=False, image_size=100)


def test_pooled_cells_equal_dense_pooling():
    torch.manual_seed(0)
    model = build_fol_cnn(pretrained=False, image_size=(128, 224)).eval()
    fmap = torch.randn(2, model.backbone.out_channels, 8, 14)
    with torch.no_grad():
        P = F.avg_pool2d(F.normalize(model._head(fmap, normalize=False), dim=1), 3, 1, 1, count_include_pad=False)
        b = torch.tensor([0, 1, 0, 1, 0, 1, 0])
        r = torch.tensor([0, 1, 13, 14, 28, 27, 5])
        c = torch.tensor([0, 52, 51, 9, 10, 2, 3])
        assert torch.allclose(model.pooled_cells(fmap, b, r, c), P[b, :, r, c], atol=1e-6)


def test_official_backbones_default_to_the_official_dense_cells():
    """`placerank eval --model fol-vitl14 --weights FoL_large.pth --rerank fol-region` re-ranks the
    official cell set (every up-conv cell of the top-225 patches); the CNN keeps pool3."""
    from placerank.rerank.fol_region import FoLRegionReranker

    with torch.device("meta"):
        vitl = create("fol-vitl14", pretrained=False)
    assert vitl.cfg.local_mode == "dense" and vitl.cfg.num_regions == 225
    assert FoLRegionReranker(vitl).mode == "dense" and FoLRegionReranker(vitl).min_matches == 0
    assert create("fol-effnet-lite0", pretrained=False).cfg.local_mode == "pool3"
    assert create("fol-vits14", pretrained=False, local_mode="pool3").cfg.local_mode == "pool3"
