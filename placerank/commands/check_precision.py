"""``placerank check-precision``: measure which precision ``--precision auto`` takes for a model here.

Runs the GardensPoint day_right -> night_right check (:mod:`placerank.eval.precision_check`) in
fp32 and every reduced precision this device runs fast, prints R@1 / ms per image / descriptor
agreement per precision, and stores the record in the cache root, where ``--precision auto``
finds it before the records shipped for the registered models. See docs/inference.md.
"""

from __future__ import annotations

from placerank.commands._common import add_model_args, image_size_arg


def register(sub) -> None:
    p = sub.add_parser(
        "check-precision", help="measure R@1 and speed per precision for --precision auto (GardensPoint)"
    )
    add_model_args(p)
    p.add_argument("--data", default=None, help="the shared data folder (default: found beside the repository)")
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the compiled runs of reduced precisions (then --compile auto never compiles them for this model)",
    )
    p.add_argument("--no-save", action="store_true", help="print the record only; do not store it for auto")
    p.set_defaults(func=run)


def run(args) -> int:
    from placerank.descriptors.fast import compiled_precision_holds
    from placerank.eval.evaluate import load_model
    from placerank.eval.precision_check import run_precision_check, save_precision_check
    from placerank.utils import resolve_device

    device = resolve_device(args.device)
    model = load_model(args.model, args.weights, image_size_arg(args.image_size), device)
    record = run_precision_check(model, device, args.data, batch_size=args.batch_size, compiled=not args.no_compile)
    fp32 = record["precisions"]["fp32"]
    print(f"{record['model']} on {record['device_class']}, {record['dataset']} ({record['queries']} queries):")
    runs = list(record["precisions"].items())
    runs += [(f"{name} compiled", r) for name, r in record.get("compiled", {}).items()]
    for name, run_ in runs:
        agree = "" if name == "fp32" else f"  min cosine {run_['min_cosine']:.5f}, max diff {run_['max_abs_diff']:.2e}"
        delta = 100 * (run_["recall_at_1"] - fp32["recall_at_1"])
        print(
            f"  {name}: R@1 {100 * run_['recall_at_1']:.1f} ({delta:+.1f}), {run_['ms_per_image']:.1f} ms/image{agree}"
        )
    print(f"--precision auto takes {record['chosen']}")
    if record["chosen"] != "fp32":
        holds = compiled_precision_holds(record, record["chosen"])
        print(f"--compile auto {'may compile' if holds else 'does not compile'} its {record['chosen']} forward")
    if not args.no_save:
        print(f"saved {save_precision_check(record)}")
    return 0
