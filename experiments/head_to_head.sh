#!/usr/bin/env bash
# The README's head-to-head of advantage estimators: one starting model (SFT only, no RL), then VinePPO, the PPO
# critic, GRPO and RLOO from that same model on RL seeds 1, 2, 3, each evaluated after every iteration, then
# tools/compare_runs.py; all by experiments/compare.py. Two runs side by side, one thread each (two 2-thread torch
# processes would slow each other 15-50x). About an hour on 2 CPU cores with the value diagnostic (DIAGNOSTIC=16, the
# default) for vine and critic, 45 minutes without (DIAGNOSTIC=0).
#
#   bash experiments/head_to_head.sh [OUT [SETTING...]]     # finished runs are skipped
#   DRY_RUN=1 bash experiments/head_to_head.sh              # print the commands, run nothing
#
# OUT defaults to runs/h2h; SETTING (train.py options shared by the starting model and every arm) defaults to the
# "slip" setting: --dataset arithmetic --sft-answer-only 0 --sft-slip 0.5.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/h2h}
shift || true
SETTING=("$@")
if [ ${#SETTING[@]} -eq 0 ]; then SETTING=(--dataset arithmetic --sft-answer-only 0 --sft-slip 0.5); fi
DIAGNOSTIC=${DIAGNOSTIC:-16}
DIAG=$([ "$DIAGNOSTIC" = 0 ] || echo "--value-diagnostic $DIAGNOSTIC")  # vine and critic only
EACH="--eval-every 1"

python experiments/compare.py "$OUT" --setting "$(printf '%q ' "${SETTING[@]}")" --workers 2 --seeds 1 2 3 \
  --arm vine "--advantage vine $EACH $DIAG" --arm critic "--advantage critic $EACH $DIAG" \
  --arm grpo "--advantage grpo $EACH" --arm rloo "--advantage rloo $EACH" \
  --compare "--at 1 2 10" ${DRY_RUN:+--dry-run}
