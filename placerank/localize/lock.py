"""One writer at a time: an exclusive ``fcntl.flock`` on ``DB/write.lock``.

The kernel releases the lock when its process dies, so a crash never leaves a stale lock. The
holder writes ``pid start-time host`` into the file, so a refusal can name the other process, and
so a lock whose holder is dead can be taken over at once: forked DataLoader workers inherit the
open file and keep the ``flock`` for a few seconds after their parent was killed (``kill -9``).
A holder is dead when its pid is gone, is a zombie, or now belongs to a process that started at
another time (a reused pid); a holder on another host is never judged. The stale file is then
unlinked and a new one locked. A second writer is refused at once, or retries until ``wait``
seconds have passed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
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


def process_start(pid: int) -> str | None:
    """The start time of ``pid`` (clock ticks since boot, from ``/proc``), ``"zombie"`` for a dead
    process not yet reaped, None when there is no such process; ``"?"`` where ``/proc`` is absent."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"
    except OSError:
        return "?"
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return "zombie"
    return fields[19]


def holder_text() -> str:
    pid = os.getpid()
    return f"{pid} {process_start(pid) or '?'} {socket.gethostname()}"


def holder_is_dead(text: str) -> bool:
    """Whether the ``pid start host`` written by a holder names a process that no longer runs.
    Unknown (empty, another host, no ``/proc``) counts as alive."""
    parts = text.split()
    if not parts or not parts[0].isdigit():
        return False
    if len(parts) >= 3 and parts[2] != socket.gethostname():
        return False
    now = process_start(int(parts[0]))
    if now is None or now == "zombie":
        return True
    return len(parts) >= 2 and parts[1] != "?" and now != "?" and now != parts[1]


@contextlib.contextmanager
def _guard(path: Path) -> Iterator[None]:
    """A short lock that makes "check the holder, unlink its file" of a taker and "check my file,
    write my name" of a new holder happen one after the other, never interleaved."""
    fd = os.open(path.with_name(f".{path.name}.guard"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


class WriteLock:
    """Exclusive ``fcntl.flock`` on ``DB/write.lock``; the holder writes ``pid start host`` into
    it so the refusal can name the other process and a dead holder's lock can be taken over."""

    def __init__(self, folder: Path, wait: float = 0.0):
        self.path = Path(folder) / LOCK_FILE
        self.wait = float(wait)
        self._fd: int | None = None

    def __enter__(self) -> WriteLock:
        deadline = time.monotonic() + max(0.0, self.wait)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 128, 0).decode(errors="replace").strip()
                if holder_is_dead(holder):
                    with _guard(self.path):  # re-read under the guard: a new holder may have just written
                        holder = os.pread(fd, 128, 0).decode(errors="replace").strip()
                        stale = holder_is_dead(holder) and _same_file(fd, self.path)
                        if stale:  # the holder died; an orphan (e.g. a loader worker) keeps the lock
                            os.unlink(self.path)
                    if stale:
                        os.close(fd)
                        continue
                os.close(fd)
                if time.monotonic() >= deadline:
                    pid = holder.split()[0] if holder else "unknown"
                    how = f"after waiting {self.wait:g} s" if self.wait > 0 else "now"
                    raise DatabaseBusyError(
                        f"{self.path.parent}: another placerank process (pid {pid}) is writing to this "
                        f"database {how}; wait for it to finish or pass --wait SECONDS"
                    ) from None
                _pause(RETRY_S)
                continue
            with _guard(self.path):
                mine = _same_file(fd, self.path)  # not a stale file unlinked while we locked it
                if mine:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, holder_text().encode(), 0)
            if mine:
                break
            os.close(fd)
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
