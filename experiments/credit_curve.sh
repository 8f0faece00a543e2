#!/usr/bin/env bash
# The credit-assignment curve (docs/credit_curve.md): for D = 1, 2, 4 decisions per answer, one starting model each
# (SFT on 4-step arithmetic whose every multiplication is slipped with probability 0.5; --arithmetic-multiply sets
# the expected number of multiplications), then vine, grpo, rloo and a compute-matched grpo on RL seeds 1, 2, 3, and
# the critic at D = 4 on seed 1, each for 3 iterations evaluated after every one (on 200 test problems); then
# tools/compare_runs.py per D and experiments/credit_curve.py over the three. The runs and the comparison of each D
# are experiments/compare.py's. One run at a time on all cores: on the 2-core machine it was measured on, two runs
# of one thread each were slower in all (SFT: 3.2 steps/s together against 3.7 alone). 1 h 50 min there: 12 minutes
# per starting model, 24-33 minutes per D for its 12 runs.
#
#   bash experiments/credit_curve.sh [OUT]     # finished runs are skipped: it can be stopped and run again
#   DRY_RUN=1 bash experiments/credit_curve.sh # print the commands, run nothing
#
# grpo_matched: GRPO given VinePPO's generated tokens (answers + MC rollouts) per iteration, measured on vine_s1 of
# the same D: S = round(8 x ratio) answers per problem for the same 64 problems, with --minibatch-size 8 x S so
# that every arm takes the same 16 optimizer steps per iteration (same LR schedule, same whitening share of a
# problem's answers per minibatch); the extra tokens buy more answers per group. So each D is two calls of
# compare.py: the other arms (vine_s1 among them), then the same with grpo_matched (--run: after the others) and the
# comparison of them all. DRY_RUN prints the second only, which lists every run of D in the order they run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-${1:-runs/curve}}
ITERATIONS=${ITERATIONS:-3}
WORKERS=${WORKERS:-1}  # runs side by side, each with --threads 1 when WORKERS > 1
# THREADS: torch threads of each run and starting model (unset: torch's default, or 1 when WORKERS > 1)
multiply() {  # the chance that a step multiplies, for D: 4 steps give 0.97, 1.99, 3.99 multiplications per problem
  case $1 in 1) echo 0.25 ;; 2) echo 0.5 ;; 4) echo 1.0 ;; *) echo "no setting for D = $1" >&2; exit 1 ;; esac
}
setting() {  # setting D: the task and evaluation options shared by D's starting model and all its arms
  echo --dataset arithmetic --arithmetic-steps 4 --arithmetic-multiply "$(multiply "$1")" --sft-answer-only 0 \
    --sft-slip-each 0.5 --eval-every 1 --eval-problems 200 ${THREADS:+--threads "$THREADS"}
}

matched() {  # matched D: the grpo_matched options, from vine_s1's tokens (VinePPO's answers + MC) per answer token
  local metrics="$OUT/d$1/vine_s1/metrics.jsonl"
  if [ -n "${DRY_RUN:-}" ] && [ ! -e "$metrics" ]; then  # vine_s1 has not run: S stands for the number
    echo "--samples-per-prompt S --minibatch-size 8xS --micro-batch-size 8xS"
    return
  fi
  python - "$metrics" <<'PYTHON'
import json, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if "time/train" in r]
ratio = sum(r["tokens/answers"] + r["vine/mc_tokens"] for r in rows) / sum(r["tokens/answers"] for r in rows)
s = round(8 * ratio)
print(f"--samples-per-prompt {s} --minibatch-size {8 * s} --micro-batch-size {8 * s}")
PYTHON
}

act() {  # act COMMAND...: run it, or print it with DRY_RUN
  if [ -n "${DRY_RUN:-}" ]; then echo "$*"; else "$@"; fi
}

RL="--num-iterations $ITERATIONS"
DIAG="--value-diagnostic 8 --diagnostic-rollouts 32"  # on seed 1 of vine and the critic
for d in 4 1 2; do
  arms=(--arm vine "--advantage vine $RL" --arm grpo "--advantage grpo $RL" --arm rloo "--advantage rloo $RL"
    --seeds 1 2 3 --run vine 1 "$DIAG")
  if [ "$d" = 4 ]; then arms+=(--run critic 1 "--advantage critic $RL $DIAG"); fi
  drive=(python experiments/compare.py "$OUT/d$d" --setting "$(setting "$d")" --workers "$WORKERS" "${arms[@]}"
    ${DRY_RUN:+--dry-run})
  if [ -z "${DRY_RUN:-}" ]; then "${drive[@]}" --no-compare; fi
  matched_options=$(matched "$d")  # vine_s1 has finished
  for s in 1 2 3; do drive+=(--run grpo_matched "$s" "--advantage grpo $RL $matched_options"); done
  "${drive[@]}" --compare "--at 1 2 3 --slip"
done

act mkdir -p docs/credit_curve
for d in 1 2 4; do act cp "$OUT/d$d/report/summary.json" "docs/credit_curve/d$d.json"; done  # the committed parts
act python experiments/credit_curve.py docs/credit_curve/d{1,2,4}.json --out docs/credit_curve --early 1
