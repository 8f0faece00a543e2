"""The GPU check: what only a GPU can test, in one command that fits a short loan (~8 minutes, nothing downloaded).

    python benchmarks/gpu_check.py                    # on CUDA; writes runs/gpu_check.md
    python benchmarks/gpu_check.py --small            # the same on CPU with tiny sizes (tests/test_gpu_check.py)

CI runs every line of the one-GPU code path on CPU (bf16 autocast, the bf16 reference, gradient checkpointing:
tests/test_bf16.py). What is left for a GPU is what this runs, in order:
1. tests    python -m pytest -m cuda: tests/test_cuda.py (CUDA autocast's logprobs, a CUDA run, CPU = CUDA in float32).
            On CPU they skip.
2. bench    benchmarks/bench_gpu.py, one iteration at the paper's sizes on a random RhoMath-1.1B-shaped model with
            HF generate on 8 prompts only: per phase, seconds and torch.cuda.max_memory_allocated beside the peak
            that tools/memory_plan.py predicts (--small: bench_gpu.py --small).
3. train    train.py itself, 2 iterations of --advantage vine and of critic with --bf16 --gradient-checkpointing, on a
            random model of RhoMath-1.1B's layout (22 layers, hidden 2048, 32 heads, 4 KV heads) whose vocabulary is
            a byte-level BPE trained here on the shipped GSM8K questions (sft.build_tiny_tokenizer, 8,000
            tokens instead of 32,000), on GSM8K prompts: 8 prompts x 4 answers, K = 3, 192 new tokens. A random model
            scores 0, so this checks that the loop runs, fits and stays finite, not that it learns.
Then one table (check, result, seconds, peak GiB, planned GiB), printed and written to --out.
"""

import argparse
import json
import math
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
import train  # noqa: E402

TRAIN_SIZES = {  # step 3: train.py options on the GPU, and with --small
    False: "--prompts_per_iteration 8 --samples_per_prompt 4 --num_mc_rollouts 3 --max_new_tokens 192 "
    "--max_length 640 --minibatch_size 16 --micro_batch_size 8",
    True: "--prompts_per_iteration 2 --samples_per_prompt 2 --num_mc_rollouts 2 --max_new_tokens 16 "
    "--max_length 400 --minibatch_size 4 --micro_batch_size 2 --threads 1",
}
BENCH_ARGS = {False: ["--generate-prompts", "8"], True: ["--small"]}


def run_tests(cuda: bool) -> dict:
    """Step 1: the CUDA-marked tests, in a subprocess; the summary line of pytest is the result."""
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"], cwd=ROOT,
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else done.stderr.strip()[-200:]
    ok = done.returncode == 0 or (not cuda and "skipped" in summary and "failed" not in summary)
    return {"check": "tests -m cuda", "ok": ok, "result": summary, "seconds": time.time() - start}


def run_bench(small: bool) -> list[dict]:
    """Step 2: bench_gpu.py's iteration, a row per phase with the measured and the planned peak."""
    results = bench_gpu.main(BENCH_ARGS[small])
    planned = bench_gpu.planned_peaks(results["plan"])
    rows = []
    for phase in [p for p in bench_gpu.PHASES if p in results["rows"]]:
        r = results["rows"][phase]
        ok = r["seconds"] > 0 and r["tokens"] > 0
        rows.append({"check": f"bench: {phase}", "ok": ok, "result": f"{r['tokens']} tokens",
                     "seconds": r["seconds"], "peak": r["peak"], "plan": planned.get(phase)})
    return rows


def make_model(folder: str, small: bool) -> None:
    """Step 3's start: a tokenizer trained on the GSM8K questions and solutions, and a random model of
    RhoMath-1.1B's layout (--small: bench_gpu's tiny one) with that vocabulary, saved to folder."""
    problems = reward.load_problems("gsm8k", "train")
    tokenizer = sft.build_tiny_tokenizer([p["question"] + p["solution"] for p in problems],
                                                vocab_size=512 if small else 8000)
    config = bench_gpu.small_config() if small else memory_plan.tinyllama_config()
    config.vocab_size = len(tokenizer)
    config.max_position_embeddings = max(config.max_position_embeddings, 640)  # --small's tiny one has 256
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0  # build_tiny_tokenizer's ids
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run_train(folder: str, advantage: str, small: bool, device: str) -> dict:
    """Step 3: train.py --dataset gsm8k on the random model for 2 iterations: finite losses, moved weights, peak."""
    run_dir = os.path.join(folder, f"run_{advantage}")
    argv = ["--dataset", "gsm8k", "--model", folder, "--sft_steps", "0", "--num_iterations", "2", "--eval_every",
            "0", "--advantage", advantage, "--bf16", "--gradient_checkpointing", "--device", device, "--run_dir",
            run_dir, "--log_samples", "2"] + TRAIN_SIZES[small].split()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    train.main(argv)
    seconds = time.time() - start
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    finite = all(math.isfinite(r["loss/total"]) for r in rows)
    before = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    after = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "checkpoint")).state_dict()
    moved = any(not torch.equal(before[k], after[k]) for k in before)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    tokens = sum(r["tokens/answers"] + r.get("vine/mc_tokens", 0) for r in rows)
    result = f"{len(rows)} iterations, {tokens} tokens generated, losses finite {finite}, weights moved {moved}"
    return {"check": f"train: {advantage}", "ok": finite and moved and len(rows) == 2, "result": result,
            "seconds": seconds, "peak": peak}


def table(rows: list[dict], device: str) -> str:
    gib = memory_plan.GiB
    fmt = lambda x: "-" if x is None else f"{x / gib:.2f}"  # noqa: E731
    lines = [f"GPU check on {device}, {time.strftime('%Y-%m-%d %H:%M')}", "",
             "| check | ok | result | seconds | peak GiB | plan GiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['check']} | {'yes' if r['ok'] else 'NO'} | {r['result']} | {r['seconds']:.1f} | "
                     f"{fmt(r.get('peak'))} | {fmt(r.get('plan'))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="CPU: the same checks with tiny sizes (a test)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check.md", help="where the table goes")
    cli = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not cli.small
    if not cli.small and not cuda:
        raise SystemExit("error: CUDA is not available; python benchmarks/gpu_check.py --small runs it on CPU")
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name(0) if cuda else "CPU (--small)"
    threads = torch.get_num_threads()
    rows = [run_tests(cuda)]
    rows += run_bench(cli.small)
    with tempfile.TemporaryDirectory() as folder:
        make_model(folder, cli.small)
        rows += [run_train(folder, advantage, cli.small, device) for advantage in ("vine", "critic")]
    torch.set_num_threads(threads)  # bench_gpu --small and train --threads set it for the process
    report = table(rows, name)
    print("\n" + report)
    cli.out.parent.mkdir(parents=True, exist_ok=True)
    cli.out.write_text(report + "\n")
    print(f"wrote {cli.out}")
    return rows


if __name__ == "__main__":
    main()
