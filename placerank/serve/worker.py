"""The one inference worker behind a bounded queue, and the thumbnail cache.

:class:`Worker`: a single thread runs every job that needs the model or the SQLite connection;
at most ``max_queue`` jobs wait, the next :meth:`Worker.submit` raises :class:`ServiceBusy`
(503). See :mod:`placerank.serve.service` for why one worker and not micro-batching.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

THUMB_PX = 320
THUMB_CACHE = 256


class ServiceBusy(Exception):
    """The inference queue is full (503)."""


class NotFound(Exception):
    """No such place (404)."""


class Worker:
    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="placerank-worker")
        self._pending = 0
        self._lock = threading.Lock()

    def submit(self, fn, *args) -> Future:
        """Queue a job, or refuse at once when ``max_queue`` jobs are waiting or running."""
        with self._lock:
            if self._pending >= self.max_queue:
                raise ServiceBusy(f"server busy: {self._pending} requests queued; retry shortly")
            self._pending += 1
        try:
            fut = self._pool.submit(fn, *args)
        except BaseException:
            self._done(None)
            raise
        fut.add_done_callback(self._done)
        return fut

    def _done(self, _fut) -> None:
        with self._lock:
            self._pending -= 1

    async def run(self, fn, *args):
        return await asyncio.wrap_future(self.submit(fn, *args))

    def queue(self) -> dict:
        return {"pending": self._pending, "max": self.max_queue, "policy": "one worker, bounded queue"}

    def shutdown(self, last: Callable[[], object] | None = None) -> None:
        """Run ``last`` on the worker (e.g. close the database), then stop the thread."""
        try:
            if last is not None:
                self._pool.submit(last).result(timeout=30)
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


class Thumbnails:
    """JPEGs of at most THUMB_PX pixels of database photos, by id; an LRU of THUMB_CACHE."""

    def __init__(self, path_of: Callable[[int], str | None]):
        self._path_of = path_of
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def get(self, place_id: int) -> bytes:
        with self._lock:
            if place_id in self._cache:
                self._cache.move_to_end(place_id)
                return self._cache[place_id]
        path = self._path_of(place_id)
        if path is None:
            raise NotFound(f"no place with id {place_id}")
        from PIL import Image, ImageOps

        try:
            with Image.open(path) as img:
                img.draft("RGB", (THUMB_PX, THUMB_PX))
                small = ImageOps.exif_transpose(img.convert("RGB"))
                small.thumbnail((THUMB_PX, THUMB_PX))
        except (OSError, ValueError) as e:
            raise NotFound(f"the photo of place {place_id} cannot be read now ({type(e).__name__})") from None
        buf = io.BytesIO()
        small.save(buf, "JPEG", quality=82)
        data = buf.getvalue()
        with self._lock:
            self._cache[place_id] = data
            while len(self._cache) > THUMB_CACHE:
                self._cache.popitem(last=False)
        return data


class Pictures:
    """Pictures made for one answer (the re-ranker's verified matches), kept for a while under a
    random 128-bit token that only that answer names; an LRU of ``size``."""

    def __init__(self, size: int = 64):
        self.size = size
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, data: bytes) -> str:
        import secrets

        token = secrets.token_hex(16)
        with self._lock:
            self._cache[token] = data
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return token

    def get(self, token: str) -> bytes:
        with self._lock:
            data = self._cache.get(token)
        if data is None:
            raise NotFound("no such picture (pictures are kept for the last answers only)")
        return data
