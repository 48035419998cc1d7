"""NetVLAD ``dbStruct`` ``.mat`` files (Pitts30k / Pitts250k, Tokyo 24/7, TokyoTM).

The struct (Arandjelović et al.'s NetVLAD release; OpenIBL reads the same files) has
``whichSet``, ``dbImageFns``, ``utmDb`` (2 x N), ``qImageFns``, ``utmQ`` (2 x M), ``numImages``,
``numQueries``, ``posDistThr`` (25 m), ``posDistSqThr``, ``nonTrivPosDistSqThr``. MATLAB v5 files
are read with scipy.io, v7.3 (HDF5) files with h5py. Positives are computed from ``utmDb``/``utmQ``
within ``posDistThr`` (or ``--radius``); no shipped match list is read.

Image roots: file names are relative to a dataset root (original NetVLAD: ``Pittsburgh/000/...``
and ``Pittsburgh/queries_real/000/...``; OpenIBL: the same under ``raw/``; Tokyo 24/7: the
database folder and ``247query_subset_v2/``). The root is ``--images-root`` when given, else the
``.mat`` file's folder or one of its two parents, with the usual query sub-folders tried first.

Tokyo 24/7's day / sunset / night query subsets come from a ``name,time`` CSV
(``<mat stem>_query_times.csv`` beside the ``.mat`` or in the images root); they are never
inferred from file order.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from placerank.data.dataset import Dataset, ImageSet
from placerank.data.positives import PositiveRule
from placerank.errors import DataError

FIELDS = ("whichSet", "dbImageFns", "utmDb", "qImageFns", "utmQ", "numImages", "numQueries", "posDistThr")
QUERY_DIRS = ("queries_real", "247query_subset_v2", "247query_v3", "query", "queries")
DB_DIRS = ("", "database", "images", "Pittsburgh", "pitts", "tokyo247", "raw")
TOKYO_SUBSETS = ("day", "sunset", "night")


def read_dbstruct(path: Path) -> dict:
    """``{"db": [names], "utm_db": (N, 2), "q": [names], "utm_q": (M, 2), "radius": float, "set": str}``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: .mat file does not exist")
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
    except NotImplementedError:  # MATLAB v7.3 = HDF5
        return _read_v73(path)
    except (ValueError, OSError) as e:
        import h5py

        if h5py.is_hdf5(str(path)):  # v7.3 written without MATLAB's header
            return _read_v73(path)
        raise DataError(f"{path}: not a MATLAB .mat file ({e})") from None
    if "dbStruct" not in mat:
        raise DataError(f"{path}: no dbStruct variable (found: {', '.join(k for k in mat if not k.startswith('_'))})")
    s = mat["dbStruct"][0, 0]
    names = s.dtype.names or ()
    get = (lambda f: s[f]) if all(f in names for f in FIELDS[1:5]) else (lambda f: s[FIELDS.index(f)])

    def strings(cell) -> list[str]:
        return [str(np.asarray(c).ravel()[0]) for c in np.asarray(cell).ravel()]

    radius = float(np.asarray(get("posDistThr")).ravel()[0]) if "posDistThr" in names or not names else 25.0
    which = str(np.asarray(get("whichSet")).ravel()[0]) if "whichSet" in names else ""
    return _checked(
        path, strings(get("dbImageFns")), get("utmDb"), strings(get("qImageFns")), get("utmQ"), radius, which
    )


def _read_v73(path: Path) -> dict:
    import h5py

    with h5py.File(path, "r") as f:
        if "dbStruct" not in f:
            raise DataError(f"{path}: no dbStruct group (found: {', '.join(f.keys())})")
        g = f["dbStruct"]

        def strings(name: str) -> list[str]:
            refs = np.asarray(g[name]).ravel()
            return ["".join(chr(int(c)) for c in np.asarray(f[r]).ravel()) for r in refs]

        def scalar(name: str, default) -> np.ndarray:
            return np.asarray(g[name]).ravel() if name in g else np.asarray([default])

        which = "".join(chr(int(c)) for c in scalar("whichSet", 0) if int(c))
        radius = float(scalar("posDistThr", 25.0)[0])
        return _checked(
            path,
            strings("dbImageFns"),
            np.asarray(g["utmDb"]),
            strings("qImageFns"),
            np.asarray(g["utmQ"]),
            radius,
            which,
        )


def _utm(arr, n: int, path: Path, what: str) -> np.ndarray:
    a = np.asarray(arr, dtype=np.float64)
    if a.shape == (2, n):
        a = a.T
    if a.shape != (n, 2):
        raise DataError(f"{path}: {what} has shape {a.shape}, expected 2 x {n}")
    return a


def _checked(path: Path, db: list[str], utm_db, q: list[str], utm_q, radius: float, which: str) -> dict:
    return {
        "db": db,
        "utm_db": _utm(utm_db, len(db), path, "utmDb"),
        "q": q,
        "utm_q": _utm(utm_q, len(q), path, "utmQ"),
        "radius": radius,
        "set": which,
    }


def find_root(names: list[str], bases: list[Path], prefixes: tuple[str, ...], what: str, mat: Path) -> Path:
    """The first ``base/prefix`` under which the first listed image exists; all must exist there."""
    for base in bases:
        for prefix in prefixes:
            root = base / prefix if prefix else base
            if (root / names[0]).exists():
                missing = [n for n in names if not (root / n).exists()]
                if missing:
                    raise DataError(
                        f"{root}: {len(missing)} {what} image(s) listed in {mat.name} missing, e.g. {missing[0]}"
                    )
                return root
    tried = ", ".join(str(b) for b in bases)
    raise DataError(f"{mat.name}: {what} image {names[0]} not found under {tried}; pass --images-root DATASET_ROOT")


def query_times(mat: Path, images_root: Path | None, names: list[str]) -> list[str]:
    candidates = [mat.parent / f"{mat.stem}_query_times.csv"]
    if images_root is not None:
        candidates.append(images_root / f"{mat.stem}_query_times.csv")
    for c in candidates:
        if c.exists():
            with open(c, newline="", encoding="utf-8") as f:
                times = {r["name"].strip(): r["time"].strip().lower() for r in csv.DictReader(f)}
            unknown = [n for n in names if n not in times and Path(n).name not in times]
            if unknown:
                raise DataError(f"{c}: no time for query {unknown[0]} ({len(unknown)} missing)")
            return [times.get(n, times.get(Path(n).name, "")) for n in names]
    raise DataError(f"query subsets need a name,time CSV (day|sunset|night per query): put it at {candidates[0]}")


def read_netvlad_mat(
    mat: str | Path,
    images_root: str | Path | None = None,
    radius: float | None = None,
    queries_subset: str | None = None,
) -> Dataset:
    mat = Path(mat)
    s = read_dbstruct(mat)
    if not s["db"] or not s["q"]:
        raise DataError(f"{mat}: dbStruct lists {len(s['db'])} database and {len(s['q'])} query images")
    root = Path(images_root) if images_root else None
    bases = [root] if root is not None else [mat.parent, mat.parent.parent, mat.parent.parent.parent]
    db_root = find_root(s["db"], bases, DB_DIRS, "database", mat)
    nested = tuple(f"{d}/{q}" for d in DB_DIRS[1:] for q in QUERY_DIRS)
    q_root = find_root(s["q"], bases, (*QUERY_DIRS, *nested, "", *DB_DIRS[1:]), "query", mat)
    r = float(radius) if radius is not None else s["radius"]
    db = ImageSet([db_root / n for n in s["db"]], "utm", s["utm_db"], source=f"{mat} (database)")
    q = ImageSet([q_root / n for n in s["q"]], "utm", s["utm_q"], source=f"{mat} (queries)")
    subset = "all"
    if queries_subset not in (None, "", "all"):
        if queries_subset not in TOKYO_SUBSETS:
            raise DataError(
                f"unknown query subset '{queries_subset}' for {mat.name}; known: all, {', '.join(TOKYO_SUBSETS)}"
            )
        times = query_times(mat, root, s["q"])
        q = q.subset(np.flatnonzero([t == queries_subset for t in times]))
        subset = queries_subset
        if len(q) == 0:
            raise DataError(f"{mat.name}: no query has time '{queries_subset}'")
    protocol = {
        "layout": "netvlad-mat",
        "mat": str(mat),
        "which_set": s["set"],
        "database_root": str(db_root),
        "queries_root": str(q_root),
        "query_subset": subset,
        "radius_m": r,
        "radius_source": "--radius" if radius is not None else "posDistThr",
    }
    return Dataset(db, q, PositiveRule("utm", radius=r), name=f"{mat.stem}:{subset}", protocol=protocol)
