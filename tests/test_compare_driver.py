"""Tests for experiments/compare.py, the driver of the comparisons: the commands it runs for arms x seeds (--dry-run and
with subprocess.run replaced), finished runs skipped and half-done ones resumed (fake run folders), compare_runs on
exactly the arm runs, and the options it refuses. Nothing here trains."""

import json
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import load_script

compare = load_script("experiments/compare")

SETTING = "--dataset arithmetic --sft-slip 0.5"
ARMS = """--arm vine "" --arm grpo "--advantage grpo" --seeds 1 2 --workers 2 --compare "--at 1 2 10" """


def argv(out: Path, *more: str) -> list[str]:
    """2 arms x 2 seeds, 2 workers."""
    return [str(out), "--setting", SETTING, *shlex.split(ARMS), *more]


def dry_run(out: Path, capsys, *more: str) -> list[str]:
    """The lines that --dry-run prints."""
    compare.main(argv(out, "--dry-run", *more))
    return capsys.readouterr().out.splitlines()


def value(tokens: list[str], option: str) -> str:
    assert tokens.count(option) == 1, (option, tokens)
    return tokens[tokens.index(option) + 1]


def fake_run(run_dir: Path, iterations: int, lines: list, saved: str = "checkpoint") -> None:
    """A run folder: its checkpoint (trainer_state.pt, run_args.json) in saved, and metrics.jsonl of lines (a str is
    written as is: a line cut by kill -9)."""
    (run_dir / saved).mkdir(parents=True)
    (run_dir / saved / "trainer_state.pt").write_bytes(b"")
    (run_dir / saved / "run_args.json").write_text(json.dumps({"num_iterations": iterations}))
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    (run_dir / "metrics.jsonl").write_text(text)


def finished_start(out: Path) -> None:
    (out / "start").mkdir(parents=True)
    (out / "start" / "metrics.jsonl").write_text(json.dumps({"iteration": 0, "eval/pass1": 0.4}) + "\n")


def test_dry_run_two_arms_two_seeds(tmp_path, capsys):
    out = tmp_path / "out"
    lines = dry_run(out, capsys)
    assert len(lines) == 1 + 4 + 1 and not out.exists()  # printed, nothing made
    start = shlex.split(lines[0])
    assert start[1].endswith("train.py") and start[2:6] == SETTING.split()
    assert value(start, "--num-iterations") == "0" and value(start, "--run-dir") == str(out / "start")
    assert "--threads" not in start and start[-3:] == [">", str(out / "start.log"), "2>&1"]  # alone, on all cores
    expected = [("vine", "1"), ("grpo", "1"), ("vine", "2"), ("grpo", "2")]  # seed by seed
    for line, (arm, seed) in zip(lines[1:5], expected):
        tokens = shlex.split(line)
        command, redirect = tokens[:-3], tokens[-3:]
        assert command[1].endswith("train.py") and command[2:6] == SETTING.split()
        assert value(command, "--model") == str(out / "start" / "init") and value(command, "--sft-steps") == "0"
        assert value(command, "--rl-seed") == seed and value(command, "--threads") == "1"
        assert value(command, "--run-dir") == str(out / f"{arm}_s{seed}")
        assert ("--advantage" in command) == (arm == "grpo") and "--resume" not in command
        assert redirect == [">", str(out / f"{arm}_s{seed}.log"), "2>&1"]
    last = shlex.split(lines[-1])
    assert last[1].endswith("tools/compare_runs.py")
    assert last[2:6] == [f"{out / name}/" for name in ("vine_s1", "grpo_s1", "vine_s2", "grpo_s2")]
    assert last[6:] == ["--out", str(out / "report"), "--at", "1", "2", "10"]


def test_threads_only_with_workers_and_not_over_the_options(tmp_path, capsys):
    out = tmp_path / "out"
    lines = dry_run(out, capsys, "--workers", "1")
    assert not any("--threads" in line for line in lines)
    lines = dry_run(out, capsys, "--setting", SETTING + " --threads 2")  # the later --setting wins
    assert [shlex.split(line).count("--threads") for line in lines[:-1]] == [1] * 5
    assert all(value(shlex.split(line), "--threads") == "2" for line in lines[:-1])


def test_run_adds_options_to_one_run_or_one_more_run(tmp_path, capsys):
    out = tmp_path / "out"
    runs = """--run vine 1 "--value-diagnostic 8" --run critic 1 "--advantage critic" --no-compare"""
    lines = dry_run(out, capsys, *shlex.split(runs))
    runs = [value(shlex.split(line), "--run-dir") for line in lines[1:]]
    assert runs == [str(out / n) for n in ("vine_s1", "grpo_s1", "vine_s2", "grpo_s2", "critic_s1")]
    diagnostic = ["--value-diagnostic" in shlex.split(line) for line in lines[1:]]
    assert diagnostic == [True, False, False, False, False]
    assert value(shlex.split(lines[-1]), "--advantage") == "critic"  # and no compare_runs line


def test_finished_runs_are_skipped_and_half_done_ones_resumed(tmp_path, capsys):
    out = tmp_path / "out"
    finished_start(out)
    final = {"iteration": 2, "eval/pass1": 0.5}
    fake_run(out / "vine_s1", 2, [{"iteration": 0, "eval/pass1": 0.4}, {"iteration": 1}, final])
    fake_run(out / "grpo_s1", 2, [{"iteration": 0, "eval/pass1": 0.4}, {"iteration": 1}, '{"iteration": 2, "ev'])
    fake_run(out / "vine_s2", 4, [{"iteration": 0}, {"iteration": 1}, final])  # iteration 2 of 4: half-way
    fake_run(out / "grpo_s2", 2, [{"iteration": 0}, {"iteration": 1}, final], saved="checkpoint.old")  # cut save
    states = {name: compare.run_state(out / name) for name in ("vine_s1", "grpo_s1", "vine_s2", "grpo_s2", "none")}
    assert states == dict(vine_s1="finished", grpo_s1="resume", vine_s2="resume", grpo_s2="resume", none="new")
    lines = dry_run(out, capsys)
    assert lines[:2] == ["# start: finished, skipped", "# vine_s1: finished, skipped"]
    for line, name in zip(lines[2:5], ("grpo_s1", "vine_s2", "grpo_s2")):
        tokens = shlex.split(line)
        assert tokens[-4:] == ["--resume", ">>", str(out / f"{name}.log"), "2>&1"]  # the log is appended to
    compare_runs = shlex.split(lines[5])  # every run, the skipped one too
    assert compare_runs[2:6] == [f"{out / n}/" for n in ("vine_s1", "grpo_s1", "vine_s2", "grpo_s2")]


def test_a_start_without_its_evaluation_is_made_again(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "start" / "init").mkdir(parents=True)  # SFT done, stopped before its evaluation
    (out / "start" / "init" / "config.json").write_text("{}")
    assert not dry_run(out, capsys)[0].startswith("#")


class FakeRuns:
    """subprocess.run for the driver: records each command and returns exit code 0 (fail: for these run folders,
    1)."""

    def __init__(self, fail=()):
        self.commands, self.fail = [], set(fail)

    def __call__(self, command, **kwargs):
        self.commands.append(command)
        run_dir = command[command.index("--run-dir") + 1] if "--run-dir" in command else ""
        return subprocess.CompletedProcess(command, 1 if Path(run_dir).name in self.fail else 0)


def test_runs_with_two_workers_then_compare_runs_on_exactly_the_arm_runs(tmp_path, monkeypatch):
    out = tmp_path / "out"
    fake_run(out / "old_s1", 2, [{"iteration": 2, "eval/pass1": 0.5}])  # another arm's run, of an earlier call
    monkeypatch.setattr(compare.subprocess, "run", fake := FakeRuns())
    compare.main(argv(out))
    trains, compare_runs = fake.commands[:-1], fake.commands[-1]
    assert value(trains[0], "--run-dir") == str(out / "start")  # first, alone
    names = {"vine_s1", "grpo_s1", "vine_s2", "grpo_s2"}
    assert {Path(value(c, "--run-dir")).name for c in trains[1:]} == names and len(trains) == 5
    assert all(value(c, "--threads") == "1" for c in trains[1:])
    assert compare_runs[1].endswith("compare_runs.py") and set(compare_runs[2:6]) == {f"{out / n}/" for n in names}
    assert compare_runs[6:] == ["--out", str(out / "report"), "--at", "1", "2", "10"]
    assert {p.name for p in out.glob("*.log")} == {f"{n}.log" for n in names | {"start"}}


def test_a_failed_run_is_named_and_nothing_is_compared(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(compare.subprocess, "run", fake := FakeRuns(fail={"grpo_s1"}))
    with pytest.raises(SystemExit, match=r"1 run\(s\) failed \(grpo_s1\)"):
        compare.main(argv(out))
    assert len(fake.commands) == 5 and "grpo_s1: failed with exit code 1" in capsys.readouterr().out
    monkeypatch.setattr(compare.subprocess, "run", fake := FakeRuns(fail={"start"}))
    with pytest.raises(SystemExit, match="the starting model failed"):
        compare.main(argv(out))
    assert len(fake.commands) == 1  # no arm runs without it


def test_options_strings_that_look_like_options(tmp_path):
    args = compare.parse_args([str(tmp_path), "--arm", "a", "--slip", "--seeds", "1", "--compare", "--slip"])
    assert args.arm == [("a", ["--slip"])] and args.compare == ["--slip"] and args.setting == []


@pytest.mark.parametrize(
    "more, message",
    [
        (["--arm", "a/b", "", "--seeds", "1"], "arm name 'a/b'"),
        (["--arm", "start", "", "--seeds", "1"], "is taken"),
        (["--arm", "a_s1", "", "--seeds", "1"], "arm name 'a_s1'"),
        (["--arm", "a", "", "--arm", "a", "x", "--seeds", "1"], "--arm a given twice"),
        (["--arm", "a", "", "--seeds", "1", "1"], "seed 1 given twice"),
        (["--arm", "a", ""], "--arm needs --seeds"),
        (["--seeds", "1"], "nothing to run"),
        (["--arm", "a", "--rl_seed 3", "--seeds", "1"], "the options of a: --rl-seed is set by the driver"),
        (["--arm", "a", "--model x", "--seeds", "1"], "--model is set by the driver"),
        (["--setting", "--run-dir x", "--arm", "a", "", "--seeds", "1"], "--setting: --run-dir is set"),
        (["--arm", "a", "'", "--seeds", "1"], "no shell words"),
        (["--run", "a", "x", ""], "no integer"),
        (["--arm", "a", "", "--seeds", "1", "--workers", "0"], "--workers must be at least 1"),
    ],
)
def test_refused(tmp_path, capsys, more, message):
    with pytest.raises(SystemExit):
        compare.parse_args([str(tmp_path), *more])
    assert message in capsys.readouterr().err
