"""The GPU path on a CPU machine: ``--device`` checks, bf16 autocast, per-precision caches,
pinned-memory loading and the faiss-gpu search fallback. Nothing here needs a GPU: the CUDA
branches are exercised through their CPU fallbacks (or faiss's GPU calls stood in by CPU ones)."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from placerank.cli import main
from placerank.descriptors import extract as extract_mod
from placerank.descriptors.cache import namespace
from placerank.descriptors.extract import check_precision, descriptor_cache_for, descriptor_namespace, extract_features
from placerank.descriptors.files import extract_to_folder, load_descriptors, up_to_date
from placerank.descriptors.runtime import RUNTIME_ATTR
from placerank.errors import PlaceRankError
from placerank.index import flat
from placerank.index.flat import FlatIndex
from placerank.utils import resolve_device

pytestmark = pytest.mark.usefixtures("single_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def images(shared_data) -> list[Path]:
    paths = sorted((shared_data / "gardenspoint_walking" / "day_left").glob("*.jpg"))[:6]
    assert len(paths) == 6
    return paths


@pytest.fixture(scope="module")
def model(make_model):
    return make_model("effnet-lite0-gem", image_size=(160, 224))


def test_bf16_descriptors_are_float32_unit_and_close_to_fp32(model, images):
    fp32, _ = extract_features(model, images, CPU, 4, 0, use_cache=False, progress=False)
    bf16, _ = extract_features(model, images, CPU, 4, 0, use_cache=False, progress=False, precision="bf16")
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)
    assert (fp32 * bf16).sum(1).min() > 0.99  # cosine, per image
    assert not np.array_equal(fp32, bf16)  # the forward really ran in bf16


def test_precision_is_part_of_the_cache_namespace(model, images):
    # fp32 keeps the namespace existing caches were written under
    assert descriptor_namespace(model) == namespace(model.name, model.weights_id, model.preprocess.signature())
    assert descriptor_namespace(model, "bf16") != descriptor_namespace(model)
    # another runtime: its own bf16 cache, the same fp32 one (fp32 descriptors agree to 1e-5)
    torch_bf16 = descriptor_namespace(model, "bf16")
    setattr(model, RUNTIME_ATTR, "openvino")
    assert descriptor_namespace(model, "bf16") != torch_bf16
    assert descriptor_namespace(model) == namespace(model.name, model.weights_id, model.preprocess.signature())
    setattr(model, RUNTIME_ATTR, "torch")
    assert descriptor_namespace(model, "bf16") == torch_bf16
    fp32, _ = extract_features(model, images[:2], CPU, 2, 0, progress=False)
    bf16, _ = extract_features(model, images[:2], CPU, 2, 0, progress=False, precision="bf16")
    again, _ = extract_features(model, images[:2], CPU, 2, 0, progress=False)  # read from the fp32 cache
    np.testing.assert_array_equal(again, fp32)
    assert not np.array_equal(bf16, fp32)
    for precision, expected in (("fp32", fp32), ("bf16", bf16)):
        cache = descriptor_cache_for(model, precision)
        try:
            keys = [extract_mod.image_key(p) for p in images[:2]]
            rows = cache.get_many(keys)  # a dict: SQLite returns rows in no promised order
            np.testing.assert_array_equal(np.stack([rows[k] for k in keys]), expected)
        finally:
            cache.close()


def test_descriptor_folder_records_its_precision(model, images, tmp_path):
    ds, skipped = extract_to_folder(tmp_path / "d", model, images[:2], CPU, num_workers=0, precision="bf16")
    assert not skipped and load_descriptors(tmp_path / "d").precision == "bf16"
    assert up_to_date(tmp_path / "d", model, images[:2], precision="bf16")
    assert not up_to_date(tmp_path / "d", model, images[:2])  # an fp32 run re-extracts
    ds32, skipped = extract_to_folder(tmp_path / "d", model, images[:2], CPU, num_workers=0)
    assert not skipped and ds32.precision == "fp32" and ds32.fingerprint != ds.fingerprint


def test_precision_checks_are_one_line():
    assert check_precision("bf16", CPU) == "bf16"
    with pytest.raises(PlaceRankError, match="fp16 needs a CUDA device"):
        check_precision("fp16", CPU)
    with pytest.raises(PlaceRankError, match="use one of auto, fp32, bf16, fp16"):
        check_precision("int8", CPU)


def test_pinned_memory_when_the_device_is_cuda(model, images, monkeypatch):
    seen = {}

    def loader(*args, pin_memory=False, **kwargs):
        seen["pin_memory"] = pin_memory
        raise RuntimeError("stop: loader inspected")

    monkeypatch.setattr(extract_mod, "make_loader", loader)
    for device, pinned in ((torch.device("cuda"), True), (CPU, False)):
        with pytest.raises(RuntimeError, match="stop"):
            extract_features(model, images[:1], device, use_cache=False, progress=False)
        assert seen.pop("pin_memory") is pinned


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU and resolve_device(None) == CPU and resolve_device("CPU") == CPU
    with pytest.raises(PlaceRankError, match="no CUDA GPU is available"):
        resolve_device("cuda")
    with pytest.raises(PlaceRankError, match="not a device"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(PlaceRankError, match=r"1 CUDA GPU\(s\)"):
        resolve_device("cuda:3")


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--database", "{g}/day_left", "--queries", "{g}/day_right", "--out", "{t}/e", "--device", "cuda"],
        ["extract", "--images", "{g}/day_left", "--out", "{t}/x", "--device", "cuda"],
        ["extract", "--images", "{g}/day_left", "--out", "{t}/x", "--device", "cpu", "--precision", "fp16"],
        ["match", "{g}/day_left/Image000.jpg", "{g}/day_right/Image000.jpg", "--device", "cuda"],
    ],
)
def test_cli_device_errors_are_one_line(argv, shared_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    g = shared_data / "gardenspoint_walking"
    code = main([a.format(g=g, t=tmp_path) for a in argv])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("placerank: warning")]
    assert code != 0 and len(err) == 1 and err[0].startswith("placerank: error: --")
    assert "CUDA" in err[0]


def test_flat_search_falls_back_to_cpu_without_faiss_gpu():
    rng = np.random.default_rng(0)
    db = rng.standard_normal((50, 8)).astype(np.float32)
    q = rng.standard_normal((7, 8)).astype(np.float32)
    index = FlatIndex.build(db)
    expected = index.search(q, 5)
    for device in (None, CPU, torch.device("cuda"), "cuda:1"):
        got = index.search(q, 5, device=device)
        assert index.searched_on == "cpu"
        np.testing.assert_array_equal(got[1], expected[1])
    if not hasattr(faiss, "StandardGpuResources"):  # this faiss build is CPU-only: no GPU copy
        assert flat.gpu_copy(index.index, torch.device("cuda")) is None


def test_flat_search_uses_the_gpu_copy_when_faiss_has_gpus(monkeypatch):
    """faiss-gpu's calls stood in by CPU ones: the CUDA branch picks the copy, results equal."""
    made = []

    def to_gpu(resources, gpu, index):
        made.append(gpu)
        return faiss.clone_index(index)

    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2, raising=False)
    monkeypatch.setattr(flat, "_GPU_RESOURCES", {})
    rng = np.random.default_rng(1)
    index = FlatIndex.build(rng.standard_normal((40, 4)).astype(np.float32))
    q = rng.standard_normal((3, 4)).astype(np.float32)
    expected = index.search(q, 4)
    got = index.search(q, 4, device=torch.device("cuda", 1))
    assert index.searched_on == "gpu" and made == [1]
    np.testing.assert_array_equal(got[1], expected[1])
    index.search(q, 4, device="cuda:5")  # a GPU faiss does not see: the CPU index answers
    assert index.searched_on == "cpu"
    index.search(q, 4, device=CPU)
    assert index.searched_on == "cpu"
