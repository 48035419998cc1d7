#!/usr/bin/env bash
# SelaVPR on EfficientNet-Lite0, trained and evaluated on a CPU (<= 30 min on 2 free cores).
#
#   train : GardensPoint Walking frames 0-79 of day_left + day_right + night_right (frame k = place
#           k, neighbours within 2 frames never used as negatives) [+ NORDLAND Nordland places,
#           summer + winter thumbnails; 0 by default: see docs/selavpr.md], `placerank train
#           --method selavpr`, EPOCHS short epochs, validated after each on frames 80-99
#           (day_right db vs night_right queries); the best epoch (R@1 since R@5 saturates on 20
#           queries, ties R@5; the untrained start is a candidate too) becomes model.pt
#   eval  : test GardensPoint frames 100-139, database day_right (and day_left) vs queries
#           night_right, positives |i - j| <= 2:
#           untrained (frozen ImageNet EfficientNet-Lite0 + GeM on L2-normalised features)
#           vs trained global vs trained + `--rerank selavpr-mnn` (top-TOPK), R@1/5/10
#   output: $OUT (JSON summary) and per-evaluation folders next to it
#
# Usage:  benchmarks/recipes/selavpr_cpu.sh            # the full recipe
#         TINY=1 benchmarks/recipes/selavpr_cpu.sh     # a ~3-minute smoke version of every step
# Knobs (environment): DATA WORK OUT MINUTES SIZE NORDLAND QPL POOL TOPK PROTOCOLS EPOCHS GP_FRAMES
#                       VAL_STOP RESUME
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
  GP_FRAMES="${GP_FRAMES:-20}"; VAL_STOP="${VAL_STOP:-30}"; EPOCHS="${EPOCHS:-2}"
else
  # Short epochs (QPL queries = QPL/4 steps) validated after each: held-out recall peaks and
  # then slips as the adapters over-fit a few hundred images, so the validation frames pick the
  # epoch; MINUTES is only a safety cap.
  MINUTES="${MINUTES:-22}"; SIZE="${SIZE:-224 400}"; NORDLAND="${NORDLAND:-0}"
  QPL="${QPL:-120}"; POOL="${POOL:-240}"; TOPK="${TOPK:-10}"; PROTOCOLS="${PROTOCOLS:-day_right,day_left}"
  GP_FRAMES="${GP_FRAMES:-80}"; VAL_STOP="${VAL_STOP:-100}"; EPOCHS="${EPOCHS:-10}"
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
  --gp-train-frames "$GP_FRAMES" --gp-eval-start "$VAL_STOP" --nordland-places "$NORDLAND"
TRAIN=("$GP/day_left" "$GP/day_right" "$GP/night_right")
if [[ "$NORDLAND" != "0" ]]; then TRAIN+=("$WORK/manifests/train_nordland.csv"); fi

echo "== train (max $MINUTES min)"
# shellcheck disable=SC2086
python -m placerank.cli train --method selavpr --backbone effnet-lite0 --train "${TRAIN[@]}" \
  --frames 0 "$GP_FRAMES" --out "$RUN" --epochs "$EPOCHS" --max-minutes "$MINUTES" --image-size $SIZE \
  --device cpu --option queries_per_loop="$QPL" --option negative_pool="$POOL" \
  --option val_database="$WORK/manifests/val_db_day_right.csv" \
  --option val_queries="$WORK/manifests/val_q_night_right.csv" --option val_frame_tolerance=2 \
  --option val_select_n="${VAL_N:-1}"

echo "== evaluate"
python benchmarks/recipes/selavpr_eval.py --run "$RUN" --manifests "$WORK/manifests" --out "$OUT" \
  --top-k "$TOPK" --protocols "$PROTOCOLS" --device cpu
