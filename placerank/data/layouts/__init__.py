"""Benchmark layouts as people have them on disk, and the one entry point that picks the reader.

:func:`open_dataset` takes what ``placerank eval`` was given (``--dataset ROOT``, or
``--database``/``--queries``) and returns a :class:`~placerank.data.dataset.Dataset` whose
``protocol`` says what was applied. Labels are never guessed: a layout is recognised by its own
files (``postprocessed.csv``, ``dbStruct``, ``@UTM@`` names, ...); a plain folder is unlabelled;
frames only when asked; an ambiguous or mixed layout is a one-line error.

| layout | reader |
| --- | --- |
| ``msls`` | :mod:`.msls` |
| ``netvlad-mat`` | :mod:`.netvlad_mat` |
| ``vpr-downloader`` (also SF-XL, SVOX, Nordland, St Lucia) | :mod:`.downloader` |
| ``patchnetvlad`` | :mod:`.patchnetvlad` |
| ``auto``, ``csv``, ``utm``, ``frames``, ``unlabelled`` | :mod:`placerank.data.readers` |
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from placerank.data.dataset import Dataset
from placerank.data.layouts.downloader import is_downloader_tree, read_downloader
from placerank.data.layouts.msls import find_cities, is_msls_side, read_msls, read_msls_pair
from placerank.data.layouts.netvlad_mat import read_netvlad_mat
from placerank.data.layouts.patchnetvlad import read_patchnetvlad
from placerank.data.readers import FOLDER_LAYOUTS, load_dataset
from placerank.errors import DataError

DATASET_LAYOUTS = ("msls", "netvlad-mat", "vpr-downloader", "patchnetvlad")
LAYOUTS = (*FOLDER_LAYOUTS, *DATASET_LAYOUTS)


@dataclass(frozen=True)
class LayoutOptions:
    """Everything a reader may need besides the paths (all optional)."""

    layout: str = "auto"
    radius: float | None = None
    frame_tolerance: int | None = None
    msls_subtask: str = "all"
    queries_subset: str | None = None  # Tokyo 24/7 day|sunset|night; SF-XL/SVOX query folder
    images_root: str | Path | None = None
    msls_cities: tuple[str, ...] | None = None


def detect_root(root: Path) -> str:
    """The layout of a dataset root given as ``--dataset``; ambiguous roots are an error."""
    if root.is_file():
        suffix = root.suffix.lower()
        if suffix == ".mat":
            return "netvlad-mat"
        if suffix == ".npz":
            return "patchnetvlad"
        raise DataError(f"{root}: not a dataset root (a folder, a NetVLAD .mat or a Patch-NetVLAD .npz)")
    if not root.exists():
        raise DataError(f"{root}: dataset root does not exist")
    found = []
    try:
        find_cities(root)
        found.append("msls")
    except (DataError, OSError):
        pass
    if is_downloader_tree(root):
        found.append("vpr-downloader")
    mats = sorted(root.glob("*.mat"))
    if mats:
        found.append("netvlad-mat")
    if len(found) == 1 and found[0] != "netvlad-mat":
        return found[0]
    if found == ["netvlad-mat"] and len(mats) == 1:
        return "netvlad-mat"
    if not found:
        raise DataError(
            f"{root}: no known dataset layout (MSLS train_val/<city>, images/test/{{database,queries}}, a dbStruct .mat);"
            " give --database and --queries instead"
        )
    what = ", ".join(found) if len(found) > 1 else f"{len(mats)} .mat files ({', '.join(m.name for m in mats[:4])})"
    raise DataError(f"{root}: ambiguous layout ({what}); point --dataset at one of them or pass --layout")


def open_dataset(
    database: str | Path | None = None,
    queries: str | Path | None = None,
    dataset: str | Path | None = None,
    options: LayoutOptions | None = None,
) -> Dataset:
    o = options or LayoutOptions()
    if o.layout not in LAYOUTS:
        raise DataError(f"unknown layout '{o.layout}'; known: {', '.join(LAYOUTS)}")
    if o.frame_tolerance is not None and o.layout in DATASET_LAYOUTS:
        raise DataError(f"--frame-tolerance does not apply to the {o.layout} layout (its positions are metric)")
    if dataset is not None:
        return _open_root(Path(dataset), database, queries, o)
    if database is None or queries is None:
        raise DataError("give --database and --queries, or --dataset ROOT (or NAME:ROOT)")
    db, q = Path(database), Path(queries)
    msls = [is_msls_side(p) for p in (db, q)]
    if o.layout == "msls" or (o.layout == "auto" and all(msls)):
        return read_msls_pair(db, q, o.msls_subtask, 25.0 if o.radius is None else o.radius)
    if o.layout == "auto" and any(msls):
        raise DataError(f"mixed layout: only one of {db} and {q} is an MSLS city folder (database/ or query/)")
    if o.layout in DATASET_LAYOUTS:
        raise DataError(f"--layout {o.layout} reads a dataset root: pass --dataset ROOT")
    return load_dataset(db, q, radius=o.radius, frame_tolerance=o.frame_tolerance, layout=o.layout)


def _open_root(root: Path, database, queries, o: LayoutOptions) -> Dataset:
    layout = o.layout if o.layout in DATASET_LAYOUTS else detect_root(root)
    if o.layout not in ("auto", *DATASET_LAYOUTS):
        raise DataError(f"--layout {o.layout} is for --database/--queries folders, not --dataset")
    if layout == "patchnetvlad":
        if database is None or queries is None or o.images_root is None:
            raise DataError(
                f"{root}: a Patch-NetVLAD .npz needs --database INDEX.txt --queries QUERY.txt --images-root ROOT"
            )
        return read_patchnetvlad(root, database, queries, o.images_root, o.radius)
    if database is not None or queries is not None:
        raise DataError(f"--dataset {root} already names the database and queries; drop --database/--queries")
    if layout == "msls":
        return read_msls(find_cities(root, o.msls_cities), o.msls_subtask, 25.0 if o.radius is None else o.radius)
    if layout == "netvlad-mat":
        mat = root if root.is_file() else next(iter(sorted(root.glob("*.mat"))), root)
        return read_netvlad_mat(mat, o.images_root, o.radius, o.queries_subset)
    return read_downloader(root, o.queries_subset, o.radius)
