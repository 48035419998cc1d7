"""``VPRModel.encode``: the global descriptor and the model's own local features from ONE backbone
pass (FoL, SelaVPR), equal to the separate global forward and the separate local pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from placerank.data.images import load_tensor
from placerank.errors import PlaceRankError
from placerank.models import create
from placerank.models.local_head import grid_positions

pytestmark = pytest.mark.usefixtures("single_thread")


def _batch(gardens, preprocess):
    items = [load_tensor(gardens / side / "Image012.jpg", preprocess) for side in ("day_left", "night_right")]
    return torch.stack([x for x, _ in items]), [size for _, size in items]


def _count_backbone_calls(model) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    model.backbone.register_forward_hook(hook)
    return calls


def _fol_reference(model, images, sizes, mode, num_regions):
    """The separate local pass as the re-ranker ran it before ``encode``: its own backbone
    forward, the inference region sets and the cell -> original pixel mapping."""
    with torch.no_grad():
        out = model.run(images, local_map=mode != "center")
        sets = model.region_sets(out, training=False, mode=mode, num_regions=num_regions)
    stride = float(model.backbone.stride)
    in_h, in_w = images.shape[-2:]
    ref = []
    for (oh, ow), rs in zip(sizes, sets):
        cells = rs.cells.float()
        ys = ((cells[:, 0] / 4 * stride + stride / 2) * (oh / in_h)).clamp(0, oh - 1)
        xs = ((cells[:, 1] / 4 * stride + stride / 2) * (ow / in_w)).clamp(0, ow - 1)
        ref.append((torch.stack([xs, ys], 1).numpy(), rs.descriptors.numpy(), rs.scores.numpy()))
    return ref


@pytest.mark.parametrize(
    "name,size", [("fol-effnet-lite0", (128, 224)), ("fol-vits14", (112, 224))], ids=["effnet", "vit"]
)
def test_fol_encode_is_one_pass_equal_to_forward_and_local_pass(gardens, name, size):
    torch.manual_seed(0)
    model = create(name, image_size=size, pretrained=name.endswith("lite0")).eval()
    assert model.has_local_head
    images, sizes = _batch(gardens, model.preprocess)
    with torch.no_grad():
        forward = model(images)
    calls = _count_backbone_calls(model)
    for options in ({}, {"mode": "center"}, {"mode": "dense", "num_regions": 30}, {"mode": "pool3", "num_regions": 50}):
        calls[0] = 0
        g, local = model.encode(images, sizes, local_options=options)
        assert calls[0] == 1, options
        assert torch.equal(g, forward)
        mode = options.get("mode", model.cfg.local_mode)
        ref = _fol_reference(model, images, sizes, mode, options.get("num_regions"))
        assert local is not None and len(local) == 2
        for lf, (kp, desc, scores), (h, w) in zip(local, ref, sizes):
            assert lf.image_size == (h, w) and len(lf) == len(kp) > 0
            np.testing.assert_allclose(lf.keypoints, kp, atol=1e-6)
            np.testing.assert_allclose(lf.descriptors, desc, atol=1e-6)
            np.testing.assert_allclose(lf.scores, scores, atol=1e-6)
        # the old entry point gives the same sets
        old = model.local_features(images, sizes, mode=options.get("mode"), num_regions=options.get("num_regions"))
        assert all(np.array_equal(a.descriptors, b.descriptors) for a, b in zip(old, local))
    calls[0] = 0
    g, none = model.encode(images, sizes)
    assert none is None and calls[0] == 1 and torch.equal(g, forward)
    with pytest.raises(PlaceRankError, match=r"^unknown FoL local option 'radius'; known: mode, num_regions$"):
        model.encode(images, sizes, local_options={"radius": 3})


@pytest.mark.parametrize(
    "name,size", [("selavpr-effnet-lite0", (128, 224)), ("selavpr-vits14", (112, 224))], ids=["effnet", "vit"]
)
def test_selavpr_encode_is_one_pass_equal_to_forward_and_local_pass(gardens, name, size):
    torch.manual_seed(0)
    model = create(name, image_size=size, pretrained=name.endswith("lite0")).eval()
    with torch.no_grad():
        model.LocalAdapt.upconv2.bias.normal_(0, 0.1)  # a non-trivial head
    assert model.has_local_head
    images, sizes = _batch(gardens, model.preprocess)
    with torch.no_grad():
        forward = model(images)
        dense = model.LocalAdapt(model.backbone(images).feature_map)  # the separate local pass
    calls = _count_backbone_calls(model)
    g, local = model.encode(images, sizes, local_options={})
    assert calls[0] == 1
    assert torch.allclose(g, forward, atol=1e-6)
    B, C, gh, gw = dense.shape
    assert local is not None and len(local) == B
    for b, lf in enumerate(local):
        h, w = sizes[b]
        kp = grid_positions(gh, gw, float(model.backbone.stride), (h, w), tuple(images.shape[-2:])).numpy()
        kp[:, 0], kp[:, 1] = kp[:, 0].clip(0, w - 1), kp[:, 1].clip(0, h - 1)
        np.testing.assert_allclose(lf.keypoints, kp, atol=1e-6)
        np.testing.assert_allclose(lf.descriptors, dense[b].reshape(C, -1).t().numpy(), atol=1e-6)
        assert lf.image_size == (h, w)
        assert np.allclose(np.linalg.norm(lf.descriptors, axis=1), 1.0, atol=1e-5)
    old = model.local_features(images, sizes)
    assert all(np.array_equal(a.descriptors, b.descriptors) for a, b in zip(old, local))
    with pytest.raises(PlaceRankError, match=r"^unknown SelaVPR local option 'mode'; known: none$"):
        model.encode(images, sizes, local_options={"mode": "pool3"})


def test_models_without_local_head_refuse_local_options(gardens):
    model = create("effnet-lite0-gem", image_size=(128, 224)).eval()
    images, sizes = _batch(gardens, model.preprocess)
    assert not model.has_local_head
    with torch.no_grad():
        g, none = model.encode(images, sizes)
        assert none is None and torch.equal(g, model(images))
    with pytest.raises(PlaceRankError, match=r"^model 'effnet-lite0-gem' has no local head$"):
        model.encode(images, sizes, local_options={})
