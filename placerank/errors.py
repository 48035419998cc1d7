"""User-facing errors.

Every problem a user can cause (a missing folder, a corrupt image, a mismatched index) is raised
as :class:`PlaceRankError` with a single line that names the problem and, where possible, what to
do. The CLI prints that line and exits with status 2; it never prints a traceback for these.
"""


class PlaceRankError(Exception):
    """A one-line, user-actionable error."""

    def __init__(self, message: str):
        if "\n" in message:
            message = " ".join(part.strip() for part in message.splitlines() if part.strip())
        super().__init__(message)


class DataError(PlaceRankError):
    """Bad dataset input: missing folder, empty set, unknown CSV layout, unreadable image."""


class WeightsError(PlaceRankError):
    """Weights missing, or a checkpoint that does not match the model."""


class IndexMismatchError(PlaceRankError):
    """An on-disk index or cache built with another model, weights or dimension."""
