"""One VinePPO iteration at the paper's sizes on one GPU: seconds, peak memory and tokens/s per phase, against the plan.

    python benchmarks/bench_gpu.py                          # CUDA: RhoMath-1.1B's shape, train.py's gsm8k sizes
    python benchmarks/bench_gpu.py --prompts 16 --max-new-tokens 512 --max-batch-tokens 65536    # a smaller GPU
    python benchmarks/bench_gpu.py --small                  # CPU: a tiny model and tiny sizes, a few seconds

What runs: a random-initialised model with RhoMath-1.1B's architecture (memory_plan.tinyllama_config: TinyLlama-1.1B,
22 layers, hidden 2048, 4 KV heads, vocabulary 32000; nothing is downloaded) is saved to a temporary folder and
loaded by train.load_models, so the policy (float32, gradient checkpointing on CUDA) and the bf16 reference are set
up exactly as for training (--small: train.py's CPU defaults, float32 and no checkpointing). Then train.py's own
functions run one iteration (docs/paper.md §1.1) with the Args that train.parse_args gives for --dataset gsm8k
(64 prompts x 8 answers, K = 9, micro-batch 8, max_new_tokens 1024, bf16 autocast; options below scale them down):
    sample answers      train.sample_and_grade (rollout.sample), then train.make_episodes
    HF generate         model.generate on the same prompts and settings, for comparison (not part of an iteration)
    MC values           train.vine_advantages (vine.estimate_values: K rollouts from every step state)
    old/ref logprobs    train.old_and_ref_logprobs, the first thing train.ppo_update does (timed apart by patching)
    PPO update          the rest of train.ppo_update: 2 epochs of minibatches of 64, micro-batches, AdamW steps
For each: seconds (torch.cuda.synchronize around the timer), peak GPU memory (torch.cuda.max_memory_allocated, reset
at the start of each phase), tokens (sampling: generated; logprobs: episode tokens, each through policy and
reference; PPO: episode tokens x epochs) and tokens/s; and on CUDA the peak that memory_plan.memory_plan predicts
for the phase (without AdamW moments before the first optimizer step: this is the first iteration). For the sampling
phases also what the engine did (Rollouts.stats): forward passes, ms and rows per decoding step, host reads per pass,
and on CUDA the synchronizing calls torch reports per pass (torch.cuda.set_sync_debug_mode). --out FILE appends each
row to FILE as one JSON line as soon as it is measured (benchmarks/gpu_check.py keeps what a time cap cuts).

What is synthetic, and why:
1. Prompts are random token ids, lengths uniform in --prompt-tokens (40-130 by default: GSM8K prompts with the
   paper's template are 149-446 characters from the 5th to the 95th percentile in data/gsm8k, at an assumed ~3.5
   characters per Llama token).
2. Lengths. A random model almost never samples EOS, so while sampling (inside sampling_eos: rollout.sample and our
   generate call) a forward hook on the LM head sets the EOS logit so that softmax(logits / T)[EOS] =
   1 / --mean-answer-tokens at every position (set_eos_probability). Answers and MC continuations are then
   geometric, mean 100 tokens by default (GSM8K solutions average 249 characters), a few up to max_new_tokens, like a
   real policy's long tail; a continuation is as long as an answer on average, where a trained model's only finishes
   the rest of a solution, so the MC phase generates up to ~2x a real one's tokens: compare tokens/s, not seconds.
   The logprob and training passes (not sampling) see the random model unchanged. A random model's next-token
   distribution is nearly flat, so top-p sorts the vocabulary at every step (rollout.sample_next_tokens), slower than
   the top-64 candidates a trained, peaked model's nucleus fits in.
3. Steps. The tokenizer (synthetic_tokenizer) is word-level with exactly the model's vocabulary, and every
   --newline-every-th token ends a line, so vine.split_steps finds ~1 + 100 / 40 = 3.5 steps per answer, as GSM8K
   solutions have (3.58 on average in data/gsm8k).
4. Rewards. No answer contains "####", so every answer is unfinished (no EOS appended) and the real grader scores
   everything 0. The answers' rewards are replaced by seeded random 0/1 so that advantages and the PPO loss are not
   all zero; the MC rollouts keep the real grader (all values 0, so the last step of a rewarded answer gets A = 1).

Untested here (written without a GPU): everything behind `if cuda`. Test: python -m pytest tests/test_bench_gpu.py.
"""

import argparse
import collections
import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import tempfile
import time
import warnings
from unittest import mock

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))  # memory_plan
import memory_plan  # noqa: E402
import reward  # noqa: E402
import rollout  # noqa: E402
import train  # noqa: E402

PHASES = ("sample answers", "HF generate", "MC values", "old/ref logprobs", "PPO update")
SAMPLING = [False]  # True inside sampling_eos: the EOS hook acts
# --small: train.py options for a few seconds on one CPU thread (as tests/conftest.py's TINY)
SMALL_ARGS = (
    "--prompts_per_iteration 4 --samples_per_prompt 2 --num_mc_rollouts 2 --max_new_tokens 24 --minibatch_size 4 "
    "--micro_batch_size 2"
).split()


def small_config() -> LlamaConfig:
    """A tiny Llama with TinyLlama's layout (GQA: 4 heads, 2 KV heads), for --small."""
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=2048,  # train.py's gsm8k --max-length (rotary: no table to fill)
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def synthetic_tokenizer(vocab_size: int, newline_every: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with exactly vocab_size tokens, as Llama's: <unk> 0, <s> 1, </s> 2 (no pad token:
    checkpoint.load_model makes EOS the pad), then " w3", " w4", ... where every newline_every-th word ends a line
    (" w40\\n"). decode() concatenates the words. Only decoding is used: prompts are token ids."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, vocab_size):
        vocab[f" w{i}" + ("\n" if i % newline_every == 0 else "")] = i
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@contextlib.contextmanager
def sampling_eos():
    """Within the block the EOS hook (set_eos_probability) acts: sampling, not the logprob or training passes."""
    SAMPLING[0] = True
    try:
        yield
    finally:
        SAMPLING[0] = False


def set_eos_probability(module, inputs, logits, *, eos_token_id: int, probability: float, temperature: float):
    """Forward hook of the LM head: while sampling (sampling_eos), set the EOS logit so that
    softmax(logits / T)[EOS] = probability at every position:
        l_EOS = T * (logsumexp_{v != EOS}(l_v / T) + log(p / (1 - p)))
    since then exp(l_EOS / T) / (exp(l_EOS / T) + sum_{v != EOS} exp(l_v / T)) = p. Other passes are left alone."""
    if not SAMPLING[0]:
        return None
    scaled = logits.float() / temperature  # (B, T, V)
    scaled[..., eos_token_id] = -math.inf
    others = torch.logsumexp(scaled, dim=-1)  # (B, T)
    logits[..., eos_token_id] = (temperature * (others + math.log(probability / (1 - probability)))).to(logits.dtype)
    return logits


def synthetic_problems(num_prompts: int, lengths: tuple[int, int], tokenizer, generator) -> list:
    """reward.Problem values of BOS + random word ids, lengths uniform in [lo, hi]; gold answer "0"."""
    problems = []
    for _ in range(num_prompts):
        length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=generator))
        words = torch.randint(3, len(tokenizer), (length - 1,), generator=generator).tolist()  # no special token
        problems.append(reward.Problem("", "0", "", [tokenizer.bos_token_id] + words))
    return problems


@contextlib.contextmanager
def measure(rows: dict, name: str, device: str, out: str | None = None):
    """Time the block and record rows[name] = {seconds, peak, tokens, engine, syncs}: peak is
    torch.cuda.max_memory_allocated over the block (None on CPU); engine sums the Rollouts.stats of every
    rollout.sample call in it; syncs counts the synchronizing calls torch reports on CUDA. The peak statistic is reset
    after the block too, so that an enclosing block's peak covers only what follows it. out: a file the row is
    appended to as a JSON line."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    row = rows.setdefault(name, {"seconds": 0.0, "peak": None, "tokens": 0, "engine": {}, "syncs": None})
    engine = collections.Counter()
    start = time.perf_counter()
    with recording(engine), warnings.catch_warnings(record=True) as caught:
        if cuda:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield row
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    if cuda:
        torch.cuda.synchronize()
        row["peak"] = torch.cuda.max_memory_allocated()
        row["syncs"] = sum("synchroniz" in str(w.message) for w in caught)
        torch.cuda.reset_peak_memory_stats()
    row["seconds"], row["engine"] = time.perf_counter() - start, dict(engine)
    append_row(out, name, row)


def append_row(out: str | None, name: str, row: dict) -> None:
    """Append one phase's row to the file out as a JSON line (nothing when out is None)."""
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"phase": name, **row}) + "\n")


@contextlib.contextmanager
def recording(engine: collections.Counter):
    """Within the block, every rollout.sample call adds its Rollouts.stats to engine."""
    sample = rollout.sample

    def recorded(*args, **kwargs):
        out = sample(*args, **kwargs)
        engine.update(out.stats)
        return out

    with mock.patch.object(rollout, "sample", recorded):
        yield


def measured_call(rows: dict, name: str, device: str, fn, *args, **kwargs):
    """fn(*args, **kwargs) inside measure(rows, name, device): patched over train.old_and_ref_logprobs."""
    with measure(rows, name, device):
        return fn(*args, **kwargs)


def generate_tokens(model, tokenizer, prompts: list[list[int]], *, num_samples: int, args, seed: int) -> int:
    """Hugging Face generate on the left-padded prompts, num_samples each, with the answers' sampling settings (T,
    top-p, no top-k, max_new_tokens, EOS; no stop strings) under the same autocast; the generated tokens, counted up
    to each row's first EOS (later positions are padding)."""
    longest, pad_token_id, eos_token_id = max(len(p) for p in prompts), tokenizer.pad_token_id, tokenizer.eos_token_id
    input_ids = torch.tensor([[pad_token_id] * (longest - len(p)) + p for p in prompts], device=args.device)
    attention_mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=args.device)
    torch.manual_seed(seed)  # generate draws from the global generator
    model.eval()
    with torch.inference_mode(), train.autocast(args), sampling_eos():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=0,
            max_new_tokens=args.max_new_tokens,
            num_return_sequences=num_samples,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
    new = out[:, longest:]  # (B * num_samples, T_new)
    return int(((new == eos_token_id).cumsum(dim=1) == 0).sum())


def run_iteration(policy, reference, tokenizer, args, cli) -> dict:
    """One iteration through train.py's functions, phase by phase (module docstring); returns the measurements."""
    rows, device, out = {}, args.device, cli.out
    generator = torch.Generator().manual_seed(cli.seed)
    problems = synthetic_problems(args.prompts_per_iteration, cli.prompt_tokens, tokenizer, generator)
    hook = functools.partial(
        set_eos_probability,
        eos_token_id=tokenizer.eos_token_id,
        probability=1.0 / cli.mean_answer_tokens,
        temperature=args.temperature,
    )
    policy.get_output_embeddings().register_forward_hook(hook)
    prompts = [p.prompt_ids for p in problems]
    # warm-up (CUDA kernels, cuBLAS handles) outside the timers, drawing from the global RNG, not the run's generator
    short = dataclasses.replace(args, max_new_tokens=2)
    sampling = train.sampling_settings(args, policy, tokenizer)
    state = train.State(policy, None, None, reference=reference, pad_id=tokenizer.pad_token_id, tokenizer=tokenizer,
                        sampling=sampling)
    warm = dataclasses.replace(sampling, temperature=1.0, max_new_tokens=2)
    with sampling_eos():
        train.sample_answers(state, prompts[:1], 1, warm, None, short)
    generate_tokens(policy, tokenizer, prompts[:1], num_samples=1, args=short, seed=0)
    # -------- sample answers: rollout.sample through train.py; rewards replaced by seeded random 0/1 (docstring 4)
    with measure(rows, "sample answers", device, out) as row, sampling_eos():
        rollouts, _ = train.sample_and_grade(state, problems, generator, args)
        num_answers = len(rollouts.response_ids)
        rewards = torch.randint(0, 2, (num_answers,), generator=torch.Generator().manual_seed(cli.seed)).tolist()
        episodes = train.make_episodes(tokenizer, problems, rollouts, [float(r) for r in rewards], args)
        row["tokens"] = sum(len(ids) for ids in rollouts.response_ids)
    # -------- the same prompts through Hugging Face generate (a comparison, not part of the iteration)
    if cli.generate_prompts != 0:
        with measure(rows, "HF generate", device, out) as row:
            some = prompts[: cli.generate_prompts]  # None: all
            row["tokens"] = generate_tokens(
                policy, tokenizer, some, num_samples=args.samples_per_prompt, args=args, seed=cli.seed
            )
    # -------- MC values of every step state and the advantages
    with measure(rows, "MC values", device, out) as row, sampling_eos():
        vine_stats = train.vine_advantages(state, problems, episodes, generator, args)
        row["tokens"] = vine_stats["vine/mc_tokens"]
    # -------- old/ref logprobs (timed apart, as a patched call) and the PPO update
    state.optimizer, state.scheduler = train.make_optimizer(policy, args)
    watched = policy.get_output_embeddings().weight
    before = watched.detach().to("cpu", copy=True)  # a CPU copy: the GPU peaks stay the model's own
    timed = functools.partial(measured_call, rows, "old/ref logprobs", device, train.old_and_ref_logprobs)
    with mock.patch.object(train, "old_and_ref_logprobs", timed), measure(rows, "PPO update", device) as row:
        ppo_stats = train.ppo_update(state, episodes, generator, args)
    row["seconds"] -= rows["old/ref logprobs"]["seconds"]  # ppo_update's time includes the patched call's
    episode_tokens = sum(len(e.prompt_ids) + len(e.response_ids) for e in episodes)
    rows["old/ref logprobs"]["tokens"] = episode_tokens
    row["tokens"] = args.num_epochs * episode_tokens
    append_row(out, "old/ref logprobs", rows["old/ref logprobs"])  # both rows once their numbers are final
    append_row(out, "PPO update", row)
    return {
        "rows": rows,
        "vine": vine_stats,
        "ppo": ppo_stats,
        "answers": rollouts,
        "longest_episode": max(len(e.prompt_ids) + len(e.response_ids) for e in episodes),
        "weight_change": float((watched.detach().cpu() - before).abs().max()),
    }


def planned_peaks(plan: dict) -> dict:
    """memory_plan's peak for each measured phase of a FIRST iteration: no AdamW moments exist before its first
    optimizer step, so they are left out of the phases that precede it."""
    first = plan["adam_moments"] + plan["critic_moments"]
    return {
        "sample answers": plan["sampling_peak"] - first,
        "MC values": plan["sampling_peak"] - first,
        "old/ref logprobs": plan["logprobs_peak"] - first,
        "PPO update": max(plan["training_peak"], plan["optimizer_peak"]),
    }


def format_rows(rows: dict, planned: dict, unit: tuple[int, str]) -> str:
    """The phase table: seconds, tokens, tokens/s, peak memory measured (CUDA) and planned, in unit = (bytes, name),
    and their ratio."""
    size, name = unit
    lines = [
        f"{'phase':18s} {'seconds':>8s} {'tokens':>10s} {'tokens/s':>9s} {'peak ' + name:>9s} {'plan ' + name:>9s}"
    ]
    lines[0] += " ratio"
    for phase in PHASES:
        if phase not in rows:
            continue
        r = rows[phase]
        peak = f"{r['peak'] / size:.2f}" if r["peak"] is not None else "-"
        plan = f"{planned[phase] / size:.2f}" if phase in planned else "-"
        ratio = f"{r['peak'] / planned[phase]:.2f}" if r["peak"] is not None and phase in planned else "-"
        speed = r["tokens"] / max(r["seconds"], 1e-9)
        lines.append(
            f"{phase:18s} {r['seconds']:8.2f} {r['tokens']:10d} {speed:9.0f} {peak:>9s} {plan:>9s} {ratio:>5s}"
        )
    return "\n".join(lines)


def format_engine(rows: dict) -> str:
    """What the engine did in each sampling phase: forward passes (decoding steps + prefill passes), ms and rows per
    decoding step, host reads per pass, synchronizing calls per pass (CUDA), rows preempted."""
    lines = ["\nengine (phase, passes = decoding steps + prefill passes, ms and rows per decoding step, host reads and "
             "syncs per pass, rows preempted):"]
    for phase in ("sample answers", "MC values"):
        e, seconds, syncs = rows[phase]["engine"], rows[phase]["seconds"], rows[phase]["syncs"]
        passes, steps = e.get("forward_passes", 0), max(e.get("decode_steps", 0), 1)
        if passes:
            lines.append(f"  {phase:15s} {passes:6d} = {steps} + {e['prefill_passes']}  "
                         f"{1000 * seconds / steps:7.1f} ms  "
                         f"{e['decoded_tokens'] / steps:7.1f} rows  {e['host_reads'] / passes:.2f} reads  "
                         f"{'-' if syncs is None else f'{syncs / passes:.2f}'} syncs  {e['preempted_rows']} preempted")
    return "\n".join(lines)


def parse_cli(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="CPU smoke run: tiny model, tiny sizes, same code path")
    parser.add_argument("--prompts", type=int, help="train.py --prompts-per-iteration (default: its gsm8k 64)")
    parser.add_argument("--samples", type=int, help="train.py --samples-per-prompt (default: 8)")
    parser.add_argument("--K", type=int, help="train.py --num-mc-rollouts (default: its gsm8k 9)")
    parser.add_argument("--max-new-tokens", type=int, help="train.py --max-new-tokens (default: its gsm8k 1024)")
    parser.add_argument("--micro-batch-size", type=int, help="train.py --micro-batch-size (default: its gsm8k 8)")
    parser.add_argument("--max-batch-tokens", type=int, help="train.py --max-batch-tokens (default: rollout's)")
    parser.add_argument("--mean-answer-tokens", type=float, help="mean answer length, 1 / P(EOS) (default 100)")
    parser.add_argument("--newline-every", type=int, help="one token in this many ends a line (default 40)")
    parser.add_argument("--prompt-tokens", type=int, nargs=2, help="prompt lengths, uniform (default 40 130)")
    parser.add_argument("--generate-prompts", type=int, help="prompts for HF generate (default all; 0: skip)")
    parser.add_argument("--seed", type=int, default=0, help="model weights, prompts, sampling, rewards")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: 1 with --small)")
    parser.add_argument("--out", help="append each phase's row to this file as a JSON line when it is measured")
    cli = parser.parse_args(argv)
    small = dict(mean_answer_tokens=8.0, newline_every=4, prompt_tokens=(6, 12), threads=1)
    full = dict(mean_answer_tokens=100.0, newline_every=40, prompt_tokens=(40, 130), threads=None)
    for name, value in (small if cli.small else full).items():
        if getattr(cli, name) is None:
            setattr(cli, name, value)
    return cli


def train_argv(cli, folder: str, device: str) -> list[str]:
    """train.py options: --dataset gsm8k defaults (the paper's sizes), --small's tiny ones, and the CLI's overrides."""
    argv = ["--dataset", "gsm8k", "--model", folder, "--run_dir", os.path.join(folder, "run"), "--device", device]
    argv += ["--sft_steps", "0"] + (SMALL_ARGS if cli.small else [])
    for option, value in [
        ("--prompts_per_iteration", cli.prompts),
        ("--samples_per_prompt", cli.samples),
        ("--num_mc_rollouts", cli.K),
        ("--max_new_tokens", cli.max_new_tokens),
        ("--micro_batch_size", cli.micro_batch_size),
        ("--max_batch_tokens", cli.max_batch_tokens),
    ]:
        if value is not None:
            argv += [option, str(value)]
    return argv


def main(argv: list[str] | None = None) -> dict:
    cli = parse_cli(argv)
    cuda = not cli.small
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: CUDA is not available; python benchmarks/bench_gpu.py --small runs the CPU smoke test")
    if cli.threads:
        torch.set_num_threads(cli.threads)
    config = small_config() if cli.small else memory_plan.tinyllama_config()
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(cli.seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)  # random init, float32, freed at once
        synthetic_tokenizer(config.vocab_size, cli.newline_every).save_pretrained(folder)
        args = train.parse_args(train_argv(cli, folder, "cuda" if cuda else "cpu"))
        if cuda:  # a warning before minutes of work: the plan at the longest possible sequences
            print_worst_case(config, args)
        policy, reference, tokenizer = train.load_models(args, [])
        results = run_iteration(policy, reference, tokenizer, args, cli)
    plan = memory_plan.memory_plan(
        config,
        gpu_bytes=torch.cuda.get_device_properties(0).total_memory if cuda else 0,
        micro_batch_size=args.micro_batch_size,
        seq_len=results["longest_episode"],
        max_batch_tokens=args.max_batch_tokens or rollout.DEFAULT_MAX_BATCH_TOKENS,
        gradient_checkpointing=args.gradient_checkpointing,
        reference=args.kl_coef > 0,
        bf16=args.bf16,
    )
    results["plan"] = plan
    print_report(results, config, args)
    return results


def print_worst_case(config, args) -> None:
    """The plan's peak at --max-length sequences on this GPU, and whether it fits."""
    plan = memory_plan.memory_plan(
        config,
        gpu_bytes=torch.cuda.get_device_properties(0).total_memory,
        micro_batch_size=args.micro_batch_size,
        seq_len=args.max_length,
        max_batch_tokens=args.max_batch_tokens or rollout.DEFAULT_MAX_BATCH_TOKENS,
        reference=args.kl_coef > 0,
    )
    gib, status = memory_plan.GiB, memory_plan.fit_status(plan["peak"], plan["usable"])
    print(
        f"memory plan, sequences of {args.max_length} tokens (the worst case): peak {plan['peak'] / gib:.1f} GiB "
        f"of {plan['gpu'] / gib:.1f} GiB, fits: {status} (python tools/memory_plan.py --help to explore)"
    )


def print_report(results: dict, config, args) -> None:
    """Everything measured, then the plan it is compared with."""
    rows, vine_stats, ppo_stats, answers = results["rows"], results["vine"], results["ppo"], results["answers"]
    plan = results["plan"]
    unit = (memory_plan.GiB, "GiB") if plan["peak"] >= memory_plan.GiB else (2**20, "MiB")  # MiB for --small
    device = (
        torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    )
    num_params = memory_plan.parameter_counts(config)["total"]
    print(
        f"\ndevice: {device}; model: random Llama, {num_params / 1e6:.1f}M parameters, vocabulary {config.vocab_size}"
    )
    print(
        f"sizes: {args.prompts_per_iteration} prompts x {args.samples_per_prompt} answers, K = {args.num_mc_rollouts}, "
        f"max_new_tokens {args.max_new_tokens}, micro-batch {args.micro_batch_size}, minibatch {args.minibatch_size}, "
        f"{args.num_epochs} epochs, max_batch_tokens {args.max_batch_tokens}, bf16 autocast {args.bf16}, gradient "
        f"checkpointing {args.gradient_checkpointing}\n"
    )
    print(format_rows(rows, planned_peaks(plan), unit))
    print(format_engine(rows))
    if "HF generate" in rows:
        ours = rows["sample answers"]["tokens"] / rows["sample answers"]["seconds"]
        theirs = rows["HF generate"]["tokens"] / rows["HF generate"]["seconds"]
        print(f"\nrollout.sample / HF generate, generated tokens/s: {ours:.0f} / {theirs:.0f} = {ours / theirs:.2f}x")
    lengths = [len(ids) for ids in answers.response_ids]
    at_limit = sum(not done for done in answers.finished) / len(lengths)
    print(
        f"answers: mean {sum(lengths) / len(lengths):.1f} tokens (max {max(lengths)}), {at_limit:.1%} at the length "
        f"limit; steps per answer {vine_stats['vine/mean_steps']:.2f}; states {vine_stats['vine/states_total']} "
        f"({vine_stats['vine/states_unique']} unique), MC rollouts {vine_stats['vine/mc_rollouts']}"
    )
    loss, grad_norm = ppo_stats.get("loss/total", math.nan), ppo_stats.get("grad_norm", math.nan)  # none: all skipped
    skipped, longest = ppo_stats["ppo/skipped_minibatches"], results["longest_episode"]
    print(
        f"PPO: loss {loss:.4g}, grad norm {grad_norm:.4g}, skipped minibatches {skipped}, LM head max |change| "
        f"{results['weight_change']:.2e}; longest episode {longest} tokens"
    )
    print(f"\nmemory plan (tools/memory_plan.py) for these settings, sequences of {longest} tokens:")
    for key, label in memory_plan.COMPONENTS:
        print(f"  {label:48s} {plan[key] / unit[0]:8.2f} {unit[1]}")
    if args.device.startswith("cuda"):
        status = memory_plan.fit_status(plan["peak"], plan["usable"])
        gib = memory_plan.GiB
        print(f"  steady-state peak {plan['peak'] / gib:.2f} GiB of {plan['gpu'] / gib:.1f} GiB: fits {status}")


if __name__ == "__main__":
    main()
