"""Data parallelism (torchrun) on CPU with gloo: the update spread over 2 ranks equals the one-process update, and a
2-process train.py run finishes, saves and resumes. Processes are started from the test with timeouts, so a hang
fails instead of blocking CI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import checkpoint
import distributed
import ppo
import train
from conftest import TINY, make_model

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64


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


def update(rank: int = 0, world: int = 1, rendezvous: str = "", out: str = "") -> dict:
    """The PPO update (policy, reference and critic) of make_episodes() in minibatches of 3, 3 and 1 (shares of 1
    and 2 episodes, then of 0 and 1), after one minibatch_backward whose gradients are recorded; on `world` ranks."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    args = train.parse_args(["--dataset", "arithmetic", "--minibatch_size", "3", "--micro_batch_size", "1"])
    args.device, args.kl_coef, args.lr, args.num_epochs = "cpu", 0.05, 1e-2, 2
    policy, reference = make_model("llama", VOCAB, seed=0), make_model("llama", VOCAB, seed=1)
    critic_model = ppo.ValueModel(make_model("llama", VOCAB, seed=2), generator=torch.Generator())
    critic = train.Critic(critic_model, *train.make_optimizer(critic_model, args))
    optimizer, scheduler = train.make_optimizer(policy, args)
    episodes = make_episodes()
    train.old_and_ref_logprobs(policy, reference, episodes, 0, args)
    policy.train()
    stats = train.minibatch_backward(policy, critic, episodes[:3], 0, args)
    grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    grads.update({"critic." + n: p.grad.clone() for n, p in critic.model.named_parameters()})
    policy.zero_grad(set_to_none=True)
    critic.model.zero_grad(set_to_none=True)
    policy.eval()
    update_stats = train.ppo_update(
        policy, reference, critic, optimizer, scheduler, make_episodes(), 0, torch.Generator().manual_seed(0), args
    )
    params = {n: p.detach().clone() for n, p in policy.named_parameters()}
    params.update({"critic." + n: p.detach().clone() for n, p in critic.model.named_parameters()})
    result = dict(stats=stats, grads=grads, update_stats=update_stats, params=params)
    if world > 1:
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()
    return result


def test_the_update_on_two_ranks_equals_the_one_process_update(tmp_path):
    one = update()
    mp.start_processes(update, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        two = torch.load(tmp_path / f"rank{rank}.pt")
        assert two["stats"].keys() == one["stats"].keys()
        for key, value in one["stats"].items():  # loss, ratio (the guard's input), clipfrac, critic loss ...
            assert two["stats"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        for name, grad in one["grads"].items():  # the summed gradient of one minibatch, policy and critic
            torch.testing.assert_close(two["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=name)
        for name, param in one["params"].items():  # after 2 epochs x 3 AdamW steps at lr 1e-2 (measured: <= 3e-6)
            torch.testing.assert_close(two["params"][name], param, rtol=1e-5, atol=1e-5, msg=name)
    assert one["update_stats"]["ppo/skipped_minibatches"] == 0


def test_shards_make_up_the_list_in_rank_order(monkeypatch):
    items = list(range(7))
    parts = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, 3))
        parts.append(distributed.shard(items))
    assert parts == [[0, 1], [2, 3], [4, 5, 6]]


def test_prompts_per_iteration_must_divide_by_the_number_of_processes(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as stopped:
        train.parse_args(["--dataset", "arithmetic", "--prompts_per_iteration", "3"])
    assert "--prompts-per-iteration 3 must divide by the number of processes (2)" in str(stopped.value) + str(
        capsys.readouterr().err
    )


def torchrun(nproc: int, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    command = (launcher if nproc > 1 else [sys.executable]) + [str(ROOT / "train.py"), *argv]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_a_two_process_run_logs_once_per_iteration_saves_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    argv = TINY + ["--model", "tiny", "--num_iterations", "2", "--threads", "1", "--run_dir", str(run_dir)]
    argv += ["--eval_every", "1", "--eval_problems", "3"]  # 3 problems on 2 ranks: shares of 1 and 2
    first = torchrun(2, *argv, "--stop_after", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("\nit 0 |") == 1, "only rank 0 prints"
    second = torchrun(2, *argv, "--resume", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [row["iteration"] for row in rows] == [0, 1, 2]  # two iterations, then the final evaluation
    assert rows[0]["tokens/answers"] > 0 and 0 <= rows[2]["eval/pass1"] <= 1
    assert len(json.load(open(run_dir / "evals" / "2.json"))["eval/pass1"]) == 3, "every problem's score, gathered"
    state = torch.load(run_dir / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["world_size"] == 2 and state["next_iteration"] == 2
    for iteration in (0, 1):  # --log-samples (4): rank 0's share of the 4 answers, whitened in both epochs
        records = [json.loads(line) for line in open(run_dir / "samples" / f"{iteration}.jsonl")]
        assert sorted(r["answer_index"] for r in records) == [0, 1]
        assert all(len(step["whitened"]) == 2 for r in records for step in r["steps"])
    model, tokenizer = checkpoint.load_model(str(run_dir / "checkpoint"), "cpu")
    assert model(torch.tensor([tokenizer("1 + 2")["input_ids"]])).logits.isfinite().all()
    alone = torchrun(1, *argv, "--resume", cwd=tmp_path)  # one process cannot continue a 2-process run
    assert alone.returncode != 0 and "written by a run of 2 process(es)" in alone.stderr + alone.stdout


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
