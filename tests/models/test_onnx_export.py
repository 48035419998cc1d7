"""ONNX export (`placerank export`): every output of the file matches PyTorch within 1e-4 under
ONNX Runtime on real GardensPoint images, at batch 1 and 3 (the dynamic axis); the local outputs
decode (numpy, from the file's metadata) to the same LocalFeatures as ``model.encode``; the
metadata says how to feed the file; bad input is one line, exit 2, and no file."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from placerank.cli import main
from placerank.data.images import load_tensor
from placerank.models.onnx_export import ExportGraph, export_onnx, read_metadata, run_onnxruntime
from placerank.models.onnx_outputs import local_features_from_outputs
from placerank.version import __version__

pytestmark = pytest.mark.usefixtures("single_thread")

# small but real: FoL's optimal transport needs more stride-16 patches (8 x 12 = 96) than its 64 clusters
SIZE = (128, 192)
MODELS = ("effnet-lite0-gem", "fol-effnet-lite0", "selavpr-effnet-lite0")
TOL = 1e-4


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def images(gardens) -> list[Path]:
    """Three real GardensPoint frames (day, different places)."""
    return [gardens / "day_right" / f"Image{k:03d}.jpg" for k in (0, 50, 120)]


@pytest.fixture(scope="module")
def exported(make_model, shared_weights, tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path, tuple]]:
    """Each model with the shared weights, and its file: effnet-lite0-gem through the CLI (the
    result of that run is kept for the CLI test), the others through ``export_onnx``."""
    root = tmp_path_factory.mktemp("onnx")
    done: dict[str, tuple[torch.nn.Module, Path, tuple]] = {}
    for name in MODELS:
        model = make_model(name, image_size=SIZE)
        path = root / f"{name}.onnx"
        if name == "effnet-lite0-gem":
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("PLACERANK_WEIGHTS", str(shared_weights))
                result = _cli(["export", name, "--format", "onnx", "--out", str(path), "--image-size", *map(str, SIZE)])
        else:
            result = (0, str(export_onnx(model, path)["max_abs_diff"]), "")
        done[name] = (model, path, result)
    return done


def _batch(model, paths) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    loaded = [load_tensor(p, model.preprocess) for p in paths]
    return torch.stack([t for t, _ in loaded]), [s for _, s in loaded]


def test_cli_writes_a_verified_file_with_its_metadata(exported):
    model, path, (rc, out, err) = exported["effnet-lite0-gem"]
    assert rc == 0, err
    assert err == ""
    assert out.startswith(
        f"wrote {path}: effnet-lite0-gem (weights {model.weights_id}), input 128x192, outputs global;"
    )
    assert float(out.rsplit(" ", 1)[1]) <= TOL  # the command's own ONNX Runtime check
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(f"{m}.onnx" for m in MODELS)  # no temp files
    meta = read_metadata(path)
    assert meta["model"] == "effnet-lite0-gem"
    assert meta["weights_id"] == model.weights_id
    assert meta["placerank_version"] == __version__
    assert meta["input_name"] == "images"
    assert meta["input_size"] == [128, 192]
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["std"] == [0.5, 0.5, 0.5]  # timm tf_ EfficientNet stats
    assert meta["descriptor_dim"] == 1280
    assert list(meta["outputs"]) == ["global"]


@pytest.mark.parametrize("name", MODELS)
def test_every_output_matches_pytorch_on_real_images(exported, images, name):
    model, path, _ = exported[name]
    x, _ = _batch(model, images)
    names = ExportGraph(model).output_names()
    with torch.inference_mode():
        ref = dict(zip(names, (t.numpy() for t in ExportGraph(model)(x))))
        encoded, _ = model.encode(x)
    np.testing.assert_allclose(ref["global"], encoded.numpy(), atol=1e-6)  # the graph's global is encode's
    for batch in (x, x[:1]):  # dynamic batch axis: 3 and 1
        got = run_onnxruntime(path, batch.numpy())
        assert list(got) == names
        for key in names:
            assert got[key].shape == ref[key][: len(batch)].shape
            assert np.abs(got[key] - ref[key][: len(batch)]).max() <= TOL, key
    norms = np.linalg.norm(got["global"], axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    meta = read_metadata(path)
    assert meta["model"] == name and meta["weights_id"] == model.weights_id and meta["input_size"] == list(SIZE)
    assert list(meta["outputs"]) == names


def test_output_names_per_model_kind(exported):
    assert ExportGraph(exported["fol-effnet-lite0"][0]).output_names() == [
        "global",
        "region_score",
        "local_map",
        "patch_descriptors",
    ]
    assert ExportGraph(exported["selavpr-effnet-lite0"][0]).output_names() == ["global", "local_map"]


@pytest.mark.parametrize(("name", "options"), [("fol-effnet-lite0", {"num_regions": 40}), ("selavpr-effnet-lite0", {})])
def test_local_outputs_decode_to_the_models_local_features(exported, images, name, options):
    """The documented mapping, from the ONNX file's outputs and metadata alone, gives the
    LocalFeatures placerank's own ``encode`` gives (FoL: 40 of the 96 patches, so the top-N
    selection is exercised; keypoints in the original 1080p-ish frames)."""
    model, path, _ = exported[name]
    x, sizes = _batch(model, images)
    _, expected = model.encode(x, sizes, options)
    got = local_features_from_outputs(read_metadata(path), run_onnxruntime(path, x.numpy()), sizes, **options)
    assert expected is not None and len(got) == len(expected) == 3
    for g, e in zip(got, expected):
        assert g.image_size == e.image_size
        assert g.descriptors.shape == e.descriptors.shape
        np.testing.assert_allclose(g.keypoints, e.keypoints, atol=1e-3)
        assert np.abs(g.descriptors - e.descriptors).max() <= TOL
        if e.scores is not None:
            assert g.scores is not None and np.abs(g.scores - e.scores).max() <= 1e-6
    if name == "fol-effnet-lite0":
        assert len(got[0]) == 40


def _fails(argv: list[str]) -> str:
    rc, out, err = _cli(argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1
    return err.strip()


def test_bad_input_is_one_line_and_no_file(tmp_path, monkeypatch):
    out = tmp_path / "m.onnx"
    assert _fails(["export", "effnet-lite0-gem", "--format", "tflite", "--out", str(out)]) == (
        "placerank: error: unsupported --format 'tflite' (supported: onnx)"
    )
    assert _fails(["export", "no-such-model", "--out", str(out)]).startswith(
        "placerank: error: unknown model 'no-such-model'; known models: dinov2-vitb14-gem,"
    )
    assert _fails(["export", "effnet-lite0-gem", "--out", str(tmp_path)]) == (
        f"placerank: error: --out {tmp_path} is a folder; give a file name such as model.onnx"
    )
    (tmp_path / "f").write_text("x")
    assert _fails(["export", "effnet-lite0-gem", "--out", str(tmp_path / "f" / "m.onnx")]) == (
        f"placerank: error: --out {tmp_path / 'f' / 'm.onnx'}: {tmp_path / 'f'} is not a folder"
    )
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed: import fails
    assert _fails(["export", "effnet-lite0-gem", "--out", str(out)]) == (
        "placerank: error: ONNX export needs the Python package(s) onnxscript:"
        " pip install 'placerank[export]' (or pip install onnx onnxscript onnxruntime)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_uninitialised_netvlad_is_refused(tmp_path):
    out = tmp_path / "m.onnx"
    assert _fails(["export", "effnet-lite0-netvlad", "--out", str(out), "--image-size", "64", "96"]) == (
        "placerank: error: model 'effnet-lite0-netvlad' has an uninitialised NetVLAD layer;"
        " pass --weights of a trained model"
    )
    assert not out.exists()
