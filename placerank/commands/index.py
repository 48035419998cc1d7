"""``placerank index``: build or update a database of geotagged photos (see docs/localize.md)."""

from __future__ import annotations

import sys
from pathlib import Path

from placerank.commands._common import (
    add_compile_arg,
    add_index_args,
    add_model_args,
    add_nproc_arg,
    image_size_arg,
    index_options_arg,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)


def add_database_precision_arg(p) -> None:
    """``--precision`` for a database's commands (index, localize, serve): a new database is
    built in it; an existing one keeps its own, which ``auto`` (the default) means."""
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="inference precision of the database's descriptors: auto (default; existing database: the one it was"
        " built with; new database: the fastest one whose measured GardensPoint R@1 is within 0.5 points of fp32"
        " for this model on this device, else fp32), fp32, bf16 or fp16 (CUDA) autocast. A database never mixes"
        " precisions: another explicit one than its own is refused",
    )


def register(sub) -> None:
    p = sub.add_parser(
        "index",
        help="index a folder of geotagged photos into a database for `placerank localize`",
        description="Read every .jpg/.jpeg/.png under FOLDER (recursive) with its EXIF GPS (or the "
        "positions of --positions CSV), extract descriptors and store them in --db. "
        "Re-running adds only new or changed photos. Photos are only read.",
    )
    p.add_argument("folder", nargs="?", type=Path, help="folder of photos (optional with --positions or --remove)")
    p.add_argument("--db", required=True, type=Path, help="database folder (created if missing)")
    p.add_argument(
        "--positions",
        type=Path,
        default=None,
        help="CSV: path,lat,lon or path,easting,northing [+ utm_zone or epsg]; paths relative to the CSV",
    )
    p.add_argument(
        "--allow-no-gps", action="store_true", help="index photos without a position too (never used for the estimate)"
    )
    p.add_argument(
        "--remove", nargs="+", default=None, metavar="PATH", help="drop these photos (or folders) from the database"
    )
    p.add_argument("--prune", action="store_true", help="drop database photos under FOLDER whose files are gone")
    p.add_argument(
        "--rerank", default=None, help="also store local features for this re-ranker (see `placerank models`)"
    )
    p.add_argument(
        "--radius",
        type=positive_float,
        default=None,
        help="default agreement radius in metres for localize (new database: 25)",
    )
    p.add_argument(
        "--wait",
        type=non_negative_float,
        default=0.0,
        help="if another process is writing, wait up to this many seconds",
    )
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--workers", type=non_negative_int, default=None, help="DataLoader workers (default: min(4, CPUs))")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_args(p, for_database=True)
    add_index_args(p, for_database=True)  # --index SPEC, --index-option KEY=VALUE (docs/index.md)
    add_nproc_arg(p)  # new photos' descriptors from N local ranks
    add_database_precision_arg(p)
    add_compile_arg(p)  # auto: compiled only for a run of new photos large enough to repay it
    p.set_defaults(func=run)


def run(args) -> int:
    from placerank.commands._common import check_precision_arg
    from placerank.descriptors.shards import check_nproc
    from placerank.errors import PlaceRankError
    from placerank.localize.database import Database
    from placerank.utils import resolve_device

    check_nproc(args.nproc)  # before a database is made
    check_precision_arg(args.precision, resolve_device(args.device))
    if args.folder is None and args.positions is None and not args.remove and not (args.index or args.index_option):
        raise PlaceRankError("give a FOLDER of photos, --positions CSV, --remove PATH... or --index SPEC")
    size = image_size_arg(args.image_size)
    if args.positions is not None:  # a bad CSV is refused before a database is made
        from placerank.data.positions import read_positions_csv

        read_positions_csv(args.positions)
    if args.folder is not None and not args.folder.is_dir():
        raise PlaceRankError(f"{args.folder}: " + ("not a folder" if args.folder.exists() else "folder does not exist"))
    if args.db.exists() and not args.db.is_dir():
        raise PlaceRankError(f"--db {args.db} is an existing file; give a database folder")
    created = not args.db.exists()
    try:
        db = Database.open_or_create(
            args.db,
            model=args.model,
            weights=args.weights,
            image_size=size,
            device=args.device,
            radius=args.radius,
            wait=args.wait,
            index=args.index,
            index_options=index_options_arg(args.index_option) if args.index_option else None,
            precision=args.precision,
            compile=args.compile,
            runtime=args.runtime,
        )
    except BaseException:
        if created:  # a database that failed to be made (e.g. disk full) leaves nothing behind
            _remove_unmade(args.db)
        raise
    with db:
        info = db.info()
        print(
            f"database {db.folder}: {info['model']} (weights {info['weights_id']}), {info['images']} photo(s), "
            f"positions: {info['frame']}, precision: {info['precision']} (runtime {info['runtime']}), index: {info['index']}"
            + "".join(f" {k}={v}" for k, v in info["index_options"].items())
        )
        if args.remove:
            rep = db.remove(args.remove, wait=args.wait)
            for p in rep.not_found:
                print(f"not in the database: {p}", file=sys.stderr)
            print(f"removed {len(rep.removed)} photo(s)")
        if args.folder is None and args.positions is None:
            print(f"{len(db)} photo(s) in the database")
            return 0
        report = db.add_folder(
            args.folder,
            positions=args.positions,
            allow_no_gps=args.allow_no_gps,
            rerank=args.rerank,
            prune=args.prune,
            batch_size=args.batch_size,
            num_workers=args.workers,
            wait=args.wait,
            progress=not args.quiet,
            log=print,
            nproc=args.nproc,
        )
        for _, why in report.no_position:
            print(f"skipped: {why}")
        for _, why in report.failed:
            print(f"failed: {why}", file=sys.stderr)
        if report.touched:
            print(f"{len(report.touched)} photo(s) had a new mtime but the same content (nothing extracted)")
        if report.position_updated:
            print(f"{len(report.position_updated)} photo(s) got a new position from the CSV")
        if report.reused:
            print(f"{report.reused} photo(s) have the same content as an indexed photo (descriptor reused)")
        if report.not_in_csv:
            print(f"{report.not_in_csv} photo(s) under the folder are not in the positions CSV (not indexed)")
        if report.missing_on_disk:
            print(
                f"{len(report.missing_on_disk)} indexed photo(s) under the folder no longer exist "
                f"(drop them with --prune), e.g. {report.missing_on_disk[0]}"
            )
        if args.rerank:
            print(f"local features ({args.rerank}): {report.local_extracted} extracted")
        print(report.summary())
    return 1 if report.failed else 0


# what Database.create writes before the database holds anything
_MADE_AT_CREATE = {"placerank.sqlite", "placerank.sqlite-wal", "placerank.sqlite-shm", "write.lock"}


def _remove_unmade(folder: Path) -> None:
    """Remove a database folder this run made but could not finish making (not another process's)."""
    import shutil

    from placerank.localize import metadata

    names = {p.name for p in folder.iterdir() if not p.name.startswith(".")} if folder.is_dir() else None
    if names is None or not names <= _MADE_AT_CREATE:
        return
    try:
        made = metadata.is_initialised(folder.resolve())
    except Exception:  # unreadable: certainly not a finished database
        made = False
    if not made:
        shutil.rmtree(folder, ignore_errors=True)
