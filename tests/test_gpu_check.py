"""benchmarks/gpu_check.py --small: every check of the GPU check runs on CPU, so the script cannot rot before a GPU
is lent to run it for real; a step cut by its time cap leaves a row that says so, and the rows before it."""

import pytest
import torch
from conftest import load_script

gpu_check = load_script("benchmarks/gpu_check")


@pytest.mark.slow
def test_small_mode_runs_every_check_and_writes_the_table(tmp_path, capsys):
    threads = torch.get_num_threads()
    rows = gpu_check.main(["--small", "--out", str(tmp_path / "check.md")])
    assert torch.get_num_threads() == threads  # the checks set 1 thread; the script restores the count
    checks = [r["check"] for r in rows]
    assert checks[:2] == ["tests -m cuda", "sdpa kernel"]
    if not torch.cuda.is_available():  # without a GPU every CUDA-marked test skips, and none fails
        assert "skipped" in rows[0]["result"] and "failed" not in rows[0]["result"], rows[0]
    phases = [c.removeprefix("bench: ") for c in checks if c.startswith("bench: ")]
    assert phases == list(gpu_check.bench_gpu.PHASES)
    assert checks[-2:] == ["train: vine", "train: critic"]
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    assert all("losses finite True, weights moved True" in r["result"] for r in rows[-2:])
    table = (tmp_path / "check.md").read_text()
    assert table.count("\n| ") == len(rows) + 1 and all(f"| {c} |" in table for c in checks)  # header + a row each
    printed = capsys.readouterr().out
    assert all(line in printed for line in table.splitlines()[2:])  # printed as measured
    engine = next(r for r in rows if r["check"] == "bench: MC values")
    assert engine["rows/step"] > 0 and 0 < engine["reads/pass"] <= 1.1, engine


@pytest.mark.slow
def test_a_step_cut_by_its_cap_leaves_a_row_and_the_rows_before(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.CAPS, "bench", 0.01)
    rows = gpu_check.check_bench(small=True)
    assert rows[-1]["check"] == "bench" and not rows[-1]["ok"] and "cut at 0.01 s" in rows[-1]["result"]
