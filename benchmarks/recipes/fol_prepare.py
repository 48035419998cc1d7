"""Write the FoL CPU recipe's training manifest (path,place_id) from /work/shared/data.

    python benchmarks/recipes/fol_prepare.py OUT.csv [--gardens-frames 0 100] [--nordland-places 300]

- GardensPoint Walking frames [a, b) of day_left, day_right and night_right: place ``gp<k>``
  (3 views per place: day/night and a lateral shift). Frames >= b stay held out for evaluation.
- Nordland (64x32 thumbnails, summer + winter): ``--nordland-places`` places spread evenly over
  the frames without ``low_texture`` (tunnels, black frames), place ``nl<k>`` (2 views: seasons).

Place ids carry a dataset prefix so frame k of one route never merges with frame k of another.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("PLACERANK_SHARED", REPO.parent / "shared"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--gardens-frames", type=int, nargs=2, default=[0, 100])
    p.add_argument("--nordland-places", type=int, default=300)
    args = p.parse_args(argv)
    gardens = SHARED / "data" / "gardenspoint_walking"
    nordland = SHARED / "data" / "nordland_seqslam_64x32"
    rows = []
    for trav in ("day_left", "day_right", "night_right"):
        for k in range(*args.gardens_frames):
            rows.append((gardens / trav / f"Image{k:03d}.jpg", f"gp{k}"))
    if args.nordland_places > 0:
        with open(nordland / "frames.csv", newline="") as f:
            good = [r for r in csv.DictReader(f) if r["low_texture"] == "0"]
        step = max(1, len(good) // args.nordland_places)
        for r in good[::step][: args.nordland_places]:
            for season in ("database_summer", "queries_winter"):
                rows.append((nordland / season / r["file"], f"nl{r['index']}"))
    missing = [str(pth) for pth, _ in rows if not pth.exists()]
    if missing:
        raise SystemExit(f"missing image {missing[0]} (is PLACERANK_SHARED right?)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "place_id"])
        w.writerows((str(pth), pid) for pth, pid in rows)
    print(f"wrote {args.out}: {len(rows)} images, {len({pid for _, pid in rows})} places")
    return 0


if __name__ == "__main__":
    sys.exit(main())
