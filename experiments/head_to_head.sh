#!/usr/bin/env bash
# The README's head-to-head of advantage estimators: one starting model (SFT only, no RL), then VinePPO, the PPO
# critic, GRPO and RLOO from that same model on RL seeds 1, 2, 3, each evaluated after every iteration, then
# tools/compare_runs.py. Two queues of runs side by side, one thread each (two 2-thread torch processes would
# slow each other 15-50x). About an hour on 2 CPU cores with the value diagnostic (DIAGNOSTIC=16, the default) for
# vine and critic, 45 minutes without (DIAGNOSTIC=0).
#
#   bash experiments/head_to_head.sh [OUT [SETTING...]]     # finished runs are skipped
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
mkdir -p "$OUT"

if [ ! -e "$OUT/start/init/config.json" ]; then  # SFT only (no RL iteration), then one evaluation of the start
  python train.py "${SETTING[@]}" --num-iterations 0 --run-dir "$OUT/start" > "$OUT/start.log" 2>&1
fi

run() {  # run ADVANTAGE SEED: one arm on one RL seed, from the shared starting model
  local name="$OUT/$1_s$2" extra=()
  if [ "$DIAGNOSTIC" != 0 ] && { [ "$1" = vine ] || [ "$1" = critic ]; }; then extra=(--value-diagnostic "$DIAGNOSTIC"); fi
  if [ -e "$name/checkpoint/trainer_state.pt" ]; then return; fi
  python train.py "${SETTING[@]}" --model "$OUT/start/init" --sft-steps 0 --advantage "$1" --rl-seed "$2" \
    --eval-every 1 --threads 1 --run-dir "$name" "${extra[@]}" > "$name.log" 2>&1
}

( for s in 1 3; do for a in vine critic grpo rloo; do
    if [ $s = 3 ] && { [ $a = grpo ] || [ $a = rloo ]; }; then continue; fi
    run $a $s; done; done ) &
( for a in vine critic grpo rloo; do run $a 2; done; run grpo 3; run rloo 3 ) &
wait
python tools/compare_runs.py "$OUT"/*_s[0-9]*/ --out "$OUT/report" --at 1 2 10
