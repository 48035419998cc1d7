"""``placerank extract``: images -> a descriptor folder (the first stage, on its own).

Writes ``OUT/descriptors.npy`` + ``OUT/descriptors.json`` and, with ``--rerank NAME``, the
re-ranker's local features in ``OUT/local/`` (one backbone pass when the re-ranker uses the
model's own head). A rerun on the same images and model does nothing. See ``docs/pipeline.md``.

Several processes: under ``torchrun`` (``WORLD_SIZE`` > 1) each rank extracts its shard and rank 0
merges them (:mod:`placerank.descriptors.shards`); ``--nproc N`` starts N local ranks itself.
"""

from __future__ import annotations

from pathlib import Path

from placerank.commands._common import (
    add_compile_arg,
    add_model_args,
    add_nproc_arg,
    add_precision_arg,
    check_precision_arg,
    image_size_arg,
    inference_setup,
    rerank_options_arg,
)


def register(sub) -> None:
    p = sub.add_parser("extract", help="images -> descriptor folder (+ local features with --rerank)")
    p.add_argument("--images", required=True, help="image folder or CSV manifest")
    p.add_argument("--layout", default="auto", choices=["auto", "csv", "utm", "frames", "traversal", "unlabelled"])
    add_model_args(p)
    add_precision_arg(p)
    add_compile_arg(p)
    p.add_argument("--rerank", default=None, help="also store this re-ranker's local features (OUT/local/)")
    p.add_argument("--rerank-option", action="append", default=[], metavar="KEY=VALUE", help="re-ranker option")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the descriptor cache")
    p.add_argument("--out", required=True, type=Path, help="descriptor folder to write")
    add_nproc_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from placerank.data.readers import read_image_set
    from placerank.descriptors.files import extract_to_folder
    from placerank.descriptors.shards import check_nproc, world_size
    from placerank.eval.evaluate import load_model
    from placerank.rerank.base import create_reranker
    from placerank.utils import check_output_folder, resolve_device

    options = rerank_options_arg(args.rerank, args.rerank_option)
    check_nproc(args.nproc)
    check_output_folder(args.out)  # before any work
    images = read_image_set(args.images, args.layout)
    device = resolve_device(args.device)
    check_precision_arg(args.precision, device)  # before loading the model
    model = load_model(args.model, args.weights, image_size_arg(args.image_size), device)
    args.precision = inference_setup(args, model, device, len(images.paths))  # auto -> runtime, checked precision
    if model.needs_data_init:
        model.init_from_images(images.paths)
    reranker = create_reranker(args.rerank, model=model, **options).to(device) if args.rerank else None
    if args.nproc > 1 or world_size() > 1:
        return _run_sharded(args, model, reranker, images.paths)
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


def _run_sharded(args, model, reranker, paths) -> int:
    """This rank's shard (torchrun) or ``--nproc`` ranks started here; rank 0 merges and reports."""
    from placerank.descriptors.files import load_descriptors, up_to_date
    from placerank.descriptors.launch import ShardJob, launch, run_job
    from placerank.descriptors.shards import World

    job = ShardJob(
        model=model,
        sets=[(list(paths), args.out)],
        device=args.device,
        batch_size=args.batch_size,
        num_workers=args.workers,
        use_cache=not args.no_cache,
        reranker=reranker,
        precision=args.precision,
        weights=args.weights,
    )
    world = World.from_env()
    if world.size > 1:
        resumed = {world.rank: run_job(job, world)}
        size = world.size
    elif up_to_date(args.out, model, list(paths), reranker, args.precision):  # no ranks to start
        resumed = {0: [(-1, 0)]}
        size = args.nproc
    else:
        resumed = launch(job, args.nproc)
        size = args.nproc
    if world.rank != 0:
        return 0
    ds = load_descriptors(args.out)
    what = f"{len(ds)} images x {ds.descriptors.shape[1]}-d ({ds.model})"
    local = f" + {args.rerank} local features" if reranker is not None else ""
    if all(r[0][0] < 0 for r in resumed.values()):
        print(f"{args.out}: up to date, {what}{local}")
        return 0
    before = sum(max(0, r[0][0]) for r in resumed.values())
    note = f" ({before} rows were done by an interrupted run)" if before else ""
    print(f"wrote {args.out}: {what}{local} from {size} ranks{note}")
    return 0
