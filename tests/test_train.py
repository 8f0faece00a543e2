"""End-to-end tests of train.py: a smoke run, exact resume, and the error messages a user sees."""

import dataclasses
import functools
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import ppo
import reward
import rollout
import train
from conftest import TINY, make_model, parity, problem

ROOT = Path(__file__).resolve().parents[1]

# The README's CPU demo spelled out, as measured before it became the arithmetic defaults; it evaluated every 5
# iterations then (evaluation draws from its own generator, so the frequency changes no training number), and its
# --eval-problems 500 was all of the arithmetic test and validation splits, which the default 0 also means.
DEMO = (
    "--dataset arithmetic --model tiny --sft-steps 2600 --sft-batch-size 32 --sft-lr 2e-3 --sft-answer-only 0.5 "
    "--num-iterations 10 --prompts-per-iteration 64 --num-mc-rollouts 3 --max-new-tokens 64 --max-length 160 "
    "--lr 3e-5 --eval-every 2 --eval-samples 4 --micro-batch-size 64"
).split()


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.fixture
def parity_reward(monkeypatch):
    """conftest.parity as reward.grade, for this test."""
    monkeypatch.setattr(reward, "grade", parity)


@pytest.mark.slow
def test_smoke_run_trains_and_saves_a_loadable_checkpoint(tmp_path, sft_model, parity_reward):
    train.main(
        TINY + ["--model", str(sft_model), "--num_iterations", "2", "--run_dir", str(tmp_path), "--eval_every", "1"]
    )
    rows = read_metrics(tmp_path)
    assert [r["iteration"] for r in rows] == [0, 1, 2]  # two iterations, then the final evaluation
    assert all(math.isfinite(r["loss/policy"]) and math.isfinite(r["grad_norm"]) for r in rows[:2])
    assert any(r["advantages/zero_frac"] < 1.0 for r in rows[:2]), "the stand-in reward should give some signal"
    assert 0.0 <= rows[-1]["eval/pass1"] <= 1.0 and all("eval/val_pass1" in r for r in rows)
    for r in rows:  # every evaluation's per-problem scores (2 problems, 2 samples: 0, 1/2 or 1), for paired comparisons
        scores = json.loads((tmp_path / "evals" / f"{r['iteration']}.json").read_text())
        assert set(scores) == {"eval/pass1", "eval/greedy", "eval/val_pass1"}
        assert len(scores["eval/pass1"]) == 2 and sum(scores["eval/pass1"]) / 2 == r["eval/pass1"]
        assert all(s in (0.0, 0.5, 1.0) for s in scores["eval/pass1"])
    best = json.loads((tmp_path / "best" / "best.json").read_text())  # the first evaluation with the best val Pass@1
    vals = [r["eval/val_pass1"] for r in rows]
    assert best["eval/val_pass1"] == max(vals) and best["iteration"] == vals.index(max(vals))
    AutoModelForCausalLM.from_pretrained(tmp_path / "best")
    init = AutoModelForCausalLM.from_pretrained(sft_model)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint")
    assert not all(torch.equal(a, b) for a, b in zip(init.parameters(), trained.parameters())), "nothing was trained"
    state = torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["next_iteration"] == 2


@pytest.mark.slow
def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tmp_path, sft_model, parity_reward, capsys):
    """Also for a run folder saved before an option existed (here --arithmetic-multiply, dropped from its record):
    the option takes its default, and the option given with another value is refused."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    argv = TINY + ["--model", str(sft_model), "--num_iterations", "3"]
    train.main(argv + ["--run_dir", str(whole)])
    train.main(argv + ["--run_dir", str(parts), "--stop_after", "1"])
    assert [r["iteration"] for r in read_metrics(parts)] == [0]
    record = parts / "checkpoint" / "run_args.json"
    saved = json.loads(record.read_text())
    record.write_text(json.dumps({k: v for k, v in saved.items() if k != "arithmetic_multiply"}))
    with pytest.raises(SystemExit, match="other settings \\(arithmetic_multiply\\)"):
        train.main(argv + ["--run_dir", str(parts), "--resume", "--arithmetic_multiply", "0.3"])
    capsys.readouterr()
    train.main(argv + ["--run_dir", str(parts), "--resume"])
    assert "started before --arithmetic-multiply existed: the run goes on with the default" in capsys.readouterr().out
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert strip(read_metrics(parts)) == strip(read_metrics(whole))
    assert any(r["grad_norm"] > 0 for r in read_metrics(whole)[:3]), "the runs should have trained"
    a = AutoModelForCausalLM.from_pretrained(whole / "checkpoint")
    b = AutoModelForCausalLM.from_pretrained(parts / "checkpoint")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_arithmetic_defaults_are_the_measured_cpu_demo():
    assert train.parse_args(["--dataset", "arithmetic"]) == train.parse_args(DEMO)


def test_per_dataset_defaults_fill_only_what_the_command_line_leaves_out():
    fields = {f.name: f for f in dataclasses.fields(train.Args)}
    for name, values in train.DATASET_DEFAULTS.items():
        assert fields[name].default is None, f"{name} has a per-dataset default, so its Args default must be None"
        for dataset, value in zip(reward.DATASETS, values):
            assert f"{value} ({dataset})" in fields[name].metadata["help"]  # --help lists it
            assert getattr(train.parse_args(["--dataset", dataset]), name) == value
    args = train.parse_args(["--dataset", "gsm8k", "--lr", "3e-6", "--eval-every", "0"])
    assert (args.lr, args.eval_every, args.num_iterations, args.eval_problems) == (3e-6, 0, 650, 0)


def tiny_episodes(tokenizer, num: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    prompt = problem(tokenizer, "Tom has 3 pens.", "arithmetic").prompt_ids
    episodes = []
    for _ in range(num):
        response = [rng.randrange(3, len(tokenizer)) for _ in range(rng.randint(2, 6))]
        advantages = [rng.uniform(-1, 1) for _ in response]
        episodes.append(ppo.Episode(prompt, response, False, 0.0, advantages))
    return episodes


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_a_minibatch_the_ratio_guard_skips_moves_no_weight_but_advances_the_schedule(tokenizer, monkeypatch):
    args = train.parse_args(["--dataset", "arithmetic", "--minibatch_size", "2", "--micro_batch_size", "1"])
    model = make_model("llama", len(tokenizer))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer, scheduler = train.make_optimizer(model, args)
    monkeypatch.setattr(ppo, "ratio_guard_exceeded", lambda stats: True)
    episodes = tiny_episodes(tokenizer, 4)
    state = train.State(model, optimizer, scheduler)
    stats = train.ppo_update(state, episodes, torch.Generator(), args)
    assert stats["ppo/skipped_minibatches"] == 4  # 2 epochs x 2 minibatches
    assert scheduler.last_epoch == 4, "the schedule counts skipped minibatches, as the paper's engine does"
    assert not optimizer.state, "AdamW never stepped"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_answers_and_continuations_leave_room_for_eos_within_max_length(tokenizer, monkeypatch):
    """The official budget is max_length - 1 - prefix length tokens (2047 - P for max_length 2048), for the answers
    and for the MC continuations of their step states."""
    natalia = problem(tokenizer, "Natalia sold clips.", "gsm8k")
    prompt = natalia.prompt_ids
    args = train.parse_args(["--dataset", "gsm8k", "--max_length", str(len(prompt) + 6), "--samples_per_prompt", "8"])
    args.device, args.num_mc_rollouts = "cpu", 2
    calls = []  # per rollout.sample call: (prefix length, response length) of every row
    sample = rollout.sample

    def recording_sample(model, prefixes, *, num_samples, **kwargs):
        out = sample(model, prefixes, num_samples=num_samples, **kwargs)
        calls.append([(len(prefixes[i // num_samples]), len(ids)) for i, ids in enumerate(out.response_ids)])
        return out

    monkeypatch.setattr(rollout, "sample", recording_sample)
    model = make_model("llama", len(tokenizer))
    problems, generator = [natalia], torch.Generator().manual_seed(0)
    sampling = train.sampling_settings(args, model, tokenizer)
    state = train.State(model, None, None, tokenizer=tokenizer, sampling=sampling)
    rollouts, rewards = train.sample_and_grade(state, problems, generator, args)
    episodes = train.make_episodes(tokenizer, problems, rollouts, rewards, args)
    train.vine_advantages(state, problems, episodes, generator, args)
    answers, continuations = calls  # a random model rarely stops: most rows of both calls use their whole budget
    assert max(r for _, r in answers) == 5 == args.max_length - 1 - len(prompt)
    assert max(p + r for p, r in continuations) == args.max_length - 1


def test_a_gsm8k_answer_without_a_final_answer_is_unfinished_reward_0_and_no_eos(tokenizer):
    natalia = problem(tokenizer, "Natalia sold clips.", "gsm8k")
    texts = ["\nNatalia sold 48/2 = 24 clips in May.\n", "\nNatalia sold 48/2 = 24 clips in May.\n#### 72\n"]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    eos = [tokenizer.eos_token_id] * 2
    rollouts = rollout.Rollouts(ids, [torch.zeros(len(i)) for i in ids], [True, True], eos)  # both stopped on EOS
    args = train.parse_args(["--dataset", "gsm8k", "--samples_per_prompt", "2", "--num_mc_rollouts", "2"])
    args.device, args.max_new_tokens = "cpu", 8
    rewards = train.grade_all(tokenizer, rollouts, ["72", "72"], args)
    model = make_model("llama", len(tokenizer))
    episodes = train.make_episodes(tokenizer, [natalia], rollouts, rewards, args)
    sampling = train.sampling_settings(args, model, tokenizer)
    state = train.State(model, None, None, tokenizer=tokenizer, sampling=sampling)
    train.vine_advantages(state, [natalia], episodes, torch.Generator(), args)
    assert rewards == [0.0, 1.0]
    assert not episodes[0].finished and episodes[0].response_ids == ids[0], "no answer: unfinished, no EOS"
    assert episodes[1].finished and episodes[1].response_ids == ids[1] + [tokenizer.eos_token_id]
    assert [len(e.advantages) for e in episodes] == [len(ids[0]), len(ids[1]) + 1]


@pytest.mark.slow
def test_refuses_a_run_dir_that_holds_another_runs_checkpoint(tmp_path, sft_model):
    argv = TINY + ["--model", str(sft_model), "--num_iterations", "1", "--run_dir", str(tmp_path)]
    train.main(argv)
    with pytest.raises(SystemExit, match="another run's checkpoint"):
        train.main(argv)
    with pytest.raises(SystemExit, match="other settings.*num_mc_rollouts"):
        train.main(argv + ["--resume", "--num_mc_rollouts", "3"])


def run_cli(*argv, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--run_dir", str(tmp_path / "run"), *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )


@pytest.mark.slow
def test_cli_errors_are_one_clear_line_not_a_traceback(tmp_path):
    """Bad input stops the run with one line starting "error:". Two cases run the real command line (an unreachable
    hub: the launcher's environment sets offline mode); the rest call train.main, where anything but SystemExit with
    that line (a traceback on the command line) fails the test."""
    bad = tmp_path / "bad" / "gsm8k"
    bad.mkdir(parents=True)
    (bad / "train.jsonl").write_text('{"question": "q", "answer": "a\\n#### 1"}\nnot json\n')
    (bad / "test.jsonl").write_text('{"question": "q", "answer": "a\\n#### 1"}\n')
    for argv, message in [
        (["--dataset", "gsm8k", "--model", "no-such-org/no-such-model"], "local folder"),
        (["--dataset", "gsm8k", "--data_dir", "hub"], "no --data-dir"),  # the hub is unreachable: use shipped data
    ]:
        result = run_cli(*argv, tmp_path=tmp_path)
        assert result.returncode != 0, argv
        assert "Traceback" not in result.stderr, (argv, result.stderr[-2000:])
        assert any(re.search(message, line) for line in result.stderr.splitlines()), (argv, result.stderr)
    for argv, message in [
        (["--dataset", "gsm9k"], "unknown dataset"),
        (["--dataset", "gsm8k", "--model", str(tmp_path / "missing")], "local folder"),
        (["--dataset", "gsm8k", "--data_dir", str(tmp_path / "bad")], "train.jsonl.*line 2"),
        (["--dataset", "arithmetic", "--sft_answer_only", "1.5"], "fraction in \\[0, 1\\]"),
    ]:
        with pytest.raises(SystemExit) as stopped:
            train.main(["--run_dir", str(tmp_path / "run"), *argv])
        assert str(stopped.value).startswith("error: ") and len(str(stopped.value).splitlines()) == 1, argv
        assert re.search(message, str(stopped.value)), (argv, stopped.value)


@pytest.mark.slow
@pytest.mark.parametrize("interrupt_at", [0, 1])
def test_ctrl_c_saves_a_checkpoint_that_resumes_where_the_policy_is(tmp_path, sft_model, monkeypatch, interrupt_at):
    """Ctrl-C in the evaluation before iteration 0 (no update yet) or in the final one (after iteration 0's update)."""

    def evaluate(state, iteration, args):
        if iteration == interrupt_at:
            raise KeyboardInterrupt
        return {"eval/val_pass1": 0.0}

    monkeypatch.setattr(train, "evaluate", evaluate)
    with pytest.raises(SystemExit) as stopped:
        train.main(
            TINY + ["--model", str(sft_model), "--num_iterations", "1", "--eval_every", "1", "--run_dir", str(tmp_path)]
        )
    assert stopped.value.code == 130
    state = torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["next_iteration"] == interrupt_at


@pytest.mark.slow
def test_best_keeps_the_policy_with_the_highest_validation_pass1_across_resume(tmp_path, sft_model, monkeypatch):
    val = {0: 0.2, 1: 0.5, 2: 0.3}  # iteration -> validation Pass@1; iteration 2 is the final evaluation
    scores = lambda state, iteration, args: {"eval/pass1": 0.0, "eval/val_pass1": val[iteration]}  # noqa: E731
    monkeypatch.setattr(train, "evaluate", scores)
    argv = TINY + ["--model", str(sft_model), "--num_iterations", "2", "--eval_every", "1", "--run_dir", str(tmp_path)]
    train.main(argv + ["--stop_after", "1"])
    assert json.loads((tmp_path / "best" / "best.json").read_text())["iteration"] == 0
    train.main(argv + ["--resume"])
    assert json.loads((tmp_path / "best" / "best.json").read_text()) == {
        "iteration": 1,
        "eval/pass1": 0.0,
        "eval/val_pass1": 0.5,
    }
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    state = torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["best_val_pass1"] == 0.5


# ---------------------------------------------------------------------------------------------------------------------
# The baselines (--advantage critic | grpo | rloo), the value diagnostic, the RL seed, the slipped SFT set


@pytest.mark.slow
@pytest.mark.parametrize("advantage", ["critic", "grpo", "rloo"])
def test_each_baseline_trains_through_the_cli(tmp_path, sft_model, parity_reward, advantage):
    argv = TINY + ["--model", str(sft_model), "--num_iterations", "2", "--run_dir", str(tmp_path)]
    train.main(argv + ["--advantage", advantage, "--samples_per_prompt", "4", "--minibatch_size", "4"])
    rows = read_metrics(tmp_path)
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(math.isfinite(r["loss/policy"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert any(r["advantages/zero_frac"] < 1.0 for r in rows), "the stand-in reward should give some signal"
    assert not any(key.startswith("vine/") for r in rows for key in r), "no Monte Carlo rollouts"
    init = AutoModelForCausalLM.from_pretrained(sft_model)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint")
    assert not all(torch.equal(a, b) for a, b in zip(init.parameters(), trained.parameters())), "nothing was trained"
    critic_file = tmp_path / "checkpoint" / "critic.pt"
    assert critic_file.exists() == (advantage == "critic")
    if advantage == "critic":
        assert all(math.isfinite(r["critic/loss"]) and r["critic/grad_norm"] > 0 for r in rows)
        saved = torch.load(critic_file)
        body = init.model.state_dict()  # the critic started as a copy of the SFT model's transformer
        assert not all(torch.equal(saved[f"body.{k}"], v) for k, v in body.items()), "the critic was not trained"


@pytest.mark.slow
def test_resume_restores_the_critic_exactly(tmp_path, sft_model, parity_reward):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    argv = TINY + ["--model", str(sft_model), "--num_iterations", "3", "--advantage", "critic"]
    train.main(argv + ["--run_dir", str(whole)])
    train.main(argv + ["--run_dir", str(parts), "--stop_after", "1"])
    train.main(argv + ["--run_dir", str(parts), "--resume"])
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert strip(read_metrics(parts)) == strip(read_metrics(whole))
    a, b = torch.load(whole / "checkpoint" / "critic.pt"), torch.load(parts / "checkpoint" / "critic.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def critic_for(tokenizer, args, seed: int = 1) -> ppo.Critic:
    model = ppo.ValueModel(make_model("llama", len(tokenizer), seed=seed), generator=torch.Generator().manual_seed(0))
    return ppo.Critic(model, *train.make_optimizer(model, args))


def test_critic_values_are_computed_once_before_the_update(tokenizer, monkeypatch):
    """With learning rate 0 nothing moves, so if V_old were recomputed during the update (or the update ran before
    it) nothing would show; instead check that every minibatch's value loss equals the one computed from V_old and
    the returns, in both epochs, and that the clip never fires."""
    args = train.parse_args(["--dataset", "arithmetic", "--advantage", "critic", "--lr", "0"])
    args.minibatch_size, args.micro_batch_size = 4, 2
    critic = critic_for(tokenizer, args)
    model = make_model("llama", len(tokenizer))
    optimizer, scheduler = train.make_optimizer(model, args)
    episodes = tiny_episodes(tokenizer, 4)
    episodes[1].reward = 1.0
    ppo.critic_advantages(critic.model, episodes, tokenizer.pad_token_id, args.micro_batch_size)
    losses = []
    value_loss = ppo.value_loss
    monkeypatch.setattr(ppo, "value_loss", lambda *a, **k: (out := value_loss(*a, **k), losses.append(out[1]))[0])
    state = train.State(model, optimizer, scheduler, critic=critic)
    stats = train.ppo_update(state, episodes, torch.Generator(), args)
    errors = [(float(v) - e.reward) ** 2 for e in episodes for v in e.old_values[len(e.prompt_ids) - 1 :]]
    expected = 0.5 * sum(errors) / len(errors)  # one minibatch of all 4 episodes
    per_epoch = [sum(s["critic/loss"] for s in losses[i : i + 2]) for i in (0, 2)]  # 2 micro-batches per minibatch
    assert len(losses) == 4 and per_epoch == pytest.approx([expected, expected], rel=1e-5)
    assert all(s["critic/clipfrac"] == 0.0 for s in losses)
    assert stats["critic/loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_rl_seed_changes_rl_and_keeps_the_starting_model(tmp_path, parity_reward):
    argv = TINY + ["--model", "tiny", "--num_iterations", "1", "--sft_steps", "2", "--sft_batch_size", "4"]
    for name, extra in [("a", []), ("b", ["--rl_seed", "5"]), ("c", ["--rl_seed", "5"])]:
        train.main(argv + ["--run_dir", str(tmp_path / name)] + extra)
    init = {n: AutoModelForCausalLM.from_pretrained(tmp_path / n / "init") for n in "abc"}
    assert all(torch.equal(x, y) for x, y in zip(init["a"].parameters(), init["b"].parameters()))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    a, b, c = (strip(read_metrics(tmp_path / n)) for n in "abc")
    assert b == c and a != b
    assert train.parse_args(["--dataset", "gsm8k", "--seed", "3"]).rl_seed == 3  # the default: --seed


def test_baseline_options_are_checked(capsys):
    cases = [
        (["--dataset", "arithmetic", "--advantage", "grpo", "--samples_per_prompt", "1"], "samples-per-prompt >= 2"),
        (["--dataset", "gsm8k", "--sft_slip", "0.5"], "--sft-slip"),
        (["--dataset", "arithmetic", "--advantage", "ppo"], "invalid choice"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as stopped:
            train.parse_args(argv)
        assert message in str(stopped.value) + capsys.readouterr().err, argv


def test_every_end_token_of_the_generation_config_stops_an_answer(tokenizer):
    """Chat models list several end tokens in generation_config.eos_token_id; sampling stops on each of them."""
    model = make_model("llama", len(tokenizer))
    natalia = problem(tokenizer, "Natalia sold clips.", "gsm8k")
    prompt = natalia.prompt_ids
    args = train.parse_args(["--dataset", "gsm8k", "--max_new_tokens", "6"])
    args.device = "cpu"

    def greedy():
        sampling = dataclasses.replace(train.sampling_settings(args, model, tokenizer), temperature=0.0)
        state = train.State(model, None, None, tokenizer=tokenizer)
        return train.sample_answers(state, [prompt], 1, sampling, torch.Generator(), args)

    first = greedy().response_ids[0][0]  # the token a random model writes first
    assert first != tokenizer.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, first]
    assert rollout.stop_token_ids(model, tokenizer) == sorted({tokenizer.eos_token_id, first})
    out = greedy()
    assert out.response_ids == [[]] and out.finished == [True] and out.eos == [first]
    args.samples_per_prompt = 1
    (episode,) = train.make_episodes(tokenizer, [natalia], out, [0.0], args)
    assert episode.response_ids == [], "no #### line: unfinished, no end token (GSM8K)"
    out.response_ids = [tokenizer("\n#### 72\n", add_special_tokens=False)["input_ids"]]  # as if it had answered
    (episode,) = train.make_episodes(tokenizer, [natalia], out, [1.0], args)
    assert episode.response_ids[-1] == first, "the end token it sampled, not the tokenizer's EOS"
    model.generation_config.eos_token_id = None
    assert rollout.stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id]


def test_an_iteration_with_no_reward_signal_says_why(capsys):
    signal = functools.partial(reward.reward_signal, samples_per_prompt=4, dataset="gsm8k")
    assert signal([0, 0, 1, 0] + [0, 0, 0, 0] + [1, 1, 1, 1], iteration=3) == {"reward/no_signal_groups": 2 / 3}
    assert capsys.readouterr().out == "", "some answers are right: no warning"
    assert signal([0.0] * 8, iteration=3) == {"reward/no_signal_groups": 1.0}
    warning = capsys.readouterr().out
    assert warning.startswith("warning: iteration 3: every one of the 8 answers got reward 0")
    assert '"#### N"' in warning and "--sft-steps" in warning
    signal([1.0] * 8, iteration=4)
    assert "every one of the 8 answers got reward 1" in capsys.readouterr().out
