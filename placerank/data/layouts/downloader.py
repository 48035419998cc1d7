"""The VPR-datasets-downloader tree (gmberton), and the multi-query sets laid out like it.

::

    <dataset>/images/test/database/@UTM_east@UTM_north@...@.jpg
    <dataset>/images/test/queries/@...@.jpg
    <dataset>/images/test/database_images_paths.txt   (optional: one path per line, skips globbing)

Positives: within 25 m of the names' UTM coordinates (the downloader's and CosPlace /
EigenPlaces' test protocol). The same reader covers:

- **Pitts30k, St Lucia, AmsterTime, Eynsham, ...** as the downloader writes them;
- **Nordland** as papers use it (the downloader's Patch-NetVLAD split, 2760 winter queries
  against summer): dummy UTM names 2.4 m apart along a line, so 25 m = within 10 frames;
- **SF-XL** test (``sf_xl/processed/test``: ``database`` + ``queries_v1`` / ``queries_v2`` /
  ``queries_night`` / ``queries_occlusion``) and **SVOX** (``images/test``: ``gallery`` +
  ``queries_night`` / ``_overcast`` / ``_rain`` / ``_snow`` / ``_sun``): one database, several
  query folders, picked with ``--queries-subset`` (an unnamed choice among several is an error).
"""

from __future__ import annotations

from pathlib import Path

from placerank.data.dataset import Dataset
from placerank.data.positives import PositiveRule
from placerank.data.readers import read_utm_folder
from placerank.errors import DataError

DATABASE_DIRS = ("database", "gallery")
SPLITS = ("images/test", "processed/test", "test")


def find_test_folder(root: Path, split: str | None = None) -> Path:
    """The folder holding ``database``/``gallery`` and the ``queries*`` folders."""
    root = Path(root)
    candidates = [root] + [root / s for s in ((f"images/{split}", split) if split else SPLITS)]
    for c in candidates:
        if c.is_dir() and any((c / d).is_dir() for d in DATABASE_DIRS) and query_folders(c):
            return c
    raise DataError(
        f"{root}: not a VPR-datasets-downloader tree (no images/test/{{database,queries}} or gallery + queries_*)"
    )


def is_downloader_tree(root: Path) -> bool:
    try:
        find_test_folder(root)
    except DataError:
        return False
    return True


def query_folders(test: Path) -> list[str]:
    return sorted(p.name for p in test.iterdir() if p.is_dir() and p.name.startswith("queries"))


def read_downloader(
    root: str | Path, queries_subset: str | None = None, radius: float | None = None, split: str | None = None
) -> Dataset:
    test = find_test_folder(Path(root), split)
    db_dir = next(test / d for d in DATABASE_DIRS if (test / d).is_dir())
    folders = query_folders(test)
    if queries_subset:
        name = queries_subset if queries_subset.startswith("queries") else f"queries_{queries_subset}"
        if name not in folders:
            raise DataError(f"{test}: no query folder '{name}' (found: {', '.join(folders)})")
    elif len(folders) == 1:
        name = folders[0]
    else:
        raise DataError(
            f"{test}: ambiguous layout: {len(folders)} query folders ({', '.join(folders)}); "
            "pick one with --queries-subset"
        )
    r = 25.0 if radius is None else float(radius)
    db = read_utm_folder(db_dir)
    q = read_utm_folder(test / name)
    protocol = {
        "layout": "vpr-downloader",
        "root": str(test),
        "database": db_dir.name,
        "queries": name,
        "radius_m": r,
        "image_lists": [p.name for p in (db_dir, test / name) if (p.parent / f"{p.name}_images_paths.txt").exists()],
    }
    return Dataset(
        db, q, PositiveRule("utm", radius=r), name=f"{test.parent.parent.name or test.name}:{name}", protocol=protocol
    )
