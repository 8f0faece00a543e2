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


def refusal(capsys, argv: list[str]) -> str:
    """plot_metrics.main(argv) must stop with exit code 2 and an error line last on stderr; returns that line."""
    with pytest.raises(SystemExit) as stop:
        plot_metrics.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert "error: " in err.strip().splitlines()[-1] and "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_a_folder_without_metrics_is_a_one_line_error(tmp_path, capsys):
    assert "metrics.jsonl not found" in refusal(capsys, [str(tmp_path)])


# ---------------------------------------------------------------------------------------------------------------------
# bad input: refused in one line with exit code 2, or left out with a note; never a traceback


def test_a_cut_last_line_is_left_out_with_a_note_as_train_py_does(tmp_path, capsys):
    """kill -9 in the middle of a write: train.py --resume drops that line (checkpoint.trim_metrics), so here too."""
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "a", num_iterations=3, eval_every=2)
    with open(tmp_path / "a" / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 4, "time/sa')
    assert len(plot_metrics.read_run(tmp_path / "a")) == 4
    plot_metrics.main([str(tmp_path / "a")])
    assert "left out its last line" in capsys.readouterr().err and (tmp_path / "a" / "curves.png").is_file()


@pytest.mark.parametrize(
    "line",
    ['{"iter', "[1, 2]", '{"reward/mean": 0.5}', "\udcff\udcfe garbage"],
    ids=["cut", "list", "no-iteration", "bytes"],
)
def test_a_damaged_line_before_the_last_is_refused_naming_it(tmp_path, capsys, line):
    write_run(tmp_path / "a", num_iterations=3, eval_every=2)
    metrics = tmp_path / "a" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_bytes("\n".join(lines[:2] + [line] + lines[2:]).encode(errors="surrogateescape"))
    assert f"{metrics}, line 3" in refusal(capsys, [str(tmp_path / "a")])


def test_a_file_without_rows_is_refused(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.jsonl").write_text("")
    assert "no row" in refusal(capsys, [str(tmp_path / "a")])


def test_values_that_are_not_finite_numbers_are_left_out_with_a_note(tmp_path, capsys):
    """NaN, null and text are left out of their panel; a NaN phase time does not stop the seconds axis."""
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "a", num_iterations=4, eval_every=2)
    metrics = tmp_path / "a" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows[0]["time/train"], rows[1]["reward/mean"], rows[2]["kl/ref"] = float("nan"), None, "small"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = plot_metrics.read_run(tmp_path / "a")
    xs, ys = plot_metrics.series(rows, "reward/mean")
    assert xs == [0, 2, 3] and ys == pytest.approx([0.0, 0.2, 0.3])
    assert plot_metrics.series(rows, "eval/pass1", "seconds") == ([7.0, 23.0, 33.0], [0.3, 0.3, 0.5])
    plot_metrics.main([str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert all(f"left out 1 value(s) of {key}" in err for key in ("time/train", "reward/mean", "kl/ref"))


def test_out_in_a_missing_folder_is_made(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "a", num_iterations=2, eval_every=1)
    out = tmp_path / "new" / "folder" / "c.png"
    plot_metrics.main([str(tmp_path / "a"), "--out", str(out)])
    assert out.read_bytes().startswith(b"\x89PNG") and capsys.readouterr().out == f"wrote {out}\n"


def test_out_without_a_suffix_says_where_the_png_went(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "a", num_iterations=2, eval_every=1)
    plot_metrics.main([str(tmp_path / "a"), "--out", str(tmp_path / "curves")])
    assert (tmp_path / "curves.png").is_file() and capsys.readouterr().out == f"wrote {tmp_path / 'curves.png'}\n"


@pytest.mark.parametrize("out", [".", "c.xyz"])
def test_an_out_that_is_a_folder_or_an_unknown_format_is_refused(tmp_path, capsys, out):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "a", num_iterations=2, eval_every=1)
    assert "--out" in refusal(capsys, [str(tmp_path / "a"), "--out", str(tmp_path / out)])
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # nothing written


def test_the_same_run_given_twice_is_refused(tmp_path, capsys):
    write_run(tmp_path / "a", num_iterations=2, eval_every=1)
    assert "the same run folder" in refusal(capsys, [str(tmp_path / "a"), str(tmp_path / "a") + "/"])
