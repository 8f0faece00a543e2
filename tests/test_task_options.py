"""Tests for the arithmetic task's difficulty options (docs/credit_curve.md): --arithmetic-steps, --arithmetic-multiply
and --sft-slip-each, and tools/compare_runs.py's slip count. The defaults must give the demo's task unchanged."""

import hashlib
import json
import math
import random

import pytest

import sft
import reward
import train
from conftest import load_script

compare_runs = load_script("tools/compare_runs")

# md5 of json.dumps(load_problems("arithmetic", split)) as made by the code before these options existed (54e47ce):
# the demo, the head-to-head and every test that uses the arithmetic task read these problems.
DEFAULT_SPLITS_MD5 = {"test": "accd56af9c4dd757656144d8b21b3334"}


def values_of(solution: str) -> list[tuple[int, str, int, int]]:
    """(left, op, n, result) of each working line."""
    lines = [reward.ARITHMETIC_LINE_RE.fullmatch(line) for line in solution.split("\n")]
    return [(int(m[1]), m[2], int(m[3]), int(m[4])) for m in lines if m]


def check_carried(solution: str) -> None:
    """Each line's result is its left operand op n, the next line starts from it, and the answer is the last."""
    lines = values_of(solution)
    for (a, op, n, result), following in zip(lines, lines[1:] + [None]):
        assert result == (a + n if op == "+" else a - n if op == "-" else a * n), solution
        assert following is None or following[0] == result, solution
    assert solution.rstrip("\n").endswith(f"#### {lines[-1][3]}"), solution


def test_the_default_task_is_the_one_before_the_options():
    test = reward.load_problems("arithmetic", "test")
    assert hashlib.md5(json.dumps(test).encode()).hexdigest() == DEFAULT_SPLITS_MD5["test"]
    assert test == reward.load_problems("arithmetic", "test", num_steps=3, multiply=0.15)
    args = train.parse_args(["--dataset", "arithmetic"])
    assert (args.arithmetic_steps, args.arithmetic_multiply, args.sft_slip_each) == (3, 0.15, 0.0)
    assert train.load_data(args)[2] == test


def test_multiply_sets_the_share_of_multiplications_and_steps_the_length():
    for share, expected in ((0.0, 0.0), (0.5, 2.0), (1.0, 4.0)):
        problems = reward.make_arithmetic_problems(2000, seed=7, num_steps=4, multiply=share)
        counts = [sum(op == "*" for _, op, _, _ in values_of(p["solution"])) for p in problems]
        assert all(len(values_of(p["solution"])) == 4 for p in problems)
        assert abs(sum(counts) / len(counts) - expected) < 0.1, (share, sum(counts) / len(counts))
        for p in problems[:300]:
            check_carried(p["solution"])
            assert all(0 <= v <= 999 for _, _, _, v in values_of(p["solution"]))
            assert reward.grade(p["solution"], p["answer"], "arithmetic") == 1.0
    a, b = (reward.make_arithmetic_problems(100, seed=7, num_steps=4, multiply=0.5) for _ in range(2))
    assert a == b, "deterministic for a seed"


def test_slip_each_slips_every_multiplication_independently_and_carries_it():
    solution = "\nTom has 3 pens.\n3 * 2 = 6\n6 * 3 = 18\n18 - 5 = 13\n13 * 2 = 26\n#### 26\n"
    everything = "\nTom has 3 pens.\n3 + 2 = 5\n5 + 3 = 8\n8 - 5 = 3\n3 + 2 = 5\n#### 5\n"  # by hand
    assert sft.slipped_solution(solution, 1.0, random.Random(0)) == everything
    assert sft.slipped_solution(solution, 0.0, random.Random(0)) == solution
    rng, twin = random.Random(5), random.Random(5)
    once = sft.slipped_solution(solution, 0.5, rng)
    draws = [twin.random() < 0.5 for _ in range(3)]  # one draw per multiplication, in order
    assert rng.getstate() == twin.getstate()
    assert [op for _, op, _, _ in values_of(once)] == ["+" if d else "*" for d in draws[:2]] + ["-"] + (
        ["+"] if draws[2] else ["*"]
    )
    check_carried(once)
    # over many problems: binomial slip counts with p = 0.5 per multiplication
    problems = reward.make_arithmetic_problems(3000, seed=1, num_steps=4, multiply=1.0)
    rng = random.Random(0)
    slips = [sum(op == "+" for _, op, _, _ in values_of(sft.slipped_solution(p["solution"], 0.5, rng)))
             for p in problems if p["solution"].count(" * ") == 4]
    n = len(slips)
    assert n > 2500
    for k, chance in enumerate((1, 4, 6, 4, 1)):
        expected = n * chance / 16
        assert abs(slips.count(k) - expected) < 4 * math.sqrt(expected), (k, slips.count(k), expected)


def test_sft_slip_each_in_the_warm_up():
    args = train.parse_args(["--dataset", "arithmetic", "--arithmetic-steps", "4", "--arithmetic-multiply", "1.0",
                             "--sft-answer-only", "0", "--sft-slip-each", "0.5"])
    problems = train.load_data(args)[1][:200]
    tokenizer = sft.build_tiny_tokenizer([p["question"] + p["solution"] for p in problems])

    def examples(rng: random.Random) -> list[tuple[list[int], list[int]]]:
        return sft.sft_examples(tokenizer, reward.to_problems(problems, tokenizer, "arithmetic"), "arithmetic",
                                answer_only=args.sft_answer_only, slip=args.sft_slip, slip_each=args.sft_slip_each,
                                rng=rng)

    first = examples(random.Random(3))
    assert first == examples(random.Random(3)), "deterministic for a seed"
    rng = random.Random(3)
    texts = [sft.slipped_solution(p["solution"], 0.5, rng) for p in problems]
    assert [tokenizer.decode(r[:-1]) for _, r in first] == texts  # exactly slipped_solution's draws
    slips = sum(op == "+" for t in texts for _, op, _, _ in values_of(t))
    mults = sum(p["solution"].count(" * ") for p in problems)
    assert abs(slips - mults / 2) < 4 * math.sqrt(mults / 4)


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "gsm8k", "--sft-slip-each", "0.5"], "for --dataset arithmetic"),
    (["--dataset", "gsm8k", "--arithmetic-steps", "5"], "for --dataset arithmetic"),
    (["--dataset", "arithmetic", "--sft-slip", "0.5", "--sft-slip-each", "0.5"], "not both"),
    (["--dataset", "arithmetic", "--sft-slip-each", "1.5"], "--sft-slip-each"),
    (["--dataset", "arithmetic", "--arithmetic-multiply", "-0.1"], "--arithmetic-multiply"),
    (["--dataset", "arithmetic", "--arithmetic-steps", "0"], "--arithmetic-steps"),
])
def test_bad_task_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        train.parse_args(argv)
    assert message in str(stopped.value) + capsys.readouterr().err


def test_the_task_options_belong_to_the_starting_model():
    assert {"arithmetic_steps", "arithmetic_multiply", "sft_slip_each"} <= set(train.INIT_OPTIONS)
    with pytest.raises(ValueError, match="read, not generated"):
        reward.load_problems("gsm8k", "test", num_steps=4)


def test_slips_of_counts_slipped_and_reached_multiplications():
    gold = "\nTom has 3 pens.\n3 * 2 = 6\n6 + 1 = 7\n7 * 3 = 21\n#### 21\n"
    assert compare_runs.slips_of(gold, gold) == (0, 2)
    assert compare_runs.slips_of("\nTom has 3 pens.\n3 + 2 = 5\n5 + 1 = 6\n6 * 3 = 18\n#### 18\n", gold) == (1, 2)
    assert compare_runs.slips_of("\nTom has 3 pens.\n3 + 2 = 5\n5 + 1 = 6\n6 + 3 = 9\n#### 9\n", gold) == (2, 2)
    assert compare_runs.slips_of("\nTom has 3 pens.\n3 + 2 = 5\n", gold) == (1, 1), "stopped after one"
    assert compare_runs.slips_of("\n#### 21\n", gold) == (0, 0), "no working: no decision reached"
    assert compare_runs.slips_of("\nTom has 3 pens.\n3 - 2 = 1\n1 + 1 = 2\n", gold) == (0, 0), "another mistake"
    assert compare_runs.task_of({"arithmetic_steps": 4, "model": "x", "eval_problems": 250}) == [
        "--arithmetic-steps", "4", "--eval-problems", "250"]
