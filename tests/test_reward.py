"""Tests for reward.py: data loading, the arithmetic generator, answer extraction and grading (CPU, offline)."""

import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import grading
import reward
import sft

# ----------------------------------------------------------------------------------------------------------------
# Gold solutions grade 1.0 against their own answer, 0.0 against another problem's


def test_every_gsm8k_gold_solution_grades_correct(data_dir):
    problems = [p for split in reward.SPLITS for p in reward.load_problems("gsm8k", split, data_dir)]
    assert len(problems) == 8792
    for i, p in enumerate(problems):
        assert p["solution"].startswith("\n") and p["solution"].endswith(f"#### {p['answer']}\n"), p["solution"]
        assert "<<" not in p["solution"], "calculator annotations must be removed (docs/paper.md §4.1)"
        assert reward.grade(p["solution"], p["answer"], "gsm8k") == 1.0, p
        assert reward.grade(sft.answer_only_solution(p["answer"], "gsm8k"), p["answer"], "gsm8k") == 1.0, p
        j = (i + 1) % len(problems)  # the next problem whose answer differs, even after removing commas
        while problems[j]["answer"].replace(",", "") == p["answer"].replace(",", ""):
            j = (j + 1) % len(problems)
        assert reward.grade(p["solution"], problems[j]["answer"], "gsm8k") == 0.0, (p, problems[j]["answer"])


def plain_value(answer: str) -> str:
    """A crude, independent normal form for picking non-equivalent MATH answers: no spaces, no "x=", a float."""
    answer = re.sub(r"^[a-z]=", "", answer.replace(" ", "").replace("\\$", ""))
    try:
        return str(float(answer.replace(",", "")))
    except ValueError:
        return answer


def test_every_math500_gold_solution_grades_correct(data_dir):
    problems = reward.load_problems("math", "test", data_dir)
    assert len(problems) == 500
    for i, p in enumerate(problems):
        assert reward.grade(p["solution"], p["answer"], "math") == 1.0, p
        assert reward.grade(sft.answer_only_solution(p["answer"], "math"), p["answer"], "math") == 1.0, p
        # The same through math-verify itself (grade() answers identical strings without asking it).
        assert reward.verify_boxed(p["answer"], p["answer"]), p["answer"]
        j = (i + 1) % len(problems)  # the next problem whose answer is not the same value ("5" vs "x=5", "5.0")
        while plain_value(problems[j]["answer"]) == plain_value(p["answer"]):
            j = (j + 1) % len(problems)
        assert reward.grade(p["solution"], problems[j]["answer"], "math") == 0.0, (p["answer"], problems[j]["answer"])


def test_every_math_train_gold_solution_grades_correct(data_dir):
    problems = reward.load_problems("math", "train", data_dir) + reward.load_problems("math", "validation", data_dir)
    assert all(reward.grade(p["solution"], p["answer"], "math") == 1.0 for p in problems)


# ----------------------------------------------------------------------------------------------------------------
# Hand-written extraction and grading tables

GSM8K_CASES = [  # (response, extracted answer, gold, reward)
    ("\nNatalia sold 48/2 = 24 clips.\n#### 72\n", "72", "72", 1.0),
    ("\n#### 1,080\n", "1,080", "1080", 1.0),
    ("\n#### 1080\n", "1080", "1,080", 1.0),  # departure 1: commas removed from the gold too
    ("\n#### -5\n", "-5", "-5", 1.0),
    ("\n#### 3.5\n", "3.5", "3.5", 1.0),
    ("\n#### 3.50\n", "3.50", "3.5", 0.0),  # exact string match, no numeric normalisation (docs/paper.md §4.3)
    ("\n#### 72.0\n", "72.0", "72", 0.0),
    ("\n#### $72\n", "$72", "72", 0.0),
    ("\nThe answer is 72.\n", None, "72", 0.0),  # the paper accepts only "####"
    ("\n#### 5\nNo wait.\n#### 72\n", "72", "72", 1.0),  # the last "####" counts
    ("\n#### 72\nextra", "72\nextra", "72", 0.0),  # everything after "####", as the paper does
    ("####72", "72", "72", 1.0),
    ("\n#### \n", "", "72", 0.0),
    ("\n#### ABC\n", "ABC", " abc ", 1.0),  # lowercased, gold stripped
    ("\n#### 72\n\n\nProblem: Next one.\n#### 5\n", "5", "72", 1.0),  # departure 4: cut at the stop string
    ("", None, "72", 0.0),
]


@pytest.mark.parametrize("dataset", ["gsm8k", "arithmetic"])
@pytest.mark.parametrize("response, extracted, gold, expected", GSM8K_CASES)
def test_gsm8k_extraction_and_grading(dataset, response, extracted, gold, expected):
    assert reward.extract_answer(response, dataset) == extracted
    assert reward.grade(response, gold, dataset) == expected


BOXED_CASES = [  # (text, contents of the last box)
    ("so $x = \\boxed{5}$.", "5"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("first \\boxed{1}, then \\boxed{2}.", "2"),
    ("$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("\\fbox{7}", "7"),
    ("\\boxed{1} then \\fbox{7}", "7"),
    ("answer: $\\boxed 5$.", "5"),
    ("\\boxed {5}", "5"),
    ("\\boxed{}", ""),
    ("\\boxed{5", None),  # unbalanced
    ("\\boxed{2} and then \\boxed{", None),  # the last box counts, even when it never closes
    ("The answer is 5.", None),
    ("ends with \\boxed", None),
    ("\\boxed{" + "1" * 2000 + "}", None),  # longer than MAX_ANSWER_CHARS
    ("\\boxed " + "1" * 2000, None),
]


@pytest.mark.parametrize("text, expected", BOXED_CASES)
def test_math_extraction(text, expected):
    assert reward.extract_answer(text, "math") == expected


MATH_CASES = [  # (response, gold, reward)
    ("$\\boxed{10}$", "10", 1.0),
    ("$\\boxed{\\frac12}$", "0.5", 1.0),
    ("$\\boxed{0.5}$", "\\frac{1}{2}", 1.0),
    ("$\\boxed{\\dfrac{1}{2}}$", "\\frac{1}{2}", 1.0),
    ("$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$", "(3,\\frac{\\pi}{2})", 1.0),
    ("$\\boxed{[1, 2)}$", "[1,2)", 1.0),
    ("$\\boxed{(1,2)}$", "[1,2]", 0.0),  # open and closed intervals differ
    ("$\\boxed{x(x+2)}$", "x^2+2x", 1.0),
    ("$\\boxed{\\sqrt{18}}$", "3\\sqrt{2}", 1.0),
    ("$\\boxed{\\{2,1\\}}$", "\\{1,2\\}", 1.0),
    ("$\\boxed{90^\\circ}$", "90", 1.0),
    ("$\\boxed{-3}$", "3", 0.0),
    ("$\\boxed{5}$", "6", 0.0),
    ("The answer is $5$.", "5", 0.0),  # departure 2: only a boxed answer counts
    ("$\\boxed{5}$\n\n\nProblem: next\n$\\boxed{6}$", "5", 1.0),  # cut at the stop string
]


@pytest.mark.parametrize("response, gold, expected", MATH_CASES)
def test_math_grading(response, gold, expected):
    assert reward.grade(response, gold, "math") == expected


def test_prompt_format():
    assert reward.format_prompt("What is 2+2?", "gsm8k") == "[MATH_TASK] Problem:\nWhat is 2+2?\n\nSolution:"
    assert reward.format_prompt("Q", "math") == reward.format_prompt("Q", "arithmetic")


def test_unknown_dataset_is_an_error():
    with pytest.raises(ValueError, match="gsm8k, math, arithmetic"):
        reward.extract_answer("#### 5", "svamp")


# ----------------------------------------------------------------------------------------------------------------
# grade() never raises and returns within a second

MEGABYTE = 1_000_000
HOSTILE_RESPONSES = [
    "".join(random.Random(0).choices("0123456789{}\\$#, abx^_()[]\n", k=MEGABYTE)),
    "\\boxed{" * (MEGABYTE // 7),  # deeply nested, never closed
    "\\boxed{" + "1" * MEGABYTE + "}",
    "\\boxed{" + "}" * MEGABYTE,
    "\\boxed " + "1" * MEGABYTE,
    "\\boxed" + " " * MEGABYTE + "{5}",
    "{" * MEGABYTE,
    "#### " + "9" * MEGABYTE,
    "####" * (MEGABYTE // 4),
    "\\boxed{" + "{" * 49 + "1" + "}" * 49 + "}",  # math-verify alone takes ~8 s on this one
    "\\boxed{" + "a" * 990 + "}",  # and ~1 s on this one
    "\\boxed{9^{9^{9^{9}}}}",
    "\\boxed{(10^{100})!}",
    "\\boxed{\\frac{1}{0}}",
]


BOTH_TRIES = reward.MATH_VERIFY_SECONDS + reward.MATH_RETRY_SECONDS  # the most CPU time one comparison gets


@pytest.fixture(scope="module")
def grading_workers():
    """The grading pool's workers, started (their imports and warm-up take a second or two) before anything is
    timed."""
    reward.GRADING_POOL.run([("1", "2")], default=False)


@pytest.mark.parametrize("index", range(len(HOSTILE_RESPONSES)))
def test_grade_is_fast_and_total_on_hostile_inputs(index, grading_workers):
    response = HOSTILE_RESPONSES[index]
    handlers = [signal.getsignal(s) for s in (signal.SIGALRM, signal.SIGPROF)]
    for dataset in reward.DATASETS:
        start = time.perf_counter()
        result = reward.grade(response, "5", dataset)
        elapsed = time.perf_counter() - start
        assert result in (0.0, 1.0)
        # bounded by the CPU budgets (the nested braces alone take ~8 s); the margin is for a loaded machine
        assert elapsed < BOTH_TRIES + 3.0, f"grade took {elapsed:.2f} s on input {index} ({dataset})"
    assert [signal.getsignal(s) for s in (signal.SIGALRM, signal.SIGPROF)] == handlers, "this process sets none"
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0), "no timer may be left running"


LATEX_PIECES = ["\\boxed{", "\\fbox{", "{", "}", "\\frac", "\\sqrt", "^", "_", "1", "2", "9", "x", "(", ")", "[", "]",
                ",", " ", "$", "\\left(", "\\right)", "\\{", "\\}", "!", "=", "\\infty", "\\pi", "####", "\n", "\\"]


LATEX_STRINGS = st.lists(st.sampled_from(LATEX_PIECES), max_size=60).map("".join)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(latex=LATEX_STRINGS, noise=st.text(max_size=50), gold=st.one_of(st.text(max_size=8), LATEX_STRINGS))
def test_grade_never_raises_on_random_strings(grading_workers, latex, noise, gold):
    for response in (latex, noise + latex, "\\boxed{" + latex + "}", "#### " + latex):
        for dataset in reward.DATASETS:
            start = time.perf_counter()
            assert reward.grade(response, gold, dataset) in (0.0, 1.0)
            assert time.perf_counter() - start < BOTH_TRIES + 3.0  # a margin for a loaded machine


def test_a_swallowed_deadline_fires_again(monkeypatch):
    """In a grading worker, one MathVerifyDeadline may be swallowed (Python drops an exception raised in a __del__ or a
    garbage-collector callback, which may be what is running when the signal is handled): the timer fires again until
    the comparison returns. With a one-shot timer this comparison would run its 20 s and count as right. It runs out
    of time on both tries, and that is no verdict: None."""
    swallowed = []

    def stubborn(pred: str, gold: str) -> bool:
        end = time.monotonic() + 20
        try:
            while time.monotonic() < end:
                pass
        except reward.MathVerifyDeadline:
            swallowed.append(True)
        while time.monotonic() < end:
            pass
        return True

    monkeypatch.setattr(reward, "verify_boxed", stubborn)
    assert reward.verify_in_worker("x", "y") is None  # what a grading worker runs, here in this process
    assert swallowed == [True, True]  # one per try
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0), "no timer may be left running"


def test_grade_works_outside_the_main_thread():
    reward.MATH_CACHE.clear()
    results = []
    thread = threading.Thread(target=lambda: results.append(reward.grade("$\\boxed{\\frac12}$", "0.5", "math")))
    thread.start()
    thread.join(timeout=30)
    assert results == [1.0]


# ----------------------------------------------------------------------------------------------------------------
# The arithmetic generator

STEP_LINE = re.compile(r"^(\d+) ([-+*]) (\d+) = (\d+)$")


def check_arithmetic_problem(p: dict, num_steps: int, max_number: int):
    """Every step line is a true fact that continues from the previous result; the answer line comes last."""
    lines = p["solution"].split("\n")
    assert lines[0] == "" and lines[-1] == "", "the response starts and ends with a newline (docs/paper.md §4.1)"
    assert lines[-2] == f"#### {p['answer']}", "the answer line is the last line"
    start = int(re.match(r"^\w+ has (\d+) \w+\.$", lines[1]).group(1))
    assert 1 <= start <= max_number and p["question"].startswith(lines[1])
    value, operands = start, [start]
    assert len(lines) == num_steps + 4, lines
    for line in lines[2:-2]:
        left, op, right, result = STEP_LINE.match(line).groups()
        assert int(left) == value, f"{line!r} does not continue from {value}"
        assert eval(f"{left} {op} {right}") == int(result), f"{line!r} is not true"  # digits and one operator only
        assert 0 <= int(result) <= 999
        if op == "*":
            assert right in ("2", "3")
        else:
            assert 1 <= int(right) <= max_number
            operands.append(int(right))
        value = int(result)
    assert str(value) == p["answer"]
    assert [int(n) for n in re.findall(r"\d+", p["question"])] == operands, "the question names every operand"
    assert p["question"].count("doubles") == p["solution"].count("* 2 =")
    assert p["question"].count("triples") == p["solution"].count("* 3 =")


def test_arithmetic_problems_are_true_and_gradable():
    problems = reward.load_problems("arithmetic", "train")
    assert 19_900 <= len(problems) <= 20_000, "20,000 generated, minus the few that repeat a held-out question"
    for p in problems[:2000]:
        check_arithmetic_problem(p, num_steps=3, max_number=20)
    assert all(reward.grade(p["solution"], p["answer"], "arithmetic") == 1.0 for p in problems)
    assert all(reward.grade(sft.answer_only_solution(p["answer"], "arithmetic"), p["answer"], "arithmetic") == 1.0
               for p in problems)
    assert sum("*" in p["solution"] for p in problems) > 0, "an occasional multiplication"
    lengths = [len(reward.format_prompt(p["question"], "arithmetic") + p["solution"]) for p in problems]
    assert sum(lengths) / len(lengths) < 210 and max(lengths) < 240, "short enough for a tiny byte-level model"


def test_arithmetic_difficulty_knobs():
    for p in reward.make_arithmetic_problems(200, seed=5, num_steps=2, max_number=9):
        check_arithmetic_problem(p, num_steps=2, max_number=9)
    for p in reward.make_arithmetic_problems(200, seed=5, num_steps=7, max_number=500):
        check_arithmetic_problem(p, num_steps=7, max_number=500)


def test_arithmetic_is_deterministic_per_seed_and_splits_are_disjoint():
    assert reward.make_arithmetic_problems(50, seed=3) == reward.make_arithmetic_problems(50, seed=3)
    assert reward.make_arithmetic_problems(50, seed=3) != reward.make_arithmetic_problems(50, seed=4)
    questions = [{p["question"] for p in reward.load_problems("arithmetic", split)} for split in reward.SPLITS]
    assert not (questions[0] & questions[1]) and not (questions[0] & questions[2]) and not (questions[1] & questions[2])


# ----------------------------------------------------------------------------------------------------------------
# load_problems


@pytest.mark.parametrize("dataset, sizes", [("gsm8k", (7100, 373, 1319)), ("math", (11500, 500, 500))])
def test_split_sizes_disjoint_and_deterministic(data_dir, dataset, sizes):
    splits = [reward.load_problems(dataset, split, data_dir) for split in reward.SPLITS]
    assert tuple(len(s) for s in splits) == sizes
    train, validation = ({(p["question"], p["solution"]) for p in s} for s in splits[:2])
    assert not train & validation and len(train | validation) == sizes[0] + sizes[1]
    assert reward.load_problems(dataset, "validation", data_dir) == splits[1]
    assert set(splits[0][0]) == {"question", "answer", "solution"}


def test_data_dir_may_be_the_dataset_folder(data_dir):
    assert reward.load_problems("math", "test", data_dir / "math") == reward.load_problems("math", "test", data_dir)


def test_default_is_the_data_shipped_in_the_repository(data_dir):
    assert reward.DATA_DIR == data_dir and (data_dir / "gsm8k" / "test.jsonl.gz").is_file()
    assert reward.load_problems("gsm8k", "test") == reward.load_problems("gsm8k", "test", data_dir)


def test_plain_and_gzip_jsonl_give_the_same_problems(tmp_path, data_dir):
    (tmp_path / "gsm8k").mkdir()
    with gzip.open(data_dir / "gsm8k" / "test.jsonl.gz", "rb") as f:
        (tmp_path / "gsm8k" / "test.jsonl").write_bytes(f.read())
    assert reward.load_problems("gsm8k", "test", tmp_path) == reward.load_problems("gsm8k", "test", data_dir)


def test_a_corrupt_gzip_file_is_a_value_error_naming_it(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl.gz").write_bytes(gzip.compress(b'{"question": "q"}\n' * 100)[:40])
    with pytest.raises(ValueError, match=re.escape("test.jsonl.gz")):
        reward.load_problems("gsm8k", "test", tmp_path)


def test_missing_file_error_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "gsm8k" / "test.jsonl"))):
        reward.load_problems("gsm8k", "test", tmp_path)


GOOD_GSM8K = json.dumps({"question": "q", "answer": "1 + 1 = 2\n#### 2"})


@pytest.mark.parametrize("dataset, filename, bad_line", [
    ("gsm8k", "test.jsonl", '{"question": "q", "answer": '),  # bad JSON
    ("gsm8k", "test.jsonl", '{"question": "q"}'),  # missing field
    ("gsm8k", "test.jsonl", '{"question": 5, "answer": "#### 5"}'),  # wrong type
    ("gsm8k", "test.jsonl", '{"question": "q", "answer": "5"}'),  # no "####" line
    ("gsm8k", "test.jsonl", '["q", "#### 5"]'),  # not an object
    ("math", "math500_test.jsonl", '{"problem": "p", "answer": "5"}'),  # missing solution
])
def test_malformed_row_error_names_file_and_line(tmp_path, dataset, filename, bad_line):
    (tmp_path / dataset).mkdir()
    good = GOOD_GSM8K if dataset == "gsm8k" else json.dumps({"problem": "p", "solution": "\\boxed{5}", "answer": "5"})
    (tmp_path / dataset / filename).write_text(f"{good}\n\n{bad_line}\n{good}\n")
    with pytest.raises(ValueError, match=re.escape(f"{filename}, line 3")):
        reward.load_problems(dataset, "test", tmp_path)


def test_unknown_dataset_or_split():
    with pytest.raises(ValueError, match="gsm8k, math, arithmetic"):
        reward.load_problems("svamp", "train")
    with pytest.raises(ValueError, match="train, validation, test"):
        reward.load_problems("gsm8k", "dev")


def test_hub_failure_says_how_to_use_the_shipped_data(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def unreachable(*args, **kwargs):
        raise ConnectionError("no network in tests")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(RuntimeError, match="data_dir unset") as error:
        reward.load_problems("gsm8k", "train", "hub")
    assert "data/README.md" in str(error.value)


def test_hub_rows_give_the_same_problems_as_local_files(monkeypatch, data_dir):
    """The hub path converts rows like the local path, and the validation draw does not depend on row order."""
    datasets = pytest.importorskip("datasets")
    local_file = {"openai/gsm8k": {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
                  "zzy1123/MATH_train_test_split": {"train": "math/prm800k_train.jsonl"}}

    def fake_load_dataset(repo, config, split):
        rows = [json.loads(line) for line in gzip.open(data_dir / (local_file[repo][split] + ".gz"), "rt")]
        random.Random(0).shuffle(rows)
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    shuffled, local = reward.load_problems("gsm8k", "test", "hub"), reward.load_problems("gsm8k", "test", data_dir)
    assert shuffled != local and sorted(shuffled, key=str) == sorted(local, key=str)
    for dataset in ("gsm8k", "math"):
        hub = reward.load_problems(dataset, "validation", "hub")
        local = reward.load_problems(dataset, "validation", data_dir)
        assert sorted(hub, key=str) == sorted(local, key=str)


@pytest.mark.parametrize("response, dataset, finished", [
    ("\nNatalia sold 24 clips.\n#### 72\n", "gsm8k", True),
    ("\nNatalia sold 24 clips.\n####\n", "gsm8k", True),  # an answer line, empty: finished, graded 0
    ("\nNatalia sold 24 clips.\nThe answer is 72.\n", "gsm8k", False),  # the official extractor finds nothing
    ("", "arithmetic", False),
    ("\n12 - 5 = 7\n#### 7\n", "arithmetic", True),
    ("\nSo $x = 3$.\n", "math", True),  # the official MATH extractor falls back to the last number
    ("", "math", True),
])
def test_counts_as_finished_follows_the_official_extractors(response, dataset, finished):
    assert reward.counts_as_finished(response, dataset) is finished


# ----------------------------------------------------------------------------------------------------------------
# The grading pool (grading.py): MATH comparisons in worker processes, cached, with no alarm in this process

TESTS = os.path.dirname(os.path.abspath(__file__))


def reformatted(answer: str) -> str:
    """The same answer written another way, which math-verify should still call equal (or not: either way, batch
    and one-by-one must agree)."""
    return answer.replace("\\frac", "\\dfrac").replace(",", ", ") + " "


def one_by_one(pairs: list[tuple[str, str]]) -> list[bool]:
    """Today's grading: every pair alone, from a fresh single worker, with no cache: math_answers_equal's verdicts
    as grade gave them one call at a time."""
    reward.MATH_CACHE.clear()
    pool = reward.grading_pool(1)
    try:
        verdicts = []
        for pred, gold in pairs:
            if pred.strip() == gold.strip():
                verdicts.append(True)
            elif len(pred) > reward.MAX_ANSWER_CHARS or len(gold) > reward.MAX_ANSWER_CHARS or \
                    reward.too_big_to_verify(pred):
                verdicts.append(False)
            else:
                verdicts.append(bool(pool.run([(pred, gold)], default=None)[0]))  # None: out of time
        return verdicts
    finally:
        pool.close()


def test_grade_batch_gives_grades_numbers_in_any_order(data_dir, grading_workers):
    """Over the MATH500 golds (each against itself, a reformatted copy and another problem's answer), the hostile
    inputs and the GSM8K / arithmetic formats: grade_batch, with its pool and cache, shuffled, equals one comparison
    at a time with no cache."""
    golds = [p["answer"] for p in reward.load_problems("math", "test", data_dir)]
    preds = golds + [reformatted(g) for g in golds] + golds[1:] + golds[:1]
    responses = [f"The answer is $\\boxed{{{p}}}$." for p in preds] + HOSTILE_RESPONSES
    targets = golds * 3 + ["5"] * len(HOSTILE_RESPONSES)
    order = list(range(len(responses)))
    random.Random(0).shuffle(order)
    reward.MATH_CACHE.clear()
    batch = reward.grade_batch([responses[i] for i in order], [targets[i] for i in order], "math")
    batch = [b for _, b in sorted(zip(order, batch))]
    answers = [(reward.final_answer(r, "math"), t) for r, t in zip(responses, targets)]
    verdicts = iter(one_by_one([a for a in answers if a[0] is not None]))
    assert batch == [float(next(verdicts)) if a[0] is not None else 0.0 for a in answers]
    assert sum(batch[:500]) == 500 and 0 < sum(batch[1000:1500]) < 50  # itself; another problem's (some agree)
    texts, golds = ["\n1 + 2 = 3\n#### 3\n", "#### 1,080", "no answer", "#### 4"], ["3", "1080", "3", "3"]
    for dataset in ("gsm8k", "arithmetic"):
        assert reward.grade_batch(texts, golds, dataset) == [reward.grade(t, g, dataset) for t, g in zip(texts, golds)]
        assert reward.grade_batch(texts, golds, dataset) == [1.0, 1.0, 0.0, 0.0]


def test_this_process_sets_no_alarm_while_grading(monkeypatch, grading_workers):
    calls = []
    for name in ("signal", "setitimer", "alarm"):
        real = getattr(signal, name)
        monkeypatch.setattr(signal, name, lambda *a, real=real, name=name: (calls.append((name, a)), real(*a))[1])
    reward.MATH_CACHE.clear()
    pairs = ["$\\boxed{\\frac12}$", "$\\boxed{0.5}$", "\\boxed{" + "{" * 49 + "1" + "}" * 49 + "}"]
    assert reward.grade_batch(pairs, ["0.5", "\\frac{1}{2}", "1"], "math") == [1.0, 1.0, 0.0]
    assert calls == [] and signal.getitimer(signal.ITIMER_REAL) == signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None), "no handler was installed"
    assert signal.getsignal(signal.SIGPROF) in (signal.SIG_DFL, None), "no handler was installed"


def test_each_distinct_pair_is_compared_once_and_the_cache_is_bounded(monkeypatch, grading_workers):
    asked = []
    run = reward.GRADING_POOL.run
    monkeypatch.setattr(reward.GRADING_POOL, "run", lambda tasks, default: (asked.append(list(tasks)),
                                                                           run(tasks, default))[1])
    monkeypatch.setattr(reward, "MATH_CACHE_SIZE", 3)
    reward.MATH_CACHE.clear()
    boxed = ["$\\boxed{" + answer + "}$" for answer in ("\\frac12", "1/2", "0.5", "2", "3")]
    responses = [boxed[0]] * 9 + [boxed[1]] * 9 + boxed[2:]
    assert reward.grade_batch(responses, ["0.5"] * len(responses), "math") == [1.0] * 19 + [0.0, 0.0]
    assert asked == [[("\\frac12", "0.5"), ("1/2", "0.5"), ("2", "0.5"), ("3", "0.5")]]  # "0.5" is identical
    assert list(reward.MATH_CACHE) == [("1/2", "0.5"), ("2", "0.5"), ("3", "0.5")]  # the oldest went first
    assert reward.grade_batch(responses[-3:], ["0.5"] * 3, "math") == [1.0, 0.0, 0.0] and len(asked) == 1


def test_a_worker_stuck_in_c_is_killed_within_its_budget_and_the_next_call_works(monkeypatch):
    """A call that holds the GIL (no signal handler can run in that worker) gives the default after budget + 1 s; the
    other task of the run is answered by the other worker without waiting for it; a new worker takes the stuck one's
    place."""
    monkeypatch.setenv("PYTHONPATH", TESTS)
    pool = grading.Pool("stuck:hold_the_gil", workers=2, budget=0.5)
    try:
        pool.run([(1,)], default=None)  # both workers started
        first = [w.process for w in pool.workers]
        start = time.monotonic()
        assert pool.run([(40,), (3,)], default="killed") == ["killed", False]
        assert time.monotonic() - start < 0.5 + grading.MARGIN + 1.0  # the last second: a loaded machine
        assert first[0].poll() is not None, "the stuck worker was killed"
        assert pool.run([(3,), (3,)], default="killed") == [False, False], "and replaced"
    finally:
        pool.close()


def test_ctrl_c_while_grading_leaves_no_worker_behind(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", TESTS)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "Ctrl-C not handled (see conftest.py)"
    pool = grading.Pool("stuck:hold_the_gil", workers=2, budget=30)
    pool.run([(1,), (1,)], default=None)  # both workers up: none starts while the Ctrl-C comes
    processes = [w.process for w in pool.workers]
    timer = threading.Timer(1.0, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))  # a Ctrl-C
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        pool.run([(40,), (40,)], default=None)
    timer.join()
    assert pool.workers == [] and all(p.poll() is not None for p in processes)
    assert pool.run([(3,)], default=None) == [False], "the next run starts new workers"
    pool.close()


def test_the_workers_are_other_processes_and_end_with_their_pool(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", TESTS)
    pool = grading.Pool("stuck:pid", workers=2, budget=5)
    pids = set(pool.run([(i,) for i in range(8)], default=None))  # the first worker ready may take them all
    processes = [w.process for w in pool.workers]
    assert len(processes) == 2 and pids <= {p.pid for p in processes} and os.getpid() not in pids
    pool.close()
    assert all(p.poll() is not None for p in processes)


# ----------------------------------------------------------------------------------------------------------------
# Issue 35: a right answer is not graded 0 because the machine is busy; workers that die are replaced; no orphans

EQUIVALENT_PAIRS = ([(f"({a}+x)^2", f"x^2+{2 * a}x+{a * a}") for a in range(1, 9)]  # 40 distinct equivalent pairs
                   + [(f"\\frac{{{a}}}{{{2 * a}}}", "0.5") for a in range(1, 9)]
                   + [(f"[{a}, {a + 1})", f"[{a},{a + 1})") for a in range(1, 9)]
                   + [(f"\\{{{a + 1},{a}\\}}", f"\\{{{a},{a + 1}\\}}") for a in range(1, 9)]
                   + [(f"\\sqrt{{{2 * a * a}}}", f"{a}\\sqrt{{2}}") for a in range(2, 10)])


def test_the_budget_is_cpu_time_that_other_processes_cannot_use_up(monkeypatch):
    """A comparison that waits (as it does for a core on a busy machine) uses no CPU time, so its budget lasts: with
    a wall-clock budget this one would be cut at MATH_VERIFY_SECONDS and graded 0."""

    def waits_then_agrees(pred: str, gold: str) -> bool:
        time.sleep(reward.MATH_VERIFY_SECONDS + 0.5)
        return True

    monkeypatch.setattr(reward, "verify_boxed", waits_then_agrees)
    assert reward.verify_in_worker("x", "y") is True  # what a grading worker runs, here in this process
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0) and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_comparison_out_of_time_gets_a_second_try_with_a_larger_budget(monkeypatch):
    """The first comparison of a kind pays sympy's set-up (0.4-1 s): it runs out of time, the second try agrees."""
    tries = []

    def slow_the_first_time(pred: str, gold: str) -> bool:
        tries.append(pred)
        while len(tries) == 1:  # until the deadline
            pass
        return True

    monkeypatch.setattr(reward, "verify_boxed", slow_the_first_time)
    assert reward.verify_in_worker("x", "y") is True and len(tries) == 2
    assert reward.MATH_RETRY_SECONDS > reward.MATH_VERIFY_SECONDS
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)


def test_a_comparison_out_of_time_is_graded_0_but_not_cached(monkeypatch):
    """A worker killed for overrunning its budget gives no verdict: the answer scores 0 this time, and the next grading
    asks again (here a pool that answers) instead of finding a cached 0."""
    monkeypatch.setenv("PYTHONPATH", TESTS)
    real, napping = reward.GRADING_POOL, grading.Pool("stuck:nap", workers=1, budget=0.1)
    reward.MATH_CACHE.clear()
    monkeypatch.setattr(reward, "GRADING_POOL", napping)
    try:
        assert reward.grade("$\\boxed{(1+x)^2}$", "x^2+2x+1", "math") == 0.0  # killed after 0.1 + MARGIN s
    finally:
        napping.close()
    assert dict(reward.MATH_CACHE) == {}
    monkeypatch.setattr(reward, "GRADING_POOL", real)
    assert reward.grade("$\\boxed{(1+x)^2}$", "x^2+2x+1", "math") == 1.0
    assert dict(reward.MATH_CACHE) == {("(1+x)^2", "x^2+2x+1"): True}


@pytest.mark.slow
def test_right_answers_grade_1_with_8_workers_on_a_busy_machine():
    """8 grading workers and 2 busy loops on (here) 2 cores: a worker's first comparisons, sympy setting up, took 0.6-1
    s of wall clock against a 0.5 s budget, and 8 of 40 right answers were graded 0. Warmed-up workers and CPU-time
    budgets grade them all 1. (The pool is built directly: set_grading_workers would cap it at the cores.)"""
    pool = reward.grading_pool(8)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        verdicts = pool.run(EQUIVALENT_PAIRS, default=None)
    finally:
        for process in busy:
            process.kill()
            process.wait()
        pool.close()
    assert verdicts == [True] * len(EQUIVALENT_PAIRS), [p for p, v in zip(EQUIVALENT_PAIRS, verdicts) if v is not True]


def test_the_warm_up_calls_run_before_the_first_task(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", TESTS)
    pool = grading.Pool("stuck:die_first", workers=1, budget=5, warm_up=[(str(tmp_path / "calls"), 0)])
    try:
        assert pool.run([(str(tmp_path / "calls"), 0)], default=None) == [2]  # the warm-up was call 1
    finally:
        pool.close()


def test_a_worker_killed_while_idle_is_replaced(monkeypatch):
    """It used to end the run: BrokenPipeError when the next task was sent to it."""
    monkeypatch.setenv("PYTHONPATH", TESTS)
    pool = grading.Pool("stuck:pid", workers=2, budget=5)
    try:
        pool.run([(0,)], default=None)
        victim = next(w for w in pool.workers if w.ready).process
        victim.kill()
        victim.wait()
        pids = pool.run([(i,) for i in range(8)], default=None)
        assert None not in pids and victim.pid not in pids
        assert set(pids) <= {w.process.pid for w in pool.workers} and victim not in [w.process for w in pool.workers]
    finally:
        pool.close()


def test_a_worker_killed_while_starting_is_replaced(monkeypatch):
    """It used to fail the whole batch: RuntimeError "ended while starting"."""
    monkeypatch.setenv("PYTHONPATH", TESTS)
    monkeypatch.setenv("STUCK_IMPORT_SECONDS", "1.5")  # each worker takes that long to start
    pool = grading.Pool("stuck:pid", workers=2, budget=5)
    killer = threading.Timer(0.5, lambda: pool.workers[0].process.kill())
    try:
        killer.start()
        pids = pool.run([(i,) for i in range(4)], default=None)
        assert None not in pids and set(pids) <= {w.process.pid for w in pool.workers}
    finally:
        killer.join()
        pool.close()


def test_a_task_whose_worker_dies_is_tried_again_a_bounded_number_of_times(monkeypatch, tmp_path):
    """A worker killed under its task (out of memory, a kill from outside) is replaced and the task tried again; a
    task that kills every worker it touches gives the default after grading.TASK_TRIES tries, and the others are
    answered."""
    monkeypatch.setenv("PYTHONPATH", TESTS)
    pool = grading.Pool("stuck:die_first", workers=2, budget=5)
    once, always = str(tmp_path / "once"), str(tmp_path / "always")
    try:
        assert pool.run([(once, 1), (always, 100), (str(tmp_path / "never"), 0)], default="lost") == [2, "lost", 1]
        assert (tmp_path / "always").read_text() == str(grading.TASK_TRIES)
        assert pool.run([(once, 1)], default="lost") == [3], "the pool still works"
    finally:
        pool.close()


@pytest.mark.parametrize("target", ["stuck:no_such_function", "no_such_module:f"])
def test_a_target_that_cannot_start_is_an_error_not_a_loop(monkeypatch, target):
    """Workers that die while starting are replaced, but grading.START_TRIES of them in a row is an error."""
    monkeypatch.setenv("PYTHONPATH", TESTS)
    pool = grading.Pool(target, workers=2, budget=5)
    with pytest.raises(RuntimeError, match="ended while starting"):
        pool.run([(1,), (2,)], default=None)
    assert pool.workers == []


def test_a_busy_worker_ends_silently_when_its_caller_is_killed():
    """kill -9 of the process that runs the pool, while a worker is busy: the worker used to finish its task and then
    print a BrokenPipeError traceback; now it ends within a moment and prints nothing."""
    script = ("import grading\n"
              "pool = grading.Pool('stuck:spin', workers=1, budget=60)\n"
              "pool.run([(0.0,)], default=None)\n"
              "print(pool.workers[0].process.pid, flush=True)\n"
              "pool.run([(20.0,)], default=None)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(TESTS), TESTS]))
    caller = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                              text=True)
    worker = int(caller.stdout.readline())
    time.sleep(0.5)  # the worker spins
    caller.kill()
    caller.wait()
    stderr = []
    reader = threading.Thread(target=lambda: stderr.append(caller.stderr.read()))  # EOF once the worker has ended
    start = time.monotonic()
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), f"worker {worker} still running"
    assert time.monotonic() - start < 3.0 and stderr == [""]


def test_grading_workers_are_capped_by_the_cores(monkeypatch, capsys):
    monkeypatch.setattr(reward.GRADING_POOL, "size", reward.GRADING_POOL.size)  # put back after the test
    reward.set_grading_workers(1000)
    assert reward.GRADING_POOL.size == reward.cpu_cores() <= (os.cpu_count() or 1)
    assert capsys.readouterr().out == f"grading workers: 1000 asked, {reward.cpu_cores()} used (one per CPU core)\n"
    reward.set_grading_workers(1)
    assert reward.GRADING_POOL.size == 1 and capsys.readouterr().out == ""
    for bad in (0, -2):
        with pytest.raises(ValueError, match="at least 1"):
            reward.set_grading_workers(bad)
