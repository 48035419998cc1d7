"""Write the CSV manifests of the SelaVPR CPU recipe (``selavpr_cpu.sh``).

Training places (``path,place_id``):

- GardensPoint Walking frames ``[0, gp_train_frames)`` of day_left, day_right and night_right:
  frame k of the three traversals is place ``gp_k`` (3 views, day/night + lateral shift);
- optionally Nordland (summer + winter, 64x32 thumbnails upsampled by the model's resize):
  ``nordland_places`` frames with ``low_texture = 0`` from ``[nordland_start, ...)``, every
  ``nordland_step``-th, place ``nl_k`` (2 views, season change).

Validation (``path,frame``), GardensPoint frames ``[gp_train_frames, gp_eval_start)`` (never
trained on, never tested on; picks the best epoch): ``val_db_day_right.csv`` vs
``val_q_night_right.csv``.

Held-out evaluation (``path,frame``), GardensPoint frames ``[gp_eval_start, gp_eval_stop)``:
``eval_db_day_right.csv`` vs ``eval_q_night_right.csv`` (illumination change) and
``eval_db_day_left.csv`` (for day_left -> night_right, both changes).

Place-id CSVs keep the two datasets' places apart (traversal folders of different routes
would otherwise share frame numbers).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "data")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gp-train-frames", type=int, default=100)
    ap.add_argument("--gp-eval-start", type=int, default=100)
    ap.add_argument("--gp-eval-stop", type=int, default=140)
    ap.add_argument("--nordland-places", type=int, default=300, help="0: GardensPoint only")
    ap.add_argument("--nordland-start", type=int, default=200)
    ap.add_argument("--nordland-step", type=int, default=3)
    args = ap.parse_args(argv)

    gp = args.data / "gardenspoint_walking"
    if not gp.is_dir():
        raise SystemExit(f"{gp}: GardensPoint Walking folder not found (pass --data)")
    rows = []
    for trav in ("day_left", "day_right", "night_right"):
        for k in range(args.gp_train_frames):
            rows.append([str(gp / trav / f"Image{k:03d}.jpg"), f"gp_{k}"])
    write_csv(args.out / "train_gardenspoint.csv", ["path", "place_id"], rows)

    if args.nordland_places > 0:
        nl = args.data / "nordland_seqslam_64x32"
        with open(nl / "frames.csv", newline="") as f:
            frames = [
                r for r in csv.DictReader(f) if int(r["index"]) >= args.nordland_start and r["low_texture"] == "0"
            ]
        frames = frames[:: args.nordland_step][: args.nordland_places]
        rows = []
        for r in frames:
            for folder in ("database_summer", "queries_winter"):
                rows.append([str(nl / folder / r["file"]), f"nl_{r['index']}"])
        write_csv(args.out / "train_nordland.csv", ["path", "place_id"], rows)

    if not args.gp_train_frames <= args.gp_eval_start < args.gp_eval_stop:
        raise SystemExit("need --gp-train-frames <= --gp-eval-start < --gp-eval-stop")
    for trav, name in (("day_right", "val_db_day_right"), ("night_right", "val_q_night_right")):
        rows = [[str(gp / trav / f"Image{k:03d}.jpg"), k] for k in range(args.gp_train_frames, args.gp_eval_start)]
        write_csv(args.out / f"{name}.csv", ["path", "frame"], rows)
    for trav, name in (
        ("day_right", "eval_db_day_right"),
        ("night_right", "eval_q_night_right"),
        ("day_left", "eval_db_day_left"),
    ):
        rows = [[str(gp / trav / f"Image{k:03d}.jpg"), k] for k in range(args.gp_eval_start, args.gp_eval_stop)]
        write_csv(args.out / f"{name}.csv", ["path", "frame"], rows)
    print(f"manifests written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
