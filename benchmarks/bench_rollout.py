"""Benchmark rollout.sample on CPU against the engine before issue 34 (loaded from git history) and Hugging Face
generate: tokens/s, and the counts that decide a GPU's time, which a CPU counts exactly (not a test; one run).

    python benchmarks/bench_rollout.py                        # every workload, ~25 minutes on 2 cores
    python benchmarks/bench_rollout.py --workloads gpu,mc --repeats 1
    python benchmarks/bench_rollout.py --quick                # smaller workloads, a smoke run
    python benchmarks/bench_rollout.py --before 1c238e4       # the engine to compare with (a git revision)

Model: a ~10M-parameter random Llama (hidden 256, 6 layers, vocab 8192) whose output weights are scaled by
LOGIT_SCALE so that, at T = 0.6, the top-p 0.9 nucleus holds ~6 tokens as a trained LM's does. A random model rarely
ends, so its answer lengths are set: an EOS bias (EOS_BIAS) spreads them from 0 to max_new_tokens (most workloads), or
in the GPU-shaped workload a hook (geometric_eos) makes EOS nearly certain at 1 position in ~100, chosen by the logits
themselves: lengths geometric, mean ~100, a tail to the 300-token cap, as a real model's continuations are.

Workloads (T = 0.6, top-p 0.9 unless greedy):
    gpu      16 answers x 5 nested states (100-300 tokens) x K = 9, up to 300 new tokens, --max-batch-tokens 32768:
             the MC rollouts shaped as on a GPU (issue 34)
    mc       32 answers x 5 nested states x K = 9, up to 200 new tokens, the default budget
    answers  64 prompts of 50-150 tokens x 8 samples, up to 100 new tokens
    plain    the 64 prompts x 1 sample, up to 200 new tokens; against one batched generate too
    small    8 of the prompts x 64 greedy tokens, EOS off; against generate
    fixed    64 prompts of 32 tokens x 64 tokens, EOS off, greedy and sampled; against generate
Each arm runs --repeats times, alternating; tok/s are medians, ratios the median of the per-repeat ratios. Then, from
one more run of each engine with counters on: forward passes, tokens per pass, host reads per pass (.tolist(),
.item(), bool(), int(), float() of a tensor: each waits for a GPU), and for the GPU-shaped workload ATen ops per
forward pass (a TorchDispatchMode) and casts of a weight per pass under bf16 autocast.
"""

import argparse
import contextlib
import functools
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import importlib.util

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import rollout  # noqa: E402

VOCAB, EOS = 8192, 2
LOGIT_SCALE, EOS_BIAS = 12.0, 10.0
BEFORE = "1c238e4"  # the last commit whose rollout.py and attention.py are the engine before issue 34
WORKLOADS = ("gpu", "mc", "answers", "plain", "small", "fixed")


def make_bench_model(seed: int = 0, geometric: bool = False):
    """The random Llama, output weights x LOGIT_SCALE; EOS_BIAS on its EOS logit, or the geometric_eos hook."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config).eval()
    head = torch.nn.Linear(256, VOCAB, bias=True)
    head.weight.data.copy_(model.lm_head.weight.data * LOGIT_SCALE)
    head.bias.data.zero_()
    if geometric:
        head.register_forward_hook(geometric_eos)
    else:
        head.bias.data[EOS] = EOS_BIAS
    model.lm_head = head
    return model


def geometric_eos(module, inputs, logits):
    """EOS nearly certain (its logit the largest + 20) at the positions whose logits' spread has a fractional digit
    pattern that 1 position in ~100 has: a pseudo-random function of the context, the same for every engine."""
    hit = torch.frac(logits.float().std(dim=-1) * 1e4) < 0.006
    logits[..., EOS] = torch.where(hit, logits.max(dim=-1).values + 20, logits[..., EOS])
    return logits


def load_before(revision: str):
    """rollout.py and attention.py at a git revision, as a module beside today's (its `import attention` bound to its
    own attention.py)."""
    folder = tempfile.mkdtemp()
    modules = {}
    for name in ("attention", "rollout"):
        path = os.path.join(folder, f"{name}.py")
        with open(path, "w") as f:
            f.write(subprocess.run(["git", "show", f"{revision}:{name}.py"], cwd=ROOT, capture_output=True, text=True,
                                   check=True).stdout)
        spec = importlib.util.spec_from_file_location(f"before_{name}", path)
        modules[name] = importlib.util.module_from_spec(spec)
        saved = sys.modules.get("attention")
        sys.modules["attention"] = modules.get("attention", saved)
        try:
            spec.loader.exec_module(modules[name])
        finally:
            sys.modules["attention"] = saved
    return modules["rollout"]


def workloads(quick: bool) -> dict:
    """name -> (prefixes, samples per prefix, max_new_tokens, greedy, EOS on, max_batch_tokens or None, geometric)."""
    g = torch.Generator().manual_seed(0)
    tokens = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731  no pad, BOS or EOS
    prompts = [tokens(int(n)) for n in torch.randint(50, 150, (64,), generator=g)]
    answers = [tokens(300) for _ in range(32)]
    short = [tokens(32) for _ in range(64)]
    states = lambda n: [a[:k] for a in answers[:n] for k in torch.linspace(100, 300, 5).long().tolist()]  # noqa: E731
    scale = 4 if quick else 1
    return {
        "gpu": (states(16 // scale), 9, 300 // scale, False, True, 32768 // scale, True),
        "mc": (states(32 // scale), 9, 200 // scale, False, True, None, False),
        "answers": (prompts[: 64 // scale], 8, 100 // scale, False, True, None, False),
        "plain": (prompts, 1, 200 // scale, False, True, None, False),
        "small": (prompts[:8], 1, 64, True, False, None, False),
        "fixed": (short, 1, 64, True, False, None, False),
        "fixed, sampled": (short, 1, 64, False, False, None, False),
    }


def run_engine(engine, model, job, seed: int):
    prefixes, k, new, greedy, eos, budget, _ = job
    decoding = dict(temperature=0.0, top_p=1.0) if greedy else dict(temperature=0.6, top_p=0.9)
    out = engine.sample(model, prefixes, num_samples=k, max_new_tokens=new, eos_token_id=EOS if eos else [],
                        generator=torch.Generator().manual_seed(seed), max_batch_tokens=budget or 2**18, **decoding)
    return sum(len(r) for r in out.response_ids)


def run_generate(model, job, seed: int):
    """Hugging Face generate on one left-padded batch; the tokens generated (EOS and what follows excluded)."""
    prefixes, k, new, greedy, eos, _, _ = job
    torch.manual_seed(seed)
    longest = max(len(p) for p in prefixes)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prefixes])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prefixes])
    decoding = dict(do_sample=False) if greedy else dict(do_sample=True, top_k=0, temperature=0.6, top_p=0.9)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, num_return_sequences=k,
                             eos_token_id=EOS if eos else None, pad_token_id=0, **decoding)
    new_ids = out[:, longest:]
    ended = (new_ids == EOS).long().cumsum(dim=1) > 0 if eos else torch.zeros_like(new_ids, dtype=torch.bool)
    return int((~ended).sum())


def timed(fn, *args) -> float:
    start = time.perf_counter()
    tokens = fn(*args)
    return tokens / (time.perf_counter() - start)


# What a weight's cast dispatches to: _to_copy, or under torch.inference_mode (which keeps it whole) to.dtype
CASTS = {torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout}


class Counts(TorchDispatchMode):
    """Within the block: forward passes of the model, host reads, ATen ops, casts of the model's weights."""

    def __init__(self, model, ops: bool):
        super().__init__()
        self.model, self.ops_on, self.weights = model, ops, {p.data_ptr() for p in model.parameters()}
        self.passes = self.reads = self.ops = self.casts = 0
        self.saved = {}

    def __enter__(self):
        self.hook = self.model.register_forward_pre_hook(lambda *a: setattr(self, "passes", self.passes + 1))
        for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
            original = self.saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, lambda t, *a, _f=original, **k: (self.read(), _f(t, *a, **k))[1])
        return super().__enter__() if self.ops_on else self

    def read(self):
        self.reads += 1

    def __exit__(self, *exc):
        self.hook.remove()
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)
        if self.ops_on:
            super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func in CASTS and args[0].data_ptr() in self.weights:
            self.casts += 1
        return func(*args, **(kwargs or {}))


def counted(engine, model, job, *, ops: bool = False, bf16: bool = False) -> dict:
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast, Counts(model, ops) as c:
        tokens = engine(model, job, 0) if callable(engine) else run_engine(engine, model, job, 0)
    return dict(tokens=tokens, passes=c.passes, reads=c.reads, ops=c.ops, casts=c.casts)


def bench(name, job, arms: dict, models: dict, repeats: int) -> None:
    """Alternating runs of every arm; medians, and each arm's ratio to the first (the engine now)."""
    model = models[job[-1]]
    tps = {arm: [] for arm in arms}
    for r in range(repeats):
        for arm, fn in arms.items():
            tps[arm].append(timed(fn, model, job, r))
    first = next(iter(arms))
    cells = [f"{arm} {statistics.median(v):6.0f} tok/s" + (
        "" if arm == first else f" (now/{arm} {statistics.median(a / b for a, b in zip(tps[first], v)):.2f}x)")
        for arm, v in tps.items()]
    print(f"  {name:15s} " + "   ".join(cells), flush=True)


def report_counts(name, job, engines: dict, models: dict, gpu: bool) -> None:
    model = models[job[-1]]
    for arm, engine in engines.items():
        c = counted(engine, model, job, ops=gpu)
        line = (f"  {name:15s} {arm:9s} passes {c['passes']:5d}  tokens/pass {c['tokens'] / c['passes']:6.1f}  "
                f"host reads/pass {c['reads'] / c['passes']:.2f}")
        if gpu:
            casts = counted(engine, model, job, bf16=True, ops=True)
            line += (f"  ATen ops/pass {c['ops'] / c['passes']:6.0f}  weight casts/pass under bf16 "
                     f"{casts['casts'] / casts['passes']:.2f} (first pass {len(list(model.parameters()))} weights)")
        print(line, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each arm (medians)")
    parser.add_argument("--before", default=BEFORE, help="git revision of the engine to compare with")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smaller workloads, a smoke run")
    parser.add_argument("--no-counts", action="store_true", help="tok/s only")
    cli = parser.parse_args(argv)
    asked = cli.workloads.split(",")
    unknown = set(asked) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
    torch.set_num_threads(cli.threads)
    before = load_before(cli.before)
    models = {False: make_bench_model(), True: make_bench_model(geometric=True)}
    jobs = {n: j for n, j in workloads(cli.quick).items() if n.split(",")[0] in asked}
    print(f"model: Llama 256x6, vocab {VOCAB}, {sum(p.numel() for p in models[False].parameters()) / 1e6:.1f}M "
          f"parameters; {torch.get_num_threads()} threads; the engine before: {cli.before}; {cli.repeats} repeats")
    print("\ntokens/s (alternating, medians):")
    for name, job in jobs.items():
        arms = {"now": functools.partial(run_engine, rollout), "before": functools.partial(run_engine, before)}
        if name.startswith(("plain", "small", "fixed")):
            arms["generate"] = run_generate
        bench(name, job, arms, models, cli.repeats)
    if not cli.no_counts:
        print("\ncounts (one run each):")
        for name, job in jobs.items():
            engines = {"now": rollout, "before": before}
            if name == "gpu":
                engines["generate"] = run_generate
            report_counts(name, job, engines, models, gpu=name == "gpu")


if __name__ == "__main__":
    main()
