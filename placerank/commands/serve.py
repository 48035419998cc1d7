"""``placerank serve``: a localization service (HTTP API + web page) over a `placerank index` database."""

from __future__ import annotations

from pathlib import Path

from placerank.commands._common import add_compile_arg
from placerank.commands.index import add_database_precision_arg


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP service + web page: localize uploaded photos against a database",
        description="Load the database, its model and index once, then answer POST /v1/localize "
        "(the same JSON as `placerank localize`) and show a map page at /. API docs at /docs.",
    )
    p.add_argument("--db", required=True, type=Path, help="database folder built by `placerank index`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--rerank", default=None, help="default re-ranker for every query, e.g. ransac-xfeat")
    p.add_argument("--top-k", type=int, default=10, help="default database photos retrieved per query (default 10)")
    p.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="file holding the bearer token that enables POST /v1/index and DELETE /v1/places/{id}",
    )
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted request body (default 20)")
    p.add_argument(
        "--tiles",
        default=None,
        help="online basemap tile URL for the page, e.g. https://tile.openstreetmap.org/{z}/{x}/{y}.png (default: none)",
    )
    p.add_argument("--max-queue", type=int, default=64, help="requests allowed to wait for the model (default 64)")
    p.add_argument(
        "--upload-dir", type=Path, default=None, help="where POST /v1/index keeps added photos (default: DB-uploads)"
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    add_database_precision_arg(p)  # auto: the database's own
    add_compile_arg(p)  # auto: one query at a time stays eager; on: compiled at start
    p.set_defaults(func=run)


def run(args) -> int:
    from placerank.commands._common import check_precision_arg
    from placerank.errors import PlaceRankError
    from placerank.serve.server import serve
    from placerank.serve.service import ServeConfig
    from placerank.utils import resolve_device

    if args.max_upload_mb <= 0:
        raise PlaceRankError(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    if args.max_queue < 1:
        raise PlaceRankError(f"--max-queue must be >= 1, got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise PlaceRankError(f"--port must be 0..65535, got {args.port}")
    if not 1 <= args.top_k <= 100:
        raise PlaceRankError(f"--top-k must be 1..100, got {args.top_k}")
    if args.tiles and not (args.tiles.startswith(("https://", "http://")) and "{z}" in args.tiles):
        raise PlaceRankError("--tiles must be an http(s) URL with {z}, {x} and {y}")
    check_precision_arg(args.precision, resolve_device(args.device))
    config = ServeConfig(
        db=args.db,
        host=args.host,
        port=args.port,
        rerank=args.rerank,
        token_file=args.token_file,
        max_upload_mb=args.max_upload_mb,
        tiles=args.tiles,
        top_k=args.top_k,
        max_queue=args.max_queue,
        upload_dir=args.upload_dir,
        device=args.device,
        precision=args.precision,
        compile=args.compile,
        runtime=args.runtime,
    )
    return serve(config, log=lambda msg: print(msg, flush=True))
