"""User-facing errors.

Every problem a user can cause (a missing folder, a corrupt image, a mismatched index) is raised
as :class:`PlaceRankError` with a single line that names the problem and, where possible, what to
do. The CLI prints that line and exits with status 2; it never prints a traceback for these.
"""


def _unwrap_worker_message(message: str) -> str:
    """An error raised inside a DataLoader worker is re-raised by torch with the worker's whole
    traceback as its message; keep only our own one-line message (the traceback's last line)."""
    if message.startswith("Caught ") and "Original Traceback" in message:
        last = [line for line in message.splitlines() if line.strip()][-1]
        head, sep, tail = last.partition(": ")
        if sep and "Error" in head:
            return tail
        return last
    return message


class PlaceRankError(Exception):
    """A one-line, user-actionable error."""

    def __init__(self, message: str):
        message = _unwrap_worker_message(str(message))
        if "\n" in message:
            message = " ".join(part.strip() for part in message.splitlines() if part.strip())
        super().__init__(message)


class DataError(PlaceRankError):
    """Bad dataset input: missing folder, empty set, unknown CSV layout, unreadable image."""


class WeightsError(PlaceRankError):
    """Weights missing, or a checkpoint that does not match the model."""


class IndexMismatchError(PlaceRankError):
    """An on-disk index or cache built with another model, weights or dimension."""


_OS_HINTS = {
    "ENOSPC": "no space left on device; free some space or write elsewhere",
    "EFBIG": "file too large (disk quota or file-size limit reached); free some space or write elsewhere",
    "EDQUOT": "disk quota exceeded; free some space or write elsewhere",
    "EACCES": "permission denied; check the file's permissions or write elsewhere",
    "EPERM": "operation not permitted; check the file's permissions or write elsewhere",
    "EROFS": "read-only file system; write elsewhere",
    "ENOENT": "no such file or directory",
    "ENOTDIR": "a part of the path is not a folder",
    "EISDIR": "is a folder, expected a file",
    "EEXIST": "already exists",
    "ELOOP": "too many levels of symbolic links (a symlink loop)",
    "EMFILE": "too many open files; use fewer --workers",
    "ENOMEM": "out of memory; use a smaller --batch-size or --image-size",
}


def describe_os_error(e: OSError, path: object = None) -> str:
    """One line for an environment fault: the file and the real cause (``ENOSPC`` -> "no space
    left on device; ..."). ``path`` names the file when the error itself does not."""
    import errno as _errno

    name = _errno.errorcode.get(e.errno or 0, "")
    cause = _OS_HINTS.get(name) or (e.strerror or str(e) or type(e).__name__)
    where = e.filename if e.filename is not None else path
    if where is not None and e.filename2 is not None:
        return f"{where} -> {e.filename2}: {cause}"
    return f"{where}: {cause}" if where is not None else cause


class OutputError(PlaceRankError):
    """An output cannot be written: disk full, permission denied, read-only file system."""

    @classmethod
    def from_os_error(cls, e: OSError, path: object = None) -> "OutputError":
        return cls(f"cannot write {describe_os_error(e, path)}")


def warn(message: str) -> None:
    """One ``placerank: warning: ...`` line on stderr: something was repaired or skipped and the
    run goes on (a corrupt cache rebuilt, a read-only cache used read-only)."""
    import sys

    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    print(f"placerank: warning: {text}", file=sys.stderr, flush=True)


def sqlite_write_error(e: Exception, path: object) -> OutputError | None:
    """SQLite's write failures as the one-line error naming the file, with the real cause where it
    can be told: "database or disk is full" is ENOSPC; "disk I/O error" is what SQLite reports
    when a write hits the file-size limit (EFBIG) or a full disk, told apart here."""
    import errno as _errno
    import os as _os
    import resource as _resource

    text = str(e).lower()
    if "full" in text:
        return OutputError.from_os_error(OSError(_errno.ENOSPC, "No space left on device"), path)
    if "disk i/o error" not in text:
        return None
    soft, _ = _resource.getrlimit(_resource.RLIMIT_FSIZE)
    if soft != _resource.RLIM_INFINITY:
        return OutputError.from_os_error(OSError(_errno.EFBIG, "File too large"), path)
    try:
        st = _os.statvfs(_os.path.dirname(_os.path.abspath(str(path))))
        if st.f_bavail * st.f_frsize < 1 << 20:
            return OutputError.from_os_error(OSError(_errno.ENOSPC, "No space left on device"), path)
    except OSError:
        pass
    return OutputError(f"cannot write {path}: disk I/O error (a full or failing disk?)")
