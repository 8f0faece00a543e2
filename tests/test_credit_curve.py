"""Tests for experiments/credit_curve.py: hand-computed tokens to reach an accuracy and gaps at equal tokens, and the
table from compare_runs.py-shaped summaries."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
credit_curve = load_script("experiments/credit_curve")


def summary(vine: list[float], grpo: list[float], vine_tokens: float, grpo_tokens: float) -> dict:
    """A compare_runs.py summary.json: start 0.2, evaluations at iterations 1 and 2."""
    def arm(pass1, tokens, others):
        entry = {str(i + 1): {"pass1": p, "per_seed": [p], "gain": [0, 0]} for i, p in enumerate(pass1)}
        for i, p in enumerate(pass1):
            if others is not None:
                entry[str(i + 1)]["minus vine"] = [p - others[i], p - others[i] - 0.01, p - others[i] + 0.01]
        entry["cost"] = {"tokens": tokens, "s_iteration": 1.0}
        return entry

    arms = {"grpo": arm(grpo, grpo_tokens, vine), "vine": arm(vine, vine_tokens, None)}
    arms["vine"]["cost"]["diag/mc_mae"] = 0.05  # the value diagnostic ran on vine only
    return {"start_pass1": 0.2, "start_slips": {"slips_per_answer": 1.0, "decisions_per_answer": 2.0}, "arms": arms}


def test_tokens_to_reach_and_the_gap_at_equal_tokens_by_hand():
    tokens, pass1 = np.array([0.0, 100.0, 200.0]), np.array([0.2, 0.6, 1.0])
    assert credit_curve.tokens_to_reach(tokens, pass1, 0.8) == pytest.approx(150.0)
    assert credit_curve.tokens_to_reach(tokens, pass1, 0.2) == 0.0
    assert credit_curve.tokens_to_reach(tokens, pass1, 1.01) is None
    s = summary(vine=[0.6, 0.8], grpo=[0.4, 0.7], vine_tokens=300.0, grpo_tokens=100.0)
    # vine spent 600 tokens by iteration 2; grpo's curve (0: 0.2, 100: 0.4, 200: 0.7) ends at 200: read there
    assert credit_curve.per_token_gap(s, "grpo", 2) == pytest.approx(100 * (0.7 - 0.8))
    # by iteration 1 vine spent 300: grpo (at 200 tokens) is still read at its last evaluation
    s["arms"]["grpo"]["cost"]["tokens"] = 200.0  # now its curve is 0: 0.2, 200: 0.4, 400: 0.7; 300 is halfway
    assert credit_curve.per_token_gap(s, "grpo", 1) == pytest.approx(100 * (0.55 - 0.6))


def test_the_table_from_summaries(tmp_path):
    for d, grpo in ((1, [0.6, 0.8]), (4, [0.3, 0.5])):
        (tmp_path / f"d{d}.json").write_text(json.dumps(summary([0.6, 0.8], grpo, 300.0, 100.0)))
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "credit_curve.py"), str(tmp_path / "d1.json"),
         str(tmp_path / "d4.json"), "--out", str(tmp_path / "out"), "--early", "1", "--gain", "0.3"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "out" / "credit_curve.md").read_text()
    rows = [line for line in text.splitlines() if "`grpo`" in line]
    assert len(rows) == 2
    assert "+0.0 [-1.0, +1.0]" in rows[0] and "-30.0 [-31.0, -29.0]" in rows[1]  # after iteration 1
    assert "| 4: 1.00 of 2.00, start 20.0% |" in text
    # tokens to gain 30 points over the start (0.2): d1's grpo passes 0.5 between 0 (0.2) and 100 tokens (0.6): 75;
    # d4's between 100 (0.3) and 200 (0.5)
    assert "| 75 |" in rows[0] and "| 200 |" in rows[1]
    assert "| 4 | `vine` | 0.050 |  |  |  |" in text and "| 4 | `grpo` |" not in text  # the diagnostic's table
