"""The GPU check: what only a GPU can test, in one command that fits a short loan (at most ~8 minutes, nothing
downloaded), every row printed and appended to --out as soon as it is measured, so a stop keeps what ran.

    python benchmarks/gpu_check.py                    # on CUDA; writes runs/gpu_check.md
    python benchmarks/gpu_check.py --small            # the same on CPU with tiny sizes (tests/test_gpu_check.py)

CI runs every line of the one-GPU code path on CPU (bf16 autocast, the reference, gradient checkpointing:
tests/test_bf16.py). What is left for a GPU is what this runs, in order, each step in a subprocess with a time cap
(CAPS, seconds; a step cut by its cap leaves a row that says so):
1. tests    python -m pytest -m cuda: tests/test_cuda.py (CUDA autocast's logprobs on a model with large logits, the
            reference equal to the policy under bf16, a CUDA run). On CPU they skip.
2. sdpa     which scaled_dot_product_attention kernel CUDA runs for the prefill's mask and for the training batches.
3. bench    benchmarks/bench_gpu.py at reduced sizes (BENCH_ARGS: 16 prompts x 4 answers, K = 9, up to 512 new tokens)
            on a random RhoMath-1.1B-shaped model: per phase seconds, tokens/s, peak memory against the plan, and for
            the sampling phases ms and rows per decoding step, host reads and synchronizing calls per forward pass.
4. train    train.py itself, 2 iterations of --advantage vine and of critic with --bf16 --gradient-checkpointing, on a
            random model of RhoMath-1.1B's layout whose vocabulary is a byte-level BPE trained here on the shipped
            GSM8K questions (8,000 tokens), on GSM8K prompts: 8 prompts x 4 answers, K = 3, 192 new tokens. A random
            model scores 0, so this checks that the loop runs, fits and stays finite, not that it learns.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_gpu
sys.path.insert(0, str(ROOT / "tools"))  # memory_plan
import bench_gpu  # noqa: E402
import memory_plan  # noqa: E402
import reward  # noqa: E402
import sft  # noqa: E402

CAPS = {"tests": 150, "bench": 170, "train": 60}  # seconds per step (train: per estimator); ~7.5 minutes in all
TRAIN_SIZES = {  # step 4: train.py options on the GPU, and with --small
    False: "--prompts_per_iteration 8 --samples_per_prompt 4 --num_mc_rollouts 3 --max_new_tokens 192 "
    "--max_length 640 --minibatch_size 16 --micro_batch_size 8",
    True: "--prompts_per_iteration 2 --samples_per_prompt 2 --num_mc_rollouts 2 --max_new_tokens 16 "
    "--max_length 400 --minibatch_size 4 --micro_batch_size 2 --threads 1",
}
BENCH_ARGS = {False: "--prompts 16 --samples 4 --K 9 --max-new-tokens 512 --generate-prompts 4", True: "--small"}
COLUMNS = ("check", "ok", "result", "seconds", "peak GiB", "ms/step", "rows/step", "reads/pass", "syncs/pass")


def run(command: list[str], cap: float) -> tuple[subprocess.CompletedProcess | None, float]:
    """A subprocess in the repository, cut after cap seconds (then None); its time."""
    start = time.time()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=cap)
    except subprocess.TimeoutExpired:
        done = None
    return done, time.time() - start


def check_tests(cuda: bool) -> list[dict]:
    """Step 1: the CUDA-marked tests; the summary line of pytest is the result."""
    done, seconds = run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"], CAPS["tests"])
    if done is None:
        return [{"check": "tests -m cuda", "ok": False, "result": f"cut at {CAPS['tests']} s", "seconds": seconds}]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else done.stderr.strip()[-200:]
    ok = done.returncode == 0 or (not cuda and "skipped" in summary and "failed" not in summary)
    return [{"check": "tests -m cuda", "ok": ok, "result": summary, "seconds": seconds}]


def check_sdpa(cuda: bool) -> list[dict]:
    """Step 2: the SDPA kernel that runs, found in the profiler's op names, for a prefill (4D boolean mask) and a
    training batch (right-padded, as Hugging Face builds its mask) of RhoMath-1.1B's head shape in bf16."""
    if not cuda:
        return [{"check": "sdpa kernel", "ok": True, "result": "CPU: not checked", "seconds": 0.0}]
    start, kernels = time.time(), []
    q = torch.randn(4, 32, 128, 64, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(4, 1, 128, 128, device="cuda", dtype=torch.bool).tril()
    for name, kwargs in (("prefill, 4D mask", dict(attn_mask=mask)), ("causal, no mask", dict(is_causal=True))):
        with torch.profiler.profile() as prof:
            torch.nn.functional.scaled_dot_product_attention(q, q, q, **kwargs)
        ops = [e.key for e in prof.key_averages() if "scaled_dot_product" in e.key and "_scaled" in e.key]
        kernels.append(f"{name}: {ops[0].removeprefix('aten::') if ops else 'none'}")
    return [{"check": "sdpa kernel", "ok": True, "result": "; ".join(kernels), "seconds": time.time() - start}]


def check_bench(small: bool) -> list[dict]:
    """Step 3: bench_gpu.py in a subprocess, its rows read from the file it appends to, however far it got."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "rows.jsonl")
        done, seconds = run([sys.executable, "benchmarks/bench_gpu.py", *BENCH_ARGS[small].split(), "--out", out],
                            CAPS["bench"])
        measured = [json.loads(line) for line in open(out)] if os.path.exists(out) else []
    rows = [bench_row(r) for r in measured]
    if done is None or done.returncode != 0:
        why = f"cut at {CAPS['bench']} s" if done is None else done.stderr.strip()[-300:]
        rows.append({"check": "bench", "ok": False, "result": f"{len(measured)} phases measured; {why}",
                     "seconds": seconds})
    return rows


def bench_row(r: dict) -> dict:
    """A table row from one of bench_gpu.py's JSON lines."""
    e, seconds = r["engine"], r["seconds"]
    row = {"check": f"bench: {r['phase']}", "ok": seconds > 0 and r["tokens"] > 0, "seconds": seconds,
           "result": f"{r['tokens']} tokens, {r['tokens'] / max(seconds, 1e-9):.0f} tok/s", "peak": r["peak"]}
    if e.get("decode_steps"):
        passes, steps = e["forward_passes"], e["decode_steps"]
        row.update({"ms/step": 1000 * seconds / steps, "rows/step": e["decoded_tokens"] / steps,
                    "reads/pass": e["host_reads"] / passes})
        if r["syncs"] is not None:
            row["syncs/pass"] = r["syncs"] / passes
    return row


def make_model(folder: str, small: bool) -> None:
    """Step 4's start: a tokenizer trained on the GSM8K questions and solutions, and a random model of
    RhoMath-1.1B's layout (--small: bench_gpu's tiny one) with that vocabulary, saved to folder."""
    problems = reward.load_problems("gsm8k", "train")
    tokenizer = sft.build_tiny_tokenizer([p["question"] + p["solution"] for p in problems],
                                         vocab_size=512 if small else 8000)
    config = bench_gpu.small_config() if small else memory_plan.tinyllama_config()
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0  # build_tiny_tokenizer's ids
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def check_train(folder: str, advantage: str, small: bool, device: str) -> list[dict]:
    """Step 4: train.py --dataset gsm8k on the random model for 2 iterations: finite losses, moved weights."""
    run_dir = os.path.join(folder, f"run_{advantage}")
    argv = ["--dataset", "gsm8k", "--model", folder, "--sft_steps", "0", "--num_iterations", "2", "--eval_every",
            "0", "--advantage", advantage, "--bf16", "--gradient_checkpointing", "--device", device, "--run_dir",
            run_dir, "--log_samples", "2"] + TRAIN_SIZES[small].split()
    done, seconds = run([sys.executable, "train.py", *argv], CAPS["train"])
    check = f"train: {advantage}"
    if done is None or done.returncode != 0:
        why = f"cut at {CAPS['train']} s" if done is None else done.stderr.strip()[-300:]
        return [{"check": check, "ok": False, "result": why, "seconds": seconds}]
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    finite = all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)
    before = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    after = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "checkpoint")).state_dict()
    moved = any(not torch.equal(before[k], after[k]) for k in before)
    tokens = sum(r["tokens/answers"] + r.get("vine/mc_tokens", 0) for r in rows)
    result = f"{len(rows)} iterations, {tokens} tokens generated, losses finite {finite}, weights moved {moved}"
    return [{"check": check, "ok": finite and moved and len(rows) == 2, "result": result, "seconds": seconds}]


def format_row(r: dict) -> str:
    cell = lambda key, fmt: "-" if r.get(key) is None else format(r[key], fmt)  # noqa: E731
    gib = lambda key: "-" if r.get(key) is None else f"{r[key] / memory_plan.GiB:.2f}"  # noqa: E731
    return (f"| {r['check']} | {'yes' if r['ok'] else 'NO'} | {r['result']} | {r['seconds']:.1f} | {gib('peak')} | "
            f"{cell('ms/step', '.1f')} | {cell('rows/step', '.0f')} | {cell('reads/pass', '.2f')} | "
            f"{cell('syncs/pass', '.2f')} |")


def emit(rows: list[dict], out: Path) -> list[dict]:
    """Print the rows and append them to the table in out, as soon as a step has them."""
    with open(out, "a") as f:
        for r in rows:
            print(format_row(r), flush=True)
            f.write(format_row(r) + "\n")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="CPU: the same checks with tiny sizes (a test)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check.md", help="where the table goes")
    cli = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not cli.small
    if not cli.small and not cuda:
        raise SystemExit("error: CUDA is not available; python benchmarks/gpu_check.py --small runs it on CPU")
    device, name = ("cuda", torch.cuda.get_device_name(0)) if cuda else ("cpu", "CPU (--small)")
    cli.out.parent.mkdir(parents=True, exist_ok=True)
    header = [f"GPU check on {name}, {time.strftime('%Y-%m-%d %H:%M')}", "", "| " + " | ".join(COLUMNS) + " |",
              "|" + "---|" * len(COLUMNS)]
    cli.out.write_text("\n".join(header) + "\n")
    print("\n".join(header), flush=True)
    rows = emit(check_tests(cuda), cli.out) + emit(check_sdpa(cuda), cli.out) + emit(check_bench(cli.small), cli.out)
    with tempfile.TemporaryDirectory() as folder:
        make_model(folder, cli.small)
        for advantage in ("vine", "critic"):
            rows += emit(check_train(folder, advantage, cli.small, device), cli.out)
    print(f"wrote {cli.out}")
    return rows


if __name__ == "__main__":
    main()
