"""Tests for benchmarks/bench_rollout.py's counters: what a CPU counts of a GPU's costs must count them exactly."""

import pytest
import torch
from conftest import load_script

bench_rollout = load_script("benchmarks/bench_rollout")


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_weight_casts_under_autocast_are_counted_in_either_grad_mode(mode):
    """Under no_grad autocast casts each weight once and keeps it (2 casts for 3 passes of a Linear); under
    inference_mode its cache is off and every pass casts both weights again, as aten.to rather than _to_copy."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), bench_rollout.Counts(model, ops=True) as counts, mode():
        for _ in range(3):
            model(torch.randn(2, 8)).float().sum().item()
    assert counts.passes == 3 and counts.reads == 3
    assert counts.casts == (2 if mode is torch.no_grad else 6)
