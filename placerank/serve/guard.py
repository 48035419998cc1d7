"""An ASGI middleware in front of every request: the upload size limit (413 before the body is
read when Content-Length says so, or as soon as a streamed body passes the limit), security
headers (a strict Content-Security-Policy on the page: scripts, styles and data only from this
server), and the request counters and latencies of ``/v1/stats``."""

from __future__ import annotations

import json
import re
import time
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException

from placerank.serve.stats import Stats

_ID = re.compile(r"/\d+(?=/|$)")


class _TooLarge(HTTPException):
    """Raised from ``receive``: FastAPI's body parsing passes HTTP exceptions through (as 413)."""

    def __init__(self, message: str):
        super().__init__(413, message)


ROUTES = {"/", "/docs", "/openapi.json", "/v1/health", "/v1/stats", "/v1/places", "/v1/localize", "/v1/index"}
ROUTES |= {"/v1/places/{id}", "/v1/places/{id}/thumbnail", "/v1/pictures"}


def route_of(path: str) -> str:
    """The route a path belongs to, for the stats: ids folded, anything unknown is 'other' (so a
    scan of random paths cannot grow the table)."""
    if path.startswith("/static/"):
        return "/static"
    if path.startswith("/v1/pictures/"):
        return "/v1/pictures"
    route = _ID.sub("/{id}", path)
    return route if route in ROUTES else "other"


def page_policy(tiles: str | None) -> str:
    img = "'self' data: blob:"
    if tiles:
        parts = urlsplit(tiles.replace("{", "").replace("}", ""))
        if parts.scheme in ("http", "https") and parts.netloc:
            img += f" {parts.scheme}://{parts.netloc}"
    return (
        f"default-src 'self'; img-src {img}; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    )


class Guard:
    def __init__(self, app, stats: Stats, limit_bytes: int, tiles: str | None = None):
        self.app = app
        self.stats = stats
        self.limit = limit_bytes
        self.policy = page_policy(tiles).encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path = scope.get("path", "")
        state = {"status": 500, "started": False}
        limit = self.limit + 64 * 1024  # multipart framing around the file

        async def send_json(status: int, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            await send_wrapped(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            )
            await send_wrapped({"type": "http.response.body", "body": body})

        async def send_wrapped(message) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
                headers = list(message.get("headers", []))
                headers += [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                ]
                if path == "/":
                    headers.append((b"content-security-policy", self.policy))
                message = {**message, "headers": headers}
            await send(message)

        too_large = f"request body is over the {self.limit / 2**20:g} MB upload limit (--max-upload-mb)"
        try:
            declared = dict(scope.get("headers", [])).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                await send_json(413, too_large)
                return
            seen = 0

            async def receive_counted():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:
                        raise _TooLarge(too_large)
                return message

            try:
                await self.app(scope, receive_counted, send_wrapped)
            except _TooLarge:
                if not state["started"]:
                    await send_json(413, too_large)
        finally:
            self.stats.record(route_of(path), int(state["status"]), time.perf_counter() - t0)
