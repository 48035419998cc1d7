"""One writer at a time: an exclusive ``fcntl.flock`` on ``DB/write.lock``.

The kernel releases the lock when its process dies, so a crash never leaves a stale lock. The
holder's pid is written into the file so a refusal can name the other process. A second writer
is refused at once, or retries until ``wait`` seconds have passed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from placerank.errors import PlaceRankError

LOCK_FILE = "write.lock"
RETRY_S = 0.1  # how often a waiting writer tries again


class DatabaseBusyError(PlaceRankError):
    """Another process holds the database's write lock."""


def _pause(seconds: float) -> None:
    """Between two tries of a waiting writer (tests replace it to observe the wait)."""
    time.sleep(seconds)


class WriteLock:
    """Exclusive ``fcntl.flock`` on ``DB/write.lock``; the holder's pid is written into it so the
    refusal can name the other process."""

    def __init__(self, folder: Path, wait: float = 0.0):
        self.path = Path(folder) / LOCK_FILE
        self.wait = float(wait)
        self._fd: int | None = None

    def __enter__(self) -> WriteLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + max(0.0, self.wait)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    how = f"after waiting {self.wait:g} s" if self.wait > 0 else "now"
                    raise DatabaseBusyError(
                        f"{self.path.parent}: another placerank process (pid {holder}) is writing to this "
                        f"database {how}; wait for it to finish or pass --wait SECONDS"
                    ) from None
                _pause(RETRY_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class WriterSlot:
    """The write lock of one open database object, re-entrant within it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._lock: WriteLock | None = None

    @property
    def held(self) -> bool:
        return self._lock is not None

    @contextlib.contextmanager
    def hold(self, wait: float = 0.0) -> Iterator[None]:
        if self._lock is not None:  # already ours
            yield
            return
        lock = WriteLock(self.folder, wait)
        with lock:
            self._lock = lock
            try:
                yield
            finally:
                self._lock = None

    @contextlib.contextmanager
    def try_hold(self) -> Iterator[bool]:
        """Hold the lock if it is free (True), else go on without it (False): for work any
        writer may do, such as saving a rebuilt index, that a busy writer does itself."""
        if self._lock is not None:
            yield True
            return
        lock = WriteLock(self.folder, 0.0)
        try:
            lock.__enter__()
        except (DatabaseBusyError, OSError):  # busy, or a read-only folder
            yield False
            return
        self._lock = lock
        try:
            yield True
        finally:
            self._lock = None
            lock.__exit__(None, None, None)
