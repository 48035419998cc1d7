#!/usr/bin/env bash
# SelaVPR on EfficientNet-Lite0, trained and evaluated on a CPU (<= 30 min on 2 free cores).
#
#   train : `placerank train --preset selavpr-cpu` (placerank/presets/recipes.py holds every
#           setting): GardensPoint Walking frames 0-79 of day_left + day_right + night_right
#           (frame k = place k, neighbours within 2 frames never used as negatives), 10 short
#           epochs validated after each on frames 80-99 (day_right db vs night_right queries); the
#           best epoch (R@1 since R@5 saturates on 20 queries, ties R@5; the untrained start is a
#           candidate too) becomes model.pt. NORDLAND=N adds N Nordland places (summer + winter
#           thumbnails; 0 by default: see docs/selavpr.md).
#   eval  : test GardensPoint frames 100-139, database day_right (and day_left) vs queries
#           night_right, positives |i - j| <= 2:
#           untrained (frozen ImageNet EfficientNet-Lite0 + GeM on L2-normalised features)
#           vs trained global vs trained + `--rerank selavpr-mnn` (top-TOPK), R@1/5/10
#   output: $OUT (JSON summary) and per-evaluation folders next to it
#
# Usage:  benchmarks/recipes/selavpr_cpu.sh            # the full recipe
#         TINY=1 benchmarks/recipes/selavpr_cpu.sh     # a ~3-minute smoke version of every step
# Knobs (environment, each overrides the preset only when given): DATA WORK OUT MINUTES SIZE
#   NORDLAND QPL POOL TOPK PROTOCOLS EPOCHS GP_FRAMES VAL_STOP VAL_N RESUME OPTIONS
# On a machine shared with other jobs, run with OMP_NUM_THREADS=1: two OpenMP threads competing
# for two busy cores spin-wait and made each training step ~10x slower here.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
DATA="${DATA:-${PLACERANK_DATA:-$REPO/../shared/data}}"
WORK="${WORK:-/tmp/placerank-selavpr-cpu}"
OUT="${OUT:-$WORK/selavpr_cpu.json}"

if [[ "${TINY:-0}" == "1" ]]; then
  MINUTES="${MINUTES:-0.5}"; SIZE="${SIZE:-96 160}"; NORDLAND="${NORDLAND:-10}"
  QPL="${QPL:-24}"; POOL="${POOL:-40}"; TOPK="${TOPK:-5}"; PROTOCOLS="${PROTOCOLS:-day_right}"
  GP_FRAMES="${GP_FRAMES:-20}"; VAL_STOP="${VAL_STOP:-30}"; EPOCHS="${EPOCHS:-2}"
fi
# the held-out evaluation (and its manifests) only: training and validation use the preset
TOPK="${TOPK:-10}"; PROTOCOLS="${PROTOCOLS:-day_right,day_left}"
GP="$DATA/gardenspoint_walking"
RUN="$WORK/run"
mkdir -p "$WORK"
# A fresh run each time (RESUME=1 continues an interrupted one from its last epoch).
if [[ "${RESUME:-0}" != "1" ]]; then rm -rf "$RUN"; fi
export PLACERANK_CACHE="${PLACERANK_CACHE:-$WORK/cache}"
cd "$REPO"

OVERRIDES=()
if [[ -n "${MINUTES:-}" ]]; then OVERRIDES+=(--max-minutes "$MINUTES"); fi
# shellcheck disable=SC2206
if [[ -n "${SIZE:-}" ]]; then OVERRIDES+=(--image-size $SIZE); fi
if [[ -n "${EPOCHS:-}" ]]; then OVERRIDES+=(--epochs "$EPOCHS"); fi
if [[ -n "${QPL:-}" ]]; then OVERRIDES+=(--option queries_per_loop="$QPL"); fi
if [[ -n "${POOL:-}" ]]; then OVERRIDES+=(--option negative_pool="$POOL"); fi
if [[ -n "${VAL_N:-}" ]]; then OVERRIDES+=(--option val_select_n="$VAL_N"); fi
# OPTIONS="k=v k=v": more method options, e.g. OPTIONS="val_rerank=true val_patience=3" (the official rule)
for opt in ${OPTIONS:-}; do OVERRIDES+=(--option "$opt"); done
if [[ -n "${GP_FRAMES:-}" || -n "${VAL_STOP:-}" || "${NORDLAND:-0}" != "0" ]]; then
  GP_FRAMES="${GP_FRAMES:-80}"; VAL_STOP="${VAL_STOP:-100}"
  TRAIN=("$GP/day_left" "$GP/day_right" "$GP/night_right")
  # Nordland places as selavpr_prepare.py picks them: frames >= 200, every 3rd textured one
  if [[ "${NORDLAND:-0}" != "0" ]]; then TRAIN+=("$DATA/nordland_seqslam_64x32?places=$NORDLAND&start=200&step=3"); fi
  OVERRIDES+=(--train "${TRAIN[@]}" --frames 0 "$GP_FRAMES" --option val_frames="$GP_FRAMES,$VAL_STOP")
fi
GP_FRAMES="${GP_FRAMES:-80}"; VAL_STOP="${VAL_STOP:-100}"

echo "== manifests (held-out evaluation)"
python benchmarks/recipes/selavpr_prepare.py --data "$DATA" --out "$WORK/manifests" \
  --gp-train-frames "$GP_FRAMES" --gp-eval-start "$VAL_STOP" --nordland-places 0

echo "== train (placerank train --preset selavpr-cpu ${OVERRIDES[*]})"
python -m placerank.cli train --preset selavpr-cpu --data "$DATA" --out "$RUN" "${OVERRIDES[@]}"

echo "== evaluate"
python benchmarks/recipes/selavpr_eval.py --run "$RUN" --manifests "$WORK/manifests" --out "$OUT" \
  --top-k "$TOPK" --protocols "$PROTOCOLS" --device cpu
