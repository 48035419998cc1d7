"""SFRS models, PCA-whitening and the strict OpenIBL loaders (placerank/models/{sfrs,pca}.py).

OpenIBL's files are not available here, so every loader is tested on files generated in exactly
the official layouts (key names, shapes, containers) with recognisable values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from placerank.data.images import load_tensor
from placerank.errors import WeightsError
from placerank.models import create, list_models
from placerank.models.checkpoints import save_placerank_checkpoint
from placerank.models.pca import PCAParams, learn_pca, read_openibl_pca_h5, write_openibl_pca_h5
from placerank.models.sfrs import SFRS_VGG16_PREPROCESS, VGG16_CONV_INDICES, build_sfrs_vgg16
from placerank.models.sfrs_checkpoints import export_openibl_hub, openibl_vgg16_key_table
from placerank.models.sfrs_regions import REGION_NAMES

SMALL = (128, 160)  # an 8 x 10 stride-16 map: cheap VGG forwards


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def image(gardens):
    return gardens / "day_right" / "Image010.jpg"


def _randomise(model, seed=0, backbone=True):
    """Random weights (VGG) or random NetVLAD on the real ImageNet EfficientNet (backbone=False:
    its batch-norm statistics must stay valid)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype.is_floating_point and (backbone or not name.startswith("backbone.")):
                t.copy_(torch.randn(t.shape, generator=g) * (0.05 if "backbone" in name else 1.0))
    model.aggregator.initialised.fill_(True)
    model.invalidate_weights_id()


def test_registry_entries_and_preprocessing(image):
    names = {m.name for m in list_models()}
    assert {"sfrs-vgg16", "sfrs-effnet-lite0"} <= names
    pre = SFRS_VGG16_PREPROCESS
    assert pre.size == (480, 640)
    assert pre.mean == pytest.approx((0.48501961, 0.45795686, 0.40760392))
    assert pre.std == pytest.approx((1 / 255,) * 3)
    # MatConvNet convention: 0..255 pixels minus the VGG means (123.68, 116.78, 103.94)
    x, _ = load_tensor(image, pre.with_size((32, 32)))
    assert float(x.max()) > 100 and float(x.min()) < -90
    m = create("sfrs-effnet-lite0")
    assert m.preprocess.size == (352, 640) and m.descriptor_dim == 64 * 112 and m.needs_data_init
    x, _ = load_tensor(image, m.preprocess)
    with torch.no_grad():
        fmap = m.backbone(x[None]).feature_map
    assert tuple(fmap.shape) == (1, 112, 22, 40)
    with pytest.raises(WeightsError, match=r"^SFRS input 360x640 gives .* use multiples of 32 px"):
        create("sfrs-effnet-lite0", image_size=(360, 640))


def test_vgg16_needs_weights_one_line_error(tmp_path):
    with pytest.raises(WeightsError) as e:
        create("sfrs-vgg16")
    assert str(e.value) == (
        "sfrs-vgg16 needs --weights: OpenIBL's vgg16_netvlad.pth, an OpenIBL training checkpoint "
        "(+ pca_params_*.h5 beside it), the MatConvNet VGG16 state_dict vd16_offtheshelf_conv5_3_max.pth "
        "('0.weight'..'28.bias') or a placerank sfrs checkpoint"
    )
    with pytest.raises(WeightsError, match=r"nope.pth: weights file does not exist$"):
        create("sfrs-vgg16", weights=tmp_path / "nope.pth")


def test_vgg16_is_torchvision_features_cut_at_conv5_3_and_trains_conv5_only():
    import torchvision

    ref = torchvision.models.vgg16(weights=None).features[:-2]
    m = build_sfrs_vgg16()
    assert len(m.backbone.base) == 29 == len(ref)
    for a, b in zip(m.backbone.base, ref):
        assert type(a) is type(b)
        assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    assert isinstance(m.backbone.base[28], torch.nn.Conv2d)  # conv5_3, no ReLU after it
    m.set_trainable()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"backbone.base.{i}.{p}" for i in (24, 26, 28) for p in ("weight", "bias")} | {
        "aggregator.conv.weight",
        "aggregator.centroids",
    }
    assert m.descriptor_dim == 32768 and m.pca is None


def _matconvnet_state(seed=1):
    g = torch.Generator().manual_seed(seed)
    shapes = {
        k.split("base_model.base.")[1]: s
        for k, s in openibl_vgg16_key_table(with_pca=False).items()
        if k.startswith("base_model.base.")
    }
    return {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}


def test_matconvnet_state_dict_strict_load_and_kmeans_init(tmp_path, image):
    sd = _matconvnet_state()
    assert sorted(sd, key=lambda k: (int(k.split(".")[0]), k))[0] == "0.bias" and len(sd) == 26
    path = tmp_path / "vd16_offtheshelf_conv5_3_max.pth"
    torch.save(sd, path)
    m = create("sfrs-vgg16", weights=path, image_size=SMALL)
    assert m.needs_data_init and m.weights_source.startswith("vd16_offtheshelf_conv5_3_max.pth (MatConvNet VGG16)")
    for i in VGG16_CONV_INDICES:
        assert torch.equal(m.backbone.base[i].weight, sd[f"{i}.weight"])
    m.init_from_images([image, image.parent / "Image020.jpg"], per_image=100)
    assert not m.needs_data_init
    c = m.aggregator.centroids.detach()
    w = m.aggregator.conv.weight.detach()[:, :, 0, 0]
    alpha = m.aggregator.alpha
    np.testing.assert_allclose(w.numpy(), (alpha * F.normalize(c, dim=1)).numpy(), rtol=1e-5, atol=1e-6)
    bad = dict(sd)
    bad.pop("28.bias")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(
        WeightsError,
        match=r"bad.pth: weights do not fit a MatConvNet VGG16 state_dict .* \(missing 28.bias\)$",
    ):
        create("sfrs-vgg16", weights=tmp_path / "bad.pth")
    bad = dict(sd)
    bad["24.weight"] = torch.zeros(512, 512, 1, 1)
    torch.save(bad, tmp_path / "bad2.pth")
    with pytest.raises(
        WeightsError, match=r"\(24.weight is \(512, 512, 1, 1\) in the file but \(512, 512, 3, 3\) in the model\)$"
    ):
        create("sfrs-vgg16", weights=tmp_path / "bad2.pth")


def test_hub_layout_round_trip_identical_outputs(tmp_path, image):
    m = build_sfrs_vgg16(pca_dim=64, image_size=SMALL)
    _randomise(m, seed=2)
    path = tmp_path / "vgg16_netvlad.pth"
    export_openibl_hub(m, path)
    sd = torch.load(path, weights_only=True)
    table = openibl_vgg16_key_table(pca_dim=64)
    assert len(sd) == 30 and {k: tuple(v.shape) for k, v in sd.items()} == table
    r = create("sfrs-vgg16", weights=path, image_size=SMALL)
    assert r.descriptor_dim == 64 and not r.needs_data_init and "OpenIBL hub" in r.weights_source
    x, _ = load_tensor(image, r.preprocess)
    with torch.no_grad():
        a, b = m.eval()(x[None]), r.eval()(x[None])
        vlad = r(x[None], output="vlad")
    assert torch.equal(a, b)
    # descriptor = L2(W vlad + b) with the hub's pca_layer as a 1x1 conv on the cluster-major VLAD
    W = sd["pca_layer.weight"].reshape(64, 32768)
    manual = F.normalize(vlad @ W.T + sd["pca_layer.bias"], dim=-1)
    assert torch.allclose(b, manual, atol=1e-5)
    # strict: an extra key is refused in one line
    sd["net_vlad.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(
        WeightsError,
        match=r"extra.pth: weights do not fit OpenIBL's vgg16_netvlad.pth \(hub layout\) \(unexpected net_vlad.extra\)$",
    ):
        create("sfrs-vgg16", weights=tmp_path / "extra.pth")


@pytest.mark.slow
def test_hub_file_at_real_shapes(tmp_path):
    """The released file's full key table and shapes: 30 tensors, ~149 M parameters (~600 MB)."""
    table = openibl_vgg16_key_table()
    assert table["pca_layer.weight"] == (4096, 32768, 1, 1) and table["net_vlad.conv.weight"] == (64, 512, 1, 1)
    sd = {k: torch.zeros(s) for k, s in table.items()}
    assert sum(v.numel() for v in sd.values()) == 149_002_048
    sd["pca_layer.bias"] = torch.arange(4096, dtype=torch.float32)
    sd["pca_layer.weight"][7, 123, 0, 0] = 2.5
    sd["net_vlad.centroids"][3, 5] = -1.0
    sd["base_model.base.28.bias"][:] = 0.25
    path = tmp_path / "vgg16_netvlad.pth"
    torch.save(sd, path)
    del sd
    m = create("sfrs-vgg16", weights=path)
    assert m.descriptor_dim == 4096 and m.preprocess.size == (480, 640)
    assert tuple(m.pca.weight.shape) == (4096, 32768)
    assert m.pca.weight[7, 123].item() == 2.5 and torch.equal(m.pca.bias, torch.arange(4096, dtype=torch.float32))
    assert m.aggregator.centroids[3, 5].item() == -1.0 and m.backbone.base[28].bias.eq(0.25).all()


def _pca_params(D=32768, k=48, seed=0):
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.normal(size=(D, k)))
    lams = np.sort(rng.uniform(0.01, 1.0, k))[::-1]
    mu = rng.normal(size=D) * 0.01
    return PCAParams(U, lams, mu)


def test_openibl_training_checkpoint_with_pca_h5(tmp_path, image):
    src = build_sfrs_vgg16(image_size=SMALL)
    _randomise(src, seed=3)
    sd = src.state_dict()
    state = {
        f"module.base_model.base.{i}.{p}": sd[f"backbone.base.{i}.{p}"]
        for i in VGG16_CONV_INDICES
        for p in ("weight", "bias")
    }
    state["module.net_vlad.conv.weight"] = sd["aggregator.conv.weight"]
    state["module.net_vlad.centroids"] = sd["aggregator.centroids"]
    assert {k: tuple(v.shape) for k, v in state.items()} == openibl_vgg16_key_table(prefix="module.", with_pca=False)
    ckpt = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": state, "epoch": 4, "best_recall5": np.float64(0.964), "generation": 3}, ckpt)

    # without a PCA file: the 32768-d VLAD
    m = create("sfrs-vgg16", weights=ckpt, image_size=SMALL)
    assert m.pca is None and m.descriptor_dim == 32768
    assert "generation=3, epoch=4" in m.weights_source and "no PCA" in m.weights_source
    x, _ = load_tensor(image, m.preprocess)
    with torch.no_grad():
        assert torch.allclose(m(x[None]), src(x[None]), atol=1e-6)

    # with pca_params_model_best.h5 beside it (OpenIBL's name): W = diag(lams^-1/2) U^T, b = -W mu
    params = _pca_params()
    write_openibl_pca_h5(params, tmp_path / "pca_params_model_best.h5")
    back = read_openibl_pca_h5(tmp_path / "pca_params_model_best.h5")
    assert back.U.shape == (32768, 48) and back.mu.shape == (32768,)
    m = create("sfrs-vgg16", weights=ckpt, image_size=SMALL)
    assert m.descriptor_dim == 48 and "pca_params_model_best.h5" in m.weights_source
    W = (params.U / np.sqrt(params.lams)).T
    np.testing.assert_allclose(m.pca.weight.numpy(), W, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m.pca.bias.numpy(), -W @ params.mu, rtol=1e-3, atol=1e-4)
    with torch.no_grad():
        v = m(x[None], output="vlad").double().numpy()[0]
        d = m(x[None]).double().numpy()[0]
    y = W @ v - W @ params.mu
    np.testing.assert_allclose(d, y / np.linalg.norm(y), atol=1e-4)
    # whiten=False: W = U^T
    m = create("sfrs-vgg16", weights=ckpt, image_size=SMALL, whiten=False)
    np.testing.assert_allclose(m.pca.weight.numpy(), params.U.T, atol=1e-6)

    # strict: a missing key, and a file without the module. prefix (also accepted)
    plain = {k[len("module.") :]: v for k, v in state.items()}
    torch.save(plain, tmp_path / "checkpoint3_4.pth.tar")
    assert create("sfrs-vgg16", weights=tmp_path / "checkpoint3_4.pth.tar", image_size=SMALL).pca is None
    broken = dict(state)
    broken.pop("module.net_vlad.centroids")
    torch.save({"state_dict": broken}, tmp_path / "broken.pth.tar")
    with pytest.raises(
        WeightsError,
        match=r"broken.pth.tar: weights do not fit an OpenIBL VGG16-NetVLAD training checkpoint "
        r"\(missing module.net_vlad.centroids\)$",
    ):
        create("sfrs-vgg16", weights=tmp_path / "broken.pth.tar")


def test_learn_pca_dual_form_whitens_and_matches_primal():
    rng = np.random.default_rng(0)
    n, D = 60, 300
    X = (rng.normal(size=(n, D)) * np.linspace(2.0, 0.1, D)).astype(np.float32)
    p = learn_pca(X, 20)  # D > n: Gram (dual) form
    np.testing.assert_allclose(p.U.T @ p.U, np.eye(20), atol=1e-9)
    W, b = p.affine(whiten=True)
    Y = X.astype(np.float64) @ W.T + b
    np.testing.assert_allclose(np.cov(Y.T), np.eye(20), atol=1e-8)  # whitened: unit covariance
    np.testing.assert_allclose(Y.mean(0), 0, atol=1e-9)
    Xc = X.astype(np.float64) - X.mean(0, dtype=np.float64)
    lam_ref = np.sort(np.linalg.eigvalsh(Xc.T @ Xc / (n - 1)))[::-1][:20]
    np.testing.assert_allclose(p.lams, lam_ref, rtol=1e-8)
    q = learn_pca(X[:, :40], 10)  # D < n: covariance (primal) form
    lam_ref = np.sort(np.linalg.eigvalsh(np.cov(X[:, :40].astype(np.float64).T)))[::-1][:10]
    np.testing.assert_allclose(q.lams, lam_ref, rtol=1e-8)
    with pytest.raises(
        WeightsError,
        match=r"^PCA to 60 dims needs at least 61 samples of >= 60 dims \(got 60 samples of 300 dims: at most 59 components\)$",
    ):
        learn_pca(X, 60)


def test_placerank_checkpoint_round_trip_with_pca(tmp_path, image):
    m = create("sfrs-effnet-lite0", image_size=SMALL)
    _randomise(m, seed=4, backbone=False)
    m.set_pca(learn_pca(np.random.default_rng(0).normal(size=(40, m.vlad_dim)).astype(np.float32), 16))
    assert m.descriptor_dim == 16 and m.model_kwargs == {"num_clusters": 64, "image_size": [128, 160], "pca_dim": 16}
    path = tmp_path / "model.pt"
    save_placerank_checkpoint(m, path, model_kwargs=m.model_kwargs)
    r = create("sfrs-effnet-lite0", weights=path)
    assert r.descriptor_dim == 16 and r.preprocess.size == SMALL
    x, _ = load_tensor(image, r.preprocess)
    with torch.no_grad():
        assert torch.equal(m.eval()(x[None]), r.eval()(x[None]))
    with pytest.raises(WeightsError, match=r"model.pt: checkpoint is for model 'sfrs-effnet-lite0', not 'sfrs-vgg16'$"):
        create("sfrs-vgg16", weights=path)


def test_region_descriptors_equal_vlads_of_the_blocks(image):
    m = create("sfrs-effnet-lite0", image_size=(192, 256))
    _randomise(m, seed=5, backbone=False)
    m.eval()
    x, _ = load_tensor(image, m.preprocess)
    with torch.no_grad():
        fmap = m.backbone(x[None]).feature_map  # (1, 112, 12, 16)
        regions = m(x[None], output="regions")
        vlad = m(x[None], output="vlad")
        h, w = fmap.shape[-2:]
        blocks = {
            "global": fmap,
            "top": fmap[..., : h // 2, :],
            "bottom": fmap[..., h // 2 :, :],
            "left": fmap[..., : w // 2],
            "right": fmap[..., w // 2 :],
            "top_left": fmap[..., : h // 2, : w // 2],
            "top_right": fmap[..., : h // 2, w // 2 :],
            "bottom_left": fmap[..., h // 2 :, : w // 2],
            "bottom_right": fmap[..., h // 2 :, w // 2 :],
        }
        for i, name in enumerate(REGION_NAMES):
            # the soft assignment is per location, so each region descriptor is NetVLAD on its block
            assert torch.allclose(regions[0, i], m.aggregator(blocks[name])[0], atol=1e-5), name
    assert regions.shape == (1, 9, 7168)
    assert torch.allclose(regions[0, 0], vlad[0], atol=1e-6)
