"""``placerank match IMG1 IMG2 --features xfeat --out match.png``: verify two images with local
features + MAGSAC and draw the inlier matches side by side; prints the inlier count (the
number a RANSAC re-ranker scores a candidate with)."""

from __future__ import annotations

from placerank.commands._common import positive_float, positive_int


def register(sub) -> None:
    p = sub.add_parser("match", help="match two images with local features + RANSAC and draw the inliers")
    p.add_argument("image1")
    p.add_argument("image2")
    p.add_argument(
        "--features", default="xfeat", choices=["xfeat", "aliked", "disk"], help="local features (default: xfeat)"
    )
    p.add_argument(
        "--matcher",
        default="mnn",
        choices=["mnn", "lighterglue"],
        help="putative matches: mutual nearest neighbours, or LighterGlue (XFeat only)",
    )
    p.add_argument("--out", default=None, help="picture to write (.png or .jpg); none when omitted")
    p.add_argument("--max-keypoints", type=positive_int, default=2048)
    p.add_argument(
        "--longest-side", type=positive_int, default=640, help="network input: longest side in px (aspect kept)"
    )
    p.add_argument("--geometry", default="fundamental", choices=["fundamental", "homography"])
    p.add_argument("--threshold", type=positive_float, default=1.0, help="RANSAC threshold in px at longest side 640")
    p.add_argument("--weights", default=None, help="feature weights file (default: from $PLACERANK_WEIGHTS)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="the feature network's CNN: fp32, bf16 or fp16 (CUDA only) autocast; auto (default):"
        " the re-rankers' choice for this network and device (fp32 for now; bf16 is faster on CPU"
        " for xfeat / aliked at the same R@1, docs/inference.md)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path
    from typing import Any

    from placerank.errors import PlaceRankError
    from placerank.rerank.base import create_reranker
    from placerank.rerank.ransac import resolve_local_precision
    from placerank.utils import resolve_device
    from placerank.viz.matches import draw_matches

    if args.longest_side < 32:
        raise PlaceRankError(f"--longest-side must be >= 32 px, got {args.longest_side}")
    name = f"ransac-{args.features}" + ("-lighterglue" if args.matcher == "lighterglue" else "")
    if args.matcher == "lighterglue" and args.features != "xfeat":
        raise PlaceRankError("LighterGlue matches XFeat features only (use --features xfeat)")
    device = resolve_device(args.device)
    precision = resolve_local_precision(args.precision, args.features, device)  # fp16 on CPU: one line
    rr: Any = create_reranker(
        name,
        image_size=(args.longest_side, args.longest_side),
        max_keypoints=args.max_keypoints,
        geometry=args.geometry,
        threshold_px=args.threshold,
        weights=args.weights,
        device=device,
        precision=precision,
    )
    f1 = rr.extract_path(args.image1, keep_aspect=True)
    f2 = rr.extract_path(args.image2, keep_aspect=True)
    putative = rr.putative(f1, f2)
    inliers = rr.matches(f1, f2)
    print(
        f"{len(inliers)} inliers of {len(putative)} putative matches "
        f"({args.features}, {len(f1)} + {len(f2)} keypoints, {args.geometry} MAGSAC)"
    )
    if args.out:
        title = (
            f"{args.features} {args.matcher}: {len(inliers)} inliers / {len(putative)} matches | "
            f"{Path(args.image1).name} - {Path(args.image2).name}"
        )
        out = draw_matches(args.image1, args.image2, f1.keypoints, f2.keypoints, inliers, args.out, title=title)
        print(f"wrote {out}")
    return 0
