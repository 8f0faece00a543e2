"""Tests for tools/compare_runs.py: the paired bootstrap, and a summary of run folders shaped like train.py's."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
compare_runs = load_script("tools/compare_runs")


def test_bootstrap_of_a_constant_shift_is_that_shift_and_of_identical_arms_contains_zero():
    rng = np.random.default_rng(0)
    a = np.tile(rng.random(200), (3, 1))  # three seeds that scored every problem alike
    low, high = compare_runs.bootstrap_diff(a + 0.1, a, 500, np.random.default_rng(1))
    assert low == pytest.approx(0.1) and high == pytest.approx(0.1)  # paired problems: the shift is all there is
    a = rng.random((3, 200))
    low, high = compare_runs.bootstrap_diff(a, a[::-1], 500, np.random.default_rng(1))  # same seeds, reordered
    assert low < 0.0 < high


def test_the_interval_narrows_with_more_problems():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 800):
        a, b = rng.random((3, n)) < 0.6, rng.random((3, n)) < 0.5
        low, high = compare_runs.bootstrap_diff(a.astype(float), b.astype(float), 1000, np.random.default_rng(1))
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # the problem part of the noise shrinks as 1/sqrt(n)


def write_run(
    path: Path, start: list[float], final: list[float], seconds: float = 1.0, mc_tokens: int = 0, **run_args
) -> None:
    """A finished train.py run folder: 2 iterations, evaluated at 0 and 2, with per-problem scores; run_args adds to
    its run_args.json (seed, rl_seed)."""
    (path / "checkpoint").mkdir(parents=True)
    (path / "evals").mkdir()
    run_args = {"model": "start", "advantage": path.name[:4], **run_args}
    (path / "checkpoint" / "run_args.json").write_text(json.dumps(run_args))
    (path / "evals" / "0.json").write_text(json.dumps({"eval/pass1": start}))
    (path / "evals" / "2.json").write_text(json.dumps({"eval/pass1": final}))
    rows = [
        {"iteration": 0, "eval/pass1": float(np.mean(start or [0])), "time/eval": 9.0},
        {"iteration": 1, "time/sample": 1.0, "time/values": seconds, "time/train": 2.0, "tokens/answers": 100},
        {"iteration": 2, "eval/pass1": float(np.mean(final or [0])), "time/eval": 9.0},
    ]
    rows[0].update({"time/sample": 1.0, "time/values": seconds, "time/train": 2.0, "tokens/answers": 100})
    if mc_tokens:
        for r in rows[:2]:
            r["vine/mc_tokens"] = mc_tokens
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.slow
def test_summary_of_two_arms(tmp_path):
    start = [0.5] * 40
    for seed in (1, 2):
        write_run(tmp_path / f"vine_s{seed}", start, [1.0] * 30 + [0.5] * 10, seconds=4.0, mc_tokens=300)
        write_run(tmp_path / f"grpo_s{seed}", start, [1.0] * 10 + [0.5] * 30, seconds=0.0, mc_tokens=0)
    metrics = tmp_path / "vine_s1" / "metrics.jsonl"  # the value diagnostic ran on one seed only
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [{**r, "diag/mc_mae": 0.1} if "time/train" in r else r for r in rows]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "compare_runs.py"),
            *map(str, tmp_path.glob("*_s*")),
            "--out",
            str(out),
            "--bootstrap",
            "200",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["start_pass1"] == 0.5
    vine, grpo = summary["arms"]["vine"], summary["arms"]["grpo"]
    assert vine["2"]["pass1"] == pytest.approx(0.875) and grpo["2"]["pass1"] == pytest.approx(0.625)
    diff, low, high = grpo["2"]["minus vine"]  # arms print in sorted folder order: grpo first
    assert diff == pytest.approx(-0.25) and low <= -0.25 <= high and high < 0
    assert vine["cost"]["tokens"] == 400 and grpo["cost"]["tokens"] == 100  # answers + MC tokens per iteration
    assert vine["cost"]["s_iteration"] == 7.0 and grpo["cost"]["s_iteration"] == 3.0  # evaluation left out
    assert vine["cost"]["diag/mc_mae"] == pytest.approx(0.1) and "diag/mc_mae" not in grpo["cost"]
    assert "| grpo - vine | -25.0" in result.stdout


@pytest.mark.slow
def test_runs_from_different_starting_models_are_refused(tmp_path):
    write_run(tmp_path / "vine_s1", [0.5] * 4, [1.0] * 4, seconds=1.0, mc_tokens=0)
    write_run(tmp_path / "grpo_s1", [0.0] * 4, [1.0] * 4, seconds=1.0, mc_tokens=0)
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "compare_runs.py"),
            *map(str, tmp_path.glob("*_s*")),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "do not share a starting model" in result.stderr


# ---------------------------------------------------------------------------------------------------------------------
# bad input: refused in one line with exit code 2, or left out with a note; never a traceback or a nan


def compare(tmp_path: Path, *runs: str, extra: tuple = ()) -> list[str]:
    """compare_runs's command line for run folders under tmp_path, with a quick bootstrap."""
    return [*(str(tmp_path / run) for run in runs), "--out", str(tmp_path / "report"), "--bootstrap", "100", *extra]


def refusal(capsys, argv: list[str]) -> str:
    """compare_runs.main(argv) must stop with exit code 2 and an error line last on stderr (argparse's usage above
    it, or nothing); returns that line."""
    with pytest.raises(SystemExit) as stop:
        compare_runs.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert "error: " in err.strip().splitlines()[-1] and "Traceback" not in err
    return err.strip().splitlines()[-1]


def two_arms(tmp_path: Path, start: list[float] = (0.5, 1.0, 0.0, 0.5)) -> None:
    write_run(tmp_path / "vine_s1", list(start), [1.0] * len(start), seed=7, rl_seed=1)
    write_run(tmp_path / "grpo_s1", list(start), list(start), seed=7, rl_seed=1)


def test_evaluations_of_different_problem_counts_are_refused_naming_them(tmp_path, capsys):
    """A --resume with --eval-problems 4 after 8: the start is scored on 8 problems, the end on 4. Today's code
    printed a gain over the 8 with an interval over the first 4, which excluded its own estimate."""
    start = [1.0] * 4 + [0.0] * 4
    write_run(tmp_path / "vine_s1", start, [1.0] * 4)  # printed: +0.500 [+0.000, +0.000]
    write_run(tmp_path / "grpo_s1", start, [1.0, 1.0, 1.0, 0.0])
    line = refusal(capsys, compare(tmp_path, "vine_s1", "grpo_s1"))
    assert "number of test problems" in line
    assert f"4 problems: {tmp_path / 'grpo_s1'} at 2, {tmp_path / 'vine_s1'} at 2" in line
    assert f"8 problems: {tmp_path / 'grpo_s1'} at 0, {tmp_path / 'vine_s1'} at 0" in line


def test_seeds_of_one_arm_on_different_problem_counts_are_refused(tmp_path, capsys):
    two_arms(tmp_path)
    write_run(tmp_path / "vine_s2", [0.5, 1.0, 0.0, 0.5], [1.0] * 3, seed=7, rl_seed=2)
    line = refusal(capsys, compare(tmp_path, "vine_s1", "vine_s2", "grpo_s1"))
    assert f"3 problems: {tmp_path / 'vine_s2'} at 2" in line


def test_the_same_run_given_twice_is_refused(tmp_path, capsys):
    two_arms(tmp_path)
    line = refusal(capsys, compare(tmp_path, "vine_s1", "grpo_s1", "vine_s1/"))  # any spelling of the path
    assert "the same run folder" in line and "vine_s1" in line


def test_a_copy_of_a_run_is_not_a_second_seed(tmp_path, capsys):
    two_arms(tmp_path)
    write_run(tmp_path / "vine_s2", [0.5, 1.0, 0.0, 0.5], [1.0] * 4, seed=7, rl_seed=1)
    line = refusal(capsys, compare(tmp_path, "vine_s1", "vine_s2", "grpo_s1"))
    assert "--rl-seed 1" in line and str(tmp_path / "vine_s2") in line


def test_runs_of_different_seeds_are_refused_even_when_their_start_scores_agree(tmp_path, capsys):
    two_arms(tmp_path)
    (tmp_path / "grpo_s1" / "checkpoint" / "run_args.json").write_text(json.dumps({"model": "start", "seed": 8}))
    line = refusal(capsys, compare(tmp_path, "vine_s1", "grpo_s1"))
    assert "differ in --seed" in line and f"{tmp_path / 'grpo_s1'}: 8" in line


def test_a_cut_last_metrics_line_is_left_out_with_a_note(tmp_path, capsys):
    """kill -9 in the middle of a write: train.py --resume drops that line (checkpoint.trim_metrics), so here too."""
    two_arms(tmp_path)
    with open(tmp_path / "vine_s1" / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 3, "time/sam')
    compare_runs.main(compare(tmp_path, "vine_s1", "grpo_s1"))
    assert "left out its last line" in capsys.readouterr().err
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["arms"]["vine"]["cost"]["s_iteration"] == 4.0  # the two logged training iterations only


DAMAGE = {  # file of vine_s1 -> what it is overwritten with: each is refused, naming the file
    "metrics.jsonl": '{"iteration": 0}\n{"iter\n{"iteration": 2}\n',  # a damaged line that is not the last
    "evals/2.json": '{"eval/pass1": [1.0, ',  # cut
    "evals/0.json": '{"eval/greedy": [1.0, 1.0, 1.0, 1.0]}',  # no test scores
    "evals/1.json": "[1.0, 1.0]",  # not train.py's shape
    "checkpoint/run_args.json": "{",
}


@pytest.mark.parametrize("name", DAMAGE)
def test_a_damaged_file_is_refused_naming_it(tmp_path, capsys, name):
    two_arms(tmp_path)
    (tmp_path / "vine_s1" / name).write_text(DAMAGE[name])
    assert str(tmp_path / "vine_s1" / name) in refusal(capsys, compare(tmp_path, "vine_s1", "grpo_s1"))


def test_stray_files_in_evals_are_skipped_with_a_note(tmp_path, capsys):
    two_arms(tmp_path)
    (tmp_path / "vine_s1" / "evals" / "notes.json").write_text("{}")
    (tmp_path / "vine_s1" / "evals" / "README").write_text("mine")
    compare_runs.main(compare(tmp_path, "vine_s1", "grpo_s1"))
    assert "skipped" in capsys.readouterr().err and (tmp_path / "report" / "summary.md").is_file()


@pytest.mark.parametrize(
    "option", [("--bootstrap", "0"), ("--bootstrap", "-5"), ("--samples", "0"), ("--at", "-1")], ids=str
)
def test_out_of_range_options_are_refused(tmp_path, capsys, option):
    two_arms(tmp_path)
    assert f"argument {option[0]}" in refusal(capsys, compare(tmp_path, "vine_s1", "grpo_s1", extra=option))


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    two_arms(tmp_path)
    (tmp_path / "report").write_text("not a folder")
    assert "--out" in refusal(capsys, compare(tmp_path, "vine_s1", "grpo_s1"))


def test_runs_without_test_problems_are_refused(tmp_path, capsys):
    two_arms(tmp_path, start=[])
    assert "no test problem" in refusal(capsys, compare(tmp_path, "vine_s1", "grpo_s1"))


def test_nan_scores_leave_their_problem_out_of_every_pair_with_a_note(tmp_path, capsys):
    """A score that is not a number leaves its problem out of every run's mean and of the bootstrap (the pairs hold);
    a NaN at iteration 0 in every run is still one starting model."""
    start = [float("nan"), 0.0, 0.0, 1.0, 0.5]
    write_run(tmp_path / "vine_s1", start, [1.0, 1.0, float("nan"), 1.0, 1.0])
    write_run(tmp_path / "grpo_s1", start, [0.0, 0.0, 0.0, 1.0, 0.5])
    compare_runs.main(compare(tmp_path, "vine_s1", "grpo_s1"))
    out, err = capsys.readouterr()
    assert not re.search(r"\bnan\b", out, re.I) and "2 of 5 test problems left out" in out
    assert "iteration 2: 2 of 5" in err and "iteration 0: 1 of 5" in err
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["start_pass1"] == 0.375  # 0, 0, 1, 0.5
    vine, grpo = summary["arms"]["vine"]["2"], summary["arms"]["grpo"]["2"]
    assert vine["pass1"] == 1.0 and grpo["pass1"] == 0.5  # problems 1, 3, 4
    assert vine["gain"][0] <= 1.0 - 0.5 <= vine["gain"][1]  # the start over the same problems: 0, 1, 0.5
    diff, low, high = grpo["minus vine"]
    assert diff == -0.5 and low <= diff <= high


def test_runs_without_training_rows_or_with_nan_times_print_no_nan(tmp_path, capsys):
    two_arms(tmp_path)
    (tmp_path / "grpo_s1" / "metrics.jsonl").write_text("")  # evaluated, then stopped before logging
    metrics = tmp_path / "vine_s1" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows[1]["time/train"] = float("nan")
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    compare_runs.main(compare(tmp_path, "vine_s1", "grpo_s1"))
    out, err = capsys.readouterr()
    assert not re.search(r"\bnan\b", out, re.I)
    assert "| grpo |  |  |" in out and "logged no training iteration" in err and "time/train" in err
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["arms"]["vine"]["cost"]["s_train"] == 2.0


def test_runs_that_share_no_evaluated_iteration_are_refused(tmp_path, capsys):
    two_arms(tmp_path)
    (tmp_path / "vine_s1" / "evals" / "0.json").unlink()
    (tmp_path / "grpo_s1" / "evals" / "2.json").rename(tmp_path / "grpo_s1" / "evals" / "3.json")
    (tmp_path / "grpo_s1" / "evals" / "0.json").unlink()
    assert "all have []" in refusal(capsys, compare(tmp_path, "vine_s1", "grpo_s1"))
