"""Where weight files come from, in order: an explicit path; ``$PLACERANK_WEIGHTS``; a
``shared/weights`` folder beside the working directory or the repository; an installed package
that ships them. Never the network: a missing file is a one-line error saying what to put where.
"""

from __future__ import annotations

import os
from pathlib import Path

from placerank.errors import WeightsError

_REPO_ROOT = Path(__file__).resolve().parents[2]


def weights_search_dirs() -> list[Path]:
    dirs = []
    env = os.environ.get("PLACERANK_WEIGHTS")
    if env:
        dirs.append(Path(env))
    for base in (Path.cwd(), _REPO_ROOT):
        dirs.append(base.parent / "shared" / "weights")
        dirs.append(base / "shared" / "weights")
    seen, out = set(), []
    for d in dirs:
        r = d.resolve()
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


def resolve_weights(filename: str, explicit: str | os.PathLike | None, what: str) -> Path:
    """Return an existing weights file or raise a one-line :class:`WeightsError`."""
    if explicit is not None:
        p = Path(explicit).expanduser()
        if not p.exists():
            raise WeightsError(f"{p}: weights file does not exist")
        if not p.is_file():
            raise WeightsError(f"{p}: weights path is not a file")
        return p
    for d in weights_search_dirs():
        cand = d / filename
        if cand.is_file():
            return cand
    raise WeightsError(
        f"{what} weights not found: put {filename} in $PLACERANK_WEIGHTS (or ../shared/weights) or pass --weights PATH"
    )
