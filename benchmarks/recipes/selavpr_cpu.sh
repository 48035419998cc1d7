#!/usr/bin/env bash
# SelaVPR on EfficientNet-Lite0, trained and evaluated on a CPU (<= 30 min on 2 free cores).
#
#   train : GardensPoint Walking frames 0-99 of day_left + day_right + night_right (frame k = place
#           k, neighbours within 2 frames never used as negatives) + NORDLAND Nordland places
#           (summer + winter thumbnails), `placerank train --method selavpr` for MINUTES minutes
#   eval  : held-out GardensPoint frames 100-139, database day_right (and day_left) vs queries
#           night_right, positives |i - j| <= 2:
#           untrained (frozen ImageNet EfficientNet-Lite0 + GeM on L2-normalised features)
#           vs trained global vs trained + `--rerank selavpr-mnn` (top-TOPK), R@1/5/10
#   output: $OUT (JSON summary) and per-evaluation folders next to it
#
# Usage:  benchmarks/recipes/selavpr_cpu.sh            # the full recipe
#         TINY=1 benchmarks/recipes/selavpr_cpu.sh     # a ~3-minute smoke version of every step
# Knobs (environment): DATA WORK OUT MINUTES SIZE NORDLAND QPL POOL TOPK PROTOCOLS EPOCHS RESUME
# On a machine shared with other jobs, run with OMP_NUM_THREADS=1: two OpenMP threads competing
# for two busy cores spin-wait and made each training step ~10x slower here.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
DATA="${DATA:-$REPO/../shared/data}"
WORK="${WORK:-/tmp/placerank-selavpr-cpu}"
OUT="${OUT:-$WORK/selavpr_cpu.json}"

if [[ "${TINY:-0}" == "1" ]]; then
  MINUTES="${MINUTES:-0.5}"; SIZE="${SIZE:-96 160}"; NORDLAND="${NORDLAND:-10}"
  QPL="${QPL:-24}"; POOL="${POOL:-40}"; TOPK="${TOPK:-5}"; PROTOCOLS="${PROTOCOLS:-day_right}"
  GP_FRAMES="${GP_FRAMES:-20}"; EPOCHS="${EPOCHS:-2}"
else
  # 4 epochs x 100 steps: on GardensPoint alone held-out recall peaked after ~150 steps over 300
  # images and then slipped (no validation-based early stopping here), so the step budget grows
  # with the data (900 images) instead of filling MINUTES, which is only a safety cap.
  MINUTES="${MINUTES:-22}"; SIZE="${SIZE:-224 400}"; NORDLAND="${NORDLAND:-300}"
  QPL="${QPL:-400}"; POOL="${POOL:-600}"; TOPK="${TOPK:-10}"; PROTOCOLS="${PROTOCOLS:-day_right,day_left}"
  GP_FRAMES="${GP_FRAMES:-100}"; EPOCHS="${EPOCHS:-4}"
fi
GP="$DATA/gardenspoint_walking"
RUN="$WORK/run"
mkdir -p "$WORK"
# A fresh run each time (RESUME=1 continues an interrupted one from its last epoch).
if [[ "${RESUME:-0}" != "1" ]]; then rm -rf "$RUN"; fi
export PLACERANK_CACHE="${PLACERANK_CACHE:-$WORK/cache}"
cd "$REPO"

echo "== manifests"
python benchmarks/recipes/selavpr_prepare.py --data "$DATA" --out "$WORK/manifests" \
  --gp-train-frames 100 --nordland-places "$NORDLAND"
TRAIN=("$GP/day_left" "$GP/day_right" "$GP/night_right")
if [[ "$NORDLAND" != "0" ]]; then TRAIN+=("$WORK/manifests/train_nordland.csv"); fi

echo "== train (max $MINUTES min)"
# shellcheck disable=SC2086
python -m placerank.cli train --method selavpr --backbone effnet-lite0 --train "${TRAIN[@]}" \
  --frames 0 "$GP_FRAMES" --out "$RUN" --epochs "$EPOCHS" --max-minutes "$MINUTES" --image-size $SIZE \
  --device cpu --option queries_per_loop="$QPL" --option negative_pool="$POOL"

echo "== evaluate"
python benchmarks/recipes/selavpr_eval.py --run "$RUN" --manifests "$WORK/manifests" --out "$OUT" \
  --top-k "$TOPK" --protocols "$PROTOCOLS" --device cpu
