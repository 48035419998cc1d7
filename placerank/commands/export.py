"""``placerank export MODEL --weights W --format onnx --out FILE``: a model as an ONNX file for
deployment outside Python (ONNX Runtime, TensorRT, OpenVINO).

The file holds the global descriptor and, for FoL and SelaVPR, the local head's dense tensors;
its metadata says how to feed it. The export is checked before the file appears: ONNX Runtime's
outputs against PyTorch's on a batch of 1 and of 3. See ``docs/inference.md`` (ONNX export).
"""

from __future__ import annotations

from pathlib import Path

from placerank.commands._common import image_size_arg, positive_int

#: largest |ONNX Runtime - PyTorch| accepted without a warning (the tested bound)
TOLERANCE = 1e-4


def register(sub) -> None:
    p = sub.add_parser("export", help="write a model as an ONNX file (global + local head outputs)")
    p.add_argument("model", metavar="MODEL", help="registered model name (see `placerank models`)")
    p.add_argument(
        "--weights", default=None, help="weights file (default: from $PLACERANK_WEIGHTS or ../shared/weights)"
    )
    p.add_argument("--format", default="onnx", help="export format: onnx (the only one)")
    p.add_argument("--out", required=True, type=Path, help="file to write, e.g. model.onnx")
    p.add_argument(
        "--image-size",
        type=positive_int,
        nargs="+",
        default=None,
        metavar="PX",
        help="input size baked into the file: one value (square) or HEIGHT WIDTH (default: the model's)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from placerank.errors import warn
    from placerank.models import create
    from placerank.models.onnx_export import check_format, check_out_file, export_onnx, require_onnx

    check_format(args.format)  # every check before the model is built
    check_out_file(args.out)
    require_onnx()
    size = image_size_arg(args.image_size)
    model = create(args.model, weights=args.weights, **({"image_size": size} if size else {}))
    result = export_onnx(model, args.out)
    meta = result["metadata"]
    h, w = model.preprocess.size
    print(
        f"wrote {args.out}: {meta['model']} (weights {meta['weights_id']}), input {h}x{w},"
        f" outputs {', '.join(result['outputs'])}; ONNX Runtime vs PyTorch max |diff| {result['max_abs_diff']:.1e}"
    )
    if result["max_abs_diff"] > TOLERANCE:
        warn(f"{args.out}: ONNX Runtime differs from PyTorch by {result['max_abs_diff']:.1e} (> {TOLERANCE:g})")
    return 0
