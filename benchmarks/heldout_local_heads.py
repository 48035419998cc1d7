"""Local heads on held-out frames: FoL's pseudo-correspondence miner, FoL training logs before /
after the CNN adaptation, and SelaVPR's MNN re-ranking rules; writes one JSON.

    python benchmarks/heldout_local_heads.py --out benchmarks/results/local_heads.json \\
        [--fol-run before=RUN_DIR --fol-run after=RUN_DIR]   (each with RUN_DIR.eval.json from
                                                              benchmarks/recipes/fol_eval.py)
        [--selavpr-run RUN_DIR] [--skip-miner] [--skip-selavpr]

1. **Miner** (no training): ``fol-effnet-lite0`` (ImageNet backbone, seed-0 heads) at 240 x 432 on
   GardensPoint frames 0, 10, ..., 130 of three traversal pairs; per image pair the official
   miner (spec fol.md §3.5) and the relative CNN miner (train/losses/fol_adapt.py): pairs mined
   and the share whose partner lies within one patch row (the pairs' rows agree for true matches;
   random pairs: ~19 %), plus the plan statistics that explain the official count.
2. **FoL training logs**: per run, steps, the local / pseudo-correspondence losses, mined pairs,
   and each loss term's gradient norm on the last backbone block (``grad_*`` log keys), with the
   run's held-out evaluation (``RUN_DIR.eval.json``: ``fol_eval.py --database day_left``).
3. **SelaVPR scoring**: frames 100-139 (never trained on by the presets), db day_left / day_right,
   queries night_right, |i-j| <= 2, top-10: global R@1, the official MNN count, and the default
   CNN scoring (cos > 0.7, rank fusion), for the untrained model and an optional trained run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics as st
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PLACERANK_SHARED", REPO.parent / "shared"))
GARDENS = SHARED / "data" / "gardenspoint_walking"
PAIRS = (("day_right", "night_right"), ("day_left", "night_right"), ("day_left", "day_right"))


def _encode(model, traversal: str, frames, local: dict | None = None):
    from placerank.data.images import load_tensor

    batch = [load_tensor(GARDENS / traversal / f"Image{k:03d}.jpg", model.preprocess) for k in frames]
    with torch.no_grad():
        x = torch.stack([b[0] for b in batch])
        return model.encode(x, [b[1] for b in batch], local) if local is not None else model.run(x)


def miner_stats() -> dict:
    from placerank.models import create
    from placerank.train.losses.fol import FoLLossConfig, mine_pseudo_correspondences
    from placerank.train.losses.fol_adapt import adapt_loss_config

    torch.manual_seed(0)
    model = create("fol-effnet-lite0", image_size=(240, 432)).eval()
    frames = list(range(0, 140, 10))
    outs = {t: _encode(model, t, frames) for t in ("day_left", "day_right", "night_right")}
    o = outs["day_left"]
    h, w = o.grid
    pmax = o.plan.max(dim=1).values
    res: dict = {
        "model": "fol-effnet-lite0 untrained heads, 240x432",
        "grid": [h, w],
        "frames": frames,
        "plan_max_per_patch_median": round(float(pmax.median()), 4),
        "patches_with_any_assignment_above_0.1": round(float((pmax > 0.1).float().mean()), 4),
        "configs": {},
    }
    configs = {"official": FoLLossConfig(), "relative_cnn_default": adapt_loss_config(FoLLossConfig(), model.name)}
    for label, cfg in configs.items():
        per_pair = {}
        for a, b in PAIRS:
            oi, oj = outs[a], outs[b]
            fi, fj = (F.normalize(x.feature_map.flatten(2), dim=1) for x in (oi, oj))
            counts, rows = [], []
            for k in range(len(frames)):
                pairs = mine_pseudo_correspondences(fi[k], fj[k], oi.plan[k], oj.plan[k], oi.attention_thr[k], cfg)
                counts.append(len(pairs))
                rows += [abs(p // w - q // w) <= 1 for p, q, _ in pairs]
            per_pair[f"{a}->{b}"] = {
                "pairs_per_image_mean": round(float(np.mean(counts)), 2),
                "row_consistent": round(float(np.mean(rows)), 3) if rows else None,
            }
        res["configs"][label] = per_pair
    return res


def log_summary(run: Path) -> dict:
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
    steps = [x for x in lines if "ms" in x]
    grads = [x for x in steps if "grad_ms" in x]
    mean = lambda key, rows: round(st.mean(r[key] for r in rows), 6) if rows else None  # noqa: E731
    start = next((x for x in lines if x.get("event") == "start"), {})
    out = {
        "steps": len(steps),
        "time_s": lines[-1].get("time_s"),
        "image_size": json.loads((run / "config.json").read_text()).get("image_size"),
        "loss_options": {k: v for k, v in start.get("loss", {}).items() if k.startswith(("ws_", "local_", "w_"))},
        "mean": {k: mean(k, steps) for k in ("ms", "local", "ws", "ws_pairs")},
        "local_zero_fraction": round(sum(r["local"] == 0 for r in steps) / max(1, len(steps)), 3),
        "grad_norm_mean_last_block": {
            k: mean(k, grads) for k in ("grad_ms", "grad_local", "grad_ws", "grad_cel", "grad_sal")
        },
        "grad_norm_mean_local_head": {k: mean(k, grads) for k in ("grad_head_local", "grad_head_ws")},
    }
    ev = run.parent / f"{run.name}.eval.json"
    if ev.exists():
        out["heldout_eval"] = json.loads(ev.read_text())
    return out


def selavpr_rules(weights: str | None, top_k: int = 10) -> dict:
    from placerank.models import create
    from placerank.rerank import create_reranker, rerank_order

    torch.manual_seed(0)
    model = create("selavpr-effnet-lite0", **({"weights": weights} if weights else {"image_size": (224, 400)}))
    model.eval()
    frames = np.arange(100, 140)
    q_g, q_l = _encode(model, "night_right", frames, {})
    rules = {
        "official_count": {"threshold": -1.0, "fusion": "none"},
        "default_cnn": {},
        "threshold_0.7_only": {"threshold": 0.7, "fusion": "none"},
    }
    out: dict = {"model": weights or "untrained (ImageNet, zero adapters, random head)", "top_k": top_k}
    for db in ("day_left", "day_right"):
        d_g, d_l = _encode(model, db, frames, {})
        top = np.argsort(-(q_g @ d_g.T).numpy(), axis=1, kind="stable")[:, :top_k]
        hit = lambda first: float(np.mean(np.abs(frames[first] - frames) <= 2))  # noqa: E731
        row = {"global": hit(top[:, 0])}
        for name, opts in rules.items():
            rr = create_reranker("selavpr-mnn", model=model, **opts)
            first = [top[i][rerank_order(rr.score(q_l[i], [d_l[j] for j in top[i]]))][0] for i in range(len(frames))]
            row[name] = hit(np.array(first))
        out[f"{db}->night_right"] = row
        print(db, row, flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--fol-run", action="append", default=[], help="LABEL=RUN_DIR (repeatable)")
    ap.add_argument("--selavpr-run", type=Path, default=None)
    ap.add_argument("--skip-miner", action="store_true")
    ap.add_argument("--skip-selavpr", action="store_true")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from placerank.utils import write_json_atomic

    torch.set_num_threads(1)
    res: dict = {}
    if args.out.exists():
        res = json.loads(args.out.read_text())  # keep the parts not re-measured
    if not args.skip_miner:
        res["miner"] = miner_stats()
    if args.fol_run:
        res["fol_training"] = {label: log_summary(Path(d)) for label, d in (x.split("=", 1) for x in args.fol_run)}
    if not args.skip_selavpr:
        res["selavpr_scoring"] = {"untrained": selavpr_rules(None)}
        if args.selavpr_run is not None:
            res["selavpr_scoring"]["trained"] = selavpr_rules(str(args.selavpr_run / "model.pt"))
    write_json_atomic(args.out, res)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
