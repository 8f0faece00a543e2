#!/usr/bin/env bash
# The credit-assignment curve (docs/credit_curve.md): for D = 1, 2, 4 decisions per answer, one starting model each
# (SFT on 4-step arithmetic whose every multiplication is slipped with probability 0.5; --arithmetic-multiply sets
# the expected number of multiplications), then vine, grpo, rloo and a compute-matched grpo on RL seeds 1, 2, 3, and
# the critic at D = 4 on seed 1, each for 3 iterations evaluated after every one (on 200 test problems); then
# tools/compare_runs.py per D and experiments/credit_curve.py over the three. One run at a time on all cores: on
# the 2-core machine it was measured on, two runs of one thread each were slower in all (SFT: 3.2 steps/s together
# against 3.7 alone). 1 h 50 min there: 12 minutes per starting model, 24-33 minutes per D for its 12 runs.
#
#   bash experiments/credit_curve.sh [OUT]     # finished runs are skipped: it can be stopped and run again
#
# grpo_matched: GRPO given VinePPO's generated tokens (answers + MC rollouts) per iteration, measured on vine_s1 of
# the same D: S = round(8 x ratio) answers per problem for the same 64 problems, with --minibatch-size 8 x S so
# that every arm takes the same 16 optimizer steps per iteration (same LR schedule, same whitening share of a
# problem's answers per minibatch); the extra tokens buy more answers per group.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-${1:-runs/curve}}
ITERATIONS=${ITERATIONS:-3}
WORKERS=${WORKERS:-1}  # runs side by side; THREADS: torch threads each (0: torch's default)
THREADS=${THREADS:-$([ "$WORKERS" = 1 ] && echo 0 || echo 1)}
multiply() {  # the chance that a step multiplies, for D: 4 steps give 0.97, 1.99, 3.99 multiplications per problem
  case $1 in 1) echo 0.25 ;; 2) echo 0.5 ;; 4) echo 1.0 ;; *) echo "no setting for D = $1" >&2; exit 1 ;; esac
}
setting() {  # setting D: the task and evaluation options shared by D's starting model and all its arms
  echo --dataset arithmetic --arithmetic-steps 4 --arithmetic-multiply "$(multiply "$1")" --sft-answer-only 0 \
    --sft-slip-each 0.5 --eval-every 1 --eval-problems 200 --threads "$THREADS"
}

start() {  # start D: SFT only, and one evaluation; the first worker to need it makes it, the other waits
  local dir="$OUT/d$1"
  mkdir -p "$dir"
  exec 9> "$dir/start.lock"
  flock 9
  if [ ! -e "$dir/start/evals/0.json" ]; then
    python train.py $(setting "$1") --num-iterations 0 --run-dir "$dir/start" > "$dir/start.log" 2>&1
  fi
  exec 9>&-
}

matched() {  # matched D: the grpo_matched options, from vine_s1's tokens (VinePPO's answers + MC) per answer token
  python - "$OUT/d$1/vine_s1/metrics.jsonl" <<'EOF'
import json, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if "time/train" in r]
ratio = sum(r["tokens/answers"] + r["vine/mc_tokens"] for r in rows) / sum(r["tokens/answers"] for r in rows)
s = round(8 * ratio)
print(f"--samples-per-prompt {s} --minibatch-size {8 * s} --micro-batch-size {8 * s}")
EOF
}

run() {  # run D ARM SEED
  local d=$1 arm=$2 seed=$3 dir="$OUT/d$1" extra=()
  local name="$dir/${arm}_s$seed"
  start "$d"
  if [ -e "$name/evals/$ITERATIONS.json" ]; then return; fi  # finished: its final evaluation is written last
  if [ -e "$name/checkpoint/trainer_state.pt" ]; then extra+=(--resume); fi  # stopped: go on where it was
  if [ "$seed" = 1 ] && { [ "$arm" = vine ] || [ "$arm" = critic ]; }; then
    extra+=(--value-diagnostic 8 --diagnostic-rollouts 32)
  fi
  if [ "$arm" = grpo_matched ]; then
    while [ ! -e "$dir/vine_s1/evals/$ITERATIONS.json" ]; do sleep 10; done  # WORKERS > 1: another one runs it
    read -ra matched_options <<< "$(matched "$d")"
    extra+=("${matched_options[@]}")
  fi
  python train.py $(setting "$d") --model "$dir/start/init" --sft-steps 0 --advantage "${arm%_matched}" \
    --rl-seed "$seed" --num-iterations "$ITERATIONS" --run-dir "$name" "${extra[@]}" > "$name.log" 2>&1
}
export -f multiply setting start matched run
export OUT ITERATIONS THREADS

job_list() {  # one line per job, in the order the two workers take them
  for d in 4 1 2; do
    echo start "$d"
    echo run "$d" vine 1
    for s in 1 2 3; do for a in grpo rloo vine grpo_matched; do
      if [ "$a" != vine ] || [ "$s" != 1 ]; then echo run "$d" $a $s; fi
    done; done
  done
  echo run 4 critic 1
}
job_list | xargs -P "$WORKERS" -L 1 bash -c '"$@"' job  # each line runs as its own bash, with the exported functions

for d in 1 2 4; do
  python tools/compare_runs.py "$OUT/d$d"/*_s[0-9]*/ --out "$OUT/d$d/report" --at 1 2 3 --slip
done
mkdir -p docs/credit_curve
for d in 1 2 4; do cp "$OUT/d$d/report/summary.json" "docs/credit_curve/d$d.json"; done  # the parts that are committed
python experiments/credit_curve.py docs/credit_curve/d{1,2,4}.json --out docs/credit_curve --early 1
