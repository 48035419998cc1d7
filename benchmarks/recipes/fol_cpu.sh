#!/usr/bin/env bash
# FoL on CPU, end to end, on the real data in ../shared/data (<= 30 minutes on 2 cores):
#
#   1. training manifest: GardensPoint Walking frames 0-99 of day_left, day_right and night_right
#      (100 places x 3 views) + 300 Nordland places (summer + winter thumbnails);
#   2. `placerank train --method fol` on fol-effnet-lite0 (EfficientNet-Lite0 ImageNet, stride-16 map,
#      last 4 inverted-residual blocks + FoL heads trainable), 240x432 input, 8 places x 2 images
#      per batch, AdamW lr 3e-4 decayed linearly to 0.1x over 600 steps, stopped after TRAIN_MINUTES;
#   3. held-out evaluation (frames 100-139, never trained on): database day_right vs queries
#      night_right, |i-j| <= 2, R@1/5/10 for the untrained backbone (ImageNet GeM, and FoL with
#      random heads, + fol-region pool3), the trained global descriptor, and trained + --rerank
#      fol-region (top-20) for the region-feature modes in MODES (bytes per image measured too).
#
# Usage:  benchmarks/recipes/fol_cpu.sh [OUT_DIR]          (default runs/fol_cpu)
#         TINY=1 benchmarks/recipes/fol_cpu.sh /tmp/fol_tiny  (~2-3 minute smoke version)
# Env:    TRAIN_MINUTES (20), EVAL_FRAMES ("100 140"), MODES ("center pool3 dense"),
#         IMAGE_SIZE ("240 432"), EVAL_SIZE ("" = the trained size), PLACERANK_SHARED
# Output: OUT_DIR/results.json (+ OUT_DIR/run: log.jsonl, checkpoint.pt, model.pt)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${1:-runs/fol_cpu}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"

TRAIN_MINUTES="${TRAIN_MINUTES:-20}"
EVAL_FRAMES="${EVAL_FRAMES:-100 140}"
MODES="${MODES:-center pool3 dense}"
IMAGE_SIZE="${IMAGE_SIZE:-240 432}"
EVAL_SIZE="${EVAL_SIZE:-}"
GARDENS_FRAMES="0 100"
NORDLAND_PLACES=300
EPOCHS=50
if [[ "${TINY:-0}" == "1" ]]; then
  TRAIN_MINUTES="${TRAIN_MINUTES_TINY:-0.5}"
  EVAL_FRAMES="100 116"
  MODES="pool3"
  IMAGE_SIZE="128 224"
  GARDENS_FRAMES="0 20"
  NORDLAND_PLACES=20
  EPOCHS=1
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
cd "$REPO"

start=$(date +%s)
echo "[fol_cpu] 1/3 training manifest"
"$PY" benchmarks/recipes/fol_prepare.py "$OUT/train.csv" --gardens-frames $GARDENS_FRAMES \
  --nordland-places "$NORDLAND_PLACES"

echo "[fol_cpu] 2/3 training (${TRAIN_MINUTES} min max)"
"$PY" -m placerank.cli train --method fol --backbone effnet-lite0 --train "$OUT/train.csv" --out "$OUT/run" \
  --image-size $IMAGE_SIZE --places-per-batch 8 --images-per-place 2 --epochs "$EPOCHS" \
  --max-minutes "$TRAIN_MINUTES" --lr 3e-4 --option lr_decay_iters=600 --workers 1 --seed 0

echo "[fol_cpu] 3/3 held-out evaluation"
size_args=()
if [[ -n "$EVAL_SIZE" ]]; then size_args=(--image-size $EVAL_SIZE); else size_args=(--image-size $IMAGE_SIZE); fi
"$PY" benchmarks/recipes/fol_eval.py --run "$OUT/run" --out "$OUT/results.json" --frames $EVAL_FRAMES \
  --modes $MODES --top-k 20 "${size_args[@]}"

"$PY" - "$OUT/results.json" "$OUT/run/log.jsonl" "$start" <<'EOF'
import json, sys, time
res = json.load(open(sys.argv[1]))
log = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
steps = [r for r in log if "ms" in r]
res["training"] = {"steps": len(steps), "first_loss": steps[0]["loss"] if steps else None,
                   "last_loss": steps[-1]["loss"] if steps else None,
                   "mean_loss_last_20": sum(r["loss"] for r in steps[-20:]) / max(1, len(steps[-20:]))}
res["wall_seconds"] = round(time.time() - float(sys.argv[3]), 1)
json.dump(res, open(sys.argv[1], "w"), indent=2)
print(json.dumps({k: v for k, v in res.items() if k != "protocol"}, indent=1))
EOF
echo "[fol_cpu] done: $OUT/results.json"
