"""Load test of ``placerank serve``: N concurrent clients post real photos to a server on this
machine (loopback only), for a bounded number of requests and seconds.

    python benchmarks/serve_load.py                         # 50 clients, 200 requests, at most 300 s
    python benchmarks/serve_load.py --clients 8 --requests 40 --db my.db --photos a.jpg b.jpg

Without ``--db`` it builds a small database from ../shared/data/geotagged_photos (EfficientNet-
Lite0 + GeM; Berlin 01.jpg and Arezzo DSCN0038.jpg held out) in a temporary folder, and posts
all 12 photos in turn (2 never seen + 10 indexed). The server is started as a subprocess
(``placerank serve --port 0 --max-queue CLIENTS``); its resident memory is read from /proc
before the first request, every 0.2 s during the run (peak) and after the last. Each client is a
thread with its own keep-alive connection. Prints p50/p95/p99 latency, requests per second,
errors (exit status 1 if any), and writes ``benchmarks/results/serve_load.json`` + ``.png``.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PLACERANK_SHARED", REPO.parent / "shared"))
GEOTAGGED = SHARED / "data" / "geotagged_photos"
HELD = ["opensfm_berlin/01.jpg", "exif_samples_arezzo/DSCN0038.jpg"]


def loopback(host: str) -> str:
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        sys.exit(
            f"serve_load: error: --host {host} is not a loopback address; this benchmark only targets this machine"
        )
    return host


def build_db(root: Path) -> tuple[Path, list[Path]]:
    import placerank

    if not GEOTAGGED.is_dir():
        sys.exit(f"serve_load: error: {GEOTAGGED} missing (clone next to ../shared or set PLACERANK_SHARED)")
    photos = root / "photos"
    for folder in ("opensfm_berlin", "exif_samples_arezzo"):
        (photos / folder).mkdir(parents=True)
        for p in sorted((GEOTAGGED / folder).glob("*.jpg")):
            if f"{folder}/{p.name}" not in HELD:
                shutil.copy2(p, photos / folder / p.name)
    db = root / "db"
    with placerank.Database.create(db) as d:
        d.add_folder(photos, progress=False, num_workers=0)
    return db, sorted(GEOTAGGED.glob("*/*.jpg"))


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def start_server(db: Path, host: str, clients: int, extra: list[str]) -> tuple[subprocess.Popen, str, int]:
    cmd = [sys.executable, "-m", "placerank.cli", "serve", "--db", str(db), "--host", host, "--port", "0"]
    cmd += ["--max-queue", str(max(64, clients)), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line.rstrip())
        if line.startswith("placerank serve: http://"):
            url = line.split()[2]
            port = int(url.rstrip("/").rsplit(":", 1)[1])
            return proc, url, port
    sys.exit(f"serve_load: error: the server did not start (exit status {proc.wait()})")


def multipart(photo: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{photo.name}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + photo.read_bytes() + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def run_clients(host: str, port: int, bodies: list[tuple[bytes, str]], clients: int, requests: int, seconds: float):
    lock = threading.Lock()
    issued = [0]
    results: list[tuple[float, float, int, str, float]] = []  # (start s, latency s, status, error, server's total s)
    t_start = time.perf_counter()
    deadline = t_start + seconds

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=max(60.0, seconds))
        while True:
            with lock:
                if issued[0] >= requests or time.perf_counter() > deadline:
                    break
                n = issued[0]
                issued[0] += 1
            body, ctype = bodies[n % len(bodies)]
            t0 = time.perf_counter()
            status, err, total = 0, "", float("nan")
            try:
                conn.request("POST", "/v1/localize", body, {"Content-Type": ctype})
                resp = conn.getresponse()
                data = resp.read()
                status = resp.status
                if status != 200:
                    err = data[:200].decode(errors="replace")
                else:
                    total = float(json.loads(data)["timing_s"]["total"])
            except (OSError, http.client.HTTPException) as e:
                err = f"{type(e).__name__}: {e}"
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=max(60.0, seconds))
            with lock:
                results.append((t0 - t_start, time.perf_counter() - t0, status, err, total))
        conn.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t_start


def plot(results, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = np.array([r[0] for r in results])
    lat = np.array([r[1] for r in results]) * 1000
    ok = np.array([r[2] == 200 for r in results])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.scatter(start[ok] + lat[ok] / 1000, lat[ok], s=8, label="200")
    if (~ok).any():
        a.scatter(start[~ok] + lat[~ok] / 1000, lat[~ok], s=12, c="red", label="error")
    a.set_xlabel("time since start (s)")
    a.set_ylabel("latency (ms)")
    a.set_title("latency of each request")
    a.legend()
    b.hist(lat[ok], bins=30)
    for q, ls in ((50, "-"), (95, "--"), (99, ":")):
        b.axvline(np.percentile(lat[ok], q), color="k", ls=ls, label=f"p{q}")
    b.set_xlabel("latency (ms)")
    b.set_title("distribution")
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=200, help="total requests (bounded)")
    ap.add_argument("--seconds", type=float, default=300.0, help="stop issuing requests after this long")
    ap.add_argument("--db", type=Path, default=None, help="database (default: built from the shared geotagged photos)")
    ap.add_argument("--photos", type=Path, nargs="*", default=None, help="photos to post (default: the 12 geotagged)")
    ap.add_argument("--host", default="127.0.0.1", help="loopback address to serve on (127.0.0.0/8, ::1, localhost)")
    ap.add_argument("--rerank", default=None, help="server's --rerank")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/serve_load.json")
    args = ap.parse_args(argv)
    host = loopback(args.host)
    if args.clients < 1 or args.requests < 1 or args.seconds <= 0:
        sys.exit("serve_load: error: --clients, --requests and --seconds must be positive")
    with tempfile.TemporaryDirectory(prefix="serve_load-") as tmp:
        if args.db is None:
            print(f"building a database from {GEOTAGGED} ...")
            db, photos = build_db(Path(tmp))
        else:
            db, photos = args.db, sorted(GEOTAGGED.glob("*/*.jpg"))
        photos = args.photos or photos
        bodies = [multipart(p) for p in photos]
        extra = ["--rerank", args.rerank] if args.rerank else []
        proc, url, port = start_server(db, host, args.clients, extra)
        try:
            warm, _ = run_clients(host, port, bodies[:1], 1, 1, 120)  # first request: lazy allocations
            rss_before = rss_mb(proc.pid)
            peak = [rss_before]
            done = threading.Event()

            def watch() -> None:
                while not done.wait(0.2):
                    peak[0] = max(peak[0], rss_mb(proc.pid))

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            results, wall = run_clients(host, port, bodies, args.clients, args.requests, args.seconds)
            done.set()
            watcher.join()
            rss_after = rss_mb(proc.pid)
            conn = http.client.HTTPConnection(host, port, timeout=30)
            conn.request("GET", "/v1/stats")
            server_stats = json.loads(conn.getresponse().read())
            conn.close()
        finally:
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=120)
    lat = np.array([r[1] for r in results if r[2] == 200]) * 1000
    errors = [r for r in results if r[2] != 200]
    p50, p95, p99 = (float(np.percentile(lat, q)) for q in (50, 95, 99)) if len(lat) else (float("nan"),) * 3
    report = {
        "clients": args.clients,
        "requests": len(results),
        "requests_limit": args.requests,
        "seconds_limit": args.seconds,
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(results) / wall, 2),
        "latency_ms": {
            "p50": round(p50, 1),
            "p95": round(p95, 1),
            "p99": round(p99, 1),
            "mean": round(float(lat.mean()), 1) if len(lat) else None,
            "max": round(float(lat.max()), 1) if len(lat) else None,
        },
        "server_localize_ms_p50": round(float(np.nanmedian([r[4] for r in results])) * 1000, 1) if len(lat) else None,
        "errors": len(errors),
        "error_samples": sorted({f"{r[2]} {r[3]}" for r in errors})[:5],
        "server_rss_mb": {"before": round(rss_before, 1), "peak": round(peak[0], 1), "after": round(rss_after, 1)},
        "server_exit_status": rc,
        "server_stats": {k: server_stats.get(k) for k in ("database_size", "model", "rerank", "queue", "latency_ms")},
        "photos": [str(p.relative_to(SHARED)) if p.is_relative_to(SHARED) else p.name for p in photos],
        "url": url,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "omp": os.environ.get("OMP_NUM_THREADS"),
        },
        "warmup_latency_ms": round(warm[0][1] * 1000, 1) if warm else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(
        results,
        args.out.with_suffix(".png"),
        f"placerank serve: {args.clients} clients, {len(results)} requests, {report['requests_per_s']} req/s, "
        f"{len(errors)} errors",
    )
    print(
        "| clients | requests | req/s | p50 ms | p95 ms | p99 ms | errors | server RSS before -> peak -> after (MB) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {args.clients} | {len(results)} | {report['requests_per_s']} | {p50:.0f} | {p95:.0f} | {p99:.0f} | "
        f"{len(errors)} | {rss_before:.0f} -> {peak[0]:.0f} -> {rss_after:.0f} |"
    )
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    if errors:
        print(f"serve_load: {len(errors)} error(s): {report['error_samples']}", file=sys.stderr)
        return 1
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
