"""torchrun on CPU with gloo: the update of policy, critic and reference sharded with FSDP2 over 2 ranks equals the
one-process update; sampling on full weights gives the one-process tokens with no collective inside rollout.sample;
each rank holds about half the state; a 2-process train.py run stopped by SIGTERM resumes exactly; a rank that raises
ends the run in bounded time. Processes are started from the tests, every collective with a timeout of seconds."""

import datetime
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

import checkpoint
import distributed
import ppo
import rollout
import train
from conftest import TINY, load_script, make_model

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64
COLLECTIVES = ("all_gather_single", "reduce_scatter_single", "all_reduce", "broadcast", "all_gather_object")
PROMPTS = {0: [[1, 5, 6, 7], [1, 9, 9]], 1: [[1, 4, 4, 4, 4, 4, 4, 4], [1, 8]]}  # rank -> prompts, lengths differ
NEW_TOKENS = {0: 5, 1: 9}  # and so do the numbers of decoding steps


def make_episodes(seed: int = 0) -> list[ppo.Episode]:
    """7 episodes of different prompt and response lengths, with advantages, critic values and returns."""
    g = torch.Generator().manual_seed(seed)
    episodes = []
    for i in range(7):
        prompt = torch.randint(3, VOCAB, (3 + i % 3,), generator=g).tolist()
        response = torch.randint(3, VOCAB, (2 + (5 * i) % 7,), generator=g).tolist()
        advantages = torch.randn(len(response), generator=g).tolist()
        e = ppo.Episode(prompt, response, i % 2 == 0, float(i % 2), advantages)
        e.old_values = torch.randn(len(prompt) + len(response) - 1, generator=g)
        e.returns = [float(i % 2)] * len(response)
        episodes.append(e)
    return episodes


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, torch.distributed.tensor.DTensor) else t


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t


def state_bytes(model, optimizer) -> dict:
    """Bytes of the weights, gradients and AdamW moments this rank holds (its shards under FSDP2)."""
    size = lambda tensors: sum(local(t).numel() * local(t).element_size() for t in tensors)  # noqa: E731
    return {
        "weights": size(model.parameters()),
        "grads": size(p.grad for p in model.parameters() if p.grad is not None),
        "adam": size(v for s in optimizer.state.values() for k, v in s.items() if k != "step"),
    }


def count_collectives(calls: list) -> dict:
    """Patch the torch.distributed collectives FSDP2 and this project use to count their calls into calls."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES}
    for name, fn in originals.items():
        setattr(dist, name, lambda *a, fn=fn, name=name, **k: (calls.append(name), fn(*a, **k))[1])
    return originals


def sample_on_full_weights(policy, rank: int) -> tuple[list, int]:
    """Greedy continuations of this rank's prompts, on full weights; returns them and the collectives inside."""
    calls = []
    with distributed.full_weights(policy):
        originals = count_collectives(calls)
        try:
            out = rollout.sample(policy, PROMPTS[rank], num_samples=2, max_new_tokens=NEW_TOKENS[rank],
                                 temperature=0.0, top_p=1.0, eos_token_id=2)
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)
    return out.response_ids, len(calls)


def bf16_reference_logprobs() -> torch.Tensor:
    """Logprobs of a reference built as train.load_models builds it under --bf16 (bf16 matmul weights, float32 norms,
    embeddings and head: FSDP2 takes a frozen model of mixed dtypes), on full weights under CPU autocast."""
    reference = make_model("llama", VOCAB, seed=1).requires_grad_(False)
    ppo.float32_head(reference)
    ppo.store_in_bf16(reference)
    reference = distributed.shard_model(reference, "cpu", bf16=True)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])
    with distributed.full_weights(reference), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return ppo.token_logprobs(reference, ids, torch.ones_like(ids), 0.6)


def update(rank: int = 0, world: int = 1, rendezvous: str = "", out: str = "") -> dict:
    """On `world` ranks (FSDP2 when 2): the PPO update (policy, reference and critic) of make_episodes() in minibatches
    of 3, 3 and 1 (shares of 1 and 2 episodes, so 1 and 2 micro-batches, then of 0 and 1: an empty share), after one
    minibatch_backward whose gradients are recorded; the greedy samples of each rank's prompts; the state bytes."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
    args = train.parse_args(["--dataset", "arithmetic", "--minibatch_size", "3", "--micro_batch_size", "1"])
    args.device, args.kl_coef, args.lr, args.num_epochs = "cpu", 0.05, 1e-2, 2
    policy = distributed.shard_model(make_model("llama", VOCAB, seed=0), "cpu")
    reference = distributed.shard_model(make_model("llama", VOCAB, seed=1).requires_grad_(False), "cpu")
    critic_model = distributed.shard_model(ppo.ValueModel(make_model("llama", VOCAB, seed=2), torch.Generator()), "cpu")
    critic = ppo.Critic(critic_model, *train.make_optimizer(critic_model, args))
    optimizer, scheduler = train.make_optimizer(policy, args)
    state = train.State(policy, optimizer, scheduler, reference=reference, critic=critic)
    samples = {r: sample_on_full_weights(policy, r) for r in (PROMPTS if world == 1 else [rank])}
    episodes = make_episodes()
    train.old_and_ref_logprobs(state, episodes, args)
    policy.train()
    stats = train.minibatch_backward(state, episodes[:3], args)
    grads = {n: whole(p.grad).clone() for n, p in policy.named_parameters()}
    grads.update({"critic." + n: whole(p.grad).clone() for n, p in critic.model.named_parameters()})
    grad_bytes = state_bytes(policy, optimizer)["grads"]
    policy.zero_grad(set_to_none=True)
    critic.model.zero_grad(set_to_none=True)
    policy.eval()
    update_stats = train.ppo_update(state, make_episodes(), torch.Generator().manual_seed(0), args)
    params = {n: whole(p).detach().clone() for n, p in policy.named_parameters()}
    params.update({"critic." + n: whole(p).detach().clone() for n, p in critic.model.named_parameters()})
    memory = {**state_bytes(policy, optimizer), "grads": grad_bytes}
    result = dict(stats=stats, grads=grads, update_stats=update_stats, params=params, samples=samples, memory=memory,
                  bf16_reference=bf16_reference_logprobs())
    if world > 1:
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()
    return result


def test_the_sharded_update_on_two_ranks_equals_the_one_process_update(tmp_path):
    """The gradients after one minibatch, the stats, and the weights after 2 epochs of 3 AdamW steps at lr 1e-2 (the
    largest difference measured: 3e-6). The gradients fail if the sum reduction is set on the FSDP root only (the
    layers would average over the ranks: half the one-process gradient)."""
    one = update()
    mp.start_processes(update, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        two = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert two["stats"].keys() == one["stats"].keys()
        for key, value in one["stats"].items():  # loss, ratio (the guard's input), clipfrac, critic loss ...
            assert two["stats"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        for name, grad in one["grads"].items():  # the summed gradient of one minibatch, policy and critic
            torch.testing.assert_close(two["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=name)
        for name, param in one["params"].items():
            torch.testing.assert_close(two["params"][name], param, rtol=1e-5, atol=1e-5, msg=name)
        for key, value in one["update_stats"].items():
            assert two["update_stats"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        assert torch.equal(two["bf16_reference"], one["bf16_reference"])
        tokens, collectives = two["samples"][rank]
        assert tokens == one["samples"][rank][0] and collectives == 0, "one process's tokens, no collective inside"
        for kind, size in one["memory"].items():  # each rank holds half of the weights, gradients and AdamW state
            assert two["memory"][kind] == pytest.approx(size / 2, rel=0.02), kind
    assert one["update_stats"]["ppo/skipped_minibatches"] == 0


def test_the_memory_plan_divides_the_fixed_state_over_the_gpus():
    """tools/memory_plan.py's per-GPU weights, gradients and AdamW moments for N GPUs are one GPU's over N, as a rank
    measures them (test above: a rank holds half of each, within 2%)."""
    memory_plan = load_script("tools/memory_plan")
    config = make_model("llama", VOCAB).config
    one, four = (memory_plan.memory_plan(config, gpu_bytes=80 * 2**30, gpus=n) for n in (1, 4))
    params = sum(p.numel() for p in make_model("llama", VOCAB).parameters())
    assert one["policy_weights"] == 4 * params and one["adam_moments"] == 8 * params
    for key in ("policy_weights", "policy_grads", "adam_moments", "reference"):
        assert four[key] == pytest.approx(one[key] / 4, abs=4), key
    # gathered to sample: the layers in bf16 (distributed.mixed_precision), the embedding, final norm and head float32
    root = 2 * config.vocab_size * config.hidden_size + config.hidden_size  # untied
    assert four["full_weights"] == 4 * root + 2 * (params - root) and one["full_weights"] == 0
    float32 = memory_plan.memory_plan(config, gpu_bytes=80 * 2**30, gpus=4, bf16=False)
    assert float32["full_weights"] == one["policy_weights"]


def test_shards_make_up_the_list_in_rank_order(monkeypatch):
    items = list(range(7))
    parts = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, 3))
        parts.append(distributed.shard(items))
    assert parts == [[0, 1], [2, 3], [4, 5, 6]]


def test_every_rank_runs_as_many_passes_as_the_longest_share(monkeypatch):
    for world, n, micro, passes in [(1, 7, 2, 4), (2, 7, 2, 2), (2, 1, 1, 1), (3, 7, 1, 3), (4, 3, 1, 1)]:
        monkeypatch.setattr(distributed, "world", lambda world=world: (0, world))
        assert distributed.micro_batch_passes(n, micro) == passes == math.ceil(math.ceil(n / world) / micro)


def test_prompts_per_iteration_must_divide_by_the_number_of_processes(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as stopped:
        train.parse_args(["--dataset", "arithmetic", "--prompts_per_iteration", "3"])
    assert "--prompts-per-iteration 3 must divide by the number of processes (2)" in str(stopped.value) + str(
        capsys.readouterr().err
    )


def test_logs_of_the_ranks_combine_into_one(monkeypatch):
    logs = [
        {"iteration": 3, "tokens/answers": 40, "eval/pass1": 0.25, "time/sample": 1.0, "vine/mean_steps": 2.0},
        {"iteration": 3, "tokens/answers": 40, "eval/pass1": 0.25, "time/sample": 3.0, "vine/mean_steps": 3.0},
    ]
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    monkeypatch.setattr(distributed, "gather_list", lambda items: logs)
    combined = distributed.combine_logs(logs[0], train.SUMMED_KEYS)
    assert combined == {  # equal counts are still summed; equal values kept; times maxed; the rest averaged
        "iteration": 3,
        "tokens/answers": 80,
        "eval/pass1": 0.25,
        "time/sample": 3.0,
        "vine/mean_steps": 2.5,
    }


# ---------------------------------------------------------------------------------------------------------------------
# train.py under torchrun


def torchrun(nproc: int, *argv: str, cwd: Path, wait: bool = True):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    command = (launcher if nproc > 1 else [sys.executable]) + [str(ROOT / "train.py"), *argv]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    if not wait:
        return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def stop_with_sigterm(process: subprocess.Popen, run_dir: Path) -> None:
    """SIGTERM to torchrun (which passes it to its workers) once the first iteration is logged."""
    deadline = time.time() + 240
    while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text():
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=240)


@pytest.mark.slow
def test_a_two_process_run_stopped_by_sigterm_resumes_exactly(tmp_path):
    """Sharded policy and reference (FSDP2): a run stopped by SIGTERM during iteration 0 or 1 stops every rank at the
    end of an update, saves, and --resume gives the uninterrupted run's metrics and weights exactly; rank 0 alone
    prints; the evaluation gathers every problem's score; the saved folder loads with from_pretrained."""
    argv = TINY + ["--model", "tiny", "--num_iterations", "3", "--threads", "1", "--eval_every", "1",
                   "--eval_problems", "3", "--dist_timeout", "60"]  # 3 problems on 2 ranks: shares of 1 and 2
    whole_run, parts = tmp_path / "whole", tmp_path / "parts"
    first = torchrun(2, *argv, "--run_dir", str(whole_run), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("\nit 0 |") == 1, "only rank 0 prints"
    stop_with_sigterm(torchrun(2, *argv, "--run_dir", str(parts), cwd=tmp_path, wait=False), parts)
    state = torch.load(parts / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["world_size"] == 2 and 1 <= state["next_iteration"] < 3
    resumed = torchrun(2, *argv, "--run_dir", str(parts), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert metrics(parts) == metrics(whole_run) and [r["iteration"] for r in metrics(parts)] == [0, 1, 2, 3]
    assert len(json.load(open(parts / "evals" / "3.json"))["eval/pass1"]) == 3, "every problem's score, gathered"
    a = AutoModelForCausalLM.from_pretrained(whole_run / "checkpoint")
    b = AutoModelForCausalLM.from_pretrained(parts / "checkpoint")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    model, tokenizer = checkpoint.load_model(str(parts / "best"), "cpu")
    assert model(torch.tensor([tokenizer("1 + 2")["input_ids"]])).logits.isfinite().all()
    records = [json.loads(line) for line in open(whole_run / "samples" / "0.jsonl")]  # rank 0's share of 4 answers
    assert sorted(r["answer_index"] for r in records) == [0, 1]
    alone = torchrun(1, *argv, "--run_dir", str(parts), "--resume", cwd=tmp_path)  # 1 process cannot continue it
    assert alone.returncode != 0 and "written by a run of 2 process(es)" in alone.stderr + alone.stdout


FAIL_ON_RANK_1 = """
import sys, time, train
def fail_mid_update(*args, **kwargs):
    if sys.argv[1] == "raise":
        raise RuntimeError("rank 1 fails in the middle of the update")
    time.sleep(600)  # hangs
if sys.argv[2] == "1":
    train.micro_batch_backward = fail_mid_update
train.main(sys.argv[3:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["raise", "hang"])
def test_a_rank_that_raises_or_hangs_mid_update_ends_the_run_in_bounded_time(tmp_path, failure):
    """Two ranks started without torchrun (which would end the others itself): rank 1 raises (its process ends) or
    hangs in its first update. Rank 0 stops with an error: at once when its peer is gone (gloo sees the closed
    connection), or after --dist-timeout (5 s) in the update's next collective when the peer hangs; never 6 hours."""
    argv = TINY + ["--model", "tiny", "--num_iterations", "2", "--threads", "1", "--dist_timeout", "5",
                   "--run_dir", str(tmp_path / "run")]
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    ranks = [
        subprocess.Popen([sys.executable, "-c", FAIL_ON_RANK_1, failure, str(r), *argv], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
        for r in range(2)
    ]
    start = time.time()
    try:
        _, err0 = ranks[0].communicate(timeout=240)
        elapsed = time.time() - start  # measured: 12 s (raise) and 17 s (hang) on 2 cores
    finally:
        for process in ranks:
            process.kill()
        _, err1 = ranks[1].communicate()
    assert ranks[0].returncode not in (0, None) and "Error" in err0, err0[-2000:]
    assert elapsed < 90, elapsed  # setting up, the first sampling, then at most the 5 s timeout (the default: 30 min)
    if failure == "raise":
        assert "rank 1 fails in the middle of the update" in err1


def test_fsdp2_gathers_the_layers_in_bf16_and_reduces_in_float32_on_cuda_with_bf16_only():
    """On CUDA with --bf16 the all-gathers move bf16 (half the bytes, no per-step cast while sampling) and the
    gradients are reduced in float32; on CPU (these gloo tests) or in float32 nothing is cast."""
    cuda = distributed.mixed_precision("cuda:1", bf16=True)
    assert (cuda.param_dtype, cuda.reduce_dtype) == (torch.bfloat16, torch.float32)
    for device, bf16 in (("cpu", True), ("cuda", False)):
        none = distributed.mixed_precision(device, bf16)
        assert (none.param_dtype, none.reduce_dtype) == (None, None)


@pytest.mark.slow
def test_ranks_given_different_options_stop_in_one_line(tmp_path):
    """Rank 1 started with another --minibatch-size (a command line with rank-specific arguments): both ranks stop
    at start with one line naming the option, before any work (it used to abort with SIGABRT mid-update)."""
    argv = TINY + ["--model", "tiny", "--num_iterations", "1", "--threads", "1", "--dist_timeout", "30",
                   "--run_dir", str(tmp_path / "run")]
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + (os.getpid() + 7) % 1000))
    commands = [[sys.executable, str(ROOT / "train.py"), *argv], [sys.executable, str(ROOT / "train.py"), *argv,
                                                                  "--minibatch_size", "4"]]
    ranks = [subprocess.Popen(command, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r, command in enumerate(commands)]
    errors = [process.communicate(timeout=120)[1] for process in ranks]
    for process, err in zip(ranks, errors):
        assert process.returncode == 1 and "Traceback" not in err, err[-2000:]
        assert "the ranks were given different options (--minibatch-size)" in err
    assert not (tmp_path / "run" / "init").exists(), "stopped before any work"
