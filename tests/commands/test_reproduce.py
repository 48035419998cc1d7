"""``placerank reproduce``: the published configurations, the one-line errors for missing weights
and data, the measured-vs-published comparison and ``--check``, and end-to-end runs on tiny
benchmark replicas (real shared images, synthetic coordinates) with weights written in the
released key layouts.

The released models are too large for a CPU test (ViT-L: 300 M parameters; SFRS: a 4096 x 32768
PCA), so the end-to-end runs take the smallest published configuration that uses each code path:
FoL ViT-B/14 (global + fol-region re-ranking; the official checkpoint container and keys, random
values) at 126 px, and SFRS VGG16-NetVLAD in OpenIBL's hub layout with a 64-d PCA at 64 x 96 px.
The input size is overridden with ``--image-size``, which the report marks as a deviation.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from placerank.cli import main
from placerank.commands.reproduce import CONFIGURATIONS, comparison_lines
from placerank.errors import PlaceRankError
from placerank.eval.results import EvalResult
from placerank.presets import list_presets
from placerank.presets.benchmarks import BENCHMARKS
from placerank.presets.published import PUBLISHED, compare, failures, get_published

_spec = importlib.util.spec_from_file_location("layout_replicas", Path(__file__).parents[1] / "data" / "replicas.py")
R = importlib.util.module_from_spec(_spec)
assert _spec.loader is not None
_spec.loader.exec_module(R)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "reproduce.md"
pytestmark = pytest.mark.usefixtures("single_thread")


def test_configurations_are_complete_and_runnable():
    from placerank.models import list_models
    from placerank.rerank.base import list_rerankers, reranker_options

    assert list(PUBLISHED) == CONFIGURATIONS
    assert {e.name for e in list_presets("published")} == set(PUBLISHED)
    models = {e.name for e in list_models()}
    rerankers = {e.name for e in list_rerankers()}
    for pub in PUBLISHED.values():
        assert pub.model in models and set(pub.numbers) <= set(BENCHMARKS), pub.name
        if pub.rerank:
            assert pub.rerank in rerankers
            assert reranker_options(pub.rerank, pub.rerank_options) == pub.rerank_options
        for numbers in pub.numbers.values():
            assert numbers.source and (numbers.reranked or numbers.global_)
    fol = get_published("fol-vitl14")
    assert (fol.model, fol.image_size, fol.top_k, fol.weights_file) == ("fol-vitl14", (504, 504), 100, "FoL_large.pth")
    assert fol.rerank == "fol-region" and fol.rerank_options == {"threshold": 0.7, "mode": "dense", "min_matches": 0}
    assert fol.numbers["pitts30k-test"].reranked == (94.5, 97.4, 98.2)
    sela = get_published("selavpr-vitl14-pitts30k")
    assert (sela.image_size, sela.rerank, sela.weights_file) == ((224, 224), "selavpr-mnn", "SelaVPR_pitts30k.pth")
    assert get_published("sfrs-vgg16").numbers["pitts250k-test"].global_ == (90.7, 96.4, 97.6)
    with pytest.raises(PlaceRankError, match=r"^unknown published configuration 'fol'; known: fol-vitl14, "):
        get_published("fol")


def test_docs_list_exactly_the_published_numbers():
    """docs/reproduce.md's table and presets/published.py hold the same numbers and sources."""
    rows = set()
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0].startswith("`") and cells[2] in ("global", "re-ranked"):
            rows.add((cells[0].strip("`"), cells[1].strip("`"), cells[2], *map(float, cells[3:6]), cells[6]))
    expected = set()
    for pub in PUBLISHED.values():
        for split, numbers in pub.numbers.items():
            for stage, triple in (("global", numbers.global_), ("re-ranked", numbers.reranked)):
                if triple:
                    expected.add((pub.name, split, stage, *triple, numbers.source))
    assert rows == expected


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


def test_missing_weights_and_data_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PLACERANK_WEIGHTS", str(tmp_path))
    root = tmp_path / "data"
    assert _error(capsys, ["reproduce", "fol-vitl14", "--dataset", f"pitts30k-test:{root}"]) == (
        "placerank: error: FoL ViT-L/14 weights not found: put FoL_large.pth (huggingface.co/shunpeng/FoL) in"
        " $PLACERANK_WEIGHTS (or ../shared/weights) or pass --weights FILE"
    )
    missing = tmp_path / "SelaVPR_msls.pth"
    assert _error(
        capsys, ["reproduce", "selavpr-vitl14-msls", "--dataset", f"msls-val:{root}", "--weights", str(missing)]
    ) == (
        f"placerank: error: {missing}: no such weights file; put SelaVPR_msls.pth (Google Drive file"
        " 1vy05l0JTEgr6n8iSoz_P_yjWfEzFPAkV, linked from the SelaVPR README) there or pass --weights with its path"
    )
    weights = tmp_path / "vgg16_netvlad.pth"
    weights.write_bytes(b"")
    base = ["reproduce", "sfrs-vgg16", "--weights", str(weights), "--out", str(tmp_path / "out"), "--dataset"]
    assert _error(capsys, [*base, f"pitts250k-test:{root}"]) == (
        f"placerank: error: {root}: does not exist; put the pitts250k-test data there"
        " (pitts250k_test.mat or pitts250k/images/test/)"
    )
    root.mkdir()
    assert _error(capsys, [*base, f"pitts250k-test:{root}"]) == (
        f"placerank: error: {root}: no pitts250k-test data found (looked for pitts250k_test.mat or"
        " pitts250k/images/test/)"
    )
    assert _error(capsys, [*base, f"tokyo247:{root}"]) == (
        "placerank: error: sfrs-vgg16 has no published number on tokyo247 (published on: pitts250k-test;"
        " see docs/reproduce.md)"
    )
    assert _error(capsys, [*base, str(root)]) == (
        "placerank: error: --dataset needs NAME:ROOT; sfrs-vgg16 has published numbers on: pitts250k-test"
    )
    assert _error(capsys, ["reproduce", "netvlad", "--dataset", f"pitts30k-test:{root}"]).startswith(
        "placerank: error: unknown published configuration 'netvlad'; known: fol-vitl14, fol-vitl14-322,"
    )


def _result(recall: dict, first: dict) -> EvalResult:
    return EvalResult(
        recall=recall,
        recall_first_stage=first,
        num_queries=10,
        num_database=20,
        timing_s={},
        peak_memory_mb=0.0,
        dataset={"name": "pitts30k-test", "rule": "distance <= 25 m"},
    )


def test_comparison_and_check_on_a_result(tmp_path, capsys, monkeypatch):
    pub = get_published("fol-vitl14")  # pitts30k-test: global 93.9/97.2/98.1, re-ranked 94.5/97.4/98.2
    result = _result({"1": 0.940, "5": 0.979, "10": 0.982, "20": 0.99}, {"1": 0.939, "5": 0.970, "10": 0.981})
    rows = compare(pub, "pitts30k-test", result)
    assert [(r.stage, r.n) for r in rows] == [("global", n) for n in ("1", "5", "10")] + [
        ("re-ranked", n) for n in ("1", "5", "10")
    ]
    assert [round(r.delta, 3) for r in rows] == [0.0, -0.2, 0.0, -0.5, 0.5, 0.0]
    assert failures(rows) == []  # 0.5 exactly is within
    worse = compare(pub, "pitts30k-test", _result({**result.recall, "1": 0.9399}, result.recall_first_stage))
    assert [(r.stage, r.n) for r in failures(worse)] == [("re-ranked", "1")]
    lines = comparison_lines(worse)
    assert lines[4] == "re-ranked  R@1      93.99      94.5  -0.51  !"
    assert lines[1] == "global     R@1      93.90      93.9  +0.00"
    # global-only configuration: only the first-stage numbers are compared
    sfrs = compare(get_published("sfrs-vgg16"), "pitts250k-test", _result({}, {"1": 0.9, "5": 0.96, "10": 0.97}))
    assert [r.stage for r in sfrs] == ["global"] * 3

    # the command: --check exits 1 on a failing row, 0 otherwise; without --check always 0
    import placerank.presets.published as published

    failing = _result({"1": 0.5, "5": 0.9, "10": 1.0}, result.recall_first_stage)
    for res, code in ((result, 0), (failing, 1)):
        monkeypatch.setattr(
            published, "reproduce", lambda *a, res=res, **k: (res, compare(pub, "pitts30k-test", res), tmp_path)
        )
        assert main(["reproduce", "fol-vitl14", "--dataset", "pitts30k-test:x", "--check"]) == code
        out = capsys.readouterr().out
        assert ("check failed: 3 of 6 deltas exceed 0.5 points (worst re-ranked R@1)" in out) == (code == 1)
        assert ("check passed" in out) == (code == 0)
    assert main(["reproduce", "fol-vitl14", "--dataset", "pitts30k-test:x"]) == 0
    assert "published: FoL README @09cd23b, 'Performance' table (ViT-L, 504x504)" in capsys.readouterr().out


@pytest.fixture(scope="module")
def fol_base_official(tmp_path_factory) -> Path:
    """FoL_base.pth as released: ``model_state_dict`` with DataParallel's ``module.`` prefix and
    the training-time keys, every key and shape of the model (built on the meta device), seeded
    random values (LayerNorm weights 1, LayerScale 0.1)."""
    from placerank.models import create

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in create("fol-vitb14", pretrained=False).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, shape in shapes.items():
        if k.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            sd[k] = torch.ones(shape)
        elif k.endswith("gamma"):
            sd[k] = torch.full(shape, 0.1)
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.02
    path = tmp_path_factory.mktemp("fol_weights") / "FoL_base.pth"
    torch.save({"epoch_num": 3, "model_state_dict": {f"module.{k}": v for k, v in sd.items()}, "best_r5": 96.9}, path)
    return path


def _small_downloader_tree(root: Path, gardens: Path) -> None:
    """``pitts30k/images/test``: the replica's first 10 database places (R@10 needs 10) and 3
    queries, the last one far from everything (cheap ViT-B forwards)."""
    db, q = R.places(gardens)
    test = root / "pitts30k" / "images" / "test"
    for k, (src, e, n) in enumerate(db[:10]):
        R.link(src, test / "database" / f"@{e:.2f}@{n:.2f}@17@T@{k:04d}@.jpg")
    for k, (src, e, n) in enumerate([q[0], q[2], q[-1]]):
        R.link(src, test / "queries" / f"@{e:.2f}@{n:.2f}@17@T@q{k:04d}@.jpg")


def test_fol_vitb14_end_to_end_on_a_downloader_replica(tmp_path, gardens, fol_base_official, capsys):
    _small_downloader_tree(tmp_path / "data", gardens)
    out = tmp_path / "out"
    argv = ["reproduce", "fol-vitb14", "--dataset", f"pitts30k-test:{tmp_path / 'data'}", "--device", "cpu"]
    argv += ["--weights", str(fol_base_official), "--image-size", "126", "--out", str(out), "--check"]
    assert main(argv) == 1  # random weights cannot match the paper
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "FoL ViT-B/14 on pitts30k-test: 3 queries x 10 database images (distance <= 25 m), cpu"
    assert printed[1] == "input 126x126 instead of the published 322x322"
    assert [line.split()[:2] for line in printed[3:9]] == [
        [stage, f"R@{n}"] for stage in ("global", "re-ranked") for n in (1, 5, 10)
    ]
    assert [float(line.split()[3]) for line in printed[3:9]] == [92.1, 96.4, 97.6, 93.1, 96.9, 97.7]
    report = json.loads((out / "reproduce.json").read_text())
    assert report["benchmark"] == "pitts30k-test" and report["image_size_overridden"] == [126, 126]
    assert report["configuration"]["rerank_options"] == {"threshold": 0.7, "mode": "dense", "min_matches": 0}
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["rerank"]["name"] == "fol-region" and results["rerank"]["top_k"] == 10  # min(100, database)
    assert results["model"]["weights"].startswith("FoL_base.pth (official FoL)")
    assert results["model"]["input_size"] == [126, 126] and results["model"]["local_mode"] == "dense"
    measured = [r["measured"] for r in report["rows"]]
    assert measured == pytest.approx(
        [100 * results["recall_first_stage"][n] for n in ("1", "5", "10")]
        + [100 * results["recall"][n] for n in ("1", "5", "10")]
    )
    assert not report["all_within_tolerance"]


def test_sfrs_end_to_end_on_a_mat_replica(tmp_path, gardens, capsys):
    """Global retrieval only (no re-ranker), NetVLAD .mat reader, OpenIBL hub layout (30 tensors)."""
    from placerank.models.sfrs import build_sfrs_vgg16
    from placerank.models.sfrs_checkpoints import export_openibl_hub

    size = (64, 96)
    model = build_sfrs_vgg16(pca_dim=64, image_size=size)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype.is_floating_point:
                t.copy_(torch.randn(t.shape, generator=g) * (0.05 if "backbone" in name else 1.0))
    model.aggregator.initialised.fill_(True)
    weights = tmp_path / "vgg16_netvlad.pth"
    export_openibl_hub(model, weights)
    R.build_mat_v5(tmp_path / "data", gardens, name="pitts250k_test.mat")
    out = tmp_path / "out"
    argv = ["reproduce", "sfrs-vgg16", "--dataset", f"pitts250k-test:{tmp_path / 'data'}", "--device", "cpu"]
    assert main([*argv, "--weights", str(weights), "--image-size", "64", "96", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^global     R@1 +[0-9.]+ +90\.7 +[-+][0-9.]+", printed, re.M)
    assert "re-ranked" not in printed and "OpenIBL docs/MODEL_ZOO.md @701c8eb" in printed
    report = json.loads((out / "reproduce.json").read_text())
    assert [r["published"] for r in report["rows"]] == [90.7, 96.4, 97.6]
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["rerank"] is None and results["dataset"]["protocol"]["benchmark"] == "pitts250k-test"
