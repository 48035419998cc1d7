"""``placerank search``: database + query descriptor folders -> a candidates folder (top-K
database images per query, FAISS inner product). A rerun on the same inputs does nothing."""

from __future__ import annotations

from pathlib import Path

from placerank.commands._common import add_index_args, index_options_arg, positive_int


def register(sub) -> None:
    p = sub.add_parser("search", help="descriptor folders -> top-K candidates folder")
    p.add_argument("--database", required=True, type=Path, help="database descriptor folder (placerank extract)")
    p.add_argument("--queries", required=True, type=Path, help="query descriptor folder (placerank extract)")
    p.add_argument("--top-k", type=positive_int, default=100, help="candidates kept per query (default 100)")
    p.add_argument("--out", required=True, type=Path, help="candidates folder to write")
    add_index_args(p)  # --index SPEC, --index-option KEY=VALUE (docs/index.md)
    p.set_defaults(func=run)


def run(args) -> int:
    from placerank.index.candidates import search_folders
    from placerank.utils import check_output_folder

    check_output_folder(args.out)  # before any work
    options = index_options_arg(args.index_option)
    cands, skipped = search_folders(args.database, args.queries, args.top_k, args.out, args.index, options)
    what = f"top-{cands.depth} of {len(cands.database_paths)} database images for {len(cands.query_paths)} queries"
    print(f"{args.out}: up to date, {what}" if skipped else f"wrote {args.out}: {what}")
    return 0
