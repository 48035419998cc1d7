"""The fast inference path (placerank.descriptors.fast): channels_last and torch.compile give the
eager fp32 descriptors (within 1e-5), the compile decision follows its documented thresholds,
a failed compile falls back with one warning, and ``--precision auto`` reads the recall checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from placerank.cli import main
from placerank.descriptors import fast
from placerank.descriptors.extract import extract_features
from placerank.descriptors.fast import (
    COLD_MIN_IMAGES,
    WARM_MIN_IMAGES,
    check_record_path,
    choose_precision,
    compile_mode,
    compiled_precision_holds,
    device_class,
    prepare_inference,
    resolve_precision,
    should_compile,
)
from placerank.errors import PlaceRankError

pytestmark = pytest.mark.usefixtures("single_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def images(shared_data) -> list[Path]:
    return sorted((shared_data / "gardenspoint_walking" / "day_right").glob("*.jpg"))[:5]


def _eager(make_model, images, **kwargs):
    model = make_model("effnet-lite0-gem", image_size=(96, 128))
    return extract_features(model, images, CPU, 4, 0, use_cache=False, progress=False, **kwargs)[0]


def test_channels_last_gives_the_eager_descriptors(make_model, images):
    reference = _eager(make_model, images)
    model = prepare_inference(make_model("effnet-lite0-gem", image_size=(96, 128)), CPU, compile="off")
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    d = extract_features(model, images, CPU, 4, 0, use_cache=False, progress=False)[0]
    assert np.abs(d - reference).max() < 1e-5
    assert model.weights_id == make_model("effnet-lite0-gem", image_size=(96, 128)).weights_id


def test_compiled_backbone_gives_the_eager_descriptors_and_leaves_the_model_alone(make_model, images):
    """5 images in batches of 4: the last batch is padded to the compiled shape and cut back."""
    reference = _eager(make_model, images)
    model = prepare_inference(make_model("effnet-lite0-gem", image_size=(96, 128)), CPU, compile="on")
    before = model.weights_id
    d = extract_features(model, images, CPU, 4, 0, use_cache=False, progress=False)[0]
    assert d.shape == reference.shape and np.abs(d - reference).max() < 1e-5
    assert "forward" not in model.backbone.__dict__  # the compiled forward is gone after extraction
    model.invalidate_weights_id()
    assert model.weights_id == before and not any("_orig_mod" in k for k in model.state_dict())
    marker = fast._graph_marker(model, 4, "fp32", CPU)
    assert marker.is_file()  # the next auto run knows inductor's cache is warm
    assert should_compile(prepare_inference(model, CPU, "auto"), WARM_MIN_IMAGES, 4, "fp32", CPU)


def test_a_failing_compile_falls_back_to_eager_with_one_warning(make_model, images, monkeypatch, capsys):
    reference = _eager(make_model, images)

    def broken(fn, **kwargs):
        def run(*a, **k):
            raise RuntimeError("InductorError: no C++ compiler\nsecond line")

        return run

    monkeypatch.setattr(fast.torch, "compile", broken)
    model = prepare_inference(make_model("effnet-lite0-gem", image_size=(96, 128)), CPU, compile="on")
    d = extract_features(model, images, CPU, 4, 0, use_cache=False, progress=False)[0]
    assert np.abs(d - reference).max() < 1e-5
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "placerank: warning: torch.compile is unavailable here (RuntimeError: InductorError: no C++ compiler); running eager"
    ]
    assert compile_mode(model) == "off" and "forward" not in model.backbone.__dict__


def test_auto_compiles_only_when_the_images_repay_it(make_model, monkeypatch):
    monkeypatch.setattr(fast, "shipped_checks", lambda: [_record(0.65, 0.65, compiled16=0.65)])
    model = prepare_inference(make_model("effnet-lite0-gem", image_size=(64, 64)), CPU, compile="auto")
    assert not should_compile(model, COLD_MIN_IMAGES - 1, 16, "bf16", CPU)
    assert should_compile(model, COLD_MIN_IMAGES, 16, "bf16", CPU)
    assert not should_compile(model, WARM_MIN_IMAGES, 16, "bf16", CPU)  # cold: no marker yet
    marker = fast._graph_marker(model, 16, "bf16", CPU)
    marker.parent.mkdir(parents=True)
    marker.write_text("{}")
    assert should_compile(model, WARM_MIN_IMAGES, 16, "bf16", CPU)
    assert not should_compile(model, WARM_MIN_IMAGES, 16, "fp32", CPU)  # another graph is still cold
    assert not should_compile(prepare_inference(model, CPU, "off"), 10**6, 16, "bf16", CPU)
    assert should_compile(prepare_inference(model, CPU, "on"), 1, 16, "bf16", CPU)
    with pytest.raises(PlaceRankError, match="^--compile fast: use one of auto, on, off$"):
        prepare_inference(model, CPU, "fast")


def _record(fp32, bf16, ms32=100.0, ms16=40.0, compiled16=None) -> dict:
    record = {
        "model": "effnet-lite0-gem",
        "device_class": device_class(CPU),
        "precisions": {
            "fp32": {"recall_at_1": fp32, "ms_per_image": ms32},
            "bf16": {"recall_at_1": bf16, "ms_per_image": ms16},
        },
    }
    if compiled16 is not None:
        record["compiled"] = {"bf16": {"recall_at_1": compiled16, "ms_per_image": ms16 / 2}}
    return record


def test_auto_compiles_reduced_precision_only_where_its_compiled_check_held(make_model, monkeypatch):
    """Eager bf16 holding recall is not enough: the compiled bf16 forward must have held too (the
    shipped EfficientNet-Lite0 record: eager bf16 +0.7 points, compiled -0.7)."""
    model = prepare_inference(make_model("effnet-lite0-gem", image_size=(64, 64)), CPU, compile="auto")
    images = COLD_MIN_IMAGES
    for compiled16, expected in ((0.65, True), (0.646, True), (0.644, False), (None, False)):
        monkeypatch.setattr(fast, "shipped_checks", lambda c=compiled16: [_record(0.65, 0.65, compiled16=c)])
        assert should_compile(model, images, 16, "bf16", CPU) is expected, compiled16
        assert should_compile(model, images, 16, "fp32", CPU)  # fp32 compiles whatever the check says
    monkeypatch.setattr(fast, "shipped_checks", lambda: [])
    assert not should_compile(model, images, 16, "bf16", CPU)  # never checked: eager
    assert should_compile(prepare_inference(model, CPU, "on"), 1, 16, "bf16", CPU)  # asked for: compiled
    monkeypatch.undo()
    lite0 = fast.find_check("effnet-lite0-gem", "cpu-amx", "torch")
    assert lite0 is not None and lite0["chosen"] == "bf16" and not compiled_precision_holds(lite0, "bf16")


def test_choose_precision_takes_the_fastest_within_half_a_point():
    assert choose_precision(_record(0.650, 0.650)) == "bf16"
    assert choose_precision(_record(0.650, 0.646)) == "bf16"  # -0.4 points
    assert choose_precision(_record(0.650, 0.644)) == "fp32"  # -0.6 points
    assert choose_precision(_record(0.650, 0.700, ms16=120.0)) == "fp32"  # better but slower
    assert choose_precision(_record(0.650, 0.700)) == "bf16"


def test_auto_precision_reads_the_users_check_before_the_shipped_one(make_model, monkeypatch, capsys):
    model = make_model("effnet-lite0-gem", image_size=(64, 64))
    monkeypatch.setattr(fast, "shipped_checks", lambda: [_record(0.65, 0.65)])
    assert resolve_precision("auto", model, CPU) == "bf16"
    path = check_record_path("effnet-lite0-gem", device_class(CPU))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(_record(0.65, 0.60)))
    assert resolve_precision("auto", model, CPU) == "fp32"
    path.write_text("{not json")
    assert resolve_precision("auto", model, CPU) == "bf16"
    assert capsys.readouterr().err.startswith("placerank: warning: ignoring the unreadable precision check")
    monkeypatch.setattr(fast, "shipped_checks", lambda: [])
    path.unlink()
    assert resolve_precision("auto", model, CPU) == "fp32"  # never checked: fp32
    assert resolve_precision("bf16", model, CPU) == "bf16"
    with pytest.raises(PlaceRankError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", model, CPU)


def test_the_shipped_checks_are_readable_records():
    for record in fast.shipped_checks():
        runs = record["precisions"]
        assert "fp32" in runs and record["chosen"] == choose_precision(record)
        assert all(0 <= r["recall_at_1"] <= 1 and r["ms_per_image"] > 0 for r in runs.values())


def test_check_precision_command_measures_and_saves(capsys):
    code = main(["check-precision", "--image-size", "32", "48", "--device", "cpu", "--workers", "0"])
    out = capsys.readouterr().out
    assert code == 0, out
    record = json.loads(check_record_path("effnet-lite0-gem", device_class(CPU)).read_text())
    assert record["queries"] == 140 and record["database"] == 140 and record["input_size"] == [32, 48]
    assert record["chosen"] == choose_precision(record)
    assert f"--precision auto takes {record['chosen']}" in out
    for name, run in record["precisions"].items():
        assert 0 < run["recall_at_1"] <= 1 and run["ms_per_image"] > 0
        if name != "fp32":
            assert 0.95 < run["min_cosine"] <= 1.0 + 1e-6
    # every reduced precision this CPU runs was also measured compiled, for --compile auto
    assert sorted(record.get("compiled", {})) == sorted(set(record["precisions"]) - {"fp32"})
    for run in record.get("compiled", {}).values():
        assert 0 < run["recall_at_1"] <= 1 and 0.95 < run["min_cosine"] <= 1.0 + 1e-6


def test_extract_records_the_resolved_precision(gardens, tmp_path, monkeypatch):
    monkeypatch.setattr(fast, "shipped_checks", lambda: [_record(0.65, 0.65)])
    args = ["extract", "--images", str(gardens / "day_right"), "--out", str(tmp_path / "d"), "--device", "cpu"]
    assert main([*args, "--image-size", "32", "--workers", "0", "--no-compile"]) == 0
    meta = json.loads((tmp_path / "d" / "descriptors.json").read_text())
    assert meta["precision"] == "bf16"
    with pytest.raises(SystemExit) as e:
        main([*args, "--compile", "sometimes"])
    assert e.value.code == 2


def test_eval_writes_the_resolved_precision_and_its_check(gardens, tmp_path, monkeypatch):
    """``--precision auto`` resolved to bf16 is what results.json says, with the check it rests on;
    its descriptors are the bf16 ones (another cache namespace than fp32)."""
    monkeypatch.setattr(fast, "shipped_checks", lambda: [_record(0.65, 0.65)])
    out = tmp_path / "e"
    common = ["--database", str(gardens / "day_right"), "--queries", str(gardens / "night_right"), "--device", "cpu"]
    args = [*common, "--frame-tolerance", "2", "--image-size", "32", "48", "--workers", "0", "--examples", "0"]
    assert main(["eval", *args, "--out", str(out)]) == 0
    model = json.loads((out / "results.json").read_text())["model"]
    assert model["precision"] == "bf16" and model["compile"] == "auto"
    assert model["precision_check"]["fp32_recall_at_1"] == 0.65 and model["precision_check"]["recall_at_1"] == 0.65
    assert main(["eval", *args, "--out", str(tmp_path / "f"), "--precision", "fp32", "--no-compile"]) == 0
    model = json.loads((tmp_path / "f" / "results.json").read_text())["model"]
    assert model["precision"] == "fp32" and model["compile"] == "off" and "precision_check" not in model
