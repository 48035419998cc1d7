"""Write frame-labelled CSV manifests for the SFRS CPU recipe (GardensPoint Walking).

    python benchmarks/recipes/sfrs_manifests.py DATA/gardenspoint_walking OUT_DIR \
        --train 0 100 --test 100 140

writes OUT_DIR/train_{day_left,day_right,night_right}.csv (frames [a, b) of each traversal) and
OUT_DIR/test_{day_left,day_right,night_right}.csv (held-out frames [c, d)). Paths
are absolute so the manifests can live anywhere; the ``frame`` column is the place label.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def write_manifest(folder: Path, frames: range, out: Path) -> int:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    rows = [(str(files[k].resolve()), k) for k in frames if k < len(files)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "frame"])
        w.writerows(rows)
    return len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gardens", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, nargs=2, default=(0, 100), metavar=("START", "STOP"))
    ap.add_argument("--test", type=int, nargs=2, default=(100, 140), metavar=("START", "STOP"))
    a = ap.parse_args()
    for trav in ("day_left", "day_right", "night_right"):
        n = write_manifest(a.gardens / trav, range(*a.train), a.out / f"train_{trav}.csv")
        print(f"train_{trav}.csv: {n} frames")
        n = write_manifest(a.gardens / trav, range(*a.test), a.out / f"test_{trav}.csv")
        print(f"test_{trav}.csv: {n} frames")


if __name__ == "__main__":
    main()
