"""Tiny replicas of the benchmark layouts, built inside the tests from real shared images
(GardensPoint day_right as database, night_right as queries) with synthetic coordinates.

Place k sits at northing ``N0 + 15 k`` (metres, UTM-like), so with the 25 m radius the positives
of a query at place j are the database places j-1, j, j+1. One extra query lies far from every
database image (no positive), and the MSLS replica adds a panorama and a query outside the
subtask, which the MSLS protocol must drop. Nothing is committed: files are written to tmp.
"""

from __future__ import annotations

import csv
import os
import struct
from pathlib import Path

import numpy as np

E0, N0, STEP = 500000.0, 5000000.0, 15.0
DB_PLACES = list(range(12))
Q_PLACES = [0, 3, 5, 8, 11]
FAR = (E0 + 5000.0, N0 - 5000.0)  # the query with no positive


def places(gardens: Path):
    """([(source, east, north)] database, [(source, east, north)] queries); the last query is far."""
    db = [(gardens / "day_right" / f"Image{10 * k:03d}.jpg", E0, N0 + STEP * k) for k in DB_PLACES]
    q = [(gardens / "night_right" / f"Image{10 * k + 1:03d}.jpg", E0 + 3.0, N0 + STEP * k) for k in Q_PLACES]
    q.append((gardens / "night_right" / "Image135.jpg", *FAR))
    return db, q


def brute_positives(db, q, radius: float = 25.0) -> list[list[int]]:
    d = np.array([[e, n] for _, e, n in db])
    return [np.flatnonzero(np.linalg.norm(d - [e, n], axis=1) <= radius).tolist() for _, e, n in q]


def link(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)
    return dst


def write_csv(path: Path, header: list[str], rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def build_csv(root: Path, db, q) -> tuple[Path, Path]:
    h = ["path", "easting", "northing"]
    return (
        write_csv(root / "db.csv", h, [[str(s), e, n] for s, e, n in db]),
        write_csv(root / "q.csv", h, [[str(s), e, n] for s, e, n in q]),
    )


def build_msls(root: Path, gardens: Path, city: str = "cph") -> Path:
    """``root/train_val/<city>/{database,query}`` with the four CSVs; returns the city folder."""
    db, q = places(gardens)
    extra_db = [(gardens / "day_right" / "Image131.jpg", E0, N0 + STEP * 4)]  # a panorama: dropped
    extra_q = [(gardens / "night_right" / "Image071.jpg", E0, N0 + STEP * 7)]  # not in the subtask: dropped
    city_dir = root / "train_val" / city
    for side, items, odd in (("database", db + extra_db, len(db)), ("query", q + extra_q, len(q))):
        folder = city_dir / side
        keys = [f"{side[0]}{i:04d}key" for i in range(len(items))]
        for k, (src, _, _) in zip(keys, items):
            link(src, folder / "images" / f"{k}.jpg")
        write_csv(
            folder / "postprocessed.csv",
            ["", "key", "easting", "northing", "night", "control_panel", "view_direction", "unique_cluster"],
            [[i, k, e, n, False, False, "Forward", i] for i, (k, (_, e, n)) in enumerate(zip(keys, items))],
        )
        pano = [side == "database" and i == odd for i in range(len(items))]
        write_csv(
            folder / "raw.csv",
            ["", "key", "lon", "lat", "ca", "captured_at", "pano"],
            [[i, k, 12.5, 55.6, 0.0, 1500000000000 + i, pano[i]] for i, k in enumerate(keys)],
        )
        write_csv(
            folder / "seq_info.csv",
            ["", "key", "sequence_key", "frame_number"],
            [[i, k, "s0", i] for i, k in enumerate(keys)],
        )
        subtasks = ["all", "summer2winter", "winter2summer", "day2night", "night2day", "old2new", "new2old"]
        member = [not (side == "query" and i == odd) for i in range(len(items))]
        write_csv(
            folder / "subtask_index.csv",
            ["", "key", *subtasks],
            [[i, k, member[i], *([member[i] and i % 2 == 0] * 6)] for i, k in enumerate(keys)],
        )
    return city_dir


def _netvlad_names(db, q):
    return [f"000/{k:06d}_pitch1_yaw1.jpg" for k in range(len(db))], [
        f"000/{k:06d}_pitch1_yaw1.jpg" for k in range(len(q))
    ]


def build_netvlad_images(root: Path, db, q) -> tuple[list[str], list[str]]:
    """Original NetVLAD roots: ``Pittsburgh/000/...`` and ``Pittsburgh/queries_real/000/...``
    (query and database names collide on purpose)."""
    db_names, q_names = _netvlad_names(db, q)
    for n, (src, _, _) in zip(db_names, db):
        link(src, root / "Pittsburgh" / n)
    for n, (src, _, _) in zip(q_names, q):
        link(src, root / "Pittsburgh" / "queries_real" / n)
    return db_names, q_names


def build_mat_v5(root: Path, gardens: Path, name: str = "pitts30k_test.mat") -> Path:
    import scipy.io

    db, q = places(gardens)
    db_names, q_names = build_netvlad_images(root, db, q)

    def cell(names):
        c = np.empty((len(names), 1), dtype=object)
        for i, n in enumerate(names):
            c[i, 0] = n
        return c

    struct_ = {
        "whichSet": "test",
        "dbImageFns": cell(db_names),
        "utmDb": np.array([[e, n] for _, e, n in db]).T,
        "qImageFns": cell(q_names),
        "utmQ": np.array([[e, n] for _, e, n in q]).T,
        "numImages": float(len(db)),
        "numQueries": float(len(q)),
        "posDistThr": 25.0,
        "posDistSqThr": 625.0,
        "nonTrivPosDistSqThr": 100.0,
    }
    path = root / name
    scipy.io.savemat(str(path), {"dbStruct": struct_})
    return path


def build_mat_v73(root: Path, gardens: Path, name: str = "pitts30k_test.mat") -> Path:
    """The same struct as MATLAB ``save -v7.3`` writes it: HDF5 with a 512-byte MATLAB header,
    cell strings as object references to uint16 arrays, matrices transposed."""
    import h5py

    db, q = places(gardens)
    db_names, q_names = build_netvlad_images(root, db, q)
    path = root / name
    with h5py.File(path, "w", userblock_size=512) as f:
        g = f.create_group("dbStruct")
        refs = f.create_group("#refs#")

        def cell(key, names):
            out = []
            for i, n in enumerate(names):
                d = refs.create_dataset(f"{key}{i}", data=np.array([[ord(c)] for c in n], dtype=np.uint16))
                out.append(d.ref)
            g.create_dataset(key, data=np.array([out], dtype=h5py.ref_dtype))

        cell("dbImageFns", db_names)
        cell("qImageFns", q_names)
        g.create_dataset("utmDb", data=np.array([[e, n] for _, e, n in db]))
        g.create_dataset("utmQ", data=np.array([[e, n] for _, e, n in q]))
        g.create_dataset("posDistThr", data=np.array([[25.0]]))
        g.create_dataset("whichSet", data=np.array([[ord(c)] for c in "test"], dtype=np.uint16))
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        f.write(header.ljust(116, b" ") + b"\0" * 8 + struct.pack("<H", 0x0200) + b"IM")
    return path


def build_downloader(
    root: Path, gardens: Path, queries=("queries",), db_dir: str = "database", listing: bool = True
) -> Path:
    """``root/images/test/{database,queries*}`` with @UTM@ names; ``database_images_paths.txt``
    lists the database in reverse name order (so reading it, not globbing, is visible)."""
    db, q = places(gardens)
    test = root / "images" / "test"
    names = []
    for k, (src, e, n) in enumerate(db):
        names.append(f"@{e:.2f}@{n:.2f}@17@T@{k:04d}@.jpg")
        link(src, test / db_dir / names[-1])
    for folder in queries:
        for k, (src, e, n) in enumerate(q):
            link(src, test / folder / f"@{e:.2f}@{n:.2f}@17@T@q{k:04d}@.jpg")
    if listing:
        (test / f"{db_dir}_images_paths.txt").write_text("\n".join(reversed(names)) + "\n")
    return root


def build_patchnetvlad(root: Path, gardens: Path) -> tuple[Path, Path, Path]:
    db, q = places(gardens)
    db_names, q_names = build_netvlad_images(root, db, q)
    index = root / "pitts30k_imageNames_index.txt"
    index.write_text("".join(f"Pittsburgh/{n}\n" for n in db_names))
    query = root / "pitts30k_imageNames_query.txt"
    query.write_text("".join(f"Pittsburgh/queries_real/{n}\n" for n in q_names))
    gt = root / "pitts30k_test.npz"
    np.savez(gt, utmDb=np.array([[e, n] for _, e, n in db]), utmQ=np.array([[e, n] for _, e, n in q]), posDistThr=25)
    return gt, index, query
