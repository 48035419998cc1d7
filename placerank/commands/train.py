"""``placerank train --method NAME ...`` or ``placerank train --preset NAME [flags]``: one
interface for every training method. A preset (``placerank/presets/recipes.py``) is applied first;
every flag the user gives then overrides it (flags default to None so the two can be told apart)."""

from __future__ import annotations

from pathlib import Path

from placerank.commands._common import image_size_arg
from placerank.errors import PlaceRankError
from placerank.options import split_key_values

# TrainConfig's defaults for the flags that default to None here (so a preset can be told apart)
DEFAULTS = {
    "backbone": "effnet-lite0",
    "epochs": 1,
    "batch_places": 8,
    "images_per_place": 2,
    "seed": 0,
    "device": "auto",
}


def register(sub) -> None:
    p = sub.add_parser("train", help="train a VPR method (selavpr, fol, sfrs) on place-labelled images")
    p.add_argument(
        "--preset", default=None, help="training recipe (fol-cpu | selavpr-cpu | sfrs-cpu); flags override it"
    )
    p.add_argument("--data", default=None, help="shared data folder for a preset's data (default: ../shared/data)")
    p.add_argument("--method", default=None, help="training method (selavpr | fol | sfrs)")
    p.add_argument("--backbone", default=None, help="effnet-lite0 (trains here) | dinov2-vitl14 | vgg16 ...")
    p.add_argument(
        "--train",
        nargs="+",
        default=None,
        help="CSV manifests (path,place_id or path,frame), frame-aligned traversal folders, Nordland or GSV-Cities roots",
    )
    p.add_argument("--out", default=None, type=Path, help="run folder (checkpoints, log.jsonl, model.pt)")
    p.add_argument("--epochs", type=int, default=None, help="default 1")
    p.add_argument("--max-minutes", type=float, default=None, help="stop cleanly after this many minutes")
    p.add_argument("--places-per-batch", type=int, default=None, help="default 8")
    p.add_argument("--images-per-place", type=int, default=None, help="default 2")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="default 0")
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
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default auto)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--no-resume", action="store_true", help="start over even if RUN_DIR has a checkpoint")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method-specific option")
    p.set_defaults(func=run)


def train_settings(args) -> dict:
    """TrainConfig keywords: the preset's settings (if any), then every flag the user gave."""
    settings: dict = {"options": {}}
    if args.preset:
        from placerank.data.places import find_shared_data
        from placerank.presets import get_preset

        recipe = get_preset(args.preset, kind="train")
        settings = recipe.settings(find_shared_data(args.data))
        settings["out"] = Path("runs") / args.preset
    flags = {
        "method": args.method,
        "backbone": args.backbone,
        "train": args.train,
        "out": args.out,
        "epochs": args.epochs,
        "max_minutes": args.max_minutes,
        "batch_places": args.places_per_batch,
        "images_per_place": args.images_per_place,
        "lr": args.lr,
        "seed": args.seed,
        "image_size": image_size_arg(args.image_size),
        "frames": tuple(args.frames) if args.frames else None,
        "device": args.device,
        "weights": args.weights,
        "num_workers": args.workers,
    }
    settings.update({k: v for k, v in flags.items() if v is not None})
    settings["options"] = {**settings["options"], **split_key_values(args.option)}
    for k, v in DEFAULTS.items():
        settings.setdefault(k, v)
    for need, flag in (("method", "--method"), ("train", "--train"), ("out", "--out")):
        if settings.get(need) is None:
            raise PlaceRankError(f"train needs {flag} (or --preset NAME)")
    settings["resume"] = not args.no_resume
    return settings


def run(args) -> int:
    from placerank.train.common import TrainConfig, run_training

    model_path = run_training(TrainConfig(**train_settings(args)))
    print(f"model written to {model_path}")
    return 0
