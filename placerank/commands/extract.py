"""``placerank extract``: images -> a descriptor folder (the first stage, on its own).

Writes ``OUT/descriptors.npy`` + ``OUT/descriptors.json`` and, with ``--rerank NAME``, the
re-ranker's local features in ``OUT/local/`` (one backbone pass when the re-ranker uses the
model's own head). A rerun on the same images and model does nothing. See ``docs/pipeline.md``.
"""

from __future__ import annotations

from pathlib import Path

from placerank.commands._common import add_model_args, add_precision_arg, image_size_arg, rerank_options_arg


def register(sub) -> None:
    p = sub.add_parser("extract", help="images -> descriptor folder (+ local features with --rerank)")
    p.add_argument("--images", required=True, help="image folder or CSV manifest")
    p.add_argument("--layout", default="auto", choices=["auto", "csv", "utm", "frames", "traversal", "unlabelled"])
    add_model_args(p)
    add_precision_arg(p)
    p.add_argument("--rerank", default=None, help="also store this re-ranker's local features (OUT/local/)")
    p.add_argument("--rerank-option", action="append", default=[], metavar="KEY=VALUE", help="re-ranker option")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the descriptor cache")
    p.add_argument("--out", required=True, type=Path, help="descriptor folder to write")
    p.set_defaults(func=run)


def run(args) -> int:
    from placerank.data.readers import read_image_set
    from placerank.descriptors.extract import check_precision
    from placerank.descriptors.files import extract_to_folder
    from placerank.eval.evaluate import load_model
    from placerank.rerank.base import create_reranker
    from placerank.utils import resolve_device

    options = rerank_options_arg(args.rerank, args.rerank_option)
    from placerank.utils import check_output_folder

    check_output_folder(args.out)  # before any work
    images = read_image_set(args.images, args.layout)
    device = resolve_device(args.device)
    check_precision(args.precision, device)  # before loading the model
    model = load_model(args.model, args.weights, image_size_arg(args.image_size), device)
    if model.needs_data_init:
        model.init_from_images(images.paths)
    reranker = create_reranker(args.rerank, model=model, **options).to(device) if args.rerank else None
    ds, skipped = extract_to_folder(
        args.out,
        model,
        images.paths,
        device,
        reranker=reranker,
        batch_size=args.batch_size,
        num_workers=args.workers,
        use_cache=not args.no_cache,
        weights=args.weights,
        precision=args.precision,
    )
    what = f"{len(ds)} images x {ds.descriptors.shape[1]}-d ({ds.model})"
    local = f" + {args.rerank} local features" if reranker is not None else ""
    print(f"{args.out}: up to date, {what}{local}" if skipped else f"wrote {args.out}: {what}{local}")
    return 0
