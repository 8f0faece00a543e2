"""Tests for tools/compare_runs.py: the paired bootstrap, and a summary of run folders shaped like train.py's."""

import json
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


def write_run(path: Path, start: list[float], final: list[float], seconds: float, mc_tokens: int) -> None:
    """A finished train.py run folder: 2 iterations, evaluated at 0 and 2, with per-problem scores."""
    (path / "checkpoint").mkdir(parents=True)
    (path / "evals").mkdir()
    (path / "checkpoint" / "run_args.json").write_text(json.dumps({"model": "start", "advantage": path.name[:4]}))
    (path / "evals" / "0.json").write_text(json.dumps({"eval/pass1": start}))
    (path / "evals" / "2.json").write_text(json.dumps({"eval/pass1": final}))
    rows = [
        {"iteration": 0, "eval/pass1": float(np.mean(start)), "time/eval": 9.0},
        {"iteration": 1, "time/sample": 1.0, "time/values": seconds, "time/train": 2.0, "tokens/answers": 100},
        {"iteration": 2, "eval/pass1": float(np.mean(final)), "time/eval": 9.0},
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
