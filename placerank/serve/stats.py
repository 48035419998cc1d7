"""Counters and latency percentiles for ``GET /v1/stats`` (thread-safe, bounded memory)."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

import numpy as np

WINDOW = 2000  # latencies kept per route for the percentiles


class Stats:
    def __init__(self) -> None:
        self.started = time.time()
        self._lock = threading.Lock()
        self.requests = 0
        self.by_status: Counter[str] = Counter()
        self.localized = 0
        self._latency: dict[str, deque[float]] = {}

    def record(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests += 1
            self.by_status[f"{status // 100}xx"] += 1
            if route == "/v1/localize" and status == 200:
                self.localized += 1
            self._latency.setdefault(route, deque(maxlen=WINDOW)).append(seconds)

    def snapshot(self) -> dict:
        with self._lock:
            latency = {}
            for route, values in sorted(self._latency.items()):
                ms = np.asarray(values) * 1000.0
                p50, p95, p99 = np.percentile(ms, [50, 95, 99])
                latency[route] = {
                    "count": len(ms),
                    "p50_ms": round(float(p50), 2),
                    "p95_ms": round(float(p95), 2),
                    "p99_ms": round(float(p99), 2),
                }
            return {
                "uptime_s": round(time.time() - self.started, 1),
                "requests_served": self.requests,
                "photos_localized": self.localized,
                "responses": dict(sorted(self.by_status.items())),
                "latency_ms": latency,
                "latency_window": WINDOW,
            }
