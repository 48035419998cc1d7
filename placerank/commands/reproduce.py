"""``placerank reproduce``: run a published configuration (model, input size, re-ranker, top-K,
thresholds) on a named benchmark split and print measured against published R@1/5/10. The
configurations and the comparison live in :mod:`placerank.presets.published`."""

from __future__ import annotations

from pathlib import Path

from placerank.commands._common import add_precision_arg, image_size_arg

# placerank.presets.published.PUBLISHED, spelled out to keep `placerank --help` light
CONFIGURATIONS = ["fol-vitl14", "fol-vitl14-322", "fol-vitb14", "selavpr-vitl14-msls", "selavpr-vitl14-pitts30k"]
CONFIGURATIONS += ["sfrs-vgg16"]


def register(sub) -> None:
    p = sub.add_parser(
        "reproduce",
        help="run a published configuration on a benchmark split; measured vs published Recall@1/5/10",
        description="Published configurations and their numbers: docs/reproduce.md.",
    )
    p.add_argument("model", metavar="MODEL", help="published configuration: " + ", ".join(CONFIGURATIONS))
    p.add_argument(
        "--dataset",
        required=True,
        metavar="NAME:ROOT",
        help="a benchmark split with published numbers, e.g. msls-val:ROOT",
    )
    p.add_argument(
        "--weights", default=None, help="the released weights file (default: its name in $PLACERANK_WEIGHTS)"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add_precision_arg(p, default="fp32")  # a reproduction runs the published numerics unless asked
    p.add_argument("--check", action="store_true", help="exit 1 when any |measured - published| exceeds 0.5 points")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/reproduce/MODEL-NAME)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: min(4, CPUs))")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the descriptor cache")
    p.add_argument(
        "--image-size",
        type=int,
        nargs="+",
        default=None,
        metavar="PX",
        help="override the published input size (smoke runs only: reported as a protocol deviation)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from placerank.presets.published import failures, get_published, reproduce

    size = image_size_arg(args.image_size)
    result, rows, out = reproduce(
        args.model,
        args.dataset,
        weights=args.weights,
        out=args.out,
        device=args.device,
        precision=args.precision,
        image_size=size,
        batch_size=args.batch_size,
        num_workers=args.workers,
        use_cache=not args.no_cache,
    )
    pub = get_published(args.model)
    name = result.dataset.get("name")
    print(
        f"{pub.label} on {name}: {result.num_queries} queries x {result.num_database} database images"
        f" ({result.dataset.get('rule')}), {result.device}"
    )
    if size is not None and size != pub.image_size:
        print(f"input {size[0]}x{size[1]} instead of the published {pub.image_size[0]}x{pub.image_size[1]}")
    for line in comparison_lines(rows):
        print(line)
    print(f"published: {pub.numbers[name].source}")
    print(f"wrote {out / 'reproduce.json'} and eval's results.json, predictions.csv, examples/ in {out / 'eval'}")
    bad = failures(rows)
    if args.check and bad:
        worst = max(bad, key=lambda r: abs(r.delta))
        print(f"check failed: {len(bad)} of {len(rows)} deltas exceed 0.5 points (worst {worst.stage} R@{worst.n})")
        return 1
    if args.check:
        print("check passed: every delta within 0.5 points")
    return 0


def comparison_lines(rows) -> list[str]:
    """The table: one line per stage and N."""
    lines = [f"{'':10s} {'':5s} {'measured':>8s} {'published':>9s} {'delta':>6s}"]  # measured unrounded
    for r in rows:
        flag = "" if r.ok else "  !"
        lines.append(
            f"{r.stage:10s} R@{r.n:<3s} {r.measured:8.2f} {r.published:9.1f} {round(r.delta, 2) + 0.0:+6.2f}{flag}"
        )
    return lines
