"""Reader for GSV-Cities as it ships (Ali-bey et al., Neurocomputing 2022), FoL's training set.

Layout::

    ROOT/Dataframes/<City>.csv     place_id,year,month,northdeg,city_id,lat,lon,panoid
    ROOT/Images/<City>/<city_id>_<place_id % 1e5, 7 digits>_<yyyy>_<mm>_<northdeg, 3 digits>_<lat>_<lon>_<panoid>.jpg

The image name is rebuilt from each dataframe row (lat/lon written as Python prints a float,
as the dataset's own loader does); the file extension may be .jpg or .JPG. Places are labelled
``<City>/<place_id>`` so ids never collide across cities. The result is an
:class:`ImageSet` of kind ``"place"`` (what :func:`placerank.data.places.read_training_places`
returns), so every training method can use it.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from placerank.data.dataset import ImageSet
from placerank.errors import DataError

COLUMNS = ("place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid")


def is_gsv_cities_root(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "Dataframes").is_dir() and (p / "Images").is_dir()


def image_stem(row: dict) -> str:
    """File name without extension for one dataframe row."""
    place = int(float(row["place_id"])) % 10**5
    return "_".join(
        [
            row["city_id"],
            str(place).zfill(7),
            str(int(float(row["year"]))).zfill(4),
            str(int(float(row["month"]))).zfill(2),
            str(int(float(row["northdeg"]))).zfill(3),
            str(float(row["lat"])),
            str(float(row["lon"])),
            row["panoid"],
        ]
    )


def read_gsv_cities(
    root: str | Path, cities: Sequence[str] | None = None, min_images: int = 4, images_per_place: int | None = None
) -> ImageSet:
    """Images of GSV-Cities labelled by place.

    ``cities``: dataframe names to use (default: every ``Dataframes/*.csv``). Places with fewer
    than ``min_images`` images are dropped (the official FoL/MixVPR setting is 4).
    ``images_per_place`` keeps the most recent ones by (year, month, lat), descending — FoL's
    deterministic choice; None keeps all (PlaceBatchSampler then samples K per place).
    """
    root = Path(root)
    if not is_gsv_cities_root(root):
        raise DataError(f"{root}: not a GSV-Cities folder (expected Dataframes/*.csv and Images/<city>/)")
    frames = root / "Dataframes"
    if cities:
        csvs = [frames / f"{c}.csv" for c in cities]
        missing = [p for p in csvs if not p.is_file()]
        if missing:
            raise DataError(f"{missing[0]}: city dataframe does not exist")
    else:
        csvs = sorted(frames.glob("*.csv"))
        if not csvs:
            raise DataError(f"{frames}: no city dataframes (*.csv) found")
    paths: list[Path] = []
    labels: list[str] = []
    latlon: list[tuple[float, float]] = []
    for csv_path in csvs:
        city = csv_path.stem
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            absent = [c for c in COLUMNS if c not in cols]
            if absent:
                raise DataError(f"{csv_path}: not a GSV-Cities dataframe (missing column(s) {', '.join(absent)})")
            rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
        folder = root / "Images" / city
        if not folder.is_dir():
            raise DataError(f"{folder}: image folder for city '{city}' does not exist")
        on_disk = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")}
        by_place: dict[str, list[tuple[tuple, Path, tuple[float, float]]]] = {}
        missing_files = []
        try:
            for r in rows:
                stem = image_stem(r)
                p = on_disk.get(stem)
                if p is None:
                    missing_files.append(folder / f"{stem}.jpg")
                    continue
                key = (int(float(r["year"])), int(float(r["month"])), float(r["lat"]))
                by_place.setdefault(f"{city}/{int(float(r['place_id']))}", []).append(
                    (key, p, (float(r["lat"]), float(r["lon"])))
                )
        except (ValueError, KeyError) as e:
            raise DataError(f"{csv_path}: bad value in a dataframe row ({type(e).__name__}: {e})") from None
        if missing_files:
            raise DataError(f"{csv_path}: {len(missing_files)} listed image(s) do not exist, e.g. {missing_files[0]}")
        for place in sorted(by_place):
            members = by_place[place]
            if len(members) < min_images:
                continue
            members = sorted(members, key=lambda m: m[0], reverse=True)
            if images_per_place:
                members = members[:images_per_place]
            for _, p, ll in members:
                paths.append(p)
                labels.append(place)
                latlon.append(ll)
    if not paths:
        raise DataError(f"{root}: no GSV-Cities place has {min_images} or more images")
    return ImageSet(
        paths, "place", np.array(labels, dtype=object), source=str(root), latlon=np.array(latlon, dtype=np.float64)
    )
