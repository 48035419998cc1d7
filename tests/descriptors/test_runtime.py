"""``--runtime openvino``: extraction on the exported model gives PyTorch's fp32 descriptors
(within 1e-5) and, for a model with a local head, the same local features in the same pass;
bad combinations are one line before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from placerank.cli import main
from placerank.descriptors.fast import prepare_inference, resolve_precision
from placerank.descriptors.runtime import check_runtime, exported_path
from placerank.errors import PlaceRankError

pytestmark = pytest.mark.usefixtures("single_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def images(shared_data) -> list[Path]:
    return sorted((shared_data / "gardenspoint_walking" / "night_right").glob("*.jpg"))[10:15]


def _in_own_process(check: str, folder: Path, weights: Path) -> dict:
    """Run an OpenVINO check in a child process (openvino_checks.py says why)."""
    env = {**os.environ, "PLACERANK_WEIGHTS": str(weights), "OMP_NUM_THREADS": "1"}
    script = Path(__file__).with_name("openvino_checks.py")
    done = subprocess.run(
        [sys.executable, str(script), check, str(folder)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_openvino_gives_the_pytorch_descriptors(gardens, shared_weights):
    got = _in_own_process("global", gardens / "night_right", shared_weights)
    assert got["fp32_max_diff"] < 1e-5 and got["exported"]  # exported once, into the cache root
    assert not got["onnxruntime_loaded"]  # never ONNX Runtime and OpenVINO in one process
    assert 0.99 < got["bf16_min_cosine"] < 1.0 - 1e-7  # OpenVINO bf16: close, not equal


def test_fol_region_features_come_from_the_same_exported_pass(gardens, shared_weights):
    got = _in_own_process("fol", gardens / "night_right", shared_weights)
    assert got["global_max_diff"] < 1e-5 and got["same_keys"] and got["keypoints_equal"]
    assert got["descriptor_max_diff"] < 1e-5 and got["score_max_diff"] < 1e-5


def test_runtime_errors_are_one_line(make_model):
    with pytest.raises(PlaceRankError, match="^--runtime openvino runs fp32 or bf16, not --precision fp16$"):
        check_runtime("openvino", CPU, "fp16")
    with pytest.raises(PlaceRankError, match=r"^--runtime openvino runs on the CPU \(the device is cuda\)"):
        check_runtime("openvino", torch.device("cuda"))
    with pytest.raises(PlaceRankError, match="^--runtime onnx: use one of auto, torch, openvino$"):
        check_runtime("onnx", CPU)
    model = prepare_inference(make_model("effnet-lite0-gem", image_size=(64, 64)), CPU, "off", "openvino")
    assert resolve_precision("auto", model, CPU) in ("fp32", "bf16")  # from OpenVINO's own check, if shipped
    with pytest.raises(PlaceRankError, match="^--runtime openvino runs fp32 or bf16, not --precision fp16$"):
        resolve_precision("fp16", model, CPU)


def test_eval_cli_refuses_an_unknown_runtime_before_work(gardens, tmp_path):
    args = ["eval", "--database", str(gardens / "day_right"), "--queries", str(gardens / "night_right")]
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(tmp_path / "e"), "--runtime", "onnx", "--device", "cpu"])
    assert e.value.code == 2 and not (tmp_path / "e").exists()


def test_auto_runtime_takes_openvino_once_the_export_repays_itself(make_model, monkeypatch):
    from placerank.descriptors.runtime import EXPORT_MIN_IMAGES, choose_runtime

    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)  # as in a process that never loaded it
    model = make_model("effnet-lite0-gem", image_size=(64, 64))
    assert choose_runtime("auto", model, CPU, EXPORT_MIN_IMAGES - 1) == "torch"
    assert choose_runtime("auto", model, CPU, EXPORT_MIN_IMAGES) == "openvino"
    assert choose_runtime("auto", model, torch.device("cuda"), 10**6) == "torch"
    assert choose_runtime("openvino", model, CPU) == "openvino"
    assert choose_runtime("torch", model, CPU, 10**6) == "torch"
    exported_path(model).parent.mkdir(parents=True)
    exported_path(model).write_bytes(b"")  # exported before (by weights id and input size): no export cost left
    assert choose_runtime("auto", model, CPU, 0) == "openvino"
    netvlad = make_model("effnet-lite0-netvlad", image_size=(64, 64))
    assert netvlad.needs_data_init and choose_runtime("auto", netvlad, CPU, 10**6) == "torch"
    # a process that has loaded ONNX Runtime (a host program, this test run) never gets OpenVINO beside it
    monkeypatch.setitem(sys.modules, "onnxruntime", object())
    assert choose_runtime("auto", model, CPU, 10**6) == "torch"


def test_the_commands_default_runtime_is_auto(gardens, shared_weights, tmp_path, monkeypatch):
    """Without ``$PLACERANK_RUNTIME`` (which this test run sets to torch) a large CPU job runs on
    OpenVINO, exported into the cache on the way: an eval of GardensPoint's 280 frames (>= the
    export's break-even) in a child process; the results record the runtime and auto precision."""
    env = {k: v for k, v in os.environ.items() if k != "PLACERANK_RUNTIME"}
    env.update(PLACERANK_WEIGHTS=str(shared_weights), PLACERANK_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    argv = ["eval", "--database", str(gardens / "day_right"), "--queries", str(gardens / "night_right")]
    argv += ["--image-size", "64", "112", "--layout", "frames", "--out", str(tmp_path / "e")]
    done = subprocess.run(
        [sys.executable, "-m", "placerank", *argv], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    model = json.loads((tmp_path / "e" / "results.json").read_text())["model"]
    assert model["runtime"] == "openvino" and model["precision"] in ("fp32", "bf16")
    assert list((tmp_path / "cache" / "exported").glob("effnet-lite0-gem-*-64x112.onnx"))


def test_a_bad_runtime_default_is_one_line(gardens, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PLACERANK_RUNTIME", "onnx")
    args = ["eval", "--database", str(gardens / "day_right"), "--queries", str(gardens / "night_right")]
    assert main([*args, "--out", str(tmp_path / "e"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == (
        "placerank: error: --runtime onnx (from PLACERANK_RUNTIME): use one of auto, torch, openvino"
    )
    assert not (tmp_path / "e").exists()


def test_a_runtime_that_falls_back_caches_under_torchs_namespace(make_model, images, monkeypatch, capsys):
    """bf16 descriptors are cached per runtime; when OpenVINO cannot take the model (one warning)
    the PyTorch descriptors it extracts instead land in PyTorch's bf16 namespace, not OpenVINO's."""
    from placerank.descriptors import runtime
    from placerank.descriptors.cache import DescriptorCache, image_key
    from placerank.descriptors.extract import descriptor_namespace, extract_features

    def refuse(*args, **kwargs):
        raise RuntimeError("an op the exporter refuses")

    monkeypatch.setattr(runtime, "ExportedEncoder", refuse)
    model = prepare_inference(make_model("effnet-lite0-gem", image_size=(64, 96)), CPU, "off", "openvino")
    openvino_space = descriptor_namespace(model, "bf16")
    d, keys = extract_features(model, images, CPU, 4, 0, use_cache=True, progress=False, precision="bf16")
    assert capsys.readouterr().err.strip() == (
        "placerank: warning: --runtime openvino cannot run effnet-lite0-gem (an op the exporter refuses);"
        " running it with torch"
    )
    torch_space = descriptor_namespace(model, "bf16")
    assert torch_space != openvino_space
    cached = DescriptorCache(torch_space, model.descriptor_dim).get_many([image_key(p) for p in images])
    assert sorted(cached) == sorted(keys) and all((cached[k] == d[i]).all() for i, k in enumerate(keys))
    assert not DescriptorCache(openvino_space, model.descriptor_dim).get_many(keys)


def test_the_export_folder_keeps_the_most_recently_used_files(tmp_path):
    """Under ``--runtime auto`` every new set of weights is exported once; the folder keeps the
    newest files (by use), always the one just written, and deletes the rest."""
    from placerank.descriptors.runtime import prune_exports

    files = [tmp_path / f"m-{i}.onnx" for i in range(10)]
    for i, f in enumerate(files):
        f.write_bytes(b"x")
        os.utime(f, (1000 + i, 1000 + i))  # m-9 newest
    (tmp_path / "notes.txt").write_text("not an export")
    gone = prune_exports(tmp_path, keep=files[0], limit=4)
    assert sorted(gone) == sorted(files[1:7])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-0.onnx", "m-7.onnx", "m-8.onnx", "m-9.onnx", "notes.txt"]
