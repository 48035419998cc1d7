"""``placerank train --method NAME ...``: one interface for every training method."""

from __future__ import annotations

from pathlib import Path

from placerank.commands._common import image_size_arg, parse_option


def register(sub) -> None:
    p = sub.add_parser("train", help="train a VPR method (selavpr, fol, sfrs) on place-labelled images")
    p.add_argument("--method", required=True, help="training method (selavpr | fol | sfrs)")
    p.add_argument("--backbone", default="effnet-lite0", help="effnet-lite0 (trains here) | dinov2-vitl14 | vgg16 ...")
    p.add_argument(
        "--train",
        nargs="+",
        required=True,
        help="CSV manifests (path,place_id or path,frame) or frame-aligned traversal folders",
    )
    p.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, log.jsonl, model.pt)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-minutes", type=float, default=None, help="stop cleanly after this many minutes")
    p.add_argument("--places-per-batch", type=int, default=8)
    p.add_argument("--images-per-place", type=int, default=2)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, nargs="+", default=None)
    p.add_argument(
        "--frames",
        type=int,
        nargs=2,
        default=None,
        metavar=("START", "STOP"),
        help="use frames START <= k < STOP of traversal folders (hold the rest out)",
    )
    p.add_argument("--weights", default=None, help="backbone weights file")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--no-resume", action="store_true", help="start over even if RUN_DIR has a checkpoint")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method-specific option")
    p.set_defaults(func=run)


def run(args) -> int:
    from placerank.train.common import TrainConfig, run_training

    cfg = TrainConfig(
        method=args.method,
        train=args.train,
        out=args.out,
        backbone=args.backbone,
        epochs=args.epochs,
        max_minutes=args.max_minutes,
        batch_places=args.places_per_batch,
        images_per_place=args.images_per_place,
        lr=args.lr,
        seed=args.seed,
        image_size=image_size_arg(args.image_size),
        frames=tuple(args.frames) if args.frames else None,
        device=args.device,
        weights=args.weights,
        resume=not args.no_resume,
        num_workers=args.workers,
        options=dict(parse_option(o) for o in args.option),
    )
    model_path = run_training(cfg)
    print(f"model written to {model_path}")
    return 0
