"""The service describes queries in its database's precision, refuses another explicit one at
start, and with ``compile on`` compiles the one-photo graph at start (warm-up), not during the
first request. ``torch.compile`` is replaced by a recording wrapper here: what is tested is
when the compile happens and which batches run through it, not inductor (the lead's
``tests/descriptors`` compile for real)."""

from __future__ import annotations

import csv

import pytest
import torch
from fastapi.testclient import TestClient

import placerank
from placerank.errors import PlaceRankError
from placerank.localize import query as query_module
from placerank.serve.app import create_app
from placerank.serve.service import LocalizeService, ServeConfig

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def bf16_site(tum, tum_positions, shared_weights, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serve_precision")
    positions = tum_positions("serve_precision.csv", start=0, stop=40, step=5)  # 8 frames
    query = next(
        tum / r["query_file"] for r in csv.DictReader(open(tum / "ground_truth.csv")) if r["has_positive"] == "1"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLACERANK_WEIGHTS", str(shared_weights))
        with placerank.Database.create(root / "db", image_size=(96, 128), radius=0.3, precision="bf16") as db:
            db.add_folder(positions=positions, progress=False, num_workers=0)
    return {"db": root / "db", "query": query}


@pytest.fixture
def weights_env(shared_weights, monkeypatch):
    monkeypatch.setenv("PLACERANK_WEIGHTS", str(shared_weights))


def _localize(service, photo):
    """One POST /v1/localize and the stats after it; the app's lifespan closes the service."""
    with TestClient(create_app(service)) as client:
        r = client.post("/v1/localize", files={"image": ("q.jpg", photo.read_bytes(), "image/jpeg")})
        stats = client.get("/v1/stats").json()
    assert r.status_code == 200, r.text
    return r.json(), stats


def test_queries_use_the_database_precision(bf16_site, weights_env, monkeypatch):
    seen: list[str] = []
    real = query_module.extract_features
    monkeypatch.setattr(
        query_module, "extract_features", lambda *a, **k: seen.append(k.get("precision", "fp32")) or real(*a, **k)
    )
    service = LocalizeService(ServeConfig(db=bf16_site["db"]), log=lambda msg: None)
    body, stats = _localize(service, bf16_site["query"])  # the app's lifespan closes the service
    assert seen == ["bf16"] and body["precision"] == "bf16"
    assert (stats["precision"], stats["compile"]) == ("bf16", "auto")


def test_another_explicit_precision_is_refused_at_start(bf16_site, weights_env):
    with pytest.raises(PlaceRankError) as e:
        LocalizeService(ServeConfig(db=bf16_site["db"], precision="fp32"), log=lambda msg: None)
    db = bf16_site["db"].resolve()
    assert str(e.value) == (
        f"{db}: database was built with precision bf16, not fp32; use --precision bf16 (or auto) or a new --db"
    )


def test_compile_on_warms_up_at_start(bf16_site, weights_env, monkeypatch):
    compiles: list[dict] = []
    batches: list[tuple] = []

    def fake_compile(fn, **kwargs):
        compiles.append(kwargs)

        def run(x, *a, **k):
            batches.append((tuple(x.shape), x.is_contiguous(memory_format=torch.channels_last)))
            return fn(x, *a, **k)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    logged: list[str] = []
    service = LocalizeService(ServeConfig(db=bf16_site["db"], compile="on"), log=logged.append)
    assert compiles == [{"dynamic": False}] and batches == [((1, 3, 96, 128), True)]  # the warm-up
    assert any("compiled effnet-lite0-gem for one query at a time" in line for line in logged)
    body, stats = _localize(service, bf16_site["query"])
    assert compiles == [{"dynamic": False}]  # the request reused the warm-up's graph
    assert batches == [((1, 3, 96, 128), True)] * 2
    assert body["precision"] == "bf16" and stats["compile"] == "on" and body["matches"]
