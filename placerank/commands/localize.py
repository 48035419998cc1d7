"""``placerank localize``: where was this photo taken? (against a database from ``placerank index``)."""

from __future__ import annotations

import sys
from pathlib import Path

from placerank.commands._common import add_compile_arg, add_model_args, non_negative_int, positive_float, positive_int
from placerank.commands.index import add_database_precision_arg


def register(sub) -> None:
    p = sub.add_parser(
        "localize",
        help="estimate where photos were taken, against a `placerank index` database",
        description="For each photo: retrieve the most similar database photos (optionally "
        "re-ranked), estimate lat/lon (or metres) from those that agree, and write "
        "OUT/<photo>.json, <photo>_matches.png, <photo>_map.png (+ _inliers.png).",
    )
    p.add_argument("photos", nargs="+", type=Path, help="photo(s) or folder(s) of photos")
    p.add_argument("--db", required=True, type=Path, help="database folder built by `placerank index`")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--rerank", default=None, help="re-ranker name, e.g. ransac-xfeat (see `placerank models`)")
    p.add_argument(
        "--top-k",
        type=positive_int,
        default=10,
        help="database photos retrieved (and re-ranked) per photo (default 10)",
    )
    p.add_argument(
        "--radius",
        type=positive_float,
        default=None,
        help="metres: matches this close to the best one agree with it (default: the database's, 25 for GPS)",
    )
    p.add_argument("--no-pictures", action="store_true", help="write only the JSON files")
    p.add_argument(
        "--sequence-length",
        type=positive_int,
        default=1,
        metavar="L",
        help="the photos are frames of a traversal, in the order given (a folder: sorted names): match the"
        " last L along constant-velocity paths through the database's frames (sorted names, one traversal"
        " per folder); 1 = off (default; see docs/sequence.md)",
    )
    p.add_argument("--show", type=non_negative_int, default=5, help="top matches printed per photo (default 5)")
    add_model_args(p, for_database=True)
    add_database_precision_arg(p)  # auto: the database's own
    add_compile_arg(p)  # auto: one photo at a time stays eager
    p.set_defaults(func=run)


def _short(path: str) -> str:
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def print_result(r, show: int = 5) -> None:
    from placerank.localize.outputs import format_distance

    name = Path(r.query).name
    if not r.found:
        print(f"{name}: no estimate ({'; '.join(r.notes) or 'no match has a position'})")
        return
    where = (
        f"{r.lat:.6f}, {r.lon:.6f} (UTM {r.utm_zone} E {r.easting:.1f} N {r.northing:.1f})"
        if r.lat is not None
        else f"E {r.easting:.3f} m, N {r.northing:.3f} m (local frame)"
    )
    print(f"{name}: {where}  confidence {r.confidence:.2f}")
    for m in r.matches[:show]:
        score = f"sim {m.similarity:.3f}" + (f"  {r.rerank} {m.rerank_score:g}" if m.rerank_score is not None else "")
        print(
            f"  #{m.rank:<2d} {_short(m.path):40s} {score}  {format_distance(m.distance_m):>10s}  "
            f"{'agrees' if m.agrees else 'other place'}"
        )
    if r.query_gps is not None and r.query_gps.error_m is not None:
        print(
            f"  the photo's own EXIF GPS ({r.query_gps.lat:.6f}, {r.query_gps.lon:.6f}) is "
            f"{format_distance(r.query_gps.error_m)} from the estimate"
        )
    for note in r.notes:
        print(f"  note: {note}")


def sequence_tracker(db, length: int):
    """None for ``--sequence-length 1``; else the tracker over the database's frame order."""
    if length <= 1:
        return None
    from placerank.localize.sequence import SequenceTracker
    from placerank.rerank.sequence import SequenceOptions

    return SequenceTracker(db.store, SequenceOptions(length=length))


def run(args) -> int:
    from placerank.commands._common import check_precision_arg, image_size_arg
    from placerank.errors import DataError
    from placerank.localize.database import Database
    from placerank.localize.outputs import expand_photos, summary_row, unique_stem, write_outputs, write_summary

    photos = expand_photos(args.photos)
    from placerank.utils import check_output_folder, resolve_device

    check_output_folder(args.out)  # before any work
    check_precision_arg(args.precision, resolve_device(args.device))
    db = Database.open(
        args.db,
        model=args.model,
        weights=args.weights,
        image_size=image_size_arg(args.image_size),
        device=args.device,
        precision=args.precision,
        compile=args.compile,
        runtime=args.runtime,
    )
    failures = 0
    rows = []
    taken: set[str] = set()
    with db:
        tracker = sequence_tracker(db, args.sequence_length)
        for photo in photos:
            try:
                if tracker is None:
                    r = db.localize(photo, top_k=args.top_k, rerank=args.rerank, radius=args.radius)
                else:
                    from placerank.localize.query import localize

                    store, feats, model = db.store, db.features, db.model
                    r = localize(store, feats, model, photo, args.top_k, args.rerank, args.radius, None, None, tracker)
            except DataError as e:  # one bad photo must not stop the others
                print(f"placerank: error: {e}", file=sys.stderr)
                failures += 1
                continue
            stem = unique_stem(args.out, photo.stem, taken)
            written = write_outputs(db, r, args.out, stem=stem, pictures=not args.no_pictures)
            print_result(r, args.show)
            print(f"  wrote {written[0]}" + "".join(f", {w.name}" for w in written[1:]))
            rows.append(summary_row(photo, r, written))
    if rows:
        write_summary(args.out, rows)
    if failures:
        print(f"{failures} of {len(photos)} photo(s) could not be localized", file=sys.stderr)
        return 1
    return 0
