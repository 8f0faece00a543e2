"""Tests for tools/plot_metrics.py: it draws run folders to a PNG, and says how to get matplotlib without it."""

import json
import sys
from pathlib import Path

import pytest
from conftest import load_script

plot_metrics = load_script("tools/plot_metrics")


def write_run(run_dir: Path, num_iterations: int, eval_every: int) -> None:
    """A metrics.jsonl shaped like train.py's: evaluation rows every eval_every iterations and a final one."""
    run_dir.mkdir()
    rows = []
    for it in range(num_iterations):
        row = {"iteration": it, "time/sample": 1.0, "time/values": 2.0, "time/train": 3.0, "reward/mean": 0.1 * it}
        row.update({"response/length": 20.0, "kl/ref": 0.01 * it, "loss/approx_kl": 1e-3, "loss/clipfrac": 0.05})
        if it % eval_every == 0:
            row.update({"eval/pass1": 0.3, "eval/greedy": 0.2, "eval/val_pass1": 0.25, "time/eval": 4.0})
        rows.append(row)
    rows.append({"iteration": num_iterations, "eval/pass1": 0.5, "eval/greedy": 0.4, "time/eval": 4.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_seconds_are_the_running_sum_of_the_phase_times(tmp_path):
    write_run(tmp_path / "a", num_iterations=3, eval_every=2)
    rows = plot_metrics.read_run(tmp_path / "a")
    assert plot_metrics.series(rows, "eval/pass1") == ([0, 2, 3], [0.3, 0.3, 0.5])
    # iteration 0: 4 + 1 + 2 + 3 = 10; iteration 1: +6; iteration 2: +4 +6 = 26; the final evaluation: +4
    assert plot_metrics.series(rows, "eval/pass1", "seconds") == ([10.0, 26.0, 30.0], [0.3, 0.3, 0.5])


def test_draws_two_runs_to_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "vine", num_iterations=4, eval_every=2)
    write_run(tmp_path / "grpo", num_iterations=6, eval_every=3)
    plot_metrics.main([str(tmp_path / "vine"), str(tmp_path / "grpo")])
    png = (tmp_path / "vine" / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_without_matplotlib_it_says_how_to_install_it(tmp_path, monkeypatch):
    write_run(tmp_path / "a", num_iterations=2, eval_every=1)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        plot_metrics.main([str(tmp_path / "a")])
    assert not (tmp_path / "a" / "curves.png").exists()


def test_a_folder_without_metrics_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="metrics.jsonl not found"):
        plot_metrics.main([str(tmp_path)])
