"""The HTTP API on the real geotagged photos, through FastAPI's TestClient (httpx)."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import threading
import zlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from placerank.data.exif import read_gps
from placerank.localize.lock import WriteLock
from placerank.serve.app import create_app
from placerank.serve.service import LocalizeService, ServeConfig
from placerank.serve.worker import ServiceBusy

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def service(serve_site, serve_weights_env):
    return LocalizeService(ServeConfig(db=serve_site["db"]), log=lambda msg: None)


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service)) as c:
        yield c


def _post(client, data: bytes, name: str = "photo.jpg", **form):
    return client.post("/v1/localize", files={"image": (name, data, "image/jpeg")}, data=form)


def _one_line_error(r, status: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert list(body) == ["error"] and "\n" not in body["error"] and "Traceback" not in r.text
    return body["error"]


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels in a few bytes (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_localize_held_out_berlin_photo(client, service, serve_site):
    photo = serve_site["held"] / "01.jpg"
    r = client.post("/v1/localize", files={"image": ("01.jpg", photo.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    # The same schema as `placerank localize`'s per-photo JSON (Database.localize -> to_json).
    cli = service.worker.submit(service.db.localize, photo, 10).result().to_json()  # on the worker: it owns SQLite
    assert list(body) == list(cli)
    assert list(body["matches"][0]) == list(cli["matches"][0])
    assert [m["id"] for m in body["matches"]] == [m["id"] for m in cli["matches"]]
    assert body["lat"] == pytest.approx(cli["lat"]) and body["confidence"] == cli["confidence"]
    truth = read_gps(photo)
    assert body["query_gps"]["error_m"] < 25.0 and body["query_gps"]["lat"] == truth.lat  # measured 6.49 m
    assert body["matches"][0]["path"] == "opensfm_berlin/02.jpg" and body["matches"][0]["agrees"]
    assert body["confidence"] >= 0.9 and len(body["matches"]) == 10 and body["query"] == "01.jpg"
    assert {"describe", "search", "total", "queue"} <= set(body["timing_s"])
    assert str(serve_site["root"]) not in r.text  # no server paths in the answer
    r3 = _post(client, photo.read_bytes(), top_k="3")
    assert r3.status_code == 200 and len(r3.json()["matches"]) == 3


def test_bad_uploads_are_refused_with_one_line(client, serve_site):
    raw = (serve_site["held"] / "DSCN0038.jpg").read_bytes()
    assert "not an image" in _one_line_error(_post(client, b"this is not a JPEG\n"), 415)
    assert "empty" in _one_line_error(_post(client, b""), 422)
    assert "corrupt" in _one_line_error(_post(client, raw[: len(raw) // 2]), 422)  # pixels cut
    assert "decompression bomb" in _one_line_error(_post(client, _png_header(40000, 40000), "bomb.png"), 422)
    assert "100 MP" in _one_line_error(_post(client, _png_header(12000, 9000), "big.png"), 422)
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, "GIF")
    assert "GIF is not accepted" in _one_line_error(_post(client, gif.getvalue(), "a.gif"), 415)
    assert "top_k" in _one_line_error(_post(client, raw, top_k="0"), 422)
    assert "top_k" in _one_line_error(_post(client, raw, top_k="many"), 422)
    assert "unknown" in _one_line_error(_post(client, raw, rerank="no-such-reranker"), 422).lower()
    assert "image" in _one_line_error(client.post("/v1/localize", data={"top_k": "3"}), 422)


def test_upload_over_the_limit_is_413(client):
    big = b"\xff\xd8" + b"\0" * (21 * 2**20)  # 21 MB > the default 20 MB
    assert "upload limit" in _one_line_error(_post(client, big), 413)  # Content-Length says so

    def chunks():  # streamed without Content-Length: refused once the body passes the limit
        for _ in range(22):
            yield b"\0" * 2**20

    r = client.post("/v1/localize", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert "upload limit" in _one_line_error(r, 413)


def test_internal_error_has_no_trace(client, service, monkeypatch, serve_site):
    def broken(*args):
        raise RuntimeError(f"secret detail {serve_site['root']}")

    monkeypatch.setattr(service, "_localize", broken)
    real = TestClient(client.app, raise_server_exceptions=False)  # as a real server answers; no lifespan
    r = _post(real, (serve_site["held"] / "01.jpg").read_bytes())
    assert "internal error" in _one_line_error(r, 500)
    assert "secret" not in r.text and str(serve_site["root"]) not in r.text


def test_queue_is_bounded(client, service, monkeypatch, serve_site):
    """One worker; at most max_queue requests wait, the next is told 503 at once."""
    monkeypatch.setattr(service.worker, "max_queue", 2)
    release = threading.Event()
    blockers = [service.worker.submit(release.wait, 30), service.worker.submit(lambda: None)]
    try:
        with pytest.raises(ServiceBusy):
            service.worker.submit(lambda: None)
        r = _post(client, (serve_site["held"] / "01.jpg").read_bytes())
        assert "busy" in _one_line_error(r, 503) and r.headers["retry-after"] == "1"
    finally:
        release.set()
    for b in blockers:
        b.result(timeout=30)
    assert service.worker.queue()["pending"] == 0


def test_thumbnails_places_health_stats(client, service):
    places = client.get("/v1/places").json()
    assert places["frame"] == "wgs84" and len(places["places"]) == 10
    berlin = next(p for p in places["places"] if p["name"] == "opensfm_berlin/02.jpg")
    assert berlin["lat"] == pytest.approx(52.518925, abs=1e-5)
    r = client.get(f"/v1/places/{berlin['id']}/thumbnail")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "JPEG" and max(img.size) == 320
    assert "no place" in _one_line_error(client.get("/v1/places/987654/thumbnail"), 404)
    _one_line_error(client.get("/v1/places/..%2F..%2Fetc%2Fpasswd/thumbnail"), 404)  # ids only, never paths
    _one_line_error(client.get("/v1/places/abc/thumbnail"), 422)
    _one_line_error(client.get("/v1/places/-1/thumbnail"), 422)
    health = client.get("/v1/health").json()
    assert health["status"] == "ok" and health["database_size"] == 10 and health["model"] == "effnet-lite0-gem"
    stats = client.get("/v1/stats").json()
    assert stats["database_size"] == 10 and stats["index"]["count"] == 10 and stats["model"] == "effnet-lite0-gem"
    assert stats["photos_localized"] >= 1 and stats["requests_served"] >= 5 and stats["uptime_s"] >= 0
    lat = stats["latency_ms"]["/v1/localize"]
    assert 0 < lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"]
    client.get("/v1/no-such-thing")
    routes = client.get("/v1/stats").json()["latency_ms"]
    assert "other" in routes and not any("no-such" in k for k in routes)  # unknown paths do not grow the table


def test_page_docs_cors_and_read_only(client, service, serve_site):
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert "http" not in page.text.replace("http://www.w3.org", "")  # nothing from elsewhere
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/static/swagger/swagger-ui-bundle.js" in docs.text
    assert client.get("/static/swagger/swagger-ui-bundle.js").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/localize", "/v1/health", "/v1/stats", "/v1/places/{place_id}/thumbnail", "/v1/index"} <= set(
        spec["paths"]
    )
    # CORS is off: no allow-origin header for another site, and no preflight answer.
    r = client.get("/v1/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    pre = client.options(
        "/v1/localize", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert pre.status_code >= 400 and "access-control-allow-origin" not in pre.headers
    # Read-only: the service never writes the database.
    assert service.db.store.read_only
    sqlite = serve_site["db"] / "placerank.sqlite"
    before = hashlib.sha256(sqlite.read_bytes()).hexdigest()
    assert _post(client, (serve_site["held"] / "01.jpg").read_bytes()).status_code == 200
    assert hashlib.sha256(sqlite.read_bytes()).hexdigest() == before
    r = client.delete("/v1/places/1")
    assert "disabled" in _one_line_error(r, 403)
    assert "disabled" in _one_line_error(client.post("/v1/index", files={"images": ("a.jpg", b"x")}), 403)


def test_write_endpoints_need_the_token_and_the_lock(serve_site, serve_weights_env, tmp_path):
    from tests.serve.conftest import copy_db

    db = copy_db(serve_site, tmp_path / "db")
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    config = ServeConfig(db=db, token_file=token, upload_dir=tmp_path / "uploads", write_wait=0.0)
    svc = LocalizeService(config, log=lambda msg: None)
    auth = {"Authorization": "Bearer s3cret-token-0123456789"}
    held = serve_site["held"] / "DSCN0038.jpg"
    files = {"images": ("DSCN0038.jpg", held.read_bytes(), "image/jpeg")}
    with TestClient(create_app(svc)) as c:
        assert "token" in _one_line_error(c.post("/v1/index", files=files), 401)
        bad = {"Authorization": "Bearer wrong"}
        assert "token" in _one_line_error(c.post("/v1/index", files=files, headers=bad), 401)
        with WriteLock(db):  # another writer (e.g. `placerank index`) holds the lock
            assert "another placerank process" in _one_line_error(c.post("/v1/index", files=files, headers=auth), 409)
        r = c.post("/v1/index", files=files, headers=auth)
        assert r.status_code == 200, r.text
        added = r.json()
        assert added["database_size"] == 11 and [a["name"] for a in added["added"]] == ["DSCN0038.jpg"]
        new_id = added["added"][0]["id"]
        assert (tmp_path / "uploads").is_dir() and str(tmp_path) not in r.text
        # The read-only side sees the new place at once (its own photo comes back first).
        loc = c.post("/v1/localize", files={"image": ("q.jpg", held.read_bytes(), "image/jpeg")}).json()
        assert loc["matches"][0]["id"] == new_id and loc["database_size"] == 11
        assert c.get("/v1/stats").json()["database_size"] == 11
        nope = c.post("/v1/index", files={"images": ("x.jpg", b"not an image", "image/jpeg")}, headers=auth)
        _one_line_error(nope, 415)
        assert c.delete(f"/v1/places/{new_id}").status_code == 401
        r = c.delete(f"/v1/places/{new_id}", headers=auth)
        assert r.status_code == 200 and r.json() == {"removed": new_id, "database_size": 10}
        assert "no place" in _one_line_error(c.delete(f"/v1/places/{new_id}", headers=auth), 404)
        assert all(m["id"] != new_id for m in _post(c, held.read_bytes()).json()["matches"])
    assert json.loads((db / "index.json").read_text())["count"] == 10
    assert Path(held).exists()


def test_rerank_answers_with_the_match_picture(client, serve_site):
    """A local re-ranker (RANSAC on XFeat): scores are inliers, and the answer names its picture."""
    photo = serve_site["held"] / "01.jpg"
    r = _post(client, photo.read_bytes(), "01.jpg", top_k="3", rerank="ransac-xfeat")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["rerank"] == "ransac-xfeat" and body["matches"][0]["path"].startswith("opensfm_berlin/")
    assert body["matches"][0]["rerank_score"] > 10 * max(1.0, body["matches"][2]["rerank_score"])
    pic = client.get(body["match_picture"])
    assert pic.status_code == 200 and Image.open(io.BytesIO(pic.content)).format == "JPEG"
    assert "no such picture" in _one_line_error(client.get("/v1/pictures/" + "0" * 32 + ".jpg"), 404)
    _one_line_error(client.get("/v1/pictures/..%2Fsecret.jpg"), 404)
    assert "match_picture" not in _post(client, photo.read_bytes(), top_k="3").json()  # no re-ranker


def test_tiles_option_reaches_the_page_and_its_policy(service, monkeypatch):
    monkeypatch.setattr(service.config, "tiles", "https://tile.example.org/{z}/{x}/{y}.png")
    page = TestClient(create_app(service)).get("/")  # no lifespan: the shared service stays open
    assert 'data-tiles="https://tile.example.org/{z}/{x}/{y}.png"' in page.text
    assert "img-src 'self' data: blob: https://tile.example.org;" in page.headers["content-security-policy"]
