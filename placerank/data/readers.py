"""Readers that turn a folder or a CSV into an :class:`ImageSet`.

Supported per-folder layouts (:func:`read_image_set`; labels are never guessed):

- **CSV manifest**: a ``path`` column (relative to the CSV's folder) plus exactly one position
  group: ``easting,northing`` (metres), ``lat,lon`` (WGS84, converted to UTM with pyproj),
  ``frame`` (int) or ``place_id``.
- **@UTM@ folder** (gmberton layout): file names ``@UTM_east@UTM_north@...@.jpg``.
- **Frame-aligned traversal folder** (GardensPoint, Nordland, corridor), only when asked for
  (``layout="frames"`` or a frame tolerance): the k-th image in sorted file-name order is frame k.
- **Unlabelled folder**: anything else; eval retrieves and reports no recall.

``<folder>_images_paths.txt`` beside a folder (VPR-datasets-downloader) lists its images.
Benchmark layouts that span both sides (MSLS, NetVLAD ``.mat``, ...) are in
:mod:`placerank.data.layouts`.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from placerank.data.dataset import Dataset, ImageSet, PositiveRule
from placerank.data.geo import latlon_to_utm
from placerank.errors import DataError, warn

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
POSITION_GROUPS = (("easting", "northing"), ("lat", "lon"), ("frame",), ("place_id",))


def list_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: folder does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    pattern = folder.rglob("*") if recursive else folder.glob("*")
    named = [p for p in pattern if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]
    files = sorted(p for p in named if p.is_file())
    broken = sorted(p for p in named if p.is_symlink() and not p.exists())
    if broken:  # dangling or looping symlinks: said once, not skipped without a word
        warn(f"{folder}: skipped {len(broken)} broken or looping symlink(s), e.g. {broken[0]}")
    return files


def read_csv_manifest(csv_path: str | Path) -> ImageSet:
    csv_path = Path(csv_path)
    if not csv_path.exists():
        raise DataError(f"{csv_path}: CSV file does not exist")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    if "path" not in columns:
        raise DataError(f"{csv_path}: CSV needs a 'path' column (found: {', '.join(columns) or 'none'})")
    groups = [g for g in POSITION_GROUPS if all(c in columns for c in g)]
    if not groups:
        raise DataError(
            f"{csv_path}: CSV has no known position column; add one of: easting,northing | lat,lon | frame | place_id"
        )
    if len(groups) > 1:
        names = " and ".join(",".join(g) for g in groups)
        raise DataError(f"{csv_path}: CSV has several position columns ({names}); keep exactly one")
    group = groups[0]
    if not rows:
        raise DataError(f"{csv_path}: CSV lists no images")
    base = csv_path.parent
    paths = [(base / r["path"]).resolve() for r in rows]
    check_unique_paths(csv_path, paths)
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise DataError(f"{csv_path}: {len(missing)} listed image(s) do not exist, e.g. {missing[0]}")
    try:
        if group == ("easting", "northing"):
            pos = np.array([[float(r["easting"]), float(r["northing"])] for r in rows], dtype=np.float64)
            check_finite(csv_path, pos, "easting,northing")
            return ImageSet(paths, "utm", pos, source=str(csv_path))
        if group == ("lat", "lon"):
            latlon = np.array([[float(r["lat"]), float(r["lon"])] for r in rows], dtype=np.float64)
            check_finite(csv_path, latlon, "lat,lon")
            bad = (np.abs(latlon[:, 0]) > 90) | (np.abs(latlon[:, 1]) > 180)
            if bad.any():
                row = int(np.argmax(bad))
                raise DataError(
                    f"{csv_path}: row {row + 2} has lat/lon out of range ({latlon[row, 0]:g}, {latlon[row, 1]:g});"
                    " latitude must be within +-90 and longitude within +-180"
                )
            en, zones = latlon_to_utm(latlon)
            return ImageSet(paths, "utm", en, source=str(csv_path), utm_zone=zones, latlon=latlon)
        if group == ("frame",):
            pos = np.array([int(r["frame"]) for r in rows], dtype=np.int64)
            return ImageSet(paths, "frame", pos, source=str(csv_path))
        pos = np.array([r["place_id"] for r in rows], dtype=object)
        return ImageSet(paths, "place", pos, source=str(csv_path))
    except ValueError as e:
        raise DataError(f"{csv_path}: a value in column(s) {','.join(group)} is not a number ({e})") from None


def check_unique_paths(csv_path: Path, paths: list[Path]) -> None:
    """A CSV listing one image twice would count it twice (recall, num_queries): one line naming
    both rows (row numbers count the header as row 1)."""
    first: dict[Path, int] = {}
    for i, p in enumerate(paths):
        if p in first:
            raise DataError(
                f"{csv_path}: row {i + 2} lists {p.name} again (first at row {first[p] + 2}); remove the duplicate row"
            )
        first[p] = i


def check_finite(csv_path: Path, values: np.ndarray, columns: str) -> None:
    """NaN or inf coordinates: one line naming the row (they would break the KD-tree of positives)."""
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        shown = ", ".join(f"{v:g}" for v in values[row])
        raise DataError(f"{csv_path}: row {row + 2} has a {columns} value that is not a finite number ({shown})")


def parse_utm_name(path: Path) -> tuple[float, float] | None:
    """``@east@north@...`` -> (east, north); None if the name is not in that layout (or its
    numbers are not finite)."""
    fields = path.name.split("@")
    if len(fields) < 3:
        return None
    try:
        east, north = float(fields[1]), float(fields[2])
    except ValueError:
        return None
    return (east, north) if np.isfinite(east) and np.isfinite(north) else None


def images_paths_file(folder: Path) -> Path:
    """``<folder>_images_paths.txt`` beside ``folder`` (VPR-datasets-downloader / gmberton's
    test sets): one path per line, relative to ``folder``; when present it replaces globbing."""
    return folder.parent / f"{folder.name}_images_paths.txt"


def list_folder_images(folder: str | Path) -> list[Path]:
    """The folder's images: from ``<folder>_images_paths.txt`` when it exists, else a sorted glob."""
    folder = Path(folder)
    listing = images_paths_file(folder)
    if not listing.exists():
        return list_images(folder)
    names = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
    paths = [folder / n for n in names]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise DataError(f"{listing}: {len(missing)} listed image(s) do not exist, e.g. {missing[0]}")
    return paths


def read_utm_folder(folder: str | Path) -> ImageSet:
    files = list_folder_images(folder)
    if not files:
        raise DataError(f"{folder}: no images found")
    pos = []
    for p in files:
        en = parse_utm_name(p)
        if en is None:
            raise DataError(f"{p}: file name is not in the @UTM_east@UTM_north@...@ layout")
        pos.append(en)
    return ImageSet(files, "utm", np.array(pos, dtype=np.float64), source=str(folder))


def read_traversal_folder(folder: str | Path) -> ImageSet:
    """Frame-aligned traversal (asked for with ``--layout frames`` or ``--frame-tolerance``):
    the k-th image in file-name order is frame k."""
    files = list_images(folder, recursive=False)
    if not files:
        raise DataError(f"{folder}: no images found")
    return ImageSet(files, "frame", np.arange(len(files), dtype=np.int64), source=str(folder))


def read_unlabelled_folder(folder: str | Path) -> ImageSet:
    """Images without positions: eval retrieves for them but reports no recall."""
    files = list_folder_images(folder)
    if not files:
        raise DataError(f"{folder}: no images found")
    return ImageSet(files, "none", np.zeros(len(files), dtype=np.int64), source=str(folder))


FOLDER_LAYOUTS = ("auto", "csv", "utm", "frames", "traversal", "unlabelled")


def read_image_set(spec: str | Path, layout: str = "auto") -> ImageSet:
    """Read a folder or CSV. ``layout``: auto | csv | utm | frames (alias traversal) | unlabelled.

    ``auto`` never guesses labels: a CSV is a manifest, a folder whose names are all ``@UTM@``
    is metric, a folder with no such name is unlabelled, and a folder mixing both is an error."""
    spec = Path(spec)
    if layout not in FOLDER_LAYOUTS:
        raise DataError(f"unknown layout '{layout}' for {spec}; known: {', '.join(FOLDER_LAYOUTS)}")
    if layout == "csv" or (layout == "auto" and spec.suffix.lower() == ".csv"):
        return read_csv_manifest(spec)
    if not spec.exists():
        raise DataError(f"{spec}: folder does not exist")
    if spec.is_file():
        raise DataError(f"{spec}: expected a folder of images or a .csv manifest")
    if layout == "utm":
        return read_utm_folder(spec)
    if layout in ("frames", "traversal"):
        return read_traversal_folder(spec)
    if layout == "unlabelled":
        return read_unlabelled_folder(spec)
    files = list_folder_images(spec)
    if not files:
        raise DataError(f"{spec}: no images found")
    named = [parse_utm_name(p) is not None for p in files]
    if all(named):
        return read_utm_folder(spec)
    if any(named):
        bad = files[named.index(False)]
        raise DataError(
            f"{spec}: mixed layout: {sum(named)} of {len(files)} images have @UTM@ names but {bad.name} has not; "
            "rename or remove the odd ones, or pass --layout unlabelled"
        )
    return read_unlabelled_folder(spec)


def make_rule(kind: str, radius: float | None = None, frame_tolerance: int | None = None) -> PositiveRule:
    if kind == "utm":
        return PositiveRule("utm", radius=25.0 if radius is None else float(radius))
    if kind == "frame":
        return PositiveRule("frame", frame_tolerance=0 if frame_tolerance is None else int(frame_tolerance))
    if kind == "none":
        return PositiveRule("none")
    return PositiveRule("place")


def load_dataset(
    database: str | Path,
    queries: str | Path,
    radius: float | None = None,
    frame_tolerance: int | None = None,
    layout: str = "auto",
    name: str | None = None,
) -> Dataset:
    """Read both sides and build the positive rule that fits their positions.

    Frame alignment is used only when asked for: ``layout="frames"`` (alias ``"traversal"``) or
    an explicit ``frame_tolerance`` (a plain folder then reads as a traversal). Otherwise a plain
    folder is unlabelled."""
    if radius is not None and frame_tolerance is not None:
        raise DataError("give either --radius (metres) or --frame-tolerance (frames), not both")
    db = _read_side(database, layout, frame_tolerance)
    q = _read_side(queries, layout, frame_tolerance)
    if radius is not None and db.kind != "utm":
        raise DataError(f"--radius needs metric positions, but {database} has '{db.kind}' positions")
    if frame_tolerance is not None and db.kind != "frame":
        raise DataError(f"--frame-tolerance needs frame indices, but {database} has '{db.kind}' positions")
    if db.kind != q.kind and "none" in (db.kind, q.kind):
        labelled, bare = (database, queries) if q.kind == "none" else (queries, database)
        raise DataError(
            f"mixed layout: {labelled} has '{db.kind if q.kind == 'none' else q.kind}' positions but {bare} has "
            "none (no @UTM@ names, manifest or known layout); give both sides positions, or neither"
        )
    rule = make_rule(db.kind, radius, frame_tolerance)
    layout_name = {"utm": "utm", "frame": "frames", "place": "csv", "none": "unlabelled"}[db.kind]
    if Path(database).suffix.lower() == ".csv":
        layout_name = "csv"
    protocol = {"layout": layout_name, "database": str(database), "queries": str(queries)}
    return Dataset(db, q, rule, name=name or f"{Path(database).name}->{Path(queries).name}", protocol=protocol)


def _read_side(spec: str | Path, layout: str, frame_tolerance: int | None) -> ImageSet:
    images = read_image_set(spec, layout)
    if images.kind == "none" and frame_tolerance is not None and layout == "auto":
        return read_traversal_folder(spec)  # --frame-tolerance asks for frame alignment
    return images
