"""``--runtime onnx|openvino``: extraction on the exported model gives PyTorch's fp32 descriptors
(within 1e-5) and, for a model with a local head, the same local features in the same pass;
bad combinations are one line before any work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from placerank.cli import main
from placerank.descriptors.extract import extract_features
from placerank.descriptors.fast import prepare_inference, resolve_precision
from placerank.descriptors.runtime import check_runtime, exported_path
from placerank.errors import PlaceRankError
from placerank.rerank.base import create_reranker

pytestmark = pytest.mark.usefixtures("single_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def images(shared_data) -> list[Path]:
    return sorted((shared_data / "gardenspoint_walking" / "night_right").glob("*.jpg"))[10:15]


def test_onnx_and_openvino_give_the_pytorch_descriptors(make_model, images):
    model = make_model("effnet-lite0-gem", image_size=(96, 128))
    reference = extract_features(model, images, CPU, 4, 0, use_cache=False, progress=False)[0]
    for runtime in ("onnx", "openvino"):
        prepare_inference(model, CPU, "off", runtime)
        d = extract_features(model, images, CPU, 4, 0, use_cache=False, progress=False)[0]
        assert np.abs(d - reference).max() < 1e-5, runtime
    assert exported_path(model).is_file()  # exported once, into the cache root
    bf16 = extract_features(model, images, CPU, 4, 0, use_cache=False, progress=False, precision="bf16")[0]
    assert 0.99 < np.sum(bf16 * reference, axis=1).min() < 1.0 - 1e-7  # OpenVINO bf16: close, not equal


def test_fol_region_features_come_from_the_same_exported_pass(make_model, images):
    model = make_model("fol-effnet-lite0", image_size=(128, 160))
    reranker = create_reranker("fol-region", model=model)

    class Sink(dict):
        def add_many(self, items):
            self.update(items)

    ref_store, got_store = Sink(), Sink()
    ref, _ = extract_features(model, images, CPU, 4, 0, False, reranker=reranker, store=ref_store, progress=False)
    prepare_inference(model, CPU, "off", "onnx")
    got, _ = extract_features(model, images, CPU, 4, 0, False, reranker=reranker, store=got_store, progress=False)
    assert np.abs(got - ref).max() < 1e-5 and sorted(got_store) == sorted(ref_store)
    for key, want in ref_store.items():
        have = got_store[key]
        assert np.array_equal(have.keypoints, want.keypoints) and have.image_size == want.image_size
        assert np.abs(have.descriptors - want.descriptors).max() < 1e-5
        assert np.abs(have.scores - want.scores).max() < 1e-5


def test_runtime_errors_are_one_line(make_model):
    with pytest.raises(PlaceRankError, match="^--runtime onnx runs fp32, not --precision bf16$"):
        check_runtime("onnx", CPU, "bf16")
    with pytest.raises(PlaceRankError, match="^--runtime openvino runs fp32 or bf16, not --precision fp16$"):
        check_runtime("openvino", CPU, "fp16")
    with pytest.raises(PlaceRankError, match=r"^--runtime onnx runs on the CPU \(the device is cuda\)"):
        check_runtime("onnx", torch.device("cuda"))
    with pytest.raises(PlaceRankError, match="^--runtime tensorrt: use one of auto, torch, onnx, openvino$"):
        check_runtime("tensorrt", CPU)
    model = prepare_inference(make_model("effnet-lite0-gem", image_size=(64, 64)), CPU, "off", "onnx")
    assert resolve_precision("auto", model, CPU) == "fp32"
    with pytest.raises(PlaceRankError, match="^--runtime onnx runs fp32, not --precision bf16$"):
        resolve_precision("bf16", model, CPU)


def test_eval_cli_refuses_a_runtime_precision_pair_before_work(gardens, tmp_path, capsys):
    args = ["eval", "--database", str(gardens / "day_right"), "--queries", str(gardens / "night_right")]
    code = main([*args, "--out", str(tmp_path / "e"), "--runtime", "onnx", "--precision", "bf16", "--device", "cpu"])
    assert code == 2
    assert capsys.readouterr().err.strip() == "placerank: error: --runtime onnx runs fp32, not --precision bf16"
    assert not (tmp_path / "e").exists()
