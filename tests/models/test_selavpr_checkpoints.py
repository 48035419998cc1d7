"""Official SelaVPR checkpoint loading (strict, spec §7) and placerank checkpoints.

Checkpoints are generated here in the official container: ``{"epoch_num", "model_state_dict"
(keys prefixed ``module.``), "optimizer_state_dict", "recalls" (numpy array), "best_r5" (numpy
float), "not_improved_num"}``, pickled once as NumPy 2 writes it and once with NumPy 1.x module
names (``numpy.core.multiarray``), as in the released files.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from placerank.errors import WeightsError
from placerank.models import create
from placerank.models.checkpoints import save_placerank_checkpoint
from placerank.models.selavpr import _build_vit

# --------------------------------------------------------------------------------------------
# helpers


pytestmark = pytest.mark.usefixtures("single_thread")


class _Numpy1Pickler(pickle._Pickler):
    """Writes numpy globals under their NumPy 1.x names (``numpy.core.multiarray``)."""

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "") or ""
        if module.startswith("numpy._core"):
            qual = name or obj.__qualname__
            self.write(
                pickle.GLOBAL + module.replace("numpy._core", "numpy.core").encode() + b"\n" + qual.encode() + b"\n"
            )
            self.memoize(obj)
            return
        super().save_global(obj, name)


class _Numpy1PickleModule:
    Pickler = _Numpy1Pickler
    Unpickler = pickle.Unpickler
    __name__ = "pickle"


def official_container(model_sd: dict, numpy1_names: bool = False) -> dict:
    sd = {}
    for k, v in model_sd.items():
        sd["module." + ("aggregation.1.p" if k == "aggregator.p" else k)] = v
    return {
        "epoch_num": 7,
        "model_state_dict": sd,
        "optimizer_state_dict": {
            "state": {0: {"step": torch.tensor(3.0)}},
            "param_groups": [{"lr": 1e-5, "params": [0]}],
        },
        "recalls": np.array([90.8, 96.4, 97.2, 97.8]),
        "best_r5": np.float64(96.4),
        "not_improved_num": 0,
    }


def save_official(obj: dict, path, numpy1_names: bool = False) -> None:
    if numpy1_names:
        torch.save(obj, path, pickle_module=_Numpy1PickleModule)
    else:
        torch.save(obj, path)


@pytest.fixture(scope="module")
def vits_source():
    """A selavpr-vits14 with non-trivial adapters, GeM p and heads (the 'trained' model)."""
    torch.manual_seed(0)
    m = create("selavpr-vits14", pretrained=False).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "D_fc2" in n:
                p.normal_(0, 0.01)
        m.aggregator.p.fill_(2.71)
    return m


@pytest.fixture(scope="module")
def vits_official(vits_source, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "SelaVPR_vits.pth"
    save_official(official_container(vits_source.state_dict()), path)
    return path


# --------------------------------------------------------------------------------------------
# official files


def test_numpy_objects_refused_by_plain_weights_only_but_loaded_by_us(vits_official):
    with pytest.raises(pickle.UnpicklingError):
        torch.load(vits_official, map_location="cpu", weights_only=True)
    from placerank.models.checkpoints import read_weights

    obj = read_weights(vits_official)
    assert obj["epoch_num"] == 7 and float(obj["best_r5"]) == 96.4
    assert np.allclose(obj["recalls"], [90.8, 96.4, 97.2, 97.8])


def test_official_vits_loads_strictly_and_reproduces_outputs(vits_source, vits_official):
    m = create("selavpr-vits14", weights=str(vits_official)).eval()
    src = vits_source.state_dict()
    got = m.state_dict()
    assert set(got) == set(src)
    assert all(torch.equal(got[k], src[k]) for k in src)
    assert m.official_sanity == {"gem_p": pytest.approx(2.71), "adapters_nonzero": True}
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        a, b = m.forward_train(x), vits_source.forward_train(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert "official SelaVPR" in m.weights_source
    assert all(p.requires_grad == (("adapter" in n) or not n.startswith("backbone.")) for n, p in m.named_parameters())


def test_official_vitl14_real_shapes_every_key_lands(tmp_path):
    """The released architecture (ViT-L/14, 540 tensors, 357 M values) in the official container,
    NumPy 1.x pickle names: every tensor holds its own constant, so a key landing in the wrong
    place (or not at all) is caught."""
    with torch.device("meta"):
        ref = _build_vit("selavpr-vitl14", "vitl14", None)
    shapes = {k: v.shape for k, v in ref.state_dict().items()}
    model_sd = {k: torch.full(s, float(i + 1)) for i, (k, s) in enumerate(shapes.items())}
    path = tmp_path / "SelaVPR_msls.pth"
    container = official_container(model_sd)
    assert "module.aggregation.1.p" in container["model_state_dict"]
    assert "module.backbone.blocks.23.adapter2.D_fc2.weight" in container["model_state_dict"]
    save_official(container, path, numpy1_names=True)
    del model_sd, container
    try:
        m = create("selavpr-vitl14", weights=str(path))
    finally:
        path.unlink()  # 1.4 GB: do not leave it in pytest's kept temp folders (mmap stays valid)
    got = m.state_dict()
    assert set(got) == set(shapes)
    for i, (k, s) in enumerate(shapes.items()):
        t = got[k]
        assert t.shape == s and t.dtype == torch.float32 and not t.is_meta, k
        assert float(t.min()) == float(t.max()) == float(i + 1), k
    assert m.descriptor_dim == 1024 and m.grid_size() == (61, 61)


def _load_error(tmp_path, model_name: str, mutate, numpy1: bool = False) -> str:
    torch.manual_seed(0)
    base = create("selavpr-vits14", pretrained=False).state_dict()
    container = official_container(base)
    mutate(container["model_state_dict"])
    path = tmp_path / "bad.pth"
    save_official(container, path, numpy1)
    with pytest.raises(WeightsError) as e:
        create(model_name, weights=str(path))
    msg = str(e.value)
    assert "\n" not in msg
    return msg.replace(str(path), "PATH")


def test_mismatched_checkpoints_give_exact_one_line_errors(tmp_path):
    assert _load_error(tmp_path, "selavpr-vitl14", lambda sd: None) == (
        "PATH: SelaVPR checkpoint is for DINOv2 vits14, not vitl14; use --model selavpr-vits14"
    )
    assert _load_error(
        tmp_path, "selavpr-vits14", lambda sd: sd.pop("module.backbone.blocks.3.adapter2.D_fc2.weight")
    ) == ("PATH: SelaVPR checkpoint has no adapter2 in block 3 (a plain DINOv2 file?)")
    assert _load_error(tmp_path, "selavpr-vits14", lambda sd: sd.pop("module.LocalAdapt.upconv2.weight")) == (
        "PATH: SelaVPR checkpoint has no LocalAdapt up-convolutions"
    )
    assert _load_error(tmp_path, "selavpr-vits14", lambda sd: sd.update({"module.head.weight": torch.zeros(3)})) == (
        "PATH: weights do not fit selavpr-vits14 (unexpected head.weight)"
    )
    assert _load_error(
        tmp_path,
        "selavpr-vits14",
        lambda sd: sd.update({"module.LocalAdapt.upconv2.weight": torch.zeros(256, 64, 3, 3)}),
    ) == (
        "PATH: weights do not fit selavpr-vits14 (LocalAdapt.upconv2.weight is (256, 64, 3, 3) in the file "
        "but (256, 128, 3, 3) in the model)"
    )
    assert _load_error(tmp_path, "selavpr-vits14", lambda sd: sd.pop("module.backbone.norm.bias")) == (
        "PATH: weights do not fit selavpr-vits14 (missing backbone.norm.bias)"
    )


class Trap:
    """A pickled object that is not a tensor/numpy value (weights_only must refuse it)."""


def test_foreign_pickled_objects_are_refused_unless_allowed(tmp_path, monkeypatch, vits_source):
    container = official_container(vits_source.state_dict())
    container["args"] = Trap()
    path = tmp_path / "with_args.pth"
    torch.save(container, path)
    with pytest.raises(WeightsError) as e:
        create("selavpr-vits14", weights=str(path))
    assert str(e.value) == (
        f"{path}: file holds pickled objects that weights_only loading refuses "
        f"({__name__}.Trap); if you trust it, set PLACERANK_ALLOW_PICKLE=1 to load it "
        f"with weights_only=False"
    )
    monkeypatch.setenv("PLACERANK_ALLOW_PICKLE", "1")
    m = create("selavpr-vits14", weights=str(path))
    assert torch.equal(m.aggregator.p, vits_source.aggregator.p)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(WeightsError, match=r"list.pth: expected a state_dict, found list$"):
        create("selavpr-vits14", weights=str(path))
    with pytest.raises(WeightsError, match=r"missing.pth: weights file does not exist$"):
        create("selavpr-vits14", weights=str(tmp_path / "missing.pth"))


# --------------------------------------------------------------------------------------------
# placerank checkpoints (what training writes)


def test_placerank_checkpoint_roundtrip_effnet(tmp_path):
    m = create("selavpr-effnet-lite0", image_size=(96, 160))
    with torch.no_grad():
        m.LocalAdapt.upconv2.bias.fill_(0.5)
        m.backbone.adapters["head"].D_fc2.weight.normal_(0, 0.01)
    m.invalidate_weights_id()
    path = tmp_path / "model.pt"
    save_placerank_checkpoint(m, path, model_kwargs={"image_size": [96, 160]})
    m2 = create("selavpr-effnet-lite0", weights=str(path))
    assert m2.weights_id == m.weights_id and m2.preprocess.size == (96, 160)
    other = create("effnet-lite0-gem", pretrained=False)
    save_placerank_checkpoint(other, tmp_path / "gem.pt")
    with pytest.raises(WeightsError) as e:
        create("selavpr-effnet-lite0", weights=str(tmp_path / "gem.pt"))
    assert (
        str(e.value) == f"{tmp_path / 'gem.pt'}: checkpoint is for model 'effnet-lite0-gem', not 'selavpr-effnet-lite0'"
    )


def test_missing_default_weights_say_what_to_put_where():
    with pytest.raises(WeightsError) as e:
        create("selavpr-vitl14")
    assert str(e.value) == (
        "selavpr-vitl14 weights not found: put SelaVPR_msls.pth (released model) or "
        "dinov2_vitl14_pretrain.pth (to train) in $PLACERANK_WEIGHTS, or pass --weights PATH"
    )
