"""``placerank train --method NAME ...`` or ``placerank train --preset NAME [flags]``: one
interface for every training method. A preset (``placerank/presets/recipes.py``) is applied first;
every flag the user gives then overrides it (flags default to None so the two can be told apart).
Without ``--preset``, ``--method M`` takes M's CPU recipe settings (not its data), a 20-minute
budget and an automatic validation split of ``--train`` (docs/training.md); ``--preset none``
gives the bare :data:`DEFAULTS`."""

from __future__ import annotations

import os
from pathlib import Path

from placerank.commands._common import image_size_arg, non_negative_int, positive_float, positive_int
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
        "--preset",
        default=None,
        help="training recipe (fol-cpu | selavpr-cpu | sfrs-cpu); flags override it. Without it, --method M "
        "takes M's CPU recipe settings (not its data) and a 20-minute budget; 'none': the bare defaults",
    )
    p.add_argument(
        "--validation",
        choices=("auto", "none"),
        default="auto",
        help="auto (default, without --preset): hold out the last ~15%% of frames / places of --train to pick the "
        "best epoch and stop early, unless --option val_database/val_queries name a pair; none: no validation",
    )
    p.add_argument("--data", default=None, help="shared data folder for a preset's data (default: ../shared/data)")
    p.add_argument("--method", default=None, help="training method (selavpr | fol | sfrs)")
    p.add_argument(
        "--backbone",
        default=None,
        help="effnet-lite0 | effnet-lite1 | effnet-lite2 (train here) | dinov2-vitl14 | vgg16 ...",
    )
    p.add_argument(
        "--train",
        nargs="+",
        default=None,
        help="CSV manifests (path,place_id or path,frame), frame-aligned traversal folders, Nordland or GSV-Cities roots",
    )
    p.add_argument("--out", default=None, type=Path, help="run folder (checkpoints, log.jsonl, model.pt)")
    p.add_argument(
        "--epochs", type=positive_int, default=None, help="default: the method's recipe (1 with --preset none)"
    )
    p.add_argument(
        "--max-minutes", type=positive_float, default=None, help="stop cleanly after this many minutes (default 20)"
    )
    p.add_argument("--places-per-batch", type=positive_int, default=None, help="default 8")
    p.add_argument("--images-per-place", type=positive_int, default=None, help="default 2")
    p.add_argument("--lr", type=positive_float, default=None)
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--image-size", type=positive_int, nargs="+", default=None)
    p.add_argument(
        "--frames",
        type=non_negative_int,
        nargs=2,
        default=None,
        metavar=("START", "STOP"),
        help="use frames START <= k < STOP of traversal folders (hold the rest out)",
    )
    p.add_argument("--weights", default=None, help="backbone weights file")
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default auto)")
    p.add_argument(
        "--precision",
        default=None,
        help="fp32 (default) | bf16 | fp16 (CUDA only, with a GradScaler) | auto (the measured choice per method "
        "and device: bf16 for fol and selavpr on CPU, fp16 for fol on CUDA, else fp32); autocast covers the forward only: "
        "losses, weights and the optimizer stay fp32 (docs/training.md, 'Precision')",
    )
    p.add_argument("--workers", type=non_negative_int, default=None)
    p.add_argument(
        "--nproc",
        type=positive_int,
        default=1,
        help="train in N local processes with DDP (as torchrun --nproc-per-node N; gloo on CPU, nccl on CUDA)",
    )
    p.add_argument("--no-resume", action="store_true", help="start over even if RUN_DIR has a checkpoint")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method-specific option")
    p.set_defaults(func=run)


def train_settings(args) -> dict:
    """TrainConfig keywords: the preset's settings (if any), then every flag the user gave."""
    settings: dict = {"options": {}}
    if args.preset and args.preset != "none":
        from placerank.data.places import find_shared_data
        from placerank.presets import get_preset

        recipe = get_preset(args.preset, kind="train")
        settings = recipe.settings(find_shared_data(args.data))
        settings["out"] = Path("runs") / args.preset
    elif args.preset is None and args.method:
        from placerank.presets.recipes import default_recipe

        default = default_recipe(args.method)
        if default is not None:  # the method's measured CPU recipe, on the user's data
            settings = default.defaults(args.backbone)
            settings["out"] = Path("runs") / args.method
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
        "precision": args.precision,
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


def wants_auto_split(args, settings: dict) -> bool:
    """The automatic validation split applies to ``--method M`` runs without a preset (a preset
    brings its own data and split) unless ``--validation none`` or a val_* pair is given."""
    given = settings["options"].get("val_database") or settings["options"].get("val_queries")
    return args.preset is None and args.validation == "auto" and not given


def apply_auto_split(settings: dict) -> str:
    """Hold out validation data of the user's ``--train`` (:mod:`placerank.train.auto_split`):
    the training specs / frame range and the val_* options change in ``settings``; what was held
    out goes to ``RUN_DIR/split/split.json`` and ``log.jsonl``. Returns the line to print."""
    import json

    from placerank.train.auto_split import auto_split

    split = auto_split(settings["train"], settings.get("frames"), Path(settings["out"]))
    settings["train"], settings["frames"] = split.train, split.frames
    settings["options"] = {**settings["options"], **split.options}
    if split.options and os.environ.get("RANK", "0") == "0":
        with open(Path(settings["out"]) / "log.jsonl", "a") as f:
            f.write(json.dumps({"event": "validation_split", **split.summary}) + "\n")
    return split.message


def check_settings(settings: dict) -> None:
    """Before a run folder is made: the method exists, the numbers make sense, the training data
    exists and ``out`` can be written (the trainer itself is not asked)."""
    from placerank.train.common import METHODS

    METHODS.get(settings["method"])  # an unknown method is a one-line error listing the known ones
    for key, flag in (
        ("epochs", "--epochs"),
        ("batch_places", "--places-per-batch"),
        ("images_per_place", "--images-per-place"),
    ):
        value = settings.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise PlaceRankError(f"{flag} must be a whole number >= 1, got {value}")
    from placerank.train.precision import resolve_train_precision
    from placerank.utils import resolve_device

    resolve_train_precision(settings.get("precision", "fp32"), settings["method"], resolve_device(settings["device"]))
    minutes = settings.get("max_minutes")
    if minutes is not None and not minutes > 0:
        raise PlaceRankError(f"--max-minutes must be > 0, got {minutes}")
    for item in settings["train"]:
        path = Path(str(item).partition("?")[0])  # a spec may carry a ?selection
        if not path.exists():
            raise PlaceRankError(f"--train {item}: no such file or folder")
    out = Path(settings["out"])
    if out.exists() and not out.is_dir():
        raise PlaceRankError(f"--out {out} is an existing file; give a run folder")
    from placerank.utils import check_output_folder

    check_output_folder(out)


# what a run writes first; a run that fails before anything else removes a folder it created
_START_FILES = {"config.json", "log.jsonl", "split"}


def _remove_failed_start(out: Path) -> None:
    import shutil

    if out.is_dir() and {p.name for p in out.iterdir()} <= _START_FILES:
        shutil.rmtree(out, ignore_errors=True)


def run(args) -> int:
    from placerank.train.common import TrainConfig, run_training

    settings = train_settings(args)
    check_settings(settings)
    out = Path(settings["out"])
    created = not out.exists()
    try:
        if wants_auto_split(args, settings):
            message = apply_auto_split(settings)
            if os.environ.get("RANK", "0") == "0":
                print(message, flush=True)
        if args.nproc > 1:
            from placerank.train.distributed import launch_training

            model_path = launch_training(TrainConfig(**settings), args.nproc)
        else:
            model_path = run_training(TrainConfig(**settings))
    except Exception:
        if created:
            _remove_failed_start(out)
        raise
    if os.environ.get("RANK", "0") == "0":  # under torchrun: one line, not one per process
        print(f"model written to {model_path}")
    return 0
