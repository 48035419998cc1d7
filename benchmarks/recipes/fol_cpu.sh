#!/usr/bin/env bash
# FoL on CPU, end to end, on the real data in ../shared/data (<= 30 minutes on 2 cores):
#
#   1. (the data is read straight from the shared folder: no manifest to write)
#   2. `placerank train --preset fol-cpu` (placerank/presets/recipes.py holds every setting):
#      GardensPoint Walking frames 0-99 of day_left, day_right and night_right (100 places x 3
#      views) + 300 Nordland places (summer + winter thumbnails), fol-effnet-lite0
#      (EfficientNet-Lite0 ImageNet, stride-16 map, last 4 inverted-residual blocks + FoL heads
#      trainable), 240x432 input, 8 places x 2 images
#      per batch, AdamW lr 3e-4 decayed linearly to 0.1x over 600 steps, stopped after 20 minutes;
#   3. held-out evaluation (frames 100-139, never trained on): database day_right vs queries
#      night_right, |i-j| <= 2, R@1/5/10 for the untrained backbone (ImageNet GeM, and FoL with
#      random heads, + fol-region pool3), the trained global descriptor, and trained + --rerank
#      fol-region (top-20) for the region-feature modes in MODES (bytes per image measured too).
#
# Usage:  benchmarks/recipes/fol_cpu.sh [OUT_DIR]          (default runs/fol_cpu)
#         TINY=1 benchmarks/recipes/fol_cpu.sh /tmp/fol_tiny  (~2-3 minute smoke version)
# Env:    TRAIN_MINUTES (the preset's 20), EVAL_FRAMES ("100 140"), MODES ("center pool3 dense"),
#         IMAGE_SIZE (the preset's "240 432"), EVAL_SIZE ("" = the trained size), PLACERANK_DATA
#         (or PLACERANK_SHARED/data)
# Output: OUT_DIR/results.json (+ OUT_DIR/run: log.jsonl, checkpoint.pt, model.pt)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${1:-runs/fol_cpu}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
DATA="${PLACERANK_DATA:-${PLACERANK_SHARED:-$REPO/../shared}/data}"

EVAL_FRAMES="${EVAL_FRAMES:-100 140}"
MODES="${MODES:-center pool3 dense}"
EVAL_SIZE="${EVAL_SIZE:-}"
OVERRIDES=()  # flags that override the preset
if [[ -n "${TRAIN_MINUTES:-}" ]]; then OVERRIDES+=(--max-minutes "$TRAIN_MINUTES"); fi
# shellcheck disable=SC2206
if [[ -n "${IMAGE_SIZE:-}" ]]; then OVERRIDES+=(--image-size $IMAGE_SIZE); fi
if [[ "${TINY:-0}" == "1" ]]; then
  EVAL_FRAMES="100 116"
  MODES="pool3"
  G="$DATA/gardenspoint_walking"
  OVERRIDES+=(--max-minutes "${TRAIN_MINUTES_TINY:-0.5}" --image-size 128 224 --epochs 1 --frames 0 20
    --train "$G/day_left" "$G/day_right" "$G/night_right" "$DATA/nordland_seqslam_64x32?places=20")
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
cd "$REPO"

start=$(date +%s)
echo "[fol_cpu] 1/3 data: read from $DATA by the preset"

echo "[fol_cpu] 2/3 training (placerank train --preset fol-cpu ${OVERRIDES[*]})"
"$PY" -m placerank.cli train --preset fol-cpu --data "$DATA" --out "$OUT/run" "${OVERRIDES[@]}"

echo "[fol_cpu] 3/3 held-out evaluation"
# the trained input size comes from the run's own config.json unless EVAL_SIZE is given
TRAINED_SIZE="$("$PY" -c 'import json, sys; print(*json.load(open(sys.argv[1]))["image_size"])' "$OUT/run/config.json")"
# shellcheck disable=SC2206
size_args=(--image-size ${EVAL_SIZE:-$TRAINED_SIZE})
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
