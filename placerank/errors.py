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
