"""A small real database for the service tests: the geotagged photos (Berlin + Arezzo) with
Berlin ``01.jpg`` and Arezzo ``DSCN0038.jpg`` held out as queries / photos to add."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def serve_site(tmp_path_factory, shared_weights, shared_copy) -> dict:
    import placerank

    root = tmp_path_factory.mktemp("serve")
    copy = shared_copy("geotagged_photos")
    photos, held = root / "photos", root / "held"
    photos.mkdir()
    held.mkdir()
    for folder in ("opensfm_berlin", "exif_samples_arezzo"):
        (photos / folder).mkdir()
        for p in sorted((copy / folder).glob("*.jpg")):  # the photos only (not the sub-datasets)
            shutil.copy2(p, photos / folder / p.name)
    shutil.move(photos / "opensfm_berlin/01.jpg", held / "01.jpg")
    shutil.move(photos / "exif_samples_arezzo/DSCN0038.jpg", held / "DSCN0038.jpg")
    db = root / "db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLACERANK_WEIGHTS", str(shared_weights))
        with placerank.Database.create(db, model="effnet-lite0-gem") as d:
            report = d.add_folder(photos, progress=False, num_workers=0)
    assert report.total == 10 and not report.failed
    return {"root": root, "photos": photos, "held": held, "db": db}


@pytest.fixture(scope="session")
def serve_weights_env(shared_weights):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLACERANK_WEIGHTS", str(shared_weights))
        yield


def copy_db(site: dict, dest: Path) -> Path:
    """A private copy of the site's database (for tests that write to it)."""
    shutil.copytree(site["db"], dest)
    return dest
