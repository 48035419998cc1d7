"""`placerank serve` as a real process: the startup line, a real browser on the page (Debian's
chromium driven by Playwright; the server re-ranks with RANSAC on XFeat, so the page also shows
the match picture), a local-frame database (TUM), SIGTERM / SIGINT shut-downs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("PLACERANK_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


class Server:
    """``placerank serve ... --port 0`` in a subprocess; ``url`` from its startup line."""

    def __init__(self, args: list[str], env_extra: dict[str, str]):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env_extra}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "placerank.cli", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        deadline = time.monotonic() + 120
        self.url = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline() if self.proc.stdout else ""
            if not line:
                break
            self.lines.append(line.rstrip())
            if line.startswith("placerank serve: http://"):
                self.url = line.split()[2]
                break
        if not self.url:
            self.proc.kill()
            out, err = self.proc.communicate()
            pytest.fail(f"server did not start: {self.lines} {out} {err}")

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url.rstrip("/") + path, timeout=60) as r:
            return json.loads(r.read())

    def stop(self, sig: int) -> tuple[int, str, str]:
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, out, err


def _post_photo(url: str, photo: Path) -> dict:
    boundary = "----placerank-test"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{photo.name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + photo.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    req = urllib.request.Request(
        url.rstrip("/") + "/v1/localize", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(serve_site, shared_weights):
    args = ["--db", str(serve_site["db"]), "--rerank", "ransac-xfeat", "--top-k", "5"]
    s = Server(args, {"PLACERANK_WEIGHTS": str(shared_weights)})
    yield s
    if s.proc.poll() is None:
        s.proc.kill()
        s.proc.communicate()


def test_startup_line_prints_the_url(server):
    assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/")
    assert "10 photos, effnet-lite0-gem, rerank ransac-xfeat; writes disabled" in server.lines[-1]
    assert server.get("/v1/health")["status"] == "ok"


def test_browser_uploads_a_photo_and_sees_marker_and_matches(server, serve_site, tmp_path):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} missing: apt-get install -y chromium chromium-driver (.ci/run does)")
    outside: list[str] = []
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 860})
            page.on(
                "request",
                lambda req: (
                    None
                    if req.url.startswith((server.url, "blob:" + server.url.rstrip("/")))
                    else outside.append(req.url)
                ),
            )
            page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            page.goto(server.url)
            page.wait_for_selector("body[data-ready='1']", timeout=30_000)
            assert page.locator("#map circle.place").count() == 10  # the database's own coordinates
            page.set_input_files("#file", str(serve_site["held"] / "01.jpg"))
            page.wait_for_selector("#marker", timeout=120_000)
            page.wait_for_selector("#radius")
            strip = page.locator("#strip figure.match")
            assert strip.count() == 5
            page.wait_for_function(
                "[...document.querySelectorAll('#strip img, #inliers img')].every(i => i.complete && i.naturalWidth > 0)",
                timeout=30_000,
            )
            first = strip.nth(0).inner_text()
            assert "opensfm_berlin/0" in first and "ransac-xfeat" in first and "agrees" in first
            assert page.locator("#inliers").is_visible()  # the re-ranker's match picture
            assert page.locator("#summary .where").inner_text().startswith("52.5189")
            shot = tmp_path / "serve_page.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("PLACERANK_SCREENSHOT"):  # refresh docs/serve_page.png
                shutil.copy(shot, os.environ["PLACERANK_SCREENSHOT"])
            page.set_input_files("#file", str(serve_site["root"] / "db" / "index.json"))  # not an image
            page.wait_for_selector("#status.error")
            assert "not an image" in page.locator("#status").inner_text()
        finally:
            browser.close()
    assert outside == []  # no CDN, nothing from outside this server
    assert [p for p in problems if "415" not in p] == []


def test_sigterm_stops_cleanly(server):
    rc, out, err = server.stop(signal.SIGTERM)
    assert rc == 0, err
    assert out.strip().endswith("placerank serve: stopped") and "Traceback" not in err


def test_local_frame_database_and_sigint(tum, tum_positions, shared_weights, tmp_path):
    """TUM RGB-D: positions in metres (mocap); the API answers easting/northing, no lat/lon."""
    import placerank

    csv_path = tum_positions("db.csv", 0, 300, 30)  # 10 database frames
    db = tmp_path / "db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLACERANK_WEIGHTS", str(shared_weights))
        with placerank.Database.create(db, image_size=(240, 320), radius=0.3) as d:
            d.add_folder(positions=csv_path, progress=False, num_workers=0)
    s = Server(["--db", str(db), "--top-k", "3"], {"PLACERANK_WEIGHTS": str(shared_weights)})
    try:
        assert "10 photos" in s.lines[-1]
        places = s.get("/v1/places")
        assert places["frame"] == "local" and places["places"][0]["lat"] is None
        query = sorted((tum / "database").glob("*.jpg"))[45]  # between two database frames
        r = _post_photo(s.url, query)
        assert r["frame"] == "local" and r["lat"] is None and r["easting"] is not None
        assert len(r["matches"]) == 3 and r["matches"][0]["path"].startswith("0")
    finally:
        rc, out, err = s.stop(signal.SIGINT)
    assert rc == 0, err
    assert out.strip().endswith("placerank serve: stopped") and "Traceback" not in err


def test_bad_arguments_are_one_line(tmp_path):
    from placerank.cli import main

    assert main(["serve", "--db", str(tmp_path / "none"), "--tiles", "ftp://x"]) == 2
    assert main(["serve", "--db", str(tmp_path / "none")]) == 2
