"""bf16 descriptors of two runtimes differ as much as each differs from fp32 (cosine ~0.99), so a
descriptor folder and a local-feature store name the runtime below fp32 and a rerun with another
runtime re-extracts; fp32 ones agree to 1e-5 and are shared. No OpenVINO is loaded here: a model
prepared for ``openvino`` only carries the runtime's name until its first batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from placerank.descriptors.extract import local_numerics, local_store_for
from placerank.descriptors.fast import prepare_inference
from placerank.descriptors.files import extract_to_folder, load_descriptors, up_to_date
from placerank.descriptors.runtime import numerics

pytestmark = pytest.mark.usefixtures("single_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def images(shared_data) -> list[Path]:
    return sorted((shared_data / "gardenspoint_walking" / "day_right").glob("*.jpg"))[:3]


def test_numerics_names_the_runtime_only_below_fp32():
    assert numerics("fp32", "torch") == numerics("fp32", "openvino") == "fp32"
    assert numerics("bf16", "torch") == "bf16"  # PyTorch's label: folders written before runtimes existed keep it
    assert numerics("bf16", "openvino") == "bf16+openvino"


@pytest.mark.parametrize("precision, shared", [("bf16", False), ("fp32", True)])
def test_a_descriptor_folder_is_up_to_date_only_for_its_numerics(make_model, images, tmp_path, precision, shared):
    model = prepare_inference(make_model("effnet-lite0-gem", image_size=(64, 96)), CPU, "off", "torch")
    ds, skipped = extract_to_folder(tmp_path, model, images, CPU, batch_size=4, num_workers=0, precision=precision)
    assert not skipped and ds.runtime == "torch"
    again = load_descriptors(tmp_path)
    assert again.runtime == "torch" and again.precision == precision and again.fingerprint == ds.fingerprint
    assert up_to_date(tmp_path, model, images, None, precision)
    prepare_inference(model, CPU, "off", "openvino")  # the name only: nothing runs here
    assert up_to_date(tmp_path, model, images, None, precision) is shared


def test_the_models_own_local_features_are_stored_per_runtime_below_fp32(make_model, tmp_path):
    from placerank.rerank.base import create_reranker

    model = prepare_inference(make_model("fol-effnet-lite0", image_size=(64, 96)), CPU, "off", "torch")
    own = create_reranker("fol-region", model=model)
    assert local_numerics(model, own, "bf16") == "bf16"
    torch_store = local_store_for(own, tmp_path, local_numerics(model, own, "bf16")).folder
    prepare_inference(model, CPU, "off", "openvino")
    assert local_numerics(model, own, "bf16") == "bf16+openvino" and local_numerics(model, own, "fp32") == "fp32"
    assert local_store_for(own, tmp_path, local_numerics(model, own, "bf16")).folder != torch_store
    ransac = create_reranker("ransac-xfeat")  # its own network always runs on PyTorch
    assert local_numerics(model, ransac, "bf16") == "fp32"
