"""Small shared helpers: atomic writes, file hashing, devices, timing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def cache_root() -> Path:
    """Where placerank keeps what it can recompute: ``$PLACERANK_CACHE`` (default
    ``~/.cache/placerank``): descriptor caches, local-feature stores, converted weights."""
    return Path(os.environ.get("PLACERANK_CACHE", Path.home() / ".cache" / "placerank"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0666 minus the umask."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it over ``target`` only on success.

    A crash or an exception leaves ``target`` untouched (the old file, or nothing), so a user's
    results or index are never half-written. The file gets the umask's mode (not mkstemp's 0600).
    A write that fails for lack of space or permission raises one line naming ``target``.
    """
    from placerank.errors import OutputError

    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.fchmod(fd, file_mode())
        os.close(fd)
    except OSError as e:
        raise OutputError.from_os_error(e, target) from e
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except OSError as e:
        if e.filename in (None, str(tmp_path), tmp_path):
            e.filename, e.filename2 = None, None
        raise OutputError.from_os_error(e, target) from e
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a new temporary folder beside ``target``; on success it replaces ``target`` as a
    whole (the previous folder, if any, is removed only after the new one is in place), on
    failure it is removed and ``target`` stays as it was. Files inside follow the umask."""
    import shutil

    from placerank.errors import OutputError, PlaceRankError

    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_leftovers(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
        os.chmod(tmp, 0o777 & ~_umask())
    except OSError as e:
        raise OutputError.from_os_error(e, target) from e
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.{os.getpid()}.old.tmp"
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            if old is not None:  # put the previous outputs back: kept as a whole
                os.replace(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        where = target
        if e.filename is not None and str(e.filename).startswith(str(tmp)):
            where = target / Path(e.filename).relative_to(tmp)  # the file's name once in place
            e.filename = None
        raise OutputError.from_os_error(e, where) from e
    except PlaceRankError as e:  # e.g. from atomic_path inside: name the file as it would be
        if str(tmp) not in str(e):
            raise
        raise type(e)(str(e).replace(str(tmp), str(target))) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_dead_leftovers(target: Path) -> None:
    """Temporary folders of :func:`atomic_folder` runs that were killed (``kill -9``): their
    names carry the writer's pid; those whose process is gone are removed."""
    import re
    import shutil

    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.([a-z0-9_]{{8}}|old)\.tmp$")
    for p in target.parent.iterdir():
        found = pattern.match(p.name)
        if found is None or not p.is_dir():
            continue
        try:
            os.kill(int(found.group(1)), 0)
        except ProcessLookupError:
            if found.group(2) == "old" and not target.exists():
                os.replace(p, target)  # killed between its two renames: the previous outputs return
            else:
                shutil.rmtree(p, ignore_errors=True)
        except (PermissionError, OverflowError):
            pass


def check_writable_parent(target: Path, flag: str) -> None:
    """``target``'s nearest existing ancestor must be a folder this process can write in (one
    line otherwise): what every output path (a folder or a file) is checked for before work."""
    from placerank.errors import PlaceRankError

    parent = target.parent if str(target.parent) else Path(".")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise PlaceRankError(f"{flag} {target}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PlaceRankError(f"{flag} {target}: cannot write in {parent} (permission denied or read-only)")


def check_output_folder(target: str | os.PathLike, flag: str = "--out", owned: Sequence[str] | None = None) -> Path:
    """Before any work: ``target`` must be a folder (or not exist yet) whose parent is writable,
    so a run does not find out after all extraction that it cannot write its results. With
    ``owned`` (the names a run writes there), an existing ``target`` may hold only those, since
    :func:`atomic_folder` replaces it as a whole."""
    from placerank.errors import PlaceRankError

    target = Path(target)
    if target.exists() and not target.is_dir():
        raise PlaceRankError(f"{flag} {target} is an existing file; give a folder")
    check_writable_parent(target, flag)
    if target.is_dir() and not os.access(target, os.W_OK | os.X_OK):
        raise PlaceRankError(f"{flag} {target}: cannot write in {target} (permission denied or read-only)")
    if owned is not None and target.is_dir():
        others = sorted(p.name for p in target.iterdir() if p.name not in owned)
        if others:
            raise PlaceRankError(
                f"{flag} {target} holds files this command did not write (e.g. {others[0]}), and the folder is"
                " replaced as a whole; give a new folder or a previous run's"
            )
    return target


def write_json_atomic(target: str | os.PathLike, obj: Any) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def save_npy_atomic(target: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, memoised on (path, size, mtime) so big weights are hashed once."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def state_dict_sha256(state_dict: dict) -> str:
    """Hash of a model's tensors (names, shapes, values): the identity of in-memory weights."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        h.update(name.encode())
        arr = t.detach().cpu().contiguous().numpy() if hasattr(t, "detach") else np.asarray(t)
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def resolve_device(device: str | None = None):
    """'auto' (or None) picks CUDA when present, else CPU. Never hard-codes a GPU.

    ``cpu``, ``cuda``, ``cuda:N`` (and ``mps`` where torch has it) are honoured as asked; a
    device this machine does not have, or a name torch does not know, is one line
    (:class:`~placerank.errors.PlaceRankError`), raised before any work."""
    import torch

    from placerank.errors import PlaceRankError

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device).strip().lower())
    except (RuntimeError, ValueError):
        raise PlaceRankError(f"--device {device}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PlaceRankError(
                f"--device {device}: no CUDA GPU is available on this machine"
                " (torch.cuda.is_available() is False); use --device cpu or auto"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise PlaceRankError(f"--device {device}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise PlaceRankError(f"--device {device}: no Apple MPS device is available; use --device cpu or auto")
    elif dev.type != "cpu":
        raise PlaceRankError(f"--device {device}: not supported; use auto, cpu, cuda or cuda:N")
    return dev


def peak_memory_mb() -> float:
    """Peak resident memory of this process (MB), plus peak CUDA memory when a GPU was used."""
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    try:
        import torch

        if torch.cuda.is_available():
            rss_mb += torch.cuda.max_memory_allocated() / 2**20
    except Exception:  # pragma: no cover - torch import problems are reported elsewhere
        pass
    return rss_mb


class Timer:
    """Accumulating wall-clock timer: ``with timer("extract"): ...``."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[stage] = self.totals.get(stage, 0.0) + time.perf_counter() - t0


def read_stage_json(
    path: str | os.PathLike, kind: str, fmt: int, required: Sequence[str], bad: Callable[[str], Exception]
) -> dict:
    """Read the JSON half of a stage file (descriptors, candidates, ...) and validate what every
    such file shares: it exists, parses, says ``kind`` and ``format == fmt``, and has every key in
    ``required``. ``bad(why)`` builds the one-line error the caller raises for its own folder."""
    path = Path(path)
    if not path.is_file():
        raise bad(f"{path.name} missing")
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise bad(f"{path.name} is not JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        raise bad(f"{path.name} is not a {kind.replace('-', ' ')} file")
    if meta.get("format") != fmt:
        raise bad(f"format {meta.get('format')} is not supported (expected {fmt})")
    missing = [k for k in required if k not in meta]
    if missing:
        raise bad(f"{path.name} lacks {', '.join(missing)}")
    return meta
