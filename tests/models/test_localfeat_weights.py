"""Strict loading of the shipped local-feature weights, and one-line WeightsErrors for files
that do not fit (another network's file, a missing or reshaped tensor, a wrong container, bytes
that are not a checkpoint). Also the XFeat port's pieces checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from placerank.errors import WeightsError
from placerank.models.localfeat import create_features, to_original_pixels
from placerank.models.localfeat.xfeat import XFeat, XFeatModel
from placerank.rerank.matching import LighterGlue, mutual_nn_pairs

FILES = {"xfeat": "xfeat.pt", "aliked": "aliked-n16.pth", "disk": "disk-depth-save.pth"}
TENSORS = {"xfeat": 122, "aliked": 76, "disk": 26}


@pytest.mark.parametrize("kind", ["xfeat", "aliked", "disk"])
def test_shipped_weights_load_strictly(kind, shared_weights):
    net = create_features(kind, weights=shared_weights / FILES[kind])
    sd = torch.load(shared_weights / FILES[kind], map_location="cpu", weights_only=True)
    sd = sd["extractor"] if kind == "disk" else sd
    assert len(sd) == TENSORS[kind]
    own = net.net.state_dict()
    for k, v in sd.items():  # every tensor of the file is in the model, value for value
        assert torch.equal(own[k], v), k
    assert net.weights_source.startswith(FILES[kind] + " sha256:")


def test_official_layout_with_random_tensors_loads(shared_weights, tmp_path):
    """The loader accepts the layout (names, shapes, container), not one particular file."""
    sd = torch.load(shared_weights / "disk-depth-save.pth", map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(0)
    fake = {"extractor": {k: torch.randn(v.shape, generator=g) for k, v in sd["extractor"].items()}}
    p = tmp_path / "disk-random.pth"
    torch.save(fake, p)
    net = create_features("disk", weights=p)
    k = "unet.path_down.0.1.3.weight"
    assert torch.equal(net.net.state_dict()[k], fake["extractor"][k])


def test_mismatched_files_give_one_line_weights_errors(shared_weights, tmp_path):
    xfeat = shared_weights / "xfeat.pt"
    with pytest.raises(WeightsError) as e:
        create_features("aliked", weights=xfeat)
    assert str(e.value) == (
        f"{xfeat}: weights do not fit ALIKED-n16 (missing block1.bn1.bias, block1.bn1.num_batches_tracked, "
        f"block1.bn1.running_mean and 73 more; unexpected block1.0.layer.0.weight, "
        f"block1.0.layer.1.num_batches_tracked, block1.0.layer.1.running_mean and 119 more)"
    )

    sd = torch.load(xfeat, map_location="cpu", weights_only=True)
    dropped = dict(sd)
    del dropped["keypoint_head.3.bias"]
    p = tmp_path / "dropped.pt"
    torch.save(dropped, p)
    with pytest.raises(
        WeightsError, match=r"^.*dropped\.pt: weights do not fit XFeat \(missing keypoint_head\.3\.bias\)$"
    ):
        create_features("xfeat", weights=p)

    reshaped = dict(sd)
    reshaped["skip1.1.weight"] = torch.zeros(12, 1, 1, 1)
    p = tmp_path / "reshaped.pt"
    torch.save(reshaped, p)
    with pytest.raises(WeightsError) as e:
        create_features("xfeat", weights=p)
    assert str(e.value) == (
        f"{p}: weights do not fit XFeat (skip1.1.weight is (12, 1, 1, 1) in the file but (24, 1, 1, 1) in the model)"
    )

    with pytest.raises(WeightsError) as e:
        create_features("disk", weights=xfeat)  # a bare state_dict, not {"extractor": ...}
    assert str(e.value) == f"{xfeat}: weights do not fit DISK (expected a dict with an 'extractor' state_dict)"

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError) as e:
        create_features("xfeat", weights=junk)
    assert str(e.value).startswith(f"{junk}: cannot read weights (") and "\n" not in str(e.value)

    with pytest.raises(WeightsError) as e:
        create_features("xfeat", weights=tmp_path / "absent.pt")
    assert str(e.value) == f"{tmp_path / 'absent.pt'}: weights file does not exist"


def test_lighterglue_loads_strictly_with_renamed_keys(shared_weights, tmp_path):
    lg = LighterGlue(shared_weights / "xfeat-lighterglue.pt")
    raw = torch.load(shared_weights / "xfeat-lighterglue.pt", map_location="cpu", weights_only=True)
    own = lg.net.state_dict()
    matcher = {k[len("matcher.") :]: v for k, v in raw.items() if k.startswith("matcher.")}
    assert len(matcher) == 169 and len(own) == 169 + 1  # + confidence_thresholds, computed from the config
    for k, v in matcher.items():
        assert torch.equal(own[k], v), k
    # the older layout (self_attn.{i} / cross_attn.{i}) is renamed onto kornia's names
    old = {}
    for k, v in raw.items():
        for att in ("self_attn", "cross_attn"):
            for i in range(6):
                k = k.replace(f"transformers.{i}.{att}.", f"{att}.{i}.")
        old[k] = v
    assert "matcher.self_attn.3.Wqkv.weight" in old
    p = tmp_path / "old-layout.pt"
    torch.save(old, p)
    lg_old = LighterGlue(p)
    for k, v in lg_old.net.state_dict().items():
        assert torch.equal(v, own[k]), k
    with pytest.raises(
        WeightsError,
        match=r"weights do not fit LighterGlue \(expected matcher\.\* and extractor\.\* tensors; found block1\.0",
    ):
        LighterGlue(shared_weights / "xfeat.pt")


def test_xfeat_heatmap_layout_and_sampling_by_hand():
    # cell logits -> full-resolution heatmap: cell channel c lands at (row, col) = divmod(c, 8)
    logits = torch.full((1, 65, 2, 3), -30.0)
    logits[0, 64] = 0.0  # dustbin wins everywhere except the cells set below
    logits[0, 8 * 5 + 2, 1, 2] = 30.0  # cell (1, 2), sub-pixel row 5, col 2
    heat = XFeat.keypoint_heatmap(logits)
    assert heat.shape == (1, 1, 16, 24)
    y, x = divmod(int(heat.flatten().argmax()), 24)
    assert (y, x) == (8 + 5, 16 + 2)
    assert heat.max().item() == pytest.approx(1.0, abs=1e-6)
    # the image's 8x8 blocks as channels, in the same order
    img = torch.arange(16 * 24, dtype=torch.float32).view(1, 1, 16, 24)
    blocks = F.pixel_unshuffle(img, 8)
    assert blocks[0, 8 * 5 + 2, 1, 2].item() == img[0, 0, 13, 18].item()


def test_xfeat_architecture_counts():
    m = XFeatModel()
    assert len(m.state_dict()) == 122
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(1.55e6, rel=0.02)


def test_keypoints_map_back_to_original_pixels():
    # pixel-edge aligned resize: input pixel centre 0 of a 2x downscale is original 0.5
    k = np.array([[0.0, 0.0], [319.0, 239.0], [159.5, 119.5]], np.float32)
    out = to_original_pixels(k, (240, 320), (480, 640))
    np.testing.assert_allclose(out, [[0.5, 0.5], [638.5, 478.5], [319.5, 239.5]])


def test_mutual_nearest_neighbours_by_hand():
    a = np.eye(4, dtype=np.float32)[[0, 1, 2]]
    b = np.eye(4, dtype=np.float32)[[2, 0, 3]]
    b[2] = np.array([0, 0.9, 0, 0.1], np.float32)  # a1's nearest, and b2's nearest is a1
    pairs = mutual_nn_pairs(a, b.astype(np.float16))
    assert sorted(map(tuple, pairs.tolist())) == [(0, 1), (1, 2), (2, 0)]
    assert mutual_nn_pairs(a[:0], b).shape == (0, 2)
