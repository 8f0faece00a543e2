"""VinePPO training, the only script. It reads as the paper's loop: Args, then main -> train -> one_iteration -> its
phases in the order they run, then setup. A reader who stops at the "Setup" banner has read the whole loop.

    python train.py --dataset arithmetic                  # the CPU demo: a tiny model, SFT then VinePPO, 12-18 min
    python train.py --dataset gsm8k                       # the paper's GSM8K + RhoMath-1.1B recipe (one GPU)
    python train.py --help                                # every option, with its default
    torchrun --nproc_per_node 4 train.py --dataset gsm8k  # the same loop, data-parallel over 4 GPUs

One iteration (paper §4; what the official code does: docs/paper.md §1.1, §8), phase by phase in file order:
    evaluate_and_keep_best       every --eval-every iterations, before the update (iteration 0 is the start)
    sample_problems, sample_and_grade, make_episodes          rollout.sample, reward.grade
    vine_advantages | ppo.critic_advantages | ppo.outcome_advantages  the estimator (--advantage)
    run_value_diagnostic         optional (--value-diagnostic): how good are the values (vine.value_diagnostic)
    ppo_update                   old_and_ref_logprobs, then epochs x minibatches of minibatch_backward (ppo.ppo_loss)
    write_log, write_samples     one line per iteration; a few answers with their credit (--log-samples)
The starting model (the demo's tiny model, the supervised warm-up) is sft.py's; checkpoints, resume and what a
Ctrl-C does are checkpoint.py's (open_run, uninterrupted); torchrun is distributed.py's.

Where this script departs from the paper's code:
1. Sampling runs in the training process (rollout.py, no vLLM); the MC rollouts share the answers' policy snapshot
   and settings (one rollout.Sampling value), as in the paper (docs/paper.md pitfall 1).
2. The ratio guard judges the whole minibatch and skips its optimizer step (ppo_update says why); the official code
   zeroes each micro-batch's loss and still steps AdamW. The LR schedule advances either way, as there.
3. Every sampled answer is an episode; the paper fills or subsamples to exactly 512 when some fail to parse.
4. --sft-steps, --sft-answer-only, --sft-slip(-each) (a supervised warm-up, sft.py) and --arithmetic-* are ours, for
   the CPU demo and benchmarks (docs/head_to_head.md, docs/credit_curve.md): the paper starts from SFT models.
5. float32 master weights under bf16 autocast on CUDA (the paper: bf16 weights, DeepSpeed's float32 master copy).
6. The arithmetic defaults (DATASET_DEFAULTS) are ours, sized for a CPU; gsm8k and math use the paper's.
7. GRPO and RLOO take only their advantages from their papers and keep this loop's token-level whitening, PPO-clip,
   k3 KL term and two epochs, so that only the estimator differs.
8. The critic steps on every minibatch, also when the ratio guard skips the policy's; --value-diagnostic is ours.
9. Under torchrun the MC requests are not pooled and re-sharded across ranks (distributed.py).
"""

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import itertools
import random
import time
import traceback
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from transformers import HfArgumentParser, PreTrainedTokenizerFast

import checkpoint
import distributed
import ppo
import reward
import rollout
import sft
import vine

ADVANTAGES = ("vine", "critic", "grpo", "rloo")  # --advantage: the four estimators, the one multi-way choice

# Per-dataset defaults of the options whose default is None in Args: the paper's GSM8K and MATH recipes with
# RhoMath-1.1B (docs/paper.md §3, §9) and, for arithmetic, the README's CPU demo (12-18 minutes on 2 cores).
# This table is the one place they live; an option given on the command line overrides it.
# fmt: off
DATASET_DEFAULTS = {
    #                    gsm8k                            math                            arithmetic (CPU demo)
    "model":            ("realtreetune/rho-1b-sft-GSM8K", "realtreetune/rho-1b-sft-MATH", "tiny"),
    "num_iterations":   (650,                             1000,                           10),
    "num_mc_rollouts":  (9,                               9,                              3),
    "max_value_steps":  (25,                              0,                              25),
    "max_new_tokens":   (1024,                            1024,                           64),
    "max_length":       (2048,                            2048,                           160),
    "lr":               (1e-6,                            1e-6,                           3e-5),
    "micro_batch_size": (8,                               8,                              64),
    "sft_steps":        (0,                               0,                              2600),
    "sft_batch_size":   (64,                              64,                             32),
    "sft_lr":           (1e-3,                            1e-3,                           2e-3),
    "sft_answer_only":  (0.0,                             0.0,                            0.5),
    "eval_every":       (10,                              10,                             2),
    "eval_samples":     (16,                              16,                             4),
}
# fmt: on


def option(default, help: str, **metadata):
    """An Args field: its default and its --help text."""
    return field(default=default, metadata={"help": help, **metadata})


def per_dataset(name: str, help: str):
    """An Args field whose default depends on --dataset: None here, filled from DATASET_DEFAULTS by parse_args; the
    help text ends with the defaults, e.g. " Default: 650 (gsm8k), 1000 (math), 10 (arithmetic)."."""
    values = ", ".join(f"{value} ({dataset})" for dataset, value in zip(reward.DATASETS, DATASET_DEFAULTS[name]))
    return field(default=None, metadata={"help": f"{help} Default: {values}."})


@dataclass
class Args:
    # task and model
    dataset: str = option("gsm8k", "Task: gsm8k, math or arithmetic.")
    model: str = per_dataset("model", "A hub id, a local folder with a Hugging Face model and tokenizer, or 'tiny' "
                             "(a ~1M-parameter Llama and tokenizer built in-process).")
    data_dir: str = option(None, "Folder of JSONL data (gsm8k/*.jsonl, math/*.jsonl, plain or .gz), or 'hub' to "
                           "download it. Default: the copies shipped in data/.")
    run_dir: str = option(None, "Folder for checkpoints and metrics.jsonl. Default: runs/<dataset>.")
    resume: bool = option(False, "Continue the run saved in --run-dir exactly where it stopped.")
    seed: int = option(2746318213, "Seed of the starting model (tiny model, SFT) and of evaluation (the paper's).")
    rl_seed: int = option(None, "Seed of RL's random choices (problems, answers, MC rollouts, minibatches, critic "
                          "head), so that runs from one starting model differ only in RL noise. Default: --seed.")
    advantage: str = option("vine", "Where each token's advantage comes from, all else equal. vine: MC values of step "
                            "states (VinePPO); critic: the paper's PPO (a value model, GAE lambda = 1); grpo: (R - "
                            "mean) / std of the problem's answers; rloo: R - mean R of its other answers.",
                            choices=ADVANTAGES)
    arithmetic_steps: int = option(3, "Arithmetic only: steps (lines of working) per problem.")
    arithmetic_multiply: float = option(0.15, "Arithmetic only: chance that a step doubles or triples (where the "
                                        "result stays <= 999) instead of adding or subtracting.")
    # the VinePPO iteration (docs/paper.md §9)
    num_iterations: int = per_dataset("num_iterations", "RL iterations.")
    prompts_per_iteration: int = option(64, "Problems sampled per iteration.")
    samples_per_prompt: int = option(8, "Answers sampled per problem (episodes = prompts x samples).")
    num_mc_rollouts: int = per_dataset("num_mc_rollouts", "K: Monte Carlo continuations per state for its value.")
    max_value_steps: int = per_dataset("max_value_steps", "Value at most this many step states after the prompt "
                                       "(0: all).")
    temperature: float = option(0.6, "Sampling temperature for answers, MC rollouts and trainer logprobs.")
    top_p: float = option(0.9, "Nucleus sampling threshold for answers and MC rollouts.")
    max_new_tokens: int = per_dataset("max_new_tokens", "Most tokens in one answer or continuation.")
    max_length: int = per_dataset("max_length", "Most tokens in prompt + answer (+ EOS); longer ones are unfinished.")
    max_prompt_length: int = option(1512, "Problems with longer prompts are dropped.")
    # PPO (docs/paper.md §3)
    num_epochs: int = option(2, "PPO epochs over each iteration's episodes.")
    minibatch_size: int = option(64, "Episodes per optimizer step (advantages are whitened over it).")
    micro_batch_size: int = per_dataset("micro_batch_size", "Episodes per forward pass (gradient accumulation); "
                                        "memory only, results do not change.")
    lr: float = per_dataset("lr", "AdamW learning rate.")
    warmup_ratio: float = option(0.03, "Fraction of optimizer steps in the log-shaped warmup.")
    max_grad_norm: float = option(1.0, "Global gradient-norm clip.")
    clip_eps: float = option(0.2, "PPO clip range epsilon.")
    value_clip: float = option(0.2, "Value clip range of the critic's loss (--advantage critic).")
    kl_coef: float = option(1e-4, "Beta of the k3 KL-to-reference loss term (0: no reference model).")
    # supervised warm-up (ours, for models that start from scratch)
    sft_steps: int = per_dataset("sft_steps", "Supervised steps on the training split's gold solutions before RL.")
    sft_lr: float = per_dataset("sft_lr", "AdamW learning rate of the supervised warm-up (cosine decay).")
    sft_batch_size: int = per_dataset("sft_batch_size", "Gold solutions per supervised step.")
    sft_answer_only: float = per_dataset("sft_answer_only", "Fraction of supervised solutions cut to their final "
                                         "answer line (a mixed SFT set).")
    sft_slip: float = option(0.0, "Arithmetic only: fraction of supervised solutions whose first multiplication is "
                             "written as an addition ('14 * 2 = 28' as '14 + 2 = 16') and carried through.")
    sft_slip_each: float = option(0.0, "Arithmetic only: chance that each multiplication of a supervised solution is "
                                  "slipped so, independently of the others (--sft-slip slips only the first).")
    # evaluation, logging, checkpoints
    eval_every: int = per_dataset("eval_every", "Evaluate every this many iterations (before the update) and after "
                                  "the last; keep the best policy by validation Pass@1 in run_dir/best (0: never).")
    eval_problems: int = option(0, "Test and validation problems per evaluation (0: all, as the paper).")
    eval_samples: int = per_dataset("eval_samples", "Samples per problem for Pass@1 (the paper: 16).")
    eval_temperature: float = option(0.35, "Sampling temperature of the Pass@1 evaluation.")
    value_diagnostic: int = option(0, "Every iteration, measure the MC values (and the critic's) of this many answers' "
                                   "states against --diagnostic-rollouts rollouts each (paper §7; 0: off).")
    diagnostic_rollouts: int = option(64, "MC rollouts per state of the value diagnostic's reference values.")
    log_samples: int = option(4, "Every iteration, write this many answers with their steps, values and advantages "
                              "to run_dir/samples/<iteration>.jsonl, for tools/show_credit.py (0: off). They "
                              "are drawn apart: training draws the same either way.")
    save_every: int = option(10, "Checkpoint every this many iterations (and at the end, and on Ctrl-C).")
    stop_after: int = option(0, "Checkpoint and stop after this many iterations of this invocation (0: run on).")
    wandb: bool = option(False, "Also log to Weights & Biases (needs `pip install wandb`).")
    # hardware
    device: str = option(None, "cuda or cpu. Default: cuda when available. Float rounding differs by device.")
    bf16: bool = option(None, "bf16 autocast of every forward pass (float32 master weights) and a bf16 reference "
                        "model. Default: on for CUDA (--bf16 false: float32), off on CPU, where it runs the same "
                        "code, slower.")
    gradient_checkpointing: bool = option(None, "Recompute the policy's and the critic's activations in the backward "
                                          "pass: less memory, more time, the same numbers. Default: on for CUDA, "
                                          "off on CPU.")
    max_batch_tokens: int = option(None, "Tokens the sampler's KV cache holds at once (roots and generated tokens); "
                                   "lower it if sampling runs short of memory. It changes no draw, so --resume allows "
                                   "another value. Default: on CUDA 70% of the memory free when sampling starts, "
                                   f"on CPU {rollout.DEFAULT_MAX_BATCH_TOKENS}.")
    threads: int = option(0, "torch CPU threads (0: torch's default). A run repeats exactly for the same seed, "
                          "thread count and CPU type; --resume allows another count (float rounding only).")
    grading_workers: int = option(0, "MATH: processes that compare answers with math-verify, each comparison bounded "
                                  "by a CPU-time budget (0: one per CPU core, at most 4; capped at the cores).")
    dist_timeout: int = option(1800, "torchrun: seconds a rank waits in a collective for the others before the run "
                               "stops with an error (a rank died or raised); the wait for rank 0 making init/ is 6 h.")


# Every random draw comes from a generator seeded for its purpose, so that none shifts another and a resumed run draws
# what an uninterrupted one does: RL's draws of iteration i from rl_seed + i, evaluation i's from seed +
# EVAL_SEED_OFFSET * (i + 1), the value diagnostic's from rl_seed + DIAGNOSTIC_SEED_OFFSET * (i + 1); each rank has
# its own stream of each (seeded); the logged samples' choice from rl_seed + SAMPLES_SEED_OFFSET * (i + 1).
EVAL_SEED_OFFSET = 1_000_003
DIAGNOSTIC_SEED_OFFSET = 7_000_003
SAMPLES_SEED_OFFSET = 11_000_003


def seeded(seed: int) -> torch.Generator:
    """A generator for this rank's draws from seed (distributed.rank_seed: rank 0 draws from seed itself)."""
    return torch.Generator().manual_seed(distributed.rank_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# main -> train -> one_iteration


class Critic(NamedTuple):
    """The PPO baseline's value model with its own AdamW and schedule (--advantage critic; docs/paper.md §3)."""

    model: ppo.ValueModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


@dataclass
class State:
    """What the loop reads and updates, and where the run stands (made by set_up)."""

    train_problems: list[reward.Problem]
    val_problems: list[reward.Problem]
    test_problems: list[reward.Problem]
    policy: torch.nn.Module
    reference: torch.nn.Module | None  # the frozen initial (SFT) policy; None when --kl-coef 0
    critic: Critic | None  # --advantage critic only
    tokenizer: PreTrainedTokenizerFast
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampling: rollout.Sampling  # the answers' settings, which their MC rollouts share (docs/paper.md pitfall 1)
    next_iteration: int = 0  # the policy holds the updates of the iterations before this one
    saved_at: int | None = None  # the next_iteration of the checkpoint on disk (None: this invocation saved none)
    best_val: float = -1.0  # the best validation Pass@1 so far; best/ holds that policy


def main(argv: list[str] | None = None) -> None:
    """A run: the options, then (under torchrun) the process group, the run folder (refused if it holds another run,
    locked while this one trains), the setup and the training. A Ctrl-C or SIGTERM at any point stops the run with a
    checkpoint of the last finished update and exit 130, and --resume continues exactly there (checkpoint.open_run).
    Under torchrun every rank runs all of this on its share of the work; rank 0 prints, logs and saves."""
    args = parse_args(argv)
    seed_everything(args)
    with distributed.process_group(args.device, args.dist_timeout) as device:  # torchrun: join the other ranks
        distributed.check_same_options(dataclasses.asdict(args))  # every rank was given the same command line
        args.device = device
        with checkpoint.open_run(
            args.run_dir, main=distributed.is_main(), resume=args.resume, run_args=dataclasses.asdict(args),
            may_differ=RESUME_MAY_DIFFER, defer=distributed.world()[1] > 1,  # torchrun: all ranks stop together
        ) as run:
            try:
                state = set_up(args)  # data, models, optimizers and, with --resume, the checkpoint's state
                run.on_stop = functools.partial(save_checkpoint, state, args)  # what a stop saves from here on
                train(state, args)
            except (torch.OutOfMemoryError, RuntimeError) as e:  # one line that says what to lower, no traceback
                if not out_of_memory(e):
                    raise
                raise SystemExit(out_of_memory_message(e, args)) from None


def train(state: State, args: Args) -> None:
    """The iterations from where the run stands to --num-iterations (or --stop-after of them), each checkpointed when
    due, then the evaluation of the final policy."""
    first = state.next_iteration
    last = min(args.num_iterations, first + args.stop_after) if args.stop_after else args.num_iterations
    for iteration in range(first, last):
        one_iteration(state, iteration, args)
        if checkpoint.is_due(iteration, num_iterations=last, save_every=args.save_every):  # and after the last
            with checkpoint.uninterrupted(distributed.any_rank):  # a Ctrl-C or SIGTERM waits until it is saved
                save_checkpoint(state, args)
    if args.stop_after and last - first == args.stop_after:  # stopped here; --resume goes on
        return
    if args.eval_every:  # -------- evaluate the final policy
        write_log({"iteration": args.num_iterations, **evaluate_and_keep_best(state, args.num_iterations, args)}, args)
        checkpoint.stop_point(distributed.any_rank)  # torchrun: a stop deferred during it ends the run here
    print_where_results_went(args, state.best_val)


def one_iteration(state: State, iteration: int, args: Args) -> dict:
    """One VinePPO iteration (docs/paper.md §1.1 steps 1-6, §8): evaluate when due, sample and grade answers, their
    advantages, the PPO update and the log line. A Ctrl-C or SIGTERM during the update waits until it and its log
    line are written (checkpoint.uninterrupted). Returns the log."""
    policy, tokenizer, pad_id, sampling = state.policy, state.tokenizer, state.tokenizer.pad_token_id, state.sampling
    generator = seeded(args.rl_seed + iteration)  # per iteration: a resumed run draws what an uninterrupted one does
    log = {"iteration": iteration}
    if args.eval_every and iteration % args.eval_every == 0:  # -------- evaluate, before the update: 0 is the start
        log.update(evaluate_and_keep_best(state, iteration, args))
    # -------- sample answers and grade them: on full weights (torchrun: no collective while ranks sample)
    timer = time.time()
    with distributed.full_weights(policy):
        problems = distributed.shard(sample_problems(state.train_problems, iteration, args))  # this rank's share
        rollouts, rewards = sample_and_grade(policy, tokenizer, problems, sampling, generator, args)
        episodes = make_episodes(tokenizer, problems, rollouts, rewards, args)
        log["time/sample"], timer = time.time() - timer, time.time()
        # -------- advantages: the one place the estimator is picked; everything downstream is shared
        if args.advantage == "vine":
            log.update(vine_advantages(policy, tokenizer, problems, rollouts, episodes, sampling, generator, args))
        elif args.advantage == "critic":  # the paper's PPO: V_old from the critic, GAE with lambda = 1
            with autocast(args), distributed.full_weights(state.critic.model):
                log.update(ppo.critic_advantages(state.critic.model, episodes, pad_id, args.micro_batch_size))
        else:  # GRPO or RLOO: one advantage per answer, from its problem's group of answers
            ppo.outcome_advantages(episodes, args.samples_per_prompt, args.advantage)
        log["time/values"], timer = time.time() - timer, time.time()
        if args.value_diagnostic:  # -------- optional: how good are the values? (not part of the method)
            log.update(run_value_diagnostic(state, problems, rollouts, iteration, args))
            log["time/diagnostic"], timer = time.time() - timer, time.time()
    log["tokens/answers"] = sum(len(ids) for ids in rollouts.response_ids)
    logged = pick_samples(episodes, iteration, args)  # the credit view's answers: rank 0's, from their own generator
    log = distributed.combine_logs(log, SUMMED_KEYS)  # several ranks: one log, and every rank gets every episode
    episodes = distributed.gather_list(episodes)
    log.update(reward_signal([e.reward for e in episodes], iteration, args))
    # -------- PPO update and the log line: a Ctrl-C or SIGTERM waits until both are done (no half update)
    with checkpoint.uninterrupted(distributed.any_rank):
        log.update(
            ppo_update(policy, state.reference, state.critic, state.optimizer, state.scheduler, episodes, pad_id,
                       generator, args)
        )
        check_finite_weights(policy, state.critic, iteration)
        state.next_iteration = iteration + 1
        log["time/train"] = time.time() - timer
        log.update(episode_stats(episodes, state.scheduler))
        write_log(log, args)
        write_samples(tokenizer, problems, rollouts, episodes, logged, iteration, args)
    return log


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation (docs/paper.md §4.5): test and validation Pass@1, greedy accuracy, the best policy by validation


def evaluate_and_keep_best(state: State, iteration: int, args: Args) -> dict:
    """The evaluation phase: evaluate, write each problem's scores to run_dir/evals/<iteration>.json
    (tools/compare_runs.py pairs runs with them), and save the policy to run_dir/best/ when its validation
    Pass@1 beats every earlier evaluation of the run (the paper reports the checkpoint with the best validation
    accuracy, docs/paper.md §4.5). Returns the metrics, timed."""
    start = time.time()
    metrics = evaluate(
        state.policy, state.tokenizer, state.test_problems, state.val_problems, state.sampling, args, iteration
    )
    per_problem = metrics.pop("per_problem", None)
    if per_problem is not None and distributed.is_main():
        checkpoint.write_text(os.path.join(args.run_dir, "evals", f"{iteration}.json"), json.dumps(per_problem))
    if metrics["eval/val_pass1"] > state.best_val:
        state.best_val = metrics["eval/val_pass1"]
        weights = distributed.full_state_dict(state.policy)  # torchrun: gathered on rank 0 (every rank takes part)
        if distributed.is_main():  # every rank has the same metrics: one saves
            best_dir = os.path.join(args.run_dir, "best")
            best = {"best.json": {"iteration": iteration, **metrics}}
            checkpoint.save_folder(best_dir, state.policy, state.tokenizer, best, state_dict=weights)
            print(f"saved {best_dir} (validation Pass@1 {state.best_val:.4f}, iteration {iteration})")
    metrics["time/eval"] = time.time() - start
    return metrics


def evaluate(model, tokenizer, test_problems, val_problems, sampling: rollout.Sampling, args: Args, iteration: int):
    """Pass@1 as the paper measures it (docs/paper.md §4.5): the mean accuracy of eval_samples answers per problem at T
    = 0.35, on the test and the validation problems; and the accuracy of the greedy answer to each test problem. The
    answers' settings otherwise (sampling). The draws depend on --seed and the iteration only, so runs from one starting
    model are evaluated on the same problems with the same random numbers (paired). metrics["per_problem"] holds each
    problem's score, for comparisons. With several ranks each evaluates its share of the problems from a generator
    of its own (runs are paired with runs of the same number of ranks) and every rank gets all the scores."""
    generator = seeded(args.seed + EVAL_SEED_OFFSET * (iteration + 1))
    metrics, per_problem = {}, {}
    with distributed.full_weights(model):  # torchrun: ranks sample on whole weights, no collective in between
        for name, problems, num_samples, temperature in [
            ("eval/pass1", test_problems, args.eval_samples, args.eval_temperature),
            ("eval/greedy", test_problems, 1, 0.0),
            ("eval/val_pass1", val_problems, args.eval_samples, args.eval_temperature),
        ]:
            mine = distributed.shard(problems)
            outs = sample_answers(
                model, tokenizer, [p.prompt_ids for p in mine], num_samples=num_samples,
                sampling=dataclasses.replace(sampling, temperature=temperature), generator=generator, args=args,
            )
            golds = [p.answer for p in mine for _ in range(num_samples)]
            rewards = grade_all(tokenizer, outs, golds, args.dataset)
            scores = np.array(distributed.gather_list(rewards)).reshape(len(problems), num_samples)
            metrics[name], per_problem[name] = float(scores.mean()), scores.mean(axis=1).tolist()
            checkpoint.stop_point(distributed.any_rank)  # torchrun: a deferred stop ends the run between the splits
    return {**metrics, "per_problem": per_problem}


# ---------------------------------------------------------------------------------------------------------------------
# Sampling and grading (docs/paper.md §1.1 steps 1-3, §4.3)


def sample_problems(train_problems: list[reward.Problem], iteration: int, args: Args) -> list[reward.Problem]:
    """The iteration's problems: the train split reshuffled with rl_seed + iteration, the first prompts_per_iteration
    whose prompt has at most longest_prompt(args) tokens (docs/paper.md §1.1 step 1; §3, the prompt filter)."""
    order = random.Random(args.rl_seed + iteration).sample(range(len(train_problems)), len(train_problems))
    fitting = (train_problems[i] for i in order if len(train_problems[i].prompt_ids) <= longest_prompt(args))
    return list(itertools.islice(fitting, args.prompts_per_iteration))


def sampling_settings(args: Args, model, tokenizer) -> rollout.Sampling:
    """The answers' sampling settings, which their MC rollouts share (docs/paper.md §1.1 step 3, pitfall 1): T, top-p,
    the paper's stop string, every end token of the model, and max_length - 1 - (prefix length) new tokens at most,
    so that prefix + tokens + EOS fit in max_length (the official 2047 for 2048)."""
    return rollout.Sampling(
        args.temperature, args.top_p, args.max_new_tokens, eos_token_id=tuple(rollout.stop_token_ids(model, tokenizer)),
        max_length=args.max_length - 1, stop_strings=reward.STOP_STRINGS, max_batch_tokens=args.max_batch_tokens,
    )


def sample_answers(policy, tokenizer, prompts, *, num_samples, sampling: rollout.Sampling, generator, args: Args):
    """rollout.sample under --bf16's autocast, with a progress bar on rank 0. Returns rollout.Rollouts."""
    with autocast(args):
        return rollout.sample(
            policy, prompts, num_samples=num_samples, generator=generator, tokenizer=tokenizer,
            show_progress=distributed.is_main(), **vars(sampling),
        )


def sample_and_grade(policy, tokenizer, problems, sampling: rollout.Sampling, generator, args: Args):
    """samples_per_prompt answers per prompt at the sampling temperature (docs/paper.md §1.1 step 3), answer j of prompt
    i at i * samples_per_prompt + j, and their rewards R (docs/paper.md §4.3: 0 when unfinished). Returns (Rollouts,
    rewards)."""
    rollouts = sample_answers(
        policy, tokenizer, [p.prompt_ids for p in problems], num_samples=args.samples_per_prompt, sampling=sampling,
        generator=generator, args=args,
    )
    golds = [p.answer for p in problems for _ in range(args.samples_per_prompt)]
    return rollouts, grade_all(tokenizer, rollouts, golds, args.dataset)


def grade_all(tokenizer, rollouts: rollout.Rollouts, answers: list[str], dataset: str) -> list[float]:
    """R = grade(text) for finished answers and 0 for unfinished ones (docs/paper.md §4.3, pitfall 10), in one
    reward.grade_batch call (MATH: in its worker pool)."""
    texts = [tokenizer.decode(ids, **rollout.DECODE_KWARGS) if done else None  # None: unfinished, reward 0
             for ids, done in zip(rollouts.response_ids, rollouts.finished)]
    return reward.grade_batch(texts, answers, dataset)


def make_episodes(tokenizer, problems, rollouts: rollout.Rollouts, rewards: list[float], args: Args) -> list:
    """One Episode per answer, its advantages still empty. A GSM8K answer with no "####" line is unfinished, as in the
    official code (docs/paper.md §4.3); EOS is appended to finished answers only (docs/paper.md §1.3, pitfall 10): the
    end token the answer
    sampled (a model may have several, rollout.stop_token_ids), or the tokenizer's after a stop string."""
    episodes = []
    for i, ids in enumerate(rollouts.response_ids):
        prompt_ids = problems[i // args.samples_per_prompt].prompt_ids
        text = tokenizer.decode(ids, **rollout.DECODE_KWARGS)
        finished = rollouts.finished[i] and reward.counts_as_finished(text, args.dataset)
        eos = tokenizer.eos_token_id if rollouts.eos[i] is None else rollouts.eos[i]  # the end token it sampled
        response_ids = ids + [eos] if finished else list(ids)
        episodes.append(ppo.Episode(prompt_ids, response_ids, finished, rewards[i], advantages=[]))
    return episodes


# ---------------------------------------------------------------------------------------------------------------------
# Advantages: VinePPO's MC values (docs/paper.md §1.2, §1.3); the baselines' are in ppo.py


def vine_advantages(policy, tokenizer, problems, rollouts, episodes, sampling, generator, args: Args) -> dict:
    """VinePPO's credit assignment for every answer (paper §4; docs/paper.md §1.2, §1.3): split into steps, MC values
    of the step states from the same policy snapshot and sampling settings (docs/paper.md pitfall 1), A_i = r_i +
    V(s_{i+1}) - V(s_i) per step, each token carrying its step's A_i and the EOS of a finished answer the last
    token's (pitfall 10). vine.estimate_values runs under --bf16's autocast. Returns its stats."""
    answers = [p for p in problems for _ in range(args.samples_per_prompt)]  # answer i's problem
    steps, token_steps = vine.answer_steps(tokenizer, rollouts.response_ids, args.dataset)
    with autocast(args):
        values, stats = vine.estimate_values(
            policy, tokenizer, [p.prompt_ids for p in answers], rollouts.response_ids, token_steps,
            [p.answer for p in answers], args.dataset, num_mc_rollouts=args.num_mc_rollouts,
            max_value_steps=args.max_value_steps or None, sampling=sampling, generator=generator,
            show_progress=distributed.is_main(),
        )
    for i, e in enumerate(episodes):
        e.values = values[i]
        step_advs = vine.step_advantages(values[i], e.reward, len(steps[i]))
        advs = vine.token_advantages(step_advs, token_steps[i])
        if e.finished:  # the EOS takes the last token's advantage (the last step's for an empty answer)
            advs = advs + [advs[-1] if advs else step_advs[-1]]
        e.advantages = advs
    return stats


def run_value_diagnostic(state: State, problems, rollouts, iteration: int, args: Args) -> dict:
    """vine.value_diagnostic on --value-diagnostic answers of this iteration, drawn with their own seeded generator
    (training draws nothing less or more): --diagnostic-rollouts reference rollouts per state against a fresh K-rollout
    MC estimate and, with --advantage critic, the critic's values before this iteration's update."""
    generator = seeded(args.rl_seed + DIAGNOSTIC_SEED_OFFSET * (iteration + 1))
    picked = torch.randperm(len(rollouts.response_ids), generator=generator)[: args.value_diagnostic].tolist()
    answers = [problems[i // args.samples_per_prompt] for i in picked]
    responses = [rollouts.response_ids[i] for i in picked]
    _, steps = vine.answer_steps(state.tokenizer, responses, args.dataset)
    critic_values = None
    if state.critic is not None:
        critic_values = functools.partial(
            state.critic.model.state_values, pad_id=state.tokenizer.pad_token_id, batch_size=args.micro_batch_size
        )
    with autocast(args), distributed.full_weights(state.critic.model if state.critic else None):
        stats, _ = vine.value_diagnostic(
            state.policy, state.tokenizer, [p.prompt_ids for p in answers], responses, steps,
            [p.answer for p in answers], args.dataset, num_mc_rollouts=args.num_mc_rollouts,
            reference_rollouts=args.diagnostic_rollouts, max_value_steps=args.max_value_steps or None,
            sampling=state.sampling, generator=generator, critic_values=critic_values,
            show_progress=distributed.is_main(),
        )
    return stats


# ---------------------------------------------------------------------------------------------------------------------
# The PPO update (docs/paper.md §3, §8): old and reference logprobs once, then epochs x minibatches x micro-batches


def ppo_update(
    policy, reference, critic, optimizer, scheduler, episodes: list[ppo.Episode], pad_id: int, generator, args
) -> dict:
    """num_epochs passes over the episodes in shuffled minibatches of minibatch_size, one AdamW step each with the
    gradient norm clipped (docs/paper.md §3, §8); the critic, if any, takes a step of its own AdamW on every minibatch
    (the ratio guard is the policy's alone, as in the official code). A minibatch whose loss or gradient is not finite
    moves no weight (clipped_step). The guard (mean ratio > 10) is judged on the whole minibatch and skips the step, so
    --micro-batch-size stays a memory setting that never changes results, and a skipped step cannot move the weights
    on AdamW's momentum (departure 2). Returns the stats averaged over the optimizer steps, and the skip counts.
    episodes: the iteration's episodes, the same on every rank (several ranks: see minibatch_backward)."""
    old_and_ref_logprobs(policy, reference, episodes, pad_id, args)
    distributed.same_generator(generator)  # several ranks: every rank draws rank 0's minibatches
    totals, num_steps, skipped, nonfinite, empty = {}, 0, 0, 0, 0
    policy.train()  # dropout is off (checkpoint.load_model); train mode turns on gradient checkpointing
    if critic is not None:
        critic.model.train()
    for _ in range(args.num_epochs):
        perm = torch.randperm(len(episodes), generator=generator).tolist()
        for start in range(0, len(perm), args.minibatch_size):
            minibatch = [episodes[i] for i in perm[start : start + args.minibatch_size]]
            if sum(len(e.response_ids) for e in minibatch) < 2:  # only empty answers (EOS first, no "####"): no
                scheduler.step()  # token to learn from, nothing to whiten; the schedules advance as for a skip
                if critic is not None:
                    critic.scheduler.step()
                empty += 1
                continue
            stats = minibatch_backward(policy, critic, minibatch, pad_id, args)
            if critic is not None:
                stats["critic/grad_norm"], _ = clipped_step(
                    critic.model, critic.optimizer, critic.scheduler, stats["critic/loss"], args
                )
            if ppo.ratio_guard_exceeded(stats):  # the paper's guard: skip a minibatch whose mean ratio > 10
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()  # the schedule still advances, as in the paper (departure 2)
                skipped += 1
                continue
            stats["grad_norm"], stepped = clipped_step(policy, optimizer, scheduler, stats["loss/total"], args)
            if not stepped:
                nonfinite += 1
                continue
            num_steps += 1
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
    policy.eval()
    if critic is not None:
        critic.model.eval()
    out = {k: v / max(1, num_steps) for k, v in totals.items()}
    out["ppo/skipped_minibatches"], out["ppo/nonfinite_minibatches"] = skipped, nonfinite
    out["ppo/empty_minibatches"] = empty
    return out


def old_and_ref_logprobs(policy, reference, episodes: list[ppo.Episode], pad_id: int, args: Args) -> None:
    """pi_old and reference logprobs of every episode, once per iteration before the update (docs/paper.md pitfall 13).
    With several ranks each computes its share on full weights and receives the others'."""
    mine = distributed.shard(episodes)
    with torch.no_grad(), autocast(args), distributed.full_weights(policy, reference):
        for start in range(0, len(mine), args.micro_batch_size):
            chunk = mine[start : start + args.micro_batch_size]
            batch = ppo.make_batch(chunk, pad_id, args.device)
            old = ppo.token_logprobs(policy, batch["input_ids"], batch["attention_mask"], args.temperature)  # (B, T-1)
            ref = None
            if reference is not None:
                ref = ppo.token_logprobs(reference, batch["input_ids"], batch["attention_mask"], args.temperature)
            for j, e in enumerate(chunk):
                n = int(batch["attention_mask"][j].sum()) - 1  # number of predicted positions of this episode
                e.old_logprobs = old[j, :n].cpu()
                e.ref_logprobs = ref[j, :n].cpu() if ref is not None else None
    if distributed.world()[1] > 1:
        gathered = distributed.gather_list([(e.old_logprobs, e.ref_logprobs) for e in mine])
        for e, (old, ref) in zip(episodes, gathered, strict=True):
            e.old_logprobs, e.ref_logprobs = old, ref


def minibatch_backward(policy, critic, minibatch: list[ppo.Episode], pad_id: int, args: Args) -> dict:
    """Gradient of the clipped PPO loss + KL over one minibatch, accumulated over micro-batches (memory only: the
    advantages are whitened and the losses normalised over the whole minibatch, docs/paper.md pitfalls 6 and 7); with a
    critic, also the gradient of its value loss on the same micro-batches. Returns the ppo_loss (and value_loss)
    stats, summed over the micro-batches into minibatch means (ppo.accumulate_stats).

    With several ranks, every rank holds the whole minibatch (so the whitening statistics and the normalisers are
    the one-process ones) and runs the micro-batches of its share; FSDP2 sums the gradients over the ranks and the
    stats are summed here, which gives the one-process gradient, stats and ratio-guard decision on every rank. Every
    rank runs as many passes (distributed.micro_batch_passes): one whose share is shorter runs zero-loss passes."""
    full = ppo.make_batch(minibatch, pad_id, "cpu")
    whitened = ppo.masked_whiten(full["advantages"], full["mask"])  # (B, T-1) once over the whole minibatch
    for j, e in enumerate(minibatch):
        if e.whitened is not None:  # a logged answer (pick_samples): what this update made of its advantages
            p = len(e.prompt_ids)
            e.whitened.append(whitened[j, p - 1 : p - 1 + len(e.response_ids)].tolist())
    counts = float(full["mask"].sum()), float(len(minibatch))  # response tokens and sequences of the minibatch
    first, last = distributed.shard_bounds(len(minibatch))  # this rank's share
    stats = {}
    for k in range(distributed.micro_batch_passes(len(minibatch), args.micro_batch_size)):
        rows = range(first + k * args.micro_batch_size, min(first + (k + 1) * args.micro_batch_size, last))
        if rows:
            s = micro_batch_backward(policy, critic, minibatch, rows, whitened, counts, pad_id, args)
            stats = ppo.accumulate_stats(stats, s)
        else:  # a shorter share: the first episode's forward and backward with loss 0, as the other ranks' passes
            micro_batch_backward(policy, critic, minibatch, range(1), whitened, counts, pad_id, args, scale=0.0)
    if distributed.world()[1] > 1:
        stats = functools.reduce(ppo.accumulate_stats, distributed.gather_list([stats]), {})
    return stats


def micro_batch_backward(
    policy, critic, minibatch: list[ppo.Episode], rows: range, whitened: torch.Tensor, counts: tuple[float, float],
    pad_id: int, args: Args, scale: float = 1.0,
) -> dict:
    """The backward pass of scale x (clipped PPO loss + KL) of minibatch[rows], normalised by the whole minibatch's
    counts (response tokens, sequences), its advantages the rows of the minibatch's whitened ones; with a critic, its
    value loss too (ppo.critic_loss). Returns the ppo_loss (and value_loss) stats."""
    chunk = [minibatch[i] for i in rows]
    batch = ppo.make_batch(chunk, pad_id, args.device)
    width = batch["mask"].shape[1]
    old = ppo.pad_rows([e.old_logprobs for e in chunk], width).to(args.device)
    ref = None  # no reference model when kl_coef = 0
    if chunk[0].ref_logprobs is not None:
        ref = ppo.pad_rows([e.ref_logprobs for e in chunk], width).to(args.device)
    adv = whitened[rows.start : rows.stop, :width].to(args.device)
    with autocast(args):
        logprobs, entropy = ppo.token_logprobs(
            policy, batch["input_ids"], batch["attention_mask"], args.temperature, return_entropy=True
        )
    loss, stats = ppo.ppo_loss(
        logprobs, old, adv, batch["mask"], clip_eps=args.clip_eps, ref_logprobs=ref, kl_coef=args.kl_coef,
        num_tokens=counts[0], num_seqs=counts[1],
    )
    (loss * scale).backward()
    stats["policy/entropy"] = float((entropy * batch["mask"]).sum()) / counts[0]
    if critic is not None:  # the paper's PPO: the critic learns on the same micro-batch (docs/paper.md §3)
        with autocast(args):
            value_loss, critic_stats = ppo.critic_loss(critic.model, chunk, batch, clip_range=args.value_clip,
                                                       num_tokens=counts[0])
        (value_loss * scale).backward()
        stats.update(critic_stats)
    return stats


def clipped_step(model, optimizer, scheduler, loss: float, args: Args) -> tuple[float, bool]:
    """Clip the gradient norm to max_grad_norm and take the optimizer step, unless the loss or the gradient norm is
    not finite: one NaN would otherwise spread to every weight through AdamW's moments. The LR schedule advances
    either way. Returns the gradient norm before clipping and whether the step was taken."""
    grad_norm = distributed.clip_grad_norm(model, args.max_grad_norm)  # the global norm, also from shards
    stepped = math.isfinite(grad_norm) and math.isfinite(loss)
    if stepped:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, stepped


def check_finite_weights(policy, critic, iteration: int) -> None:
    """Stop, saving nothing, if an update left a non-finite weight (clipped_step makes that all but impossible)."""
    for name, model in (("policy", policy), ("critic", critic.model if critic else None)):
        if model is not None and not distributed.all_finite(model):
            raise SystemExit(
                f"error: the {name}'s weights are not finite after the update of iteration {iteration}; stopped "
                "without saving them, so the last checkpoint is intact. Lower --lr, or check the data"
            )


# ---------------------------------------------------------------------------------------------------------------------
# Logging and checkpoints


# Log keys that are counts: the ranks' values add up (distributed.combine_logs).
SUMMED_KEYS = {"tokens/answers", "vine/states_total", "vine/states_unique", "vine/mc_rollouts", "vine/mc_tokens"}
SUMMED_KEYS |= {"diag/states"}
# What a right answer ends with, per data set: named by the warning when no answer of an iteration is right.
ANSWER_FORMATS = {"gsm8k": 'a final line "#### N"', "arithmetic": 'a final line "#### N"', "math": "\\boxed{...}"}


def reward_signal(rewards: list[float], iteration: int, args: Args) -> dict:
    """The fraction of prompts whose answers all got the same reward: their advantages carry no outcome signal
    (GRPO/RLOO give them 0; VinePPO's MC values can still rank their steps). When every answer of the iteration got
    0 (or all got 1) nothing can be learned from it: say so once per iteration, with the likely cause."""
    groups = np.array(rewards).reshape(-1, args.samples_per_prompt)  # (prompts, samples)
    same = f"warning: iteration {iteration}: every one of the {groups.size} answers got reward"
    if groups.max() == 0:
        print(f"{same} 0, so there is nothing to learn from. On {args.dataset} an answer is right only if it ends with "
              f"{ANSWER_FORMATS[args.dataset]}: a model that never writes that format always scores 0 (teach it with "
              "--sft-steps N, or start from an SFT model); answers cut at --max-new-tokens also score 0 (see "
              "response/unfinished)")
    elif groups.min() == 1:
        print(f"{same} 1, so there is nothing to learn from; the problems are too easy for this policy")
    return {"reward/no_signal_groups": float(np.mean(groups.min(axis=1) == groups.max(axis=1)))}


def episode_stats(episodes: list[ppo.Episode], scheduler) -> dict:
    """The iteration's sample statistics for its log line (the README's metrics table)."""
    all_advs = [a for e in episodes for a in e.advantages]
    return {
        "reward/mean": float(np.mean([e.reward for e in episodes])),
        "response/length": float(np.mean([len(e.response_ids) - e.finished for e in episodes])),  # without EOS
        "response/unfinished": 1.0 - float(np.mean([e.finished for e in episodes])),
        "advantages/zero_frac": float(np.mean([a == 0.0 for a in all_advs])) if all_advs else 1.0,
        "lr": scheduler.get_last_lr()[0],
    }


def write_log(log: dict, args: Args) -> None:
    """Rank 0: print the log as one line and append it to run_dir/metrics.jsonl (and to wandb with --wandb)."""
    if not distributed.is_main():
        return
    print(format_log(log))
    with open(os.path.join(args.run_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(log) + "\n")
    if args.wandb:
        import wandb

        wandb.log(log, step=log["iteration"])


def pick_samples(episodes: list[ppo.Episode], iteration: int, args: Args) -> list[int]:
    """--log-samples of this rank's episodes, drawn from a generator of their own (so training draws the same with
    any number), on rank 0 only; marks them, so that the update keeps their whitened advantages (minibatch_backward).
    Runs of one starting model and RL seed pick the same answers at iteration 0, whatever their estimator."""
    if not args.log_samples or not distributed.is_main():
        return []
    generator = seeded(args.rl_seed + SAMPLES_SEED_OFFSET * (iteration + 1))
    picked = sorted(torch.randperm(len(episodes), generator=generator)[: args.log_samples].tolist())
    for i in picked:
        episodes[i].whitened = []
    return picked


def write_samples(tokenizer, problems, rollouts, episodes: list[ppo.Episode], picked, iteration: int, args) -> None:
    """The picked answers (pick_samples) to run_dir/samples/<iteration>.jsonl, one record per line, the file written
    whole (a resumed iteration replaces it), and to wandb as a Table: the question, gold answer, reward, finished,
    the estimator and vine.credit_record's steps. tools/show_credit.py shows them."""
    if not picked:
        return
    records = []
    for i in picked:
        e, problem = episodes[i], problems[i // args.samples_per_prompt]
        records.append({
            "iteration": iteration, "answer_index": i, "estimator": args.advantage, "question": problem.question,
            "gold": problem.answer, "reward": e.reward, "finished": e.finished,
            **vine.credit_record(tokenizer, e, rollouts.response_ids[i], args.dataset),
        })
        if args.advantage in ("grpo", "rloo"):  # one advantage for the whole answer
            records[-1]["advantage"] = e.advantages[0] if e.advantages else 0.0
    path = os.path.join(args.run_dir, "samples", f"{iteration}.jsonl")
    checkpoint.write_text(path, "".join(json.dumps(record) + "\n" for record in records))
    if args.wandb:
        import wandb

        columns = ["iteration", "estimator", "question", "gold", "answer", "reward", "steps"]
        rows = [[json.dumps(r[c]) if c == "steps" else r[c] for c in columns] for r in records]
        wandb.log({"samples": wandb.Table(columns=columns, data=rows)}, step=iteration)


def format_log(log: dict) -> str:
    """One readable line per iteration, as nanoGPT prints; the README explains each metric."""
    return " | ".join([f"it {log['iteration']}"] + [f"{k} {v:.4g}" for k, v in log.items() if k != "iteration"])


def save_checkpoint(state: State, args: Args) -> None:
    """checkpoint.save_checkpoint of the run as it stands, unless the checkpoint on disk already holds it (a stop
    right after a scheduled save saves nothing more). Rank 0 writes; under torchrun every rank takes part in gathering
    the weights and the AdamW state (distributed.full_state_dict)."""
    if state.saved_at == state.next_iteration:
        return
    critic = None
    if state.critic is not None:  # its weights (gathered on rank 0 under torchrun), AdamW state and schedule
        model, optimizer, scheduler = state.critic
        weights = distributed.full_state_dict(model)
        weights = model.state_dict() if weights is None else weights
        critic = (weights, distributed.full_optimizer_state(model, optimizer), scheduler.state_dict())
    model_state = distributed.full_state_dict(state.policy)
    optimizer = distributed.full_optimizer_state(state.policy, state.optimizer)
    if distributed.is_main():
        checkpoint.save_checkpoint(
            os.path.join(args.run_dir, "checkpoint"), state.policy, state.tokenizer, optimizer=optimizer,
            scheduler=state.scheduler.state_dict(), next_iteration=state.next_iteration, best_val=state.best_val,
            run_args=dataclasses.asdict(args), world_size=distributed.world()[1], model_state=model_state,
            critic=critic,
        )
    state.saved_at = state.next_iteration


def print_where_results_went(args: Args, best_val: float) -> None:
    """The last lines of a run: its files, and the command that draws its curves."""
    print(f"metrics:    {os.path.join(args.run_dir, 'metrics.jsonl')}")
    print(f"checkpoint: {os.path.join(args.run_dir, 'checkpoint')}")
    if best_val >= 0:
        print(f"best:       {os.path.join(args.run_dir, 'best')} (validation Pass@1 {best_val:.4f})")
    curves = os.path.join(args.run_dir, "curves.png")
    print(f"curves:     python tools/plot_metrics.py {args.run_dir}   (writes {curves}; needs matplotlib)")


# =====================================================================================================================
# Setup: seeds, data, models (the supervised warm-up is sft.py's), options, optimizers, resume. The loop ends above.


def seed_everything(args: Args) -> None:
    """cleanrl's seeding block: Python's, NumPy's and torch's global generators from --seed (the tiny model's weights,
    SFT), and torch's thread count. RL draws from generators of its own (seeded)."""
    random.seed(args.seed)
    np.random.seed(args.seed % 2**32)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)


def set_up(args: Args) -> State:
    """Data, models, optimizers and, with --resume, the checkpoint's state (checkpoint.restore_checkpoint)."""
    distributed.barrier()  # several ranks: the others wait for rank 0's check of the run folder (checkpoint.open_run)
    print(json.dumps(dataclasses.asdict(args), indent=1))
    if args.grading_workers:
        reward.set_grading_workers(args.grading_workers)
    rows = load_data(args)  # train, validation, test: reward.load_problems' dicts
    policy, reference, tokenizer = load_models(args, rows[0])
    train_problems, val_problems, test_problems = (reward.to_problems(split, tokenizer, args.dataset) for split in rows)
    check_prompts_fit(train_problems, args)
    if args.device.startswith("cuda") and args.max_batch_tokens is None:
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        tokens = rollout.default_budget(policy, dtype, torch.device(args.device))
        print(f"sampling: a KV cache of {rollout.KV_MEMORY_FRACTION:.0%} of the GPU memory free when sampling starts, "
              f"less the weights' bf16 copies and a step's logits (now {tokens} tokens; --max-batch-tokens sets it)")
    critic = load_critic(args)
    optimizer, scheduler = make_optimizer(policy, args)
    state = State(train_problems, val_problems, test_problems, policy, reference, critic, tokenizer, optimizer,
                  scheduler, sampling_settings(args, policy, tokenizer))
    if args.resume:  # the weights came from the checkpoint folder (load_models, load_critic); now the rest
        saved = checkpoint.restore_checkpoint(
            os.path.join(args.run_dir, "checkpoint"), world_size=distributed.world()[1], main=distributed.is_main()
        )
        distributed.load_optimizer_state(policy, optimizer, saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if critic is not None:
            distributed.load_optimizer_state(critic.model, critic.optimizer, saved["critic_optimizer"])
            critic.scheduler.load_state_dict(saved["critic_scheduler"])
        state.next_iteration, state.best_val = saved["next_iteration"], saved["best_val_pass1"]
        state.saved_at = state.next_iteration
        if distributed.is_main():
            checkpoint.trim_metrics(os.path.join(args.run_dir, "metrics.jsonl"), state.next_iteration)
    if args.wandb and distributed.is_main():
        import wandb

        wandb.init(project="vineppo", config=dataclasses.asdict(args), resume="allow")
    return state


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help adds "(default: X)" to every option whose default is not None; a None default is filled in later (per
    data set, or from the machine) and the option's own help says how."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> Args:
    """Parse the command line, fill the per-dataset defaults and check the values."""
    (args,) = HfArgumentParser(Args, formatter_class=HelpFormatter).parse_args_into_dataclasses(args=argv)
    if args.dataset not in reward.DATASETS:
        raise SystemExit(f"error: unknown dataset {args.dataset!r}; choose one of {', '.join(reward.DATASETS)}")
    column = reward.DATASETS.index(args.dataset)
    for name, values in DATASET_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, values[column])
    args.run_dir = args.run_dir or os.path.join("runs", args.dataset)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.startswith("cuda")  # the one-GPU recipe's memory settings, which CPU runs can ask for too
    args.bf16 = cuda if args.bf16 is None else args.bf16
    args.gradient_checkpointing = cuda if args.gradient_checkpointing is None else args.gradient_checkpointing
    args.rl_seed = args.seed if args.rl_seed is None else args.rl_seed
    errors = check_args(args)
    if errors:
        raise SystemExit("\n".join(f"error: {e}" for e in errors))
    return args


# Options whose lowest allowed value is all there is to check: name -> (lowest, what 0 means if allowed)
AT_LEAST = {
    "num_iterations": (0, ""), "prompts_per_iteration": (1, ""), "samples_per_prompt": (1, ""),
    "num_mc_rollouts": (1, ""), "max_value_steps": (0, " (0: all)"), "max_new_tokens": (1, ""),
    "max_prompt_length": (1, ""), "num_epochs": (1, ""), "minibatch_size": (1, ""), "micro_batch_size": (1, ""),
    "sft_steps": (0, ""), "sft_batch_size": (1, ""), "eval_every": (0, " (0: never)"),
    "eval_problems": (0, " (0: all)"), "eval_samples": (1, ""), "value_diagnostic": (0, " (0: off)"),
    "diagnostic_rollouts": (1, ""), "log_samples": (0, " (0: off)"), "save_every": (0, ""),
    "stop_after": (0, " (0: run on)"), "threads": (0, " (0: torch's default)"),
    "dist_timeout": (1, ""), "grading_workers": (0, " (0: one per CPU core, at most 4; capped at the cores)"),
}


# Options that must be finite and > 0, finite and >= 0, or in [0, 1] (check_args).
POSITIVE = ("temperature", "max_grad_norm", "clip_eps", "value_clip", "sft_lr")
NON_NEGATIVE = ("lr", "kl_coef")
FRACTIONS = ("warmup_ratio", "sft_answer_only", "sft_slip", "sft_slip_each", "arithmetic_multiply")


def check_args(a: Args) -> list[str]:
    """Every option's allowed values, checked in one place before any work: one line per bad option."""
    errors = [
        f"--{name.replace('_', '-')} must be >= {low}{hint}, got {getattr(a, name)}"
        for name, (low, hint) in AT_LEAST.items()
        if getattr(a, name) < low
    ]
    if a.max_batch_tokens is not None and a.max_batch_tokens < 1:
        errors.append(f"--max-batch-tokens must be >= 1, got {a.max_batch_tokens}")
    finite, world_size = math.isfinite, int(os.environ.get("WORLD_SIZE", "1"))
    errors += [f"--{n.replace('_', '-')} must be > 0, got {getattr(a, n)}" for n in POSITIVE
               if not (getattr(a, n) > 0 and finite(getattr(a, n)))]
    errors += [f"--{n.replace('_', '-')} must be a finite number >= 0, got {getattr(a, n)}" for n in NON_NEGATIVE
               if not (getattr(a, n) >= 0 and finite(getattr(a, n)))]
    errors += [f"--{n.replace('_', '-')} is a fraction in [0, 1], got {getattr(a, n)}" for n in FRACTIONS
               if not 0 <= getattr(a, n) <= 1]
    rules = [
        (0 < a.top_p <= 1, f"--top-p is a probability mass in (0, 1], got {a.top_p}"),
        (a.max_length >= 3, f"--max-length must leave room for a prompt, an answer and EOS, got {a.max_length}"),
        (
            a.micro_batch_size < 1 or a.minibatch_size % a.micro_batch_size == 0,
            f"--minibatch-size ({a.minibatch_size}) must be a multiple of --micro-batch-size ({a.micro_batch_size})",
        ),
        (not a.sft_slip or a.dataset == "arithmetic", "--sft-slip is for --dataset arithmetic"),
        (not (a.sft_slip and a.sft_slip_each), "give --sft-slip (first multiplication) or --sft-slip-each, not both"),
        (a.arithmetic_steps >= 1, f"--arithmetic-steps must be >= 1, got {a.arithmetic_steps}"),
        (
            a.dataset == "arithmetic" or (a.sft_slip_each, a.arithmetic_steps, a.arithmetic_multiply) == (0, 3, 0.15),
            "--sft-slip-each, --arithmetic-steps and --arithmetic-multiply are for --dataset arithmetic",
        ),
        (
            a.advantage not in ("grpo", "rloo") or a.samples_per_prompt >= 2,
            f"--advantage {a.advantage} compares answers to one problem: needs --samples-per-prompt >= 2",
        ),
        (
            a.prompts_per_iteration % world_size == 0,
            f"--prompts-per-iteration {a.prompts_per_iteration} must divide by the number of processes "
            f"({world_size}): each takes an equal share of the prompts",
        ),
        (0 <= a.eval_temperature < math.inf, f"--eval-temperature must be >= 0 (0: greedy), got {a.eval_temperature}"),
        (a.device in ("cpu",) or a.device.startswith("cuda"), f"--device is cuda, cuda:N or cpu, got {a.device!r}"),
        (
            not a.device.startswith("cuda") or torch.cuda.is_available(),
            f"--device {a.device}, but this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu",
        ),
        (0 <= a.seed < 2**62, f"--seed must be in [0, 2**62), got {a.seed}"),
        (0 <= a.rl_seed < 2**62, f"--rl-seed must be in [0, 2**62), got {a.rl_seed}"),
    ]
    return errors + [message for ok, message in rules if not ok]


# What --resume lets differ from the saved run: options that draw no random number of training and change no
# setting of it. --device, --threads and --micro-batch-size can change float rounding only (so a run that ran out of
# memory resumes with a smaller micro-batch or KV cache: --max-batch-tokens moves no draw, rollout.uniforms),
# --gradient-checkpointing recomputes the same numbers; --eval-problems changes what is evaluated (and so which policy
# best/ keeps), not the training; the diagnostic and the logged samples draw from their own streams. Every other
# option must be the saved run's.
RESUME_MAY_DIFFER = {"resume", "stop_after", "device", "threads", "wandb", "eval_problems", "run_dir"}
RESUME_MAY_DIFFER |= {"value_diagnostic", "diagnostic_rollouts", "log_samples", "gradient_checkpointing"}
RESUME_MAY_DIFFER |= {"dist_timeout", "grading_workers", "micro_batch_size", "max_batch_tokens"}  # float rounding


# An out-of-memory error names the phase it came from (the innermost of these functions on its traceback) and the
# settings that lower that phase's memory (tools/memory_plan.py says what fits).
MEMORY_PHASES = {
    "micro_batch_backward": ("the PPO update", "--micro-batch-size, or turn on --gradient-checkpointing"),
    "old_and_ref_logprobs": ("the old and reference logprobs", "--micro-batch-size"),
    "critic_advantages": ("the critic's values", "--micro-batch-size"),
    "estimate_values": ("the MC value rollouts", "--max-batch-tokens"),
    "sample_and_grade": ("sampling answers", "--max-batch-tokens"),
    "evaluate": ("evaluation", "--max-batch-tokens"),
    "make_init": ("the supervised warm-up", "--sft-batch-size"),
    "load_models": ("loading the models", "nothing here: take a smaller model, or more GPUs with torchrun"),
}


def out_of_memory(error: BaseException) -> bool:
    """Is this a GPU's out-of-memory error, or the CPU allocator's (a RuntimeError)?"""
    return isinstance(error, torch.OutOfMemoryError) or "DefaultCPUAllocator" in str(error)


def out_of_memory_message(error: BaseException, args: Args) -> str:
    """The one line an out-of-memory error ends the run with: the phase, the settings to lower, and what is on disk
    (nothing of this invocation's unfinished iteration was saved; the checkpoint before it is intact)."""
    frames = [frame.name for frame in reversed(traceback.extract_tb(error.__traceback__))]
    phase, settings = next((MEMORY_PHASES[name] for name in frames if name in MEMORY_PHASES),
                           ("this run", "--max-batch-tokens or --micro-batch-size"))
    saved = os.path.join(args.run_dir, "checkpoint")
    if os.path.exists(os.path.join(saved, "trainer_state.pt")):
        disk = f"the checkpoint in {saved} is intact: continue with --resume and the lower setting"
    else:
        disk = f"no checkpoint was saved yet: start again with the lower setting (delete {args.run_dir} first)"
    return f"error: out of memory on {args.device} in {phase}: lower {settings} (tools/memory_plan.py); {disk}"


def load_data(args: Args) -> tuple[list[dict], list[dict], list[dict]]:
    """Train, validation and test problems (the last two cut to eval_problems), with a one-line error for a missing
    file, a bad row or an unreachable hub."""
    try:
        difficulty = {"num_steps": args.arithmetic_steps, "multiply": args.arithmetic_multiply}
        difficulty = difficulty if args.dataset == "arithmetic" else {}
        splits = [reward.load_problems(args.dataset, s, args.data_dir, **difficulty) for s in reward.SPLITS]
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    for name, problems in zip(("train", "validation", "test"), splits):
        if not problems and (name == "train" or args.eval_every):
            raise SystemExit(f"error: the {args.dataset} {name} split is empty; check --data-dir")
    return splits[0], splits[1][: args.eval_problems or None], splits[2][: args.eval_problems or None]


def longest_prompt(args: Args) -> int:
    """Prompts longer than this are dropped: --max-prompt-length, and room for one answer token and EOS."""
    return min(args.max_prompt_length, args.max_length - 2)


def check_prompts_fit(train_problems: list[reward.Problem], args: Args) -> None:
    """Stop before training if fewer than prompts_per_iteration training prompts fit (sample_problems)."""
    fit = sum(len(p.prompt_ids) <= longest_prompt(args) for p in train_problems)
    if fit < args.prompts_per_iteration:
        raise SystemExit(
            f"error: only {fit} of {len(train_problems)} training prompts are at most {longest_prompt(args)} tokens "
            f"(--max-prompt-length {args.max_prompt_length}, --max-length {args.max_length}), fewer than "
            f"--prompts-per-iteration {args.prompts_per_iteration}; raise the limits or lower that option"
        )


# The options that make run_dir/init (a tiny model and its SFT): init_args.json records them, and a later run that
# would reuse init/ with other values is refused (sft.check_init_record).
INIT_OPTIONS = ("dataset", "model", "data_dir", "seed", "max_length", "sft_steps", "sft_lr", "sft_batch_size")
INIT_OPTIONS += ("sft_answer_only", "sft_slip", "max_grad_norm", "bf16")  # --bf16: the SFT runs under autocast
INIT_OPTIONS += ("sft_slip_each", "arithmetic_steps", "arithmetic_multiply")


def start_model(args: Args) -> str:
    """Where the initial (SFT) policy lives: --model itself, or run_dir/init/ when this run makes it (sft.make_init)."""
    made_here = args.model == "tiny" or args.sft_steps > 0
    return os.path.join(args.run_dir, "init") if made_here else args.model


def load_models(args: Args, train_rows: list[dict]):
    """The policy to train and the frozen reference, the initial (SFT) policy (docs/paper.md §3; pitfall 13), made
    first when this run makes it (sft.make_init); with --resume the policy comes from run_dir/checkpoint/. No reference
    is loaded when kl_coef = 0. Under torchrun both are sharded (distributed.shard_model)."""
    start = start_model(args)
    if start != args.model and args.model != "tiny":  # the sampler's limits are checked before the SFT too
        check_sampler(checkpoint.load_config(args.model), args)
    if start != args.model:  # made here once, by rank 0, and kept with the options that made it (departure 4)
        sft.make_init(start, {name: getattr(args, name) for name in INIT_OPTIONS}, rows=train_rows, device=args.device,
                      check_fit=functools.partial(check_prompts_fit, args=args), main=distributed.is_main(),
                      autocast=functools.partial(autocast, args))
        distributed.wait_for_rank0()  # the other ranks wait (up to 6 hours) until rank 0 has made init/
    resume_from = os.path.join(args.run_dir, "checkpoint")
    policy, tokenizer = checkpoint.load_model(resume_from if args.resume else start, "cpu")
    check_sampler(policy, args)
    ppo.float32_head(policy)  # float32 logits under autocast too (ppo.py departure 7)
    if args.gradient_checkpointing:  # active in train mode only (ppo_update), where the KV cache is off
        policy.activation_checkpointing_enable()
    policy = distributed.shard_model(policy, args.device, bf16=args.bf16)  # before the reference: one host copy
    reference = None
    if args.kl_coef > 0:
        reference, _ = checkpoint.load_model(start, "cpu")
        reference.eval().requires_grad_(False)
        ppo.float32_head(reference)
        if args.bf16:  # it scores tokens exactly as the policy does, in about half the memory
            ppo.store_in_bf16(reference)
        reference = distributed.shard_model(reference, args.device, bf16=args.bf16)
    return policy, reference, tokenizer


def check_sampler(model_or_config, args: Args) -> None:
    """Stop in one line, before any SFT or sampling, if rollout.sample cannot run this model (a sliding window, too few
    positions for --max-length, an attention that is not Hugging Face's interface)."""
    try:
        if isinstance(model_or_config, torch.nn.Module):
            rollout.check_model(model_or_config, args.max_length)
        elif model_or_config is not None:
            rollout.check_config(model_or_config, args.max_length)
    except ValueError as e:
        raise SystemExit(f"error: --model {args.model}: {e}") from None


def autocast(args: Args):
    """bf16 autocast on the policy's device type with --bf16 (CUDA optional, one code path: the same code runs in
    float32 on CPU), else nothing: float32."""
    if args.bf16:
        return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_critic(args: Args) -> Critic | None:
    """With --advantage critic: a full copy of the initial (SFT) policy with a fresh value head (head seeded by
    rl_seed), and an AdamW at the policy's learning rate and schedule (docs/paper.md §3 "Critic", pitfall 16); with
    --resume, its saved weights (set_up loads its optimizer and schedule). Else None. Sharded under torchrun."""
    if args.advantage != "critic":
        return None
    body, _ = checkpoint.load_model(start_model(args), "cpu")
    model = ppo.ValueModel(body, generator=torch.Generator().manual_seed(args.rl_seed))
    if args.resume:
        model.load_state_dict(checkpoint.load_critic_weights(os.path.join(args.run_dir, "checkpoint")))
    if args.gradient_checkpointing:
        model.body.activation_checkpointing_enable()
    model = distributed.shard_model(model, args.device, bf16=args.bf16)
    return Critic(model, *make_optimizer(model, args))


def make_optimizer(policy, args: Args):
    """AdamW (betas 0.9, 0.999, eps 1e-8, no weight decay) with the warmup-then-linear-decay schedule (docs/paper.md
    §3)."""
    episodes_per_iteration = args.prompts_per_iteration * args.samples_per_prompt
    steps_per_iteration = args.num_epochs * math.ceil(episodes_per_iteration / args.minibatch_size)
    total_steps = args.num_iterations * steps_per_iteration
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: ppo.lr_lambda(s, warmup_steps=warmup_steps, total_steps=total_steps)
    )
    return optimizer, scheduler


if __name__ == "__main__":
    try:
        main()
    finally:  # the process is ending: a late Ctrl-C or SIGTERM must not change its exit code
        checkpoint.ignore_interrupts()
