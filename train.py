"""VinePPO training, the only script: Args, then main -> train -> one_iteration -> its phases in the order they run.
A reader who stops at the "Setup" banner has read the whole training loop.

    python train.py --dataset arithmetic                  # the CPU demo: a tiny model, SFT then VinePPO, 12-18 min
    python train.py --dataset gsm8k                       # the paper's GSM8K + RhoMath-1.1B recipe (one GPU)
    python train.py --help                                # every option, with its default
    torchrun --nproc_per_node 4 train.py --dataset gsm8k  # the same loop, data-parallel over 4 GPUs

sft.py makes the starting model, checkpoint.py holds resume and what a Ctrl-C does, distributed.py is torchrun.

Where this script departs from the paper's code:
1. Sampling runs in the training process (rollout.py), not in vLLM.
2. The ratio guard judges the whole minibatch and skips its optimizer step; the official code zeroes each
   micro-batch's loss and still steps AdamW (on its momentum).
3. Every sampled answer is an episode; the paper fills or subsamples to exactly 512 when some fail to parse.
4. --sft-*, --arithmetic-* and the arithmetic defaults are ours, for the CPU demo and the experiments.
5. float32 master weights under bf16 autocast on CUDA (the paper: bf16 weights, DeepSpeed's float32 master copy).
6. GRPO and RLOO take only their advantages from their papers; all else is this loop's.
7. The critic steps on every minibatch, also when the ratio guard skips the policy's; --value-diagnostic is ours.
8. Under torchrun the MC requests are not pooled and re-sharded across ranks (distributed.py).
"""

import argparse
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

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

# Args' None defaults per data set: the paper's recipes with RhoMath-1.1B (docs/paper.md §3, §9) and the CPU demo.
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
    """An Args field whose default is DATASET_DEFAULTS[name] for the data set (parse_args fills it), named in --help."""
    values = ", ".join(f"{value} ({dataset})" for dataset, value in zip(reward.DATASETS, DATASET_DEFAULTS[name]))
    return field(default=None, metadata={"help": f"{help} Default: {values}."})


@dataclass
class Args:
    # task and model
    dataset: str = option("gsm8k", "Task: gsm8k, math or arithmetic.")
    model: str = per_dataset("model", "A hub id, a local model folder, or 'tiny' (a ~1M-parameter Llama built here).")
    data_dir: str = option(None, "Folder of JSONL data (gsm8k/, math/; .gz too) or 'hub'. Default: data/ here.")
    run_dir: str = option(None, "Folder for checkpoints and metrics.jsonl. Default: runs/<dataset>.")
    resume: bool = option(False, "Continue the run saved in --run-dir exactly where it stopped.")
    seed: int = option(2746318213, "Seed of the starting model (tiny model, SFT) and of evaluation (the paper's).")
    rl_seed: int = option(None, "Seed of RL's random draws, so runs of one starting model differ in RL noise only. "
                          "Default: --seed.")
    advantage: str = option("vine", "Each token's advantage, all else equal. vine: MC values of step states (VinePPO); "
                            "critic: the paper's PPO (a value model, GAE lambda = 1); grpo: (R - mean) / std of the "
                            "problem's answers; rloo: R - mean R of its other answers.", choices=ADVANTAGES)
    arithmetic_steps: int = option(3, "Arithmetic only: steps (lines of working) per problem.")
    arithmetic_multiply: float = option(0.15, "Arithmetic only: chance that a step doubles or triples.")
    # the VinePPO iteration (docs/paper.md §9)
    num_iterations: int = per_dataset("num_iterations", "RL iterations.")
    prompts_per_iteration: int = option(64, "Problems sampled per iteration.")
    samples_per_prompt: int = option(8, "Answers sampled per problem (episodes = prompts x samples).")
    num_mc_rollouts: int = per_dataset("num_mc_rollouts", "K: Monte Carlo continuations per state for its value.")
    max_value_steps: int = per_dataset("max_value_steps", "Value at most this many step states (0: all).")
    temperature: float = option(0.6, "Sampling temperature for answers, MC rollouts and trainer logprobs.")
    top_p: float = option(0.9, "Nucleus sampling threshold for answers and MC rollouts.")
    max_new_tokens: int = per_dataset("max_new_tokens", "Most tokens in one answer or continuation.")
    max_length: int = per_dataset("max_length", "Most tokens in prompt + answer (+ EOS); longer ones are unfinished.")
    max_prompt_length: int = option(1512, "Problems with longer prompts are dropped.")
    # PPO (docs/paper.md §3)
    num_epochs: int = option(2, "PPO epochs over each iteration's episodes.")
    minibatch_size: int = option(64, "Episodes per optimizer step (advantages are whitened over it).")
    micro_batch_size: int = per_dataset("micro_batch_size", "Episodes per forward pass: memory only.")
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
    sft_answer_only: float = per_dataset("sft_answer_only", "Fraction of SFT solutions cut to the answer line.")
    sft_slip: float = option(0.0, "Arithmetic only: fraction of SFT solutions whose first multiplication is written "
                             "as an addition ('14 * 2 = 28' as '14 + 2 = 16') and carried through.")
    sft_slip_each: float = option(0.0, "Arithmetic only: chance that each multiplication of an SFT solution slips so.")
    # evaluation, logging, checkpoints
    eval_every: int = per_dataset("eval_every", "Evaluate every this many iterations and after the last; the best "
                                  "policy by validation Pass@1 goes to run_dir/best (0: never).")
    eval_problems: int = option(0, "Test and validation problems per evaluation (0: all, as the paper).")
    eval_samples: int = per_dataset("eval_samples", "Samples per problem for Pass@1 (the paper: 16).")
    eval_temperature: float = option(0.35, "Sampling temperature of the Pass@1 evaluation.")
    value_diagnostic: int = option(0, "Measure the values of this many answers' states per iteration against "
                                   "--diagnostic-rollouts rollouts each (paper §7; 0: off).")
    diagnostic_rollouts: int = option(64, "MC rollouts per state of the value diagnostic's reference values.")
    log_samples: int = option(4, "Answers per iteration saved with their steps' credit (tools/show_credit.py; 0: off).")
    save_every: int = option(10, "Checkpoint every this many iterations (and at the end, and on Ctrl-C).")
    stop_after: int = option(0, "Checkpoint and stop after this many iterations of this invocation (0: run on).")
    wandb: bool = option(False, "Also log to Weights & Biases (needs `pip install wandb`).")
    # hardware
    device: str = option(None, "cuda or cpu. Default: cuda when available. Float rounding differs by device.")
    bf16: bool = option(None, "bf16 autocast over float32 master weights (docs/gpu.md). Default: on for CUDA only.")
    gradient_checkpointing: bool = option(None, "Recompute activations in the backward pass: less memory, the same "
                                          "numbers. Default: on for CUDA, off on CPU.")
    max_batch_tokens: int = option(None, "Tokens the sampler's KV cache holds; lower it if sampling runs out of memory "
                                   "(it moves no draw). Default: on CUDA 90% of the free memory less the weights' bf16 "
                                   f"copies and a step's logits, on CPU {rollout.DEFAULT_MAX_BATCH_TOKENS}.")
    threads: int = option(0, "torch CPU threads (0: torch's default); float rounding only.")
    grading_workers: int = option(0, "MATH: processes that grade with math-verify (0: one per core, at most 4).")
    dist_timeout: int = option(1800, "torchrun: seconds a rank waits in a collective before the run fails.")


# ---------------------------------------------------------------------------------------------------------------------
# main -> train -> one_iteration


@dataclass
class State:
    """What the loop reads and updates, and where the run stands."""

    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    reference: torch.nn.Module | None = None  # the frozen initial (SFT) policy; None when --kl-coef 0
    critic: ppo.Critic | None = None  # --advantage critic only
    pad_id: int = 0
    tokenizer: PreTrainedTokenizerFast | None = None
    sampling: rollout.Sampling | None = None  # the answers' settings, which their MC rollouts share
    train_problems: list = field(default_factory=list)  # reward.Problem
    val_problems: list = field(default_factory=list)
    test_problems: list = field(default_factory=list)
    next_iteration: int = 0  # the policy holds the iterations before this one
    saved_at: int | None = None  # the next_iteration of the checkpoint on disk
    best_val: float = -1.0  # the best validation Pass@1 so far; best/ holds that policy


def main(argv: list[str] | None = None) -> None:
    """A run in its locked folder; a Ctrl-C or SIGTERM saves a checkpoint, which --resume continues (checkpoint.py)."""
    args = parse_args(argv)
    seed_everything(args)
    with distributed.process_group(args.device, args.dist_timeout) as device:  # torchrun: join the other ranks
        distributed.check_same_options(dataclasses.asdict(args))  # every rank was given the same command line
        args.device = device
        with checkpoint.open_run(
            args.run_dir, main=distributed.is_main(), resume=args.resume, run_args=dataclasses.asdict(args),
            may_differ=RESUME_MAY_DIFFER, defer=distributed.world()[1] > 1, defaults=option_defaults(args),
        ) as run:
            try:
                state = set_up(args)
                run.on_stop = functools.partial(save_checkpoint, state, args)  # what a stop saves from here on
                train(state, args)
            except (torch.OutOfMemoryError, RuntimeError) as e:  # one line that says what to lower, no traceback
                if not checkpoint.out_of_memory(e):
                    raise
                message = checkpoint.out_of_memory_message(e, MEMORY_PHASES, args.run_dir, args.device)
                raise SystemExit(message) from None


def train(state: State, args: Args) -> None:
    """The iterations from where the run stands (checkpointed when due), then the evaluation of the final policy."""
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
    checkpoint.print_run_files(args.run_dir, state.best_val)


def one_iteration(state: State, iteration: int, args: Args) -> dict:
    """One VinePPO iteration (docs/paper.md §1.1, §8). distributed.* is torchrun's: in one process it does nothing."""
    generator = seeded(args.rl_seed + iteration)  # a resumed run draws what an uninterrupted one does
    log = {"iteration": iteration}
    if args.eval_every and iteration % args.eval_every == 0:  # -------- evaluate, before the update: 0 is the start
        log.update(evaluate_and_keep_best(state, iteration, args))
    timer = time.time()
    with distributed.full_weights(state.policy):  # torchrun: whole weights, no collective while the ranks sample
        # -------- sample answers and grade them
        problems = distributed.shard(sample_problems(state.train_problems, iteration, args))  # this rank's share
        rollouts, rewards = sample_and_grade(state, problems, generator, args)
        episodes = make_episodes(state.tokenizer, problems, rollouts, rewards, args)
        log["time/sample"], timer = time.time() - timer, time.time()
        # -------- advantages: the one place the estimator is picked; everything downstream is shared
        if args.advantage == "vine":
            log.update(vine_advantages(state, problems, episodes, generator, args))
        elif args.advantage == "critic":  # the paper's PPO: V_old from the critic, GAE with lambda = 1
            with autocast(args), distributed.full_weights(state.critic.model):
                log.update(ppo.critic_advantages(state.critic.model, episodes, state.pad_id, args.micro_batch_size))
        else:  # GRPO or RLOO: one advantage per answer, from its problem's answers
            ppo.outcome_advantages(episodes, args.samples_per_prompt, args.advantage)
        log["time/values"], timer = time.time() - timer, time.time()
        if args.value_diagnostic:  # not the method: how good are the values?
            log.update(run_value_diagnostic(state, problems, episodes, iteration, args))
            log["time/diagnostic"], timer = time.time() - timer, time.time()
    log["tokens/answers"] = sum(len(ids) for ids in rollouts.response_ids)
    logged = pick_samples(episodes, iteration, args)  # the credit view's answers, drawn apart (below the banner)
    log = distributed.combine_logs(log, SUMMED_KEYS)  # torchrun: one log, and every rank gets every episode
    episodes = distributed.gather_list(episodes)
    log.update(reward.reward_signal([e.reward for e in episodes], samples_per_prompt=args.samples_per_prompt,
                                    dataset=args.dataset, iteration=iteration))
    # -------- PPO update and the log line: a Ctrl-C or SIGTERM waits until both are done (no half update)
    with checkpoint.uninterrupted(distributed.any_rank):
        log.update(ppo_update(state, episodes, generator, args))
        check_finite_weights(state, iteration)
        state.next_iteration = iteration + 1
        log["time/train"] = time.time() - timer
        log.update(ppo.episode_stats(episodes), lr=state.scheduler.get_last_lr()[0])
        write_log(log, args)
        write_samples(state.tokenizer, problems, episodes, logged, iteration, args)
    return log


# ---------------------------------------------------------------------------------------------------------------------
# Sampling and grading (docs/paper.md §1.1 steps 1-3, §4.3)


def sample_problems(train_problems: list[reward.Problem], iteration: int, args: Args) -> list[reward.Problem]:
    """The first prompts_per_iteration problems of the reshuffled train split whose prompt fits (docs/paper.md §3)."""
    order = random.Random(args.rl_seed + iteration).sample(range(len(train_problems)), len(train_problems))
    fitting = (train_problems[i] for i in order if len(train_problems[i].prompt_ids) <= longest_prompt(args))
    return list(itertools.islice(fitting, args.prompts_per_iteration))


def sample_answers(state: State, prompts, num_samples: int, sampling: rollout.Sampling, generator, args: Args):
    """rollout.sample under --bf16's autocast, with a progress bar on rank 0."""
    with autocast(args):
        return rollout.sample(state.policy, prompts, num_samples=num_samples, generator=generator,
                              tokenizer=state.tokenizer, show_progress=distributed.is_main(), **vars(sampling))


def sample_and_grade(state: State, problems, generator, args: Args):
    """samples_per_prompt answers per prompt (answer j of prompt i at i * samples_per_prompt + j), and rewards."""
    rollouts = sample_answers(state, [p.prompt_ids for p in problems], args.samples_per_prompt, state.sampling,
                              generator, args)
    golds = [p.answer for p in problems for _ in range(args.samples_per_prompt)]
    return rollouts, grade_all(state.tokenizer, rollouts, golds, args)


def grade_all(tokenizer, rollouts: rollout.Rollouts, answers: list[str], args: Args) -> list[float]:
    """R = grade(text), 0 for an unfinished answer (docs/paper.md pitfall 10), in one reward.grade_batch call."""
    texts = [tokenizer.decode(ids, **rollout.DECODE_KWARGS) if done else None  # None: unfinished, reward 0
             for ids, done in zip(rollouts.response_ids, rollouts.finished)]
    return reward.grade_batch(texts, answers, args.dataset)


def make_episodes(tokenizer, problems, rollouts: rollout.Rollouts, rewards: list[float], args: Args) -> list:
    """One Episode per answer, with its step map (vine.step_map, made once here); only finished answers end with EOS
    (docs/paper.md pitfall 10)."""
    episodes = []
    for i, ids in enumerate(rollouts.response_ids):
        prompt_ids = problems[i // args.samples_per_prompt].prompt_ids
        text = tokenizer.decode(ids, **rollout.DECODE_KWARGS)
        finished = rollouts.finished[i] and reward.counts_as_finished(text, args.dataset)
        eos = tokenizer.eos_token_id if rollouts.eos[i] is None else rollouts.eos[i]  # the end token it sampled
        response_ids = ids + [eos] if finished else list(ids)
        steps = vine.step_map(tokenizer, ids, args.dataset)
        episodes.append(ppo.Episode(prompt_ids, response_ids, finished, rewards[i], advantages=[], steps=steps))
    return episodes


# ---------------------------------------------------------------------------------------------------------------------
# Advantages: VinePPO's MC values (docs/paper.md §1.2, §1.3); the baselines' are in ppo.py


def vine_advantages(state: State, problems, episodes: list[ppo.Episode], generator, args: Args) -> dict:
    """MC values of every step state; A_i = r_i + V(s_{i+1}) - V(s_i) on every token of step i (docs/paper.md §1.2,
    §1.3)."""
    answers = [p for p in problems for _ in range(args.samples_per_prompt)]  # answer i's problem
    responses = [e.answer_ids for e in episodes]
    with autocast(args):
        values, stats = vine.estimate_values(
            state.policy, state.tokenizer, [p.prompt_ids for p in answers], responses, [e.steps for e in episodes],
            [p.answer for p in answers], args.dataset, num_mc_rollouts=args.num_mc_rollouts,
            max_value_steps=args.max_value_steps or None, sampling=state.sampling, generator=generator,
            show_progress=distributed.is_main(),
        )
    for e, v in zip(episodes, values):
        e.values = v
        step_advs = vine.step_advantages(v, e.reward, e.num_steps)
        e.advantages = vine.token_advantages(step_advs, e.steps)
        if e.finished:  # the EOS takes the last token's advantage (the last step's for an empty answer)
            e.advantages.append(e.advantages[-1] if e.steps else step_advs[-1])
    return stats


# ---------------------------------------------------------------------------------------------------------------------
# The PPO update (docs/paper.md §3, §8): old and reference logprobs once, then epochs x minibatches x micro-batches


def ppo_update(state: State, episodes: list[ppo.Episode], generator, args: Args) -> dict:
    """num_epochs passes over shuffled minibatches, one AdamW step each (the ratio guard skips one: departure 2).
    Returns the stats averaged over the steps."""
    old_and_ref_logprobs(state, episodes, args)
    distributed.same_generator(generator)  # torchrun: every rank draws rank 0's minibatches
    totals, num_steps, counts = {}, 0, {"skipped": 0, "nonfinite": 0, "empty": 0}
    critic = state.critic
    models = [m for m in (state.policy, critic.model if critic else None) if m is not None]
    for model in models:
        model.train()  # turns on gradient checkpointing; dropout is off (checkpoint.load_model)
    for _ in range(args.num_epochs):
        perm = torch.randperm(len(episodes), generator=generator).tolist()
        for start in range(0, len(perm), args.minibatch_size):
            minibatch = [episodes[i] for i in perm[start : start + args.minibatch_size]]
            if sum(len(e.response_ids) for e in minibatch) < 2:  # only empty answers: nothing to learn or whiten
                for scheduler in [state.scheduler] + ([critic.scheduler] if critic else []):
                    scheduler.step()  # the schedules advance as for a skip
                counts["empty"] += 1
                continue
            stats = minibatch_backward(state, minibatch, args)
            if critic is not None:
                stats["critic/grad_norm"], _ = clipped_step(critic.model, critic.optimizer, critic.scheduler,
                                                            stats["critic/loss"], args)
            if ppo.ratio_guard_exceeded(stats):  # the paper's guard, judged on the whole minibatch
                state.optimizer.zero_grad(set_to_none=True)
                state.scheduler.step()  # the schedule still advances, as in the paper
                counts["skipped"] += 1
                continue
            stats["grad_norm"], stepped = clipped_step(state.policy, state.optimizer, state.scheduler,
                                                       stats["loss/total"], args)
            counts["nonfinite"] += not stepped
            num_steps += stepped
            for k, v in stats.items() if stepped else ():
                totals[k] = totals.get(k, 0.0) + v
    for model in models:
        model.eval()
    out = {k: v / max(1, num_steps) for k, v in totals.items()}
    return out | {f"ppo/{kind}_minibatches": n for kind, n in counts.items()}


def old_and_ref_logprobs(state: State, episodes: list[ppo.Episode], args: Args) -> None:
    """pi_old and reference logprobs of every episode, once before the update (docs/paper.md pitfall 13)."""
    mine = distributed.shard(episodes)
    with torch.no_grad(), autocast(args), distributed.full_weights(state.policy, state.reference):
        for start in range(0, len(mine), args.micro_batch_size):
            chunk = mine[start : start + args.micro_batch_size]
            batch = ppo.make_batch(chunk, state.pad_id, args.device)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            old = ppo.token_logprobs(state.policy, ids, mask, args.temperature)  # (B, T-1)
            ref = None if state.reference is None else ppo.token_logprobs(state.reference, ids, mask, args.temperature)
            for j, e in enumerate(chunk):
                n = int(mask[j].sum()) - 1  # number of predicted positions of this episode
                e.old_logprobs = old[j, :n].cpu()
                e.ref_logprobs = ref[j, :n].cpu() if ref is not None else None
    distributed.share_fields(episodes, mine, ("old_logprobs", "ref_logprobs"))


def minibatch_backward(state: State, minibatch: list[ppo.Episode], args: Args) -> dict:
    """Gradients of one minibatch, summed over this rank's micro-batches (memory only: the whitening and normalisers
    are the minibatch's, docs/paper.md pitfalls 6, 7). Returns its stats."""
    full = ppo.make_batch(minibatch, state.pad_id, "cpu")
    whitened = ppo.masked_whiten(full["advantages"], full["mask"])  # (B, T-1) once over the whole minibatch
    ppo.keep_whitened(minibatch, whitened)  # the credit view's answers (pick_samples)
    counts = float(full["mask"].sum()), float(len(minibatch))  # response tokens and sequences of the minibatch
    stats = {}
    for rows, scale in distributed.micro_batches(len(minibatch), args.micro_batch_size):
        s = micro_batch_backward(state, minibatch, rows, whitened, counts, args, scale)
        stats = ppo.accumulate_stats(stats, s) if scale else stats
    return distributed.combine_stats(stats, ppo.accumulate_stats)


def micro_batch_backward(state: State, minibatch, rows: range, whitened, counts, args: Args, scale=1.0) -> dict:
    """Backward of scale x (clipped loss + KL) of minibatch[rows], and of the critic's loss. Returns their stats."""
    chunk = [minibatch[i] for i in rows]
    batch = ppo.make_batch(chunk, state.pad_id, args.device)
    width = batch["mask"].shape[1]
    old = ppo.pad_rows([e.old_logprobs for e in chunk], width).to(args.device)
    ref = None  # no reference model when kl_coef = 0
    if chunk[0].ref_logprobs is not None:
        ref = ppo.pad_rows([e.ref_logprobs for e in chunk], width).to(args.device)
    adv = whitened[rows.start : rows.stop, :width].to(args.device)
    with autocast(args):
        logprobs, entropy = ppo.token_logprobs(
            state.policy, batch["input_ids"], batch["attention_mask"], args.temperature, return_entropy=True
        )
    loss, stats = ppo.ppo_loss(logprobs, old, adv, batch["mask"], clip_eps=args.clip_eps, ref_logprobs=ref,
                               kl_coef=args.kl_coef, num_tokens=counts[0], num_seqs=counts[1])
    (loss * scale).backward()
    stats["policy/entropy"] = float((entropy * batch["mask"]).sum()) / counts[0]
    if state.critic is not None:  # the paper's PPO: the critic learns on the same micro-batch (docs/paper.md §3)
        with autocast(args):
            value_loss, critic_stats = ppo.critic_loss(state.critic.model, chunk, batch, clip_range=args.value_clip,
                                                       num_tokens=counts[0])
        (value_loss * scale).backward()
        stats.update(critic_stats)
    return stats


def clipped_step(model, optimizer, scheduler, loss: float, args: Args) -> tuple[float, bool]:
    """Clip the gradient norm and step unless the loss or the norm is not finite; the schedule advances either way.
    Returns the norm and whether it stepped."""
    grad_norm = distributed.clip_grad_norm(model, args.max_grad_norm)  # the global norm, also from shards
    stepped = math.isfinite(grad_norm) and math.isfinite(loss)
    if stepped:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, stepped


# =====================================================================================================================
# Setup: seeds, options, data, models (the supervised warm-up is sft.py's), optimizers, resume. The loop ends above.


# Every draw comes from a generator seeded for its purpose, so that none shifts another: iteration i's RL draws from
# rl_seed + i, evaluation's, the diagnostic's and the logged samples' from (seed or rl_seed) + OFFSET * (i + 1).
EVAL_SEED_OFFSET = 1_000_003
DIAGNOSTIC_SEED_OFFSET = 7_000_003
SAMPLES_SEED_OFFSET = 11_000_003


def seeded(seed: int) -> torch.Generator:
    """A generator for this rank's draws from seed (distributed.rank_seed)."""
    return torch.Generator().manual_seed(distributed.rank_seed(seed))


def seed_everything(args: Args) -> None:
    """cleanrl's seeding block: the global generators from --seed (the tiny model, SFT), and torch's threads."""
    random.seed(args.seed)
    np.random.seed(args.seed % 2**32)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)


def set_up(args: Args) -> State:
    """Data, models, optimizers and, with --resume, the checkpoint's state."""
    distributed.barrier()  # the other ranks wait for rank 0's check of the run folder
    print(json.dumps(dataclasses.asdict(args), indent=1))
    if args.grading_workers:
        reward.set_grading_workers(args.grading_workers)
    rows = load_data(args)  # train, validation, test: reward.load_problems' dicts
    policy, reference, tokenizer = load_models(args, rows[0])
    train_problems, val_problems, test_problems = (reward.to_problems(split, tokenizer, args.dataset) for split in rows)
    check_prompts_fit(train_problems, args)
    if args.device.startswith("cuda") and args.max_batch_tokens is None:  # what rollout.sample sizes its KV cache to
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        tokens = rollout.default_budget(policy, dtype, torch.device(args.device))
        print(f"sampling: a KV cache of {tokens} tokens now (rollout.default_budget; --max-batch-tokens sets it)")
    critic = load_critic(args)
    optimizer, scheduler = make_optimizer(policy, args)
    state = State(policy, optimizer, scheduler, reference, critic, tokenizer.pad_token_id, tokenizer,
                  sampling_settings(args, policy, tokenizer), train_problems, val_problems, test_problems)
    if args.resume:  # the weights came with load_models and load_critic
        restore(state, args)
    if args.wandb and distributed.is_main():
        import wandb

        wandb.init(project="vineppo", config=dataclasses.asdict(args), resume="allow")
    return state


def restore(state: State, args: Args) -> None:
    """The optimizers, schedules and iteration of run_dir/checkpoint/."""
    saved = checkpoint.restore_checkpoint(
        os.path.join(args.run_dir, "checkpoint"), world_size=distributed.world()[1], main=distributed.is_main()
    )
    distributed.load_optimizer_state(state.policy, state.optimizer, saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    if state.critic is not None:
        distributed.load_optimizer_state(state.critic.model, state.critic.optimizer, saved["critic_optimizer"])
        state.critic.scheduler.load_state_dict(saved["critic_scheduler"])
    state.next_iteration, state.best_val = saved["next_iteration"], saved["best_val_pass1"]
    state.saved_at = state.next_iteration
    if distributed.is_main():
        checkpoint.trim_metrics(os.path.join(args.run_dir, "metrics.jsonl"), state.next_iteration)


def sampling_settings(args: Args, model, tokenizer) -> rollout.Sampling:
    """The answers' sampling settings, which their MC rollouts share (docs/paper.md pitfall 1); EOS fits max_length."""
    return rollout.Sampling(
        args.temperature, args.top_p, args.max_new_tokens, eos_token_id=tuple(rollout.stop_token_ids(model, tokenizer)),
        max_length=args.max_length - 1, stop_strings=reward.STOP_STRINGS, max_batch_tokens=args.max_batch_tokens,
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help adds "(default: X)" to an option unless it is None (filled in later, as the option's help says)."""

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
    cuda = args.device.startswith("cuda")
    args.bf16 = cuda if args.bf16 is None else args.bf16
    args.gradient_checkpointing = cuda if args.gradient_checkpointing is None else args.gradient_checkpointing
    args.rl_seed = args.seed if args.rl_seed is None else args.rl_seed
    errors = check_args(args)
    if errors:
        raise SystemExit("\n".join(f"error: {e}" for e in errors))
    return args


def option_defaults(args: Args) -> dict:
    """Every option's default for this data set: what --resume gives an option added since the run started."""
    return dataclasses.asdict(parse_args(["--dataset", args.dataset]))


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
POSITIVE = ("temperature", "max_grad_norm", "clip_eps", "value_clip", "sft_lr")  # finite and > 0
NON_NEGATIVE = ("lr", "kl_coef")  # finite and >= 0
FRACTIONS = ("warmup_ratio", "sft_answer_only", "sft_slip", "sft_slip_each", "arithmetic_multiply")  # in [0, 1]


def check_args(a: Args) -> list[str]:
    """Every option's allowed values, checked before any work: one line per bad option."""
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
        (a.micro_batch_size < 1 or a.minibatch_size % a.micro_batch_size == 0,
         f"--minibatch-size ({a.minibatch_size}) must be a multiple of --micro-batch-size ({a.micro_batch_size})"),
        (not a.sft_slip or a.dataset == "arithmetic", "--sft-slip is for --dataset arithmetic"),
        (not (a.sft_slip and a.sft_slip_each), "give --sft-slip (first multiplication) or --sft-slip-each, not both"),
        (a.arithmetic_steps >= 1, f"--arithmetic-steps must be >= 1, got {a.arithmetic_steps}"),
        (a.dataset == "arithmetic" or (a.sft_slip_each, a.arithmetic_steps, a.arithmetic_multiply) == (0, 3, 0.15),
         "--sft-slip-each, --arithmetic-steps and --arithmetic-multiply are for --dataset arithmetic"),
        (a.advantage not in ("grpo", "rloo") or a.samples_per_prompt >= 2,
         f"--advantage {a.advantage} compares answers to one problem: needs --samples-per-prompt >= 2"),
        (a.prompts_per_iteration % world_size == 0,
         f"--prompts-per-iteration {a.prompts_per_iteration} must divide by the number of processes "
         f"({world_size}): each takes an equal share of the prompts"),
        (0 <= a.eval_temperature < math.inf, f"--eval-temperature must be >= 0 (0: greedy), got {a.eval_temperature}"),
        (a.device in ("cpu",) or a.device.startswith("cuda"), f"--device is cuda, cuda:N or cpu, got {a.device!r}"),
        (not a.device.startswith("cuda") or torch.cuda.is_available(),
         f"--device {a.device}, but this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu"),
        (0 <= a.seed < 2**62, f"--seed must be in [0, 2**62), got {a.seed}"),
        (0 <= a.rl_seed < 2**62, f"--rl-seed must be in [0, 2**62), got {a.rl_seed}"),
    ]
    return errors + [message for ok, message in rules if not ok]


# What --resume lets differ from the saved run: options that change no draw and no setting of training (float
# rounding at most: a run that ran out of memory resumes with less); --eval-problems changes what best/ keeps.
RESUME_MAY_DIFFER = {"resume", "stop_after", "device", "threads", "wandb", "eval_problems", "run_dir", "dist_timeout"}
RESUME_MAY_DIFFER |= {"value_diagnostic", "diagnostic_rollouts", "log_samples", "gradient_checkpointing"}
RESUME_MAY_DIFFER |= {"grading_workers", "micro_batch_size", "max_batch_tokens"}


def load_data(args: Args) -> tuple[list[dict], list[dict], list[dict]]:
    """Train, validation and test problems (the last two cut to eval_problems), or a one-line error."""
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
    """Longer prompts are dropped: --max-prompt-length, and room for one answer token and EOS."""
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


# The options that make run_dir/init (the tiny model and its SFT), kept in its init_args.json (sft.check_init_record).
INIT_OPTIONS = ("dataset", "model", "data_dir", "seed", "max_length", "sft_steps", "sft_lr", "sft_batch_size")
INIT_OPTIONS += ("sft_answer_only", "sft_slip", "max_grad_norm", "bf16", "sft_slip_each", "arithmetic_steps")
INIT_OPTIONS += ("arithmetic_multiply",)


def start_model(args: Args) -> str:
    """Where the initial (SFT) policy lives: --model, or run_dir/init/ when this run makes it (sft.make_init)."""
    made_here = args.model == "tiny" or args.sft_steps > 0
    return os.path.join(args.run_dir, "init") if made_here else args.model


def load_models(args: Args, train_rows: list[dict]):
    """The policy to train and the frozen reference, the initial (SFT) policy (docs/paper.md pitfall 13)."""
    start = start_model(args)
    if start != args.model and args.model != "tiny":  # the sampler's limits are checked before the SFT too
        check_sampler(checkpoint.load_config(args.model), args)
    if start != args.model:  # made here once, by rank 0 (departure 4)
        sft.make_init(start, {name: getattr(args, name) for name in INIT_OPTIONS}, rows=train_rows, device=args.device,
                      check_fit=functools.partial(check_prompts_fit, args=args), main=distributed.is_main(),
                      autocast=functools.partial(autocast, args))
        distributed.wait_for_rank0()
    resume_from = os.path.join(args.run_dir, "checkpoint")
    policy, tokenizer = checkpoint.load_model(resume_from if args.resume else start, "cpu")
    check_sampler(policy, args)
    ppo.float32_head(policy)  # float32 logits under autocast too (ppo.py departure 7)
    if args.gradient_checkpointing:  # in train mode only (ppo_update)
        policy.activation_checkpointing_enable()
    policy = distributed.shard_model(policy, args.device, bf16=args.bf16)  # before the reference: one host copy
    reference = None
    if args.kl_coef > 0:
        reference, _ = checkpoint.load_model(start, "cpu")
        reference.eval().requires_grad_(False)
        ppo.float32_head(reference)
        if args.bf16:  # scores as the policy does, in half the memory
            ppo.store_in_bf16(reference)
        reference = distributed.shard_model(reference, args.device, bf16=args.bf16)
    return policy, reference, tokenizer


def check_sampler(model_or_config, args: Args) -> None:
    """Stop in one line, before any SFT or sampling, if rollout.sample cannot run this model (rollout.check_model)."""
    try:
        if isinstance(model_or_config, torch.nn.Module):
            rollout.check_model(model_or_config, args.max_length)
        elif model_or_config is not None:
            rollout.check_config(model_or_config, args.max_length)
    except ValueError as e:
        raise SystemExit(f"error: --model {args.model}: {e}") from None


def autocast(args: Args):
    """bf16 autocast on the policy's device type with --bf16 (on CPU too: one code path), else nothing: float32."""
    if args.bf16:
        return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_critic(args: Args) -> ppo.Critic | None:
    """--advantage critic: the SFT policy with a fresh value head (docs/paper.md §3, pitfall 16) and its AdamW."""
    if args.advantage != "critic":
        return None
    body, _ = checkpoint.load_model(start_model(args), "cpu")
    model = ppo.ValueModel(body, generator=torch.Generator().manual_seed(args.rl_seed))
    if args.resume:
        model.load_state_dict(checkpoint.load_critic_weights(os.path.join(args.run_dir, "checkpoint")))
    if args.gradient_checkpointing:
        model.body.activation_checkpointing_enable()
    model = distributed.shard_model(model, args.device, bf16=args.bf16)
    return ppo.Critic(model, *make_optimizer(model, args))


def make_optimizer(policy, args: Args):
    """AdamW (betas 0.9, 0.999, eps 1e-8, no weight decay) with ppo.lr_lambda's schedule (docs/paper.md §3)."""
    episodes_per_iteration = args.prompts_per_iteration * args.samples_per_prompt
    steps_per_iteration = args.num_epochs * math.ceil(episodes_per_iteration / args.minibatch_size)
    total_steps = args.num_iterations * steps_per_iteration
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: ppo.lr_lambda(s, warmup_steps=warmup_steps, total_steps=total_steps)
    )
    return optimizer, scheduler


# =====================================================================================================================
# Around the loop: evaluation, the log line, the credit view, the value diagnostic, checkpoints, a stop for memory


def evaluate_and_keep_best(state: State, iteration: int, args: Args) -> dict:
    """Evaluate; the scores to run_dir/evals/ (tools/compare_runs.py), the policy to run_dir/best/ when its validation
    Pass@1 is the run's best."""
    start = time.time()
    metrics = evaluate(state, iteration, args)
    per_problem = metrics.pop("per_problem", None)
    if per_problem is not None and distributed.is_main():
        checkpoint.write_text(os.path.join(args.run_dir, "evals", f"{iteration}.json"), json.dumps(per_problem))
    if metrics["eval/val_pass1"] > state.best_val:
        state.best_val = metrics["eval/val_pass1"]
        weights = distributed.full_state_dict(state.policy)  # torchrun: gathered on rank 0 (every rank takes part)
        if distributed.is_main():
            best_dir = os.path.join(args.run_dir, "best")
            best = {"best.json": {"iteration": iteration, **metrics}}
            checkpoint.save_folder(best_dir, state.policy, state.tokenizer, best, state_dict=weights)
            print(f"saved {best_dir} (validation Pass@1 {state.best_val:.4f}, iteration {iteration})")
    metrics["time/eval"] = time.time() - start
    return metrics


def evaluate(state: State, iteration: int, args: Args) -> dict:
    """Test and validation Pass@1 (docs/paper.md §4.5) and greedy test accuracy, drawn from --seed and the iteration
    only, so that runs of one starting model are evaluated alike (paired)."""
    generator = seeded(args.seed + EVAL_SEED_OFFSET * (iteration + 1))
    metrics, per_problem = {}, {}
    with distributed.full_weights(state.policy):
        for name, problems, num_samples, temperature in [
            ("eval/pass1", state.test_problems, args.eval_samples, args.eval_temperature),
            ("eval/greedy", state.test_problems, 1, 0.0),
            ("eval/val_pass1", state.val_problems, args.eval_samples, args.eval_temperature),
        ]:
            mine = distributed.shard(problems)
            sampling = dataclasses.replace(state.sampling, temperature=temperature)
            outs = sample_answers(state, [p.prompt_ids for p in mine], num_samples, sampling, generator, args)
            rewards = grade_all(state.tokenizer, outs, [p.answer for p in mine for _ in range(num_samples)], args)
            scores = np.array(distributed.gather_list(rewards)).reshape(len(problems), num_samples)
            metrics[name], per_problem[name] = float(scores.mean()), scores.mean(axis=1).tolist()
            checkpoint.stop_point(distributed.any_rank)  # torchrun: a deferred stop ends the run between the splits
    return {**metrics, "per_problem": per_problem}


# Log keys that are counts: the ranks' values add up (distributed.combine_logs).
SUMMED_KEYS = {"tokens/answers", "vine/states_total", "vine/states_unique", "vine/mc_rollouts", "vine/mc_tokens"}
SUMMED_KEYS |= {"diag/states"}


def write_log(log: dict, args: Args) -> None:
    """Rank 0: print the log as one line, as nanoGPT does, and append it to run_dir/metrics.jsonl (and wandb)."""
    if not distributed.is_main():
        return
    print(" | ".join([f"it {log['iteration']}"] + [f"{k} {v:.4g}" for k, v in log.items() if k != "iteration"]))
    with open(os.path.join(args.run_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(log) + "\n")
    if args.wandb:
        import wandb

        wandb.log(log, step=log["iteration"])


def pick_samples(episodes: list[ppo.Episode], iteration: int, args: Args) -> list[int]:
    """Rank 0's --log-samples episodes, drawn apart, marked so that the update keeps their whitened advantages."""
    if not args.log_samples or not distributed.is_main():
        return []
    generator = seeded(args.rl_seed + SAMPLES_SEED_OFFSET * (iteration + 1))
    picked = sorted(torch.randperm(len(episodes), generator=generator)[: args.log_samples].tolist())
    for i in picked:
        episodes[i].whitened = []
    return picked


def write_samples(tokenizer, problems, episodes: list[ppo.Episode], picked, iteration: int, args) -> None:
    """The picked answers with vine.credit_record's steps to run_dir/samples/ (for tools/show_credit.py) and wandb."""
    if not picked:
        return
    records = []
    for i in picked:
        e, problem = episodes[i], problems[i // args.samples_per_prompt]
        records.append({
            "iteration": iteration, "answer_index": i, "estimator": args.advantage, "question": problem.question,
            "gold": problem.answer, "reward": e.reward, "finished": e.finished, **vine.credit_record(tokenizer, e),
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


def run_value_diagnostic(state: State, problems, episodes: list[ppo.Episode], iteration: int, args: Args) -> dict:
    """vine.value_diagnostic of --value-diagnostic answers, drawn apart (training draws the same)."""
    generator = seeded(args.rl_seed + DIAGNOSTIC_SEED_OFFSET * (iteration + 1))
    picked = torch.randperm(len(episodes), generator=generator)[: args.value_diagnostic].tolist()
    answers = [problems[i // args.samples_per_prompt] for i in picked]
    steps = [episodes[i].steps for i in picked]  # each answer's step map (make_episodes)
    responses = [episodes[i].answer_ids for i in picked]
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


def check_finite_weights(state: State, iteration: int) -> None:
    """Stop, saving nothing, if an update left a non-finite weight."""
    for name, model in (("policy", state.policy), ("critic", state.critic.model if state.critic else None)):
        if model is not None and not distributed.all_finite(model):
            raise SystemExit(
                f"error: the {name}'s weights are not finite after the update of iteration {iteration}; stopped "
                "without saving them, so the last checkpoint is intact. Lower --lr, or check the data"
            )


def save_checkpoint(state: State, args: Args) -> None:
    """checkpoint.save_checkpoint of the run as it stands, unless the one on disk holds it (rank 0 writes)."""
    if state.saved_at == state.next_iteration:
        return
    critic = None
    if state.critic is not None:
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


# An out-of-memory error names its phase (the innermost of these on its traceback) and what to lower.
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


if __name__ == "__main__":
    try:
        main()
    finally:  # a late Ctrl-C or SIGTERM must not change the exit code
        checkpoint.ignore_interrupts()
