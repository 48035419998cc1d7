"""``placerank rerank``: a candidates folder -> a re-ranked candidates folder. Local features
come from the stores ``placerank extract --rerank`` wrote beside the descriptors; missing ones
are extracted for the re-ranked candidates only. A rerun on the same inputs does nothing."""

from __future__ import annotations

from pathlib import Path

from placerank.commands._common import image_size_arg, non_negative_int, positive_int, rerank_options_arg


def register(sub) -> None:
    p = sub.add_parser("rerank", help="candidates folder -> re-ranked candidates folder")
    p.add_argument("--candidates", required=True, type=Path, help="candidates folder (placerank search)")
    p.add_argument("--rerank", required=True, help="re-ranker name (see `placerank models`)")
    p.add_argument("--top-k", type=positive_int, default=20, help="candidates re-ranked per query (default 20)")
    p.add_argument("--rerank-option", action="append", default=[], metavar="KEY=VALUE", help="re-ranker option")
    p.add_argument("--model", default=None, help="model of a re-ranker that needs one (default: the candidates')")
    p.add_argument("--weights", default=None, help="its weights (default: as recorded by placerank extract)")
    p.add_argument("--image-size", type=positive_int, nargs="+", default=None, metavar="PX", help="its input size")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--workers", type=non_negative_int, default=None, help="DataLoader workers (default: min(4, CPUs))")
    p.add_argument("--out", required=True, type=Path, help="re-ranked candidates folder to write")
    p.set_defaults(func=run)


def run(args) -> int:
    from placerank.index.candidates import load_candidates
    from placerank.rerank.stage import rerank_folder, reranker_for_candidates
    from placerank.utils import resolve_device

    options = rerank_options_arg(args.rerank, args.rerank_option)
    from placerank.utils import check_output_folder

    check_output_folder(args.out)  # before any work
    device = resolve_device(args.device)
    candidates = load_candidates(args.candidates)
    reranker = reranker_for_candidates(
        candidates, args.rerank, options, device, args.model, args.weights, image_size_arg(args.image_size)
    )
    result, skipped = rerank_folder(args.candidates, args.out, reranker, args.top_k, device, options, args.workers)
    what = f"top-{(result.rerank or {}).get('top_k')} of {len(result.query_paths)} queries re-ranked by {reranker.name}"
    print(f"{args.out}: up to date, {what}" if skipped else f"wrote {args.out}: {what}")
    return 0
