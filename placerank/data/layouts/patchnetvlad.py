"""Patch-NetVLAD's image lists and ``.npz`` ground-truth files.

Patch-NetVLAD ships ``dataset_imagenames/<name>_imageNames_index.txt`` (database) and
``..._query.txt`` (one image path per line, relative to the dataset root) and
``dataset_gt_files/<name>.npz`` with ``utmDb``, ``utmQ`` and ``posDistThr``. Positives are
computed here from ``utmDb``/``utmQ`` within ``posDistThr`` (or ``--radius``); any other array
in the ``.npz`` is ignored.

``placerank eval --dataset GT.npz --database INDEX.txt --queries QUERY.txt --images-root ROOT``
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from placerank.data.dataset import Dataset, ImageSet
from placerank.data.positives import PositiveRule
from placerank.errors import DataError


def read_list(path: Path, root: Path) -> list[Path]:
    if not path.exists():
        raise DataError(f"{path}: image list does not exist")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: lists no images")
    paths = [root / n for n in names]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise DataError(f"{path}: {len(missing)} listed image(s) missing under {root}, e.g. {missing[0]}")
    return paths


def _utm(npz, key: str, n: int, path: Path) -> np.ndarray:
    if key not in npz:
        raise DataError(f"{path}: no '{key}' array (found: {', '.join(npz.files)})")
    a = np.asarray(npz[key], dtype=np.float64)
    if a.shape == (2, n) and n != 2:
        a = a.T
    if a.shape != (n, 2):
        raise DataError(f"{path}: '{key}' has shape {a.shape} but the image list has {n} images")
    return a


def read_patchnetvlad(
    gt: str | Path, database: str | Path, queries: str | Path, images_root: str | Path, radius: float | None = None
) -> Dataset:
    gt, root = Path(gt), Path(images_root)
    if not gt.exists():
        raise DataError(f"{gt}: ground-truth .npz does not exist")
    db_paths = read_list(Path(database), root)
    q_paths = read_list(Path(queries), root)
    with np.load(gt, allow_pickle=False) as npz:
        utm_db = _utm(npz, "utmDb", len(db_paths), gt)
        utm_q = _utm(npz, "utmQ", len(q_paths), gt)
        shipped = float(np.asarray(npz["posDistThr"]).ravel()[0]) if "posDistThr" in npz.files else 25.0
    r = float(radius) if radius is not None else shipped
    db = ImageSet(db_paths, "utm", utm_db, source=str(database))
    q = ImageSet(q_paths, "utm", utm_q, source=str(queries))
    protocol = {
        "layout": "patchnetvlad",
        "ground_truth": str(gt),
        "database_list": str(database),
        "queries_list": str(queries),
        "images_root": str(root),
        "radius_m": r,
        "radius_source": "--radius" if radius is not None else "posDistThr",
    }
    return Dataset(db, q, PositiveRule("utm", radius=r), name=gt.stem, protocol=protocol)
