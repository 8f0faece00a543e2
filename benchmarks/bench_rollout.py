"""Benchmark rollout.sample against Hugging Face generate on CPU (not a test; prints numbers measured in one run).

    python benchmarks/bench_rollout.py            # full run, ~5 minutes on 2 quiet cores
    python benchmarks/bench_rollout.py --quick    # smoke mode, smaller workloads
    python benchmarks/bench_rollout.py --flat     # near-uniform next-token distributions (see below)
    python benchmarks/bench_rollout.py --workloads small,fixed --threads 1   # only the fixed-length workloads

Model: a ~10M-parameter random Llama (hidden 256, 6 layers, vocab 8192). Its output weights are scaled by LOGIT_SCALE
so that, at T=0.6, the top-p 0.9 nucleus holds ~6 tokens (median) as for a trained LM (--flat keeps the random init:
a near-uniform distribution, nucleus ~6000 of 8192 tokens, where top-p needs a large partial sort). A random model
rarely emits EOS, so the output layer gets a bias on the EOS logit (EOS_BIAS, tuned by hand): response lengths then
spread from 0 to max_new_tokens (measured with max_new_tokens=200: median ~120, ~45% reach the limit). Both engines
sample the same model with the same settings (T=0.6, top-p 0.9, no top-k), so they see the same length distribution.

Prints: (1) tokens/s of sample vs generate on one batch of 64 prompts; (2) an MC-shaped workload (answers x states x
K continuations, nested prefixes of 100-300 tokens) by prefix reuse vs a loop of generate(num_return_sequences=K) per
state; (3) achieved FLOP/s (2 x params x tokens/s) as a fraction of a measured float32 matmul; (4) float32 vs
bfloat16 weights for sample; (5) a small job, 8 prompts x 64 greedy tokens, and (6) 64 prompts of 32 tokens x 64 new
tokens, greedy and at T=0.6, against one batched generate. In (5) and (6) EOS is disabled in both engines, so every
row generates exactly 64 tokens and the two do the same work; each is repeated --repeats times, generate and sample
alternating, and the medians are printed (the ratio is the median of the per-repeat ratios). (7) the roots of the
MC workload (half of it) and of the answers (64 prompts x 8) shared in attention (attention.py) against copied into
every row, alternating, and the rows and cache of the largest chunk at the same --max-batch-tokens.
"""

import argparse
import os
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from rollout import find_roots, plan_chunks, sample  # noqa: E402

VOCAB, EOS = 8192, 2
LOGIT_SCALE, EOS_BIAS, EOS_BIAS_FLAT = 12.0, 10.0, 2.7
SETTINGS = dict(temperature=0.6, top_p=0.9)


def make_bench_model(seed: int = 0, flat: bool = False):
    """Llama-style random model, ~10.5M parameters, EOS made likely enough that response lengths vary.

    peaked (default): output weights x LOGIT_SCALE, so at T=0.6 the top-p 0.9 nucleus holds ~6 tokens (median), like
    a trained LM; flat: the random init, a near-uniform next-token distribution (nucleus ~6000 of 8192 tokens)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config).eval()
    head = torch.nn.Linear(256, VOCAB, bias=True)
    head.weight.data.copy_(model.lm_head.weight.data * (1.0 if flat else LOGIT_SCALE))
    head.bias.data.zero_()
    head.bias.data[EOS] = EOS_BIAS_FLAT if flat else EOS_BIAS
    model.lm_head = head
    return model


def count_matmul_params(model) -> int:
    """Parameters used in matmuls per token: everything except the input embedding table (a lookup)."""
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


def matmul_flops(dtype=torch.float32, n: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def run_generate(model, prefixes, *, num_samples, max_new_tokens, seed, greedy=False, eos=True):
    """Hugging Face generate on a left-padded batch; returns the number of generated tokens (EOS and later excluded).
    greedy: argmax instead of SETTINGS; eos=False: EOS does not stop a row (every row makes max_new_tokens)."""
    torch.manual_seed(seed)
    longest = max(len(p) for p in prefixes)
    input_ids = torch.tensor([[0] * (longest - len(p)) + p for p in prefixes])  # (B, T) left padding
    attention_mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prefixes])
    decoding = dict(do_sample=False) if greedy else dict(do_sample=True, top_k=0, **SETTINGS)
    stop = dict(eos_token_id=EOS if eos else None, pad_token_id=0)  # None: generate stops at the length limit only
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_samples,
            **stop,
            **decoding,
        )
    new = out[:, longest:]  # (B * num_samples, T_new)
    is_eos = (new == EOS).long().cumsum(dim=1) > 0 if eos else torch.zeros_like(new, dtype=torch.bool)
    return int((~is_eos).sum())  # EOS and everything after it (padding) excluded


def run_sample(model, prefixes, *, num_samples, max_new_tokens, seed, greedy=False, eos=True, shared=None):
    decoding = dict(temperature=0.0, top_p=1.0) if greedy else SETTINGS
    rollouts = sample(
        model,
        prefixes,
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        eos_token_id=EOS if eos else [],
        generator=torch.Generator().manual_seed(seed),
        shared=shared,
        **decoding,
    )
    return sum(len(r) for r in rollouts.response_ids)


def compare_fixed_length(model, prompts, *, max_new_tokens, greedy, repeats):
    """sample vs generate with EOS disabled (both make len(prompts) x max_new_tokens tokens), alternating, repeats
    times. Returns the median tokens/s of each and the median of the per-repeat ratios sample/generate."""
    kwargs = dict(num_samples=1, max_new_tokens=max_new_tokens, greedy=greedy, eos=False)
    tps_g, tps_s = [], []
    for r in range(repeats):
        tps_g.append(timed(run_generate, model, prompts, seed=r, **kwargs)[2])
        tps_s.append(timed(run_sample, model, prompts, seed=r, **kwargs)[2])
    ratio = statistics.median(s / g for s, g in zip(tps_s, tps_g))
    return statistics.median(tps_g), statistics.median(tps_s), ratio


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    tokens = fn(*args, **kwargs)
    seconds = time.perf_counter() - start
    return tokens, seconds, tokens / seconds


def parse_args() -> tuple[argparse.Namespace, set[str]]:
    """The command line, and the set of workloads it asks for (checked: flops and bf16 reuse others' numbers)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small workloads, a smoke run")
    parser.add_argument("--flat", action="store_true", help="near-uniform next-token distributions")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--workloads",
        default="plain,mc,flops,bf16,small,fixed,shared",
        help="comma-separated subset of plain (1), mc (2), flops (3, needs plain and mc), bf16 (4, "
        "needs plain), small (5), fixed (6), shared (7)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="repeats of workloads 5 and 6 (medians printed)")
    cli = parser.parse_args()
    workloads = set(cli.workloads.split(","))
    assert workloads <= {"plain", "mc", "flops", "bf16", "small", "fixed", "shared"}, f"unknown in {cli.workloads}"
    assert "flops" not in workloads or {"plain", "mc"} <= workloads, "flops needs plain and mc"
    assert "bf16" not in workloads or "plain" in workloads, "bf16 needs plain"
    return cli, workloads


def random_tokens(generator: torch.Generator, n: int) -> list[int]:
    """n token ids drawn uniformly from the vocabulary, leaving out pad, BOS and EOS (0, 1, 2)."""
    return torch.randint(3, VOCAB, (n,), generator=generator).tolist()


def draw_inputs(num_prompts: int, num_answers: int) -> tuple[list, list, list]:
    """Three lists of token ids from one seeded generator, drawn in this order: the prompts of workloads 1, 4 and 5
    (50-150 tokens), the answers whose prefixes are workload 2's states (300 tokens), workload 6's prompts (32)."""
    g = torch.Generator().manual_seed(0)
    prompts = [random_tokens(g, int(n)) for n in torch.randint(50, 150, (num_prompts,), generator=g)]
    answers = [random_tokens(g, 300) for _ in range(num_answers)]
    short_prompts = [random_tokens(g, 32) for _ in range(64)]
    return prompts, answers, short_prompts


def bench_plain(model, prompts, max_new: int) -> tuple[float, float]:
    """[1] plain sampling: one batch of the prompts, 1 sample each. Returns the tokens/s of generate and of sample."""
    tok_g, sec_g, tps_g = timed(run_generate, model, prompts, num_samples=1, max_new_tokens=max_new, seed=0)
    tok_s, sec_s, tps_s = timed(run_sample, model, prompts, num_samples=1, max_new_tokens=max_new, seed=0)
    print(
        f"\n[1] plain sampling, {len(prompts)} prompts of 50-150 tokens, max_new_tokens={max_new}, T=0.6 "
        f"top-p 0.9"
    )
    print(f"  generate: {tok_g:6d} tokens in {sec_g:6.2f} s = {tps_g:7.0f} tok/s")
    print(
        f"  sample:   {tok_s:6d} tokens in {sec_s:6.2f} s = {tps_s:7.0f} tok/s   ratio sample/generate = "
        f"{tps_s / tps_g:.2f}x"
    )
    return tps_g, tps_s


def bench_mc(model, answers, *, num_states: int, k: int, mc_new: int, quick: bool) -> float:
    """[2] the MC-shaped workload: answers x states x K, nested prefixes of 100-300 tokens, by sample with prefix
    reuse against a loop of generate(num_return_sequences=K) per state. Returns sample's tokens/s."""
    states = [a[:n] for a in answers for n in torch.linspace(100, 300, num_states).long().tolist()]
    tok_r, sec_r, tps_r = timed(run_sample, model, states, num_samples=k, max_new_tokens=mc_new, seed=1)
    # the naive loop is slow: time it on a subset of the states and scale to all of them (stated below)
    subset = states[:: 2 if quick else 8]  # every 8th: all 5 state lengths appear
    start, tok_n = time.perf_counter(), 0
    for i, state in enumerate(subset):
        tok_n += run_generate(model, [state], num_samples=k, max_new_tokens=mc_new, seed=100 + i)
    sec_n = (time.perf_counter() - start) * len(states) / len(subset)
    tps_n = tok_n * len(states) / len(subset) / sec_n
    print(
        f"\n[2] MC workload: {len(answers)} answers x {num_states} states (100-300 tokens) x K={k}, up to "
        f"{mc_new} new tokens"
    )
    print(
        f"  naive generate(num_return_sequences={k}) per state: {sec_n:7.2f} s (timed on {len(subset)} of "
        f"{len(states)} states, scaled) = {tps_n:6.0f} tok/s"
    )
    print(
        f"  sample, prefix reuse:                           {sec_r:7.2f} s ({tok_r} tokens) = {tps_r:6.0f} "
        f"tok/s"
    )
    print(f"  speed-up (tok/s ratio) = {tps_r / tps_n:.2f}x")
    return tps_r


def bench_shared(model, prompts, answers, *, num_states: int, k: int, mc_new: int, repeats: int) -> None:
    """[7] the roots read once (shared-prefix attention) against copied into every row, alternating, repeats times:
    the MC workload, the answers (64 prompts x 8), and what sample's rule picks for one sample per prompt (the copy);
    then, at the same --max-batch-tokens, the rows of the MC workload's largest chunk and its cache."""
    states = [a[:n] for a in answers for n in torch.linspace(100, 300, num_states).long().tolist()]
    jobs = [("MC workload", states, k, mc_new), ("answers, 64 prompts x 8", prompts, 8, mc_new),
            ("64 prompts x 1 (sample's rule)", prompts, 1, mc_new)]
    print(f"\n[7] roots shared in attention vs copied into every row, T=0.6 top-p 0.9, median of {repeats}")
    for name, prefixes, num_samples, new in jobs:
        shared_arm = None if num_samples == 1 else True  # one sample per prompt: what sample picks by itself
        tps = {False: [], shared_arm: []}
        for r in range(repeats):
            for arm in (False, shared_arm):
                tps[arm].append(timed(run_sample, model, prefixes, num_samples=num_samples, max_new_tokens=new,
                                      seed=r, shared=arm)[2])
        ratio = statistics.median(s / c for s, c in zip(tps[shared_arm], tps[False]))
        print(f"  {name:32s} copied {statistics.median(tps[False]):6.0f} tok/s   shared "
              f"{statistics.median(tps[shared_arm]):6.0f} tok/s   ratio {ratio:.2f}x")
    lens = [len(s) for s in states]
    roots = find_roots(states)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # float32 bytes per cached token
    for cap in (2**15, 2**18):
        for shared in (False, True):
            chunks = plan_chunks(lens, roots, num_samples=k, max_new_tokens=mc_new, max_batch_tokens=cap,
                                 shared=shared)
            biggest = max(chunks, key=len)
            longest, num_roots = max(lens[roots[i]] for i in biggest), len({roots[i] for i in biggest})
            rows = len(biggest) * k
            tokens = num_roots * longest + rows * mc_new if shared else rows * (longest + mc_new)
            print(f"  --max-batch-tokens {cap:6d}, {'shared' if shared else 'copied'}: {len(chunks):3d} chunks, the "
                  f"largest {len(biggest) * k:4d} rows, cache {tokens * kv / 2**20:6.1f} MiB")


def bench_flops(params: int, throughputs: list[tuple[str, float]]) -> None:
    """[3] the fraction of the machine's matmul throughput that each (name, tokens/s) of workloads 1 and 2 achieves."""
    flops32, flops16 = matmul_flops(torch.float32), matmul_flops(torch.bfloat16)
    print(f"\n[3] measured matmul: float32 {flops32 / 1e9:.1f} GFLOP/s, bfloat16 {flops16 / 1e9:.1f} GFLOP/s")
    for name, tps in throughputs:
        print(
            f"  {name:16s} 2 x {params / 1e6:.1f}M x {tps:6.0f} tok/s = {2 * params * tps / 1e9:5.2f} GFLOP/s = "
            f"{2 * params * tps / flops32:6.1%} of float32 matmul"
        )


def bench_bf16(flat: bool, prompts, max_new: int, tps_s: float) -> None:
    """[4] sample with bfloat16 weights on CPU on the plain workload, against its float32 tokens/s tps_s."""
    model_bf16 = make_bench_model(flat=flat).to(torch.bfloat16)
    tok_b, sec_b, tps_b = timed(run_sample, model_bf16, prompts, num_samples=1, max_new_tokens=max_new, seed=0)
    print(
        f"\n[4] sample with bfloat16 weights: {tok_b} tokens in {sec_b:.2f} s = {tps_b:.0f} tok/s; "
        f"bf16/fp32 = {tps_b / tps_s:.2f}x"
    )


def bench_fixed(model, prompts, short_prompts, workloads: set[str], repeats: int) -> None:
    """[5] and [6]: fixed-length jobs (EOS disabled) against one batched generate, medians of repeats runs."""
    fixed = []
    if "small" in workloads:
        fixed.append(("[5] small job: 8 prompts of 50-150 tokens x 64 new tokens, greedy", prompts[:8], True))
    if "fixed" in workloads:
        fixed.append(("[6] 64 prompts of 32 tokens x 64 new tokens, greedy", short_prompts, True))
        fixed.append(("[6] 64 prompts of 32 tokens x 64 new tokens, T=0.6 top-p 0.9", short_prompts, False))
    for name, job_prompts, greedy in fixed:
        tps_g, tps_s, ratio = compare_fixed_length(
            model, job_prompts, max_new_tokens=64, greedy=greedy, repeats=repeats
        )
        print(f"\n{name}, no EOS, median of {repeats}")
        print(f"  generate: {tps_g:7.0f} tok/s   sample: {tps_s:7.0f} tok/s   ratio sample/generate = {ratio:.2f}x")


def main():
    cli, workloads = parse_args()
    quick = cli.quick
    torch.set_num_threads(cli.threads)
    model = make_bench_model(flat=cli.flat)
    params = count_matmul_params(model)
    print(f"model: Llama 256x6, vocab {VOCAB}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters "
          f"({params / 1e6:.1f}M in matmuls); threads {torch.get_num_threads()}; quick={quick}; flat={cli.flat}")

    # prompts are drawn whatever --workloads says, so every workload sees the same ones in every run
    num_prompts, max_new = (64, 48) if quick else (64, 200)
    num_answers, num_states, k, mc_new = (8, 5, 9, 48) if quick else (32, 5, 9, 200)
    prompts, answers, short_prompts = draw_inputs(num_prompts, num_answers)
    run_sample(model, prompts[:4], num_samples=1, max_new_tokens=4, seed=0)  # warm-up
    run_generate(model, prompts[:4], num_samples=1, max_new_tokens=4, seed=0)

    if "plain" in workloads:
        tps_g, tps_s = bench_plain(model, prompts, max_new)
    if "mc" in workloads:
        tps_r = bench_mc(model, answers, num_states=num_states, k=k, mc_new=mc_new, quick=quick)
    if "flops" in workloads:
        bench_flops(params, [("generate, plain", tps_g), ("sample, plain", tps_s), ("sample, MC", tps_r)])
    if "bf16" in workloads:
        bench_bf16(cli.flat, prompts, max_new, tps_s)
    bench_fixed(model, prompts, short_prompts, workloads, cli.repeats)
    if "shared" in workloads:  # half the MC workload's answers and new tokens, 3 alternating repeats
        bench_shared(model, prompts, answers[: max(1, num_answers // 2)], num_states=num_states, k=k,
                     mc_new=mc_new // 2, repeats=3)


if __name__ == "__main__":
    main()
