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
def vits_file_state(shared_data) -> dict[str, torch.Tensor]:
    """ViT-S/14 (C = 384, 12 blocks) ``model_state_dict`` built from the spec's §7.3 key table
    (not from the model): random values, LayerScale 0.1, norms 1, GeM p 2.71, non-zero adapters."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for k, shape in spec_table(shared_data, 384, 12).items():
        if k.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            out[k] = torch.ones(shape)
        elif k.endswith("gamma"):
            out[k] = torch.full(shape, 0.1)
        elif k == "aggregation.1.p":
            out[k] = torch.full(shape, 2.71)
        else:
            out[k] = torch.randn(shape, generator=gen) * 0.02
    return out


@pytest.fixture(scope="module")
def vits_official(vits_file_state, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "SelaVPR_vits.pth"
    save_official(
        {**official_container({}), "model_state_dict": {"module." + k: v for k, v in vits_file_state.items()}}, path
    )
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


def test_official_vits_loads_strictly_and_reproduces_outputs(vits_file_state, vits_official):
    m = create("selavpr-vits14", weights=str(vits_official)).eval()
    got = {("aggregation.1.p" if k == "aggregator.p" else k): v for k, v in m.state_dict().items()}
    assert set(got) == set(vits_file_state)  # the spec's layout, key for key
    assert all(torch.equal(got[k], vits_file_state[k]) for k in vits_file_state)
    assert m.official_sanity == {"gem_p": pytest.approx(2.71), "adapters_nonzero": True}
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        a, b = m.forward_train(x), create("selavpr-vits14", weights=str(vits_official)).eval().forward_train(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[1].shape == (1, 128, 29, 29)
    assert "official SelaVPR" in m.weights_source
    assert all(p.requires_grad == (("adapter" in n) or not n.startswith("backbone.")) for n, p in m.named_parameters())


def spec_table(shared_data, C: int = 1024, depth: int = 24) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``model_state_dict`` (``module.`` stripped), read from the spec's §7.3
    table, independently of the model code. The table is written for ViT-L (C = 1024); other
    widths substitute C for 1024, 3C / 4C for 3072 / 4096 and the adapters' C/2 for 512 (ratio 0.5,
    §2.3). The registers row (reg4 file only) is left out."""
    import re

    text = (shared_data.parent / "docs" / "methods" / "selavpr.md").read_text(encoding="utf-8")
    section = text[text.index("### 7.3") : text.index("### 7.4")]
    dims = {"1024": C, "3072": 3 * C, "4096": 4 * C, "512": C // 2}
    table: dict[str, tuple[int, ...]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`") or "register_tokens" in cells[0]:
            continue
        names = [n.replace("…", "") for n in re.findall(r"`([^`]+)`", cells[0])]
        shapes = [
            tuple(dims.get(d.strip(), int(d)) for d in m.split(",")) for m in re.findall(r"\[([^\]]+)\]", cells[1])
        ]
        full: list[str] = []
        for n in names:  # "a.weight / .bias" -> a.weight, a.bias; "…ls2.gamma" -> the block's ls2.gamma
            if n.startswith(".") and full:
                n = full[-1].rsplit(".", 1)[0] + n
            elif not n.startswith("backbone.") and not n.startswith(("aggregation", "LocalAdapt")) and full:
                n = full[-1][: full[-1].rindex("}") + 2] + n
            full.append(n)
        if len(shapes) == 1:
            shapes = shapes * len(full)
        for name, shape in zip(full, shapes, strict=True):
            for i in range(depth) if "{" in name else [None]:
                table[re.sub(r"\{[^}]*\}", str(i), name)] = shape
    return table


def test_spec_key_table_is_the_model_layout(shared_data):
    """The spec's table has the released file's 540 tensors and is the model's own layout key
    for key and shape (GeM ``p`` is ``aggregation.1.p`` in the file, ``aggregator.p`` here)."""
    table = spec_table(shared_data)
    assert len(table) == 540 and table["LocalAdapt.upconv1.weight"] == (1024, 256, 3, 3)
    with torch.device("meta"):
        ref = _build_vit("selavpr-vitl14", "vitl14", None)
    ours = {("aggregation.1.p" if k == "aggregator.p" else k): tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == table


def test_official_vitl14_real_shapes_every_key_lands(tmp_path, shared_data):
    """A file built from the spec's key table (ViT-L/14, 540 tensors, 357 M values) in the official
    container, NumPy 1.x pickle names: every tensor holds its own constant, so a key landing in the
    wrong place (or not at all), or an architecture that differs from the table, is caught."""
    shapes = spec_table(shared_data)
    sd = {"module." + k: torch.full(s, float(i + 1)) for i, (k, s) in enumerate(shapes.items())}
    path = tmp_path / "SelaVPR_msls.pth"
    container = {**official_container({}), "model_state_dict": sd}
    save_official(container, path, numpy1_names=True)
    del sd, container
    try:
        m = create("selavpr-vitl14", weights=str(path))
    finally:
        path.unlink()  # 1.4 GB: do not leave it in pytest's kept temp folders (mmap stays valid)
    got = {("aggregation.1.p" if k == "aggregator.p" else k): v for k, v in m.state_dict().items()}
    assert set(got) == set(shapes)
    for i, (k, s) in enumerate(shapes.items()):
        t = got[k]
        assert tuple(t.shape) == s and t.dtype == torch.float32 and not t.is_meta, k
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
