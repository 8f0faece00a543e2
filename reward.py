r"""The task layer: load problems, format the prompt, extract and grade final answers.

Paper: VinePPO (arXiv:2410.01679); what its official code does: docs/paper.md §4.1 (prompt and SFT format), §4.3
(GSM8K reward), §4.4 (MATH reward and splits). A third data set, `arithmetic`, is ours: short synthetic multi-step word
problems in the GSM8K answer format, so that a ~1-5M-parameter model trained from scratch on a CPU can be SFT-warmed
to an imperfect accuracy in minutes and then improved by RL (demos and tests).

    prompt   = format_prompt(question, dataset)      "[MATH_TASK] Problem:\n{question}\n\nSolution:"
    response = "\n" + worked solution + "\n"         GSM8K/arithmetic end with "#### 72\n", MATH with \boxed{..}
    reward   = grade(response, gold_answer, dataset) 1.0 or 0.0
    rewards  = grade_batch(responses, golds, dataset) the same numbers for many (MATH: in grading.py's worker pool)

Test: python -m pytest tests/test_reward.py -q   (reads the data shipped in data/, see data/README.md)

Departures from the paper (numbered):
1. GSM8K gold answers have their commas removed too. The paper's code removes commas from the prediction only
   (`pred.strip().replace(",", "").lower() == gold.strip().lower()`), so the 93 of 8792 GSM8K problems whose gold
   answer is written "1,080" could never be graded correct. Otherwise grading is the paper's exact string match.
2. MATH answers are compared with the `math-verify` package instead of the paper's Minerva/DeepSeekMath normaliser
   plus sympy grader, and only a \boxed{..} (or \fbox{..}) answer counts: the paper's extractor falls back to
   "The answer is ..." and then to the last number in the text; we return None (reward 0) instead.
3. A MATH comparison gets a budget of MATH_VERIFY_SECONDS of CPU time, and one more try with MATH_RETRY_SECONDS
   when it overruns that (the first comparison of a kind pays sympy's set-up), and answers longer than
   MAX_ANSWER_CHARS or too big to compute (too_big_to_verify: a tower of powers such as 10^{10^{10}}, an exponent of 5
   or more digits, the factorial of a 5-digit number) count as wrong, so that grade() returns within about two seconds
   of CPU time for any input. math-verify runs in a pool of worker processes (grading.py, GRADING_POOL), each warmed
   up at start (WARM_UP) and bounding its comparisons with a SIGPROF timer of its own (verify_in_worker); one that
   overruns MATH_WALL_SECONDS of wall clock by a second is killed and replaced. A comparison that runs out of time
   scores 0 but is not a verdict: it is asked again the next time. The training process sets no timer. Verdicts are
   kept per (answer, gold) pair (MATH_CACHE).
4. grade() cuts the response at the first stop string ("\n\n\nProblem:"), as vLLM's `stop` does in the paper, so a
   sampler that keeps the stop string in its output grades the same.
5. The validation subsets (GSM8K: 373 of train, MATH: 500 of the PRM800K train split) are our own seeded draws; the
   authors' exact held-out ids ship in their release zip, which we do not have. MATH's 12,000-problem PRM800K train
   split is rebuilt from MATH (see data/README.md); its row order is not OpenAI's.
"""

import collections
import gzip
import json
import logging
import os
import random
import re
import signal
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from math_verify import parse, verify

import grading

DATASETS = ("gsm8k", "math", "arithmetic")
SPLITS = ("train", "validation", "test")
STOP_STRINGS = ("\n\n\nProblem:",)  # the paper's stop string (docs/paper.md §1.1, pitfall 11)
# docs/paper.md §4.1, §9: no space or newline after "Solution:"
PROMPT_TEMPLATE = "[MATH_TASK] Problem:\n{question}\n\nSolution:"

DATA_DIR = Path(__file__).resolve().parent / "data"  # the copies shipped with the repository (data/README.md)
# Local JSONL file behind each split (plain, or gzip-compressed with ".gz" added); "validation" is a seeded subset of
# the "train" file (docs/paper.md §4.3, §4.4).
SOURCE_FILES = {"gsm8k": {"train": "train.jsonl", "test": "test.jsonl"},
                "math": {"train": "prm800k_train.jsonl", "test": "math500_test.jsonl"}}
# The same files on the Hugging Face hub: (repository, config, split). The PRM800K train split (12,000 problems =
# all of MATH minus MATH500) has no official hub copy; zzy1123/MATH_train_test_split is a public copy of OpenAI's
# prm800k/math_splits/train.jsonl with the MATH500 schema. We could not check it offline.
HUB_SOURCES = {"train.jsonl": ("openai/gsm8k", "main", "train"), "test.jsonl": ("openai/gsm8k", "main", "test"),
               "prm800k_train.jsonl": ("zzy1123/MATH_train_test_split", None, "train"),
               "math500_test.jsonl": ("HuggingFaceH4/MATH-500", None, "test")}
NUM_VALIDATION = {"gsm8k": 373, "math": 500}  # docs/paper.md §4.3: ~373 GSM8K problems held out; §4.4: 11,500 + 500
VALIDATION_SEED = 2410  # fixed, so every run holds out the same problems
ARITHMETIC_SPLITS = {"train": (20_000, 0), "validation": (500, 1), "test": (500, 2)}  # (num_problems, seed)

MAX_ANSWER_CHARS = 1000  # the longest MATH gold answer has 159 characters; longer \boxed{..} contents count as wrong
MATH_VERIFY_SECONDS = 0.5  # CPU seconds for one math-verify comparison (parse + verify) in a grading worker
MATH_RETRY_SECONDS = 1.0  # CPU seconds for its second and last try, when the first ran out of time
MATH_WALL_SECONDS = 5.0  # the pool's backstop: a comparison still running after this + 1 s of wall clock is killed
DEADLINE_REPEAT = 0.05  # after the budget, the SIGPROF timer fires again every this many CPU seconds until it returns
# What each grading worker compares before its first task: the first comparison of a kind sets sympy up (the first
# of all takes 0.4 s of CPU), which no task's budget should pay. Polynomials, fractions, intervals, sets, tuples.
WARM_UP = [("(1+x)^2", "x^2+2x+1"), ("\\frac12", "0.5"), ("[1, 2)", "[1,2)"), ("\\{2,1\\}", "\\{1,2\\}"),
           ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})")]
MATH_CACHE_SIZE = 2**16  # verdicts kept, per (answer, gold) pair; the oldest go first (math_answers_equal)
UNBRACED_BOX = re.compile(r" +([^\s{$][^$\n]*)")  # "\boxed 5$" (MATH's old style): up to "$" or the end of the line
OPENING_BRACE = re.compile(r" *\{")

# We pass math-verify no timeouts of its own (they use signal.alarm, whole seconds only, main thread only) and run it
# under our own deadline instead; silence its one-off "timeout is disabled" warning.
logging.getLogger("math_verify").setLevel(logging.ERROR)

# The processes that run math-verify (math_answers_equal): one per CPU core, at most 4 (train.py --grading-workers,
# never more than the cores). They work while the training process waits for them.


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the platform tells it), at least 1."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def grading_pool(workers: int) -> grading.Pool:
    """A pool of `workers` processes running verify_in_worker, warmed up with WARM_UP."""
    return grading.Pool("reward:verify_in_worker", workers=workers, budget=MATH_WALL_SECONDS, warm_up=WARM_UP)


GRADING_POOL = grading_pool(min(4, cpu_cores()))
MATH_CACHE: collections.OrderedDict = collections.OrderedDict()


# ----------------------------------------------------------------------------------------------------------------
# Loading problems


def check_dataset(dataset: str) -> None:
    """A ValueError naming the valid data sets, for any other name."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")


def load_problems(dataset: str, split: str, data_dir: str | Path | None = None, **difficulty) -> list[dict]:
    """Problems of one split as dicts with "question", "answer" (gold final answer) and "solution".

    "solution" is the SFT response of docs/paper.md §4.1: "\\n" + worked solution + "\\n" (GSM8K without its <<..>>
    calculator annotations, ending "#### 72\\n"; MATH ending with \\boxed{..}), so grade(solution, answer) == 1.0.
    data_dir: None reads the copies shipped in the repository's data/ folder; a folder path reads a folder of the
    same layout (gsm8k/*.jsonl and math/*.jsonl, plain or .gz), or the data set's own subfolder; "hub" downloads
    the same files from the Hugging Face hub. The arithmetic data set is generated and ignores data_dir; difficulty
    (num_steps, multiply: make_arithmetic_problems' options) sets its problems, and is an error for the others.
    """
    check_dataset(dataset)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if difficulty and dataset != "arithmetic":
        raise ValueError(f"the {dataset} problems are read, not generated: no options {', '.join(difficulty)}")
    if dataset == "arithmetic":
        num_problems, seed = ARITHMETIC_SPLITS[split]
        problems = make_arithmetic_problems(num_problems, seed, **difficulty)
        if split != "train":
            return problems
        # the space of small problems is not that large: keep the held-out questions out of train
        held_out = {p["question"] for s in ("validation", "test") for p in load_problems(dataset, s, **difficulty)}
        return [p for p in problems if p["question"] not in held_out]
    filename = SOURCE_FILES[dataset]["test" if split == "test" else "train"]
    if data_dir == "hub":
        problems = load_hub_problems(dataset, filename)
    else:
        problems = read_jsonl_problems(find_local_file(data_dir or DATA_DIR, dataset, filename), dataset)
    if split == "test":
        return problems
    train, validation = split_validation(problems, num_validation=NUM_VALIDATION[dataset], seed=VALIDATION_SEED)
    return train if split == "train" else validation


def find_local_file(data_dir: str | Path, dataset: str, filename: str) -> Path:
    """data_dir/dataset/filename, or data_dir/filename when data_dir is already the data set's folder; either one
    plain or gzip-compressed (filename + ".gz")."""
    candidates = [Path(data_dir) / dataset / filename, Path(data_dir) / filename]
    for path in candidates:
        for candidate in (path, path.with_name(path.name + ".gz")):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"{candidates[0]} not found (nor {candidates[1]}, nor either with .gz); data_dir must "
                            f"hold gsm8k/{{train,test}}.jsonl and math/{{prm800k_train,math500_test}}.jsonl")


def read_jsonl_problems(path: Path, dataset: str) -> list[dict]:
    """One problem per non-blank line of a JSONL file (gzip-compressed if its name ends in .gz); a malformed line
    raises ValueError naming file and line."""
    problems = []
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for line_number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")  # per line, so that a bad byte is reported with its line
                    if line.strip():
                        problems.append(row_to_problem(json.loads(line), dataset))
                except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors too
                    raise ValueError(f"{path}, line {line_number}: {e}") from e
    except (gzip.BadGzipFile, EOFError) as e:  # a damaged or cut-off gzip file
        raise ValueError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e
    return problems


def load_hub_problems(dataset: str, filename: str) -> list[dict]:
    """The file's copy on the Hugging Face hub (HUB_SOURCES), through `datasets`, imported only here."""
    repo, config, split = HUB_SOURCES[filename]
    try:
        import datasets

        rows = list(datasets.load_dataset(repo, config, split=split))
    except Exception as e:  # no network, offline mode, moved repository...: all mean "use local files"
        raise RuntimeError(
            f"could not load {repo} ({split}) from the Hugging Face hub: {type(e).__name__}: {e}\n"
            f"Leave data_dir unset (train.py: no --data-dir) to read the copies shipped in data/ (see data/README.md)."
        ) from e
    problems = []
    for i, row in enumerate(rows):
        try:
            problems.append(row_to_problem(dict(row), dataset))
        except ValueError as e:
            raise ValueError(f"hub dataset {repo}, row {i}: {e}") from e
    return problems


def row_to_problem(row: dict, dataset: str) -> dict:
    """A raw GSM8K {question, answer} or MATH {problem, solution, answer} row -> {question, answer, solution}."""
    fields = ("question", "answer") if dataset == "gsm8k" else ("problem", "solution", "answer")
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    for name in fields:
        if not isinstance(row.get(name), str):
            raise ValueError(f"field {name!r} missing or not a string")
    if dataset == "math":
        return {"question": row["problem"].strip(), "answer": row["answer"], "solution": "\n" + row["solution"] + "\n"}
    if "####" not in row["answer"]:
        raise ValueError("GSM8K answer has no '####' final-answer line")
    # docs/paper.md §4.1: the SFT target is the GSM8K answer without its calculator annotations ("<<48/2=24>>").
    solution = re.sub(r"<<.*?>>", "", row["answer"], flags=re.DOTALL)
    final_answer = row["answer"].rsplit("####", 1)[1].strip()
    return {"question": row["question"].strip(), "answer": final_answer, "solution": "\n" + solution + "\n"}


def split_validation(problems: list[dict], *, num_validation: int, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded, fixed subset of num_validation problems, and the rest, both in their original order.

    The draw is over the problems sorted by (question, solution), so it depends on the set of problems only, not
    on the row order of the file or hub copy they came from.
    """
    if num_validation >= len(problems):
        raise ValueError(f"cannot hold out {num_validation} validation problems from {len(problems)} training problems")
    by_content = sorted(range(len(problems)), key=lambda i: (problems[i]["question"], problems[i]["solution"]))
    held_out = {by_content[k] for k in random.Random(seed).sample(range(len(problems)), num_validation)}
    train = [p for i, p in enumerate(problems) if i not in held_out]
    validation = [p for i, p in enumerate(problems) if i in held_out]
    return train, validation


# ----------------------------------------------------------------------------------------------------------------
# The synthetic arithmetic task

ARITHMETIC_NAMES = (("Tom", "He"), ("Ann", "She"), ("Bob", "He"), ("Sue", "She"), ("Max", "He"), ("Eva", "She"))
ARITHMETIC_ITEMS = ("apples", "pens", "cards", "coins", "eggs", "books", "shells", "stamps")
ARITHMETIC_ADD = ("buys {n} more", "finds {n} more", "gets {n} more")
ARITHMETIC_SUBTRACT = ("uses {n}", "loses {n}", "sells {n}")
ARITHMETIC_MULTIPLY = {2: "doubles them", 3: "triples them"}


def make_arithmetic_problems(
    num_problems: int, seed: int, *, num_steps: int = 3, max_number: int = 20, multiply: float = 0.15
) -> list[dict]:
    """Synthetic multi-step word problems with one line per step and a final "#### N" line (GSM8K format).

    "Tom has 12 apples. He buys 7 more, uses 5, doubles them, then sells 3. How many now?"
    -> "\\nTom has 12 apples.\\n12 + 7 = 19\\n19 - 5 = 14\\n14 * 2 = 28\\n28 - 3 = 25\\n#### 25\\n"
    Each step doubles or triples with probability `multiply` (where the result stays <= 999), else adds or
    subtracts a number in [1, max_number] (coin flip); every intermediate result stays in [0, 999]. Deterministic
    for a seed (random.Random(seed)); the defaults are the CPU demo's task.
    """
    ok = num_steps >= 1 and 1 <= max_number <= 999 and 0 <= multiply <= 1
    assert ok, f"bad difficulty num_steps={num_steps} max_number={max_number} multiply={multiply}"
    rng = random.Random(seed)
    problems = []
    for _ in range(num_problems):
        name, pronoun = rng.choice(ARITHMETIC_NAMES)
        item = rng.choice(ARITHMETIC_ITEMS)
        value = start = rng.randint(1, max_number)
        phrases, lines = [], [f"{name} has {start} {item}."]
        for _ in range(num_steps):
            if value > 0 and value * 2 <= 999 and rng.random() < multiply:
                n = 2 if value * 3 > 999 else rng.choice((2, 3))
                op, new_value, phrase = "*", value * n, ARITHMETIC_MULTIPLY[n]
            elif value > 0 and (value == 999 or rng.random() < 0.5):
                n = rng.randint(1, min(max_number, value))  # never below zero
                op, new_value, phrase = "-", value - n, rng.choice(ARITHMETIC_SUBTRACT)
            else:
                n = rng.randint(1, min(max_number, 999 - value))  # never above 999
                op, new_value, phrase = "+", value + n, rng.choice(ARITHMETIC_ADD)
            phrases.append(phrase.format(n=n))
            lines.append(f"{value} {op} {n} = {new_value}")
            value = new_value
        actions = phrases[0] if num_steps == 1 else ", ".join(phrases[:-1]) + ", then " + phrases[-1]
        question = f"{name} has {start} {item}. {pronoun} {actions}. How many now?"
        solution = "\n" + "\n".join(lines) + f"\n#### {value}\n"
        problems.append({"question": question, "answer": str(value), "solution": solution})
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Prompt, answer extraction, grading


@dataclass
class Problem:
    """One problem as the training loop uses it: a row of load_problems with its prompt's token ids (to_problems)."""

    question: str
    answer: str  # the gold final answer, which grade compares with
    solution: str  # the gold worked solution (sft.py's target)
    prompt_ids: list[int]  # BOS + format_prompt(question) (docs/paper.md §4.1); the response starts with "\n"


def to_problems(rows: list[dict], tokenizer, dataset: str) -> list[Problem]:
    """load_problems' rows as Problems, each with its prompt's ids: BOS (if the tokenizer has one) + the paper's
    zero-shot prompt, all in one tokenizer call."""
    texts = [format_prompt(row["question"], dataset) for row in rows]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [Problem(r["question"], r["answer"], r["solution"], bos + prompt) for r, prompt in zip(rows, ids)]


def format_prompt(question: str, dataset: str) -> str:
    """The paper's zero-shot prompt (docs/paper.md §4.1), the same for every data set; the response starts with
    "\\n"."""
    check_dataset(dataset)
    return PROMPT_TEMPLATE.format(question=question)


ARITHMETIC_LINE_RE = re.compile(r"(-?\d+) ([-+*]) (\d+) = (-?\d+)")


def extract_answer(text: str, dataset: str) -> str | None:
    """The final answer in a response, or None when it has none.

    GSM8K/arithmetic (docs/paper.md §4.3): everything after the LAST "####", stripped ("#### 72\\nextra" gives
    "72\\nextra", which then fails to match: the paper's behaviour, kept). "The answer is 72" without "####" gives None:
    the paper's original-format extractor accepts nothing else. MATH (docs/paper.md §4.4): the contents of the last
    \\boxed{..}.
    """
    if dataset in ("gsm8k", "arithmetic"):
        position = text.rfind("####")
        return None if position < 0 else text[position + len("####"):].strip()
    if dataset == "math":
        return last_boxed_content(text)
    raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")


def counts_as_finished(response: str, dataset: str) -> bool:
    """Does an answer that stopped by itself (EOS or stop string) count as finished? (docs/paper.md §4.3, pitfall 10)

    The official code marks a GSM8K answer from which no final answer can be extracted (no "####") as unfinished:
    reward 0 and no EOS token appended, like an answer cut by the length limit. Its MATH extractor always returns
    something (it falls back to the last number), so there every answer that stopped by itself is finished.
    """
    check_dataset(dataset)
    return dataset == "math" or extract_answer(response, dataset) is not None


def last_boxed_content(text: str) -> str | None:
    """Contents of the last \\boxed{..} or \\fbox{..}, braces balanced; "\\boxed 5$" gives "5".

    None when there is no box, when the last box never closes, or when its contents pass MAX_ANSWER_CHARS. The
    brace scan is bounded, so a 1 MB response costs a few C-speed string searches and at most MAX_ANSWER_CHARS
    Python loop steps. Escaped braces need no special case: "\\{1,2\\}" has one "{" and one "}", which balance.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    command_end = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    unbraced = UNBRACED_BOX.match(text, command_end)
    if unbraced is not None:
        content = unbraced.group(1).strip()
        return content if len(content) <= MAX_ANSWER_CHARS else None
    opening = OPENING_BRACE.match(text, command_end)
    if opening is None:
        return None
    window = text[opening.end() - 1 : opening.end() + MAX_ANSWER_CHARS + 1]  # "{" + up to MAX_ANSWER_CHARS + "}"
    depth = 0
    for j, char in enumerate(window):
        depth += (char == "{") - (char == "}")
        if depth == 0:
            return window[1:j]  # between the box's own braces
    return None  # unbalanced, or longer than MAX_ANSWER_CHARS


def grade(response: str, gold_answer: str, dataset: str) -> float:
    """Reward of a response: 1.0 if its final answer equals the gold answer, else 0.0; never raises on any strings.

    GSM8K/arithmetic (docs/paper.md §4.3): pred.replace(",", "").lower() == gold.strip().replace(",", "").lower(), no
    numeric normalisation ("72.0" and "$72" are wrong). MATH (docs/paper.md §4.4): the last \\boxed answer is
    equivalent to the gold answer under math-verify (math_answers_equal, in a worker process). A response without a
    parsable answer gets 0.0. Many at once: grade_batch."""
    if not isinstance(response, str) or not isinstance(gold_answer, str):
        return 0.0
    pred = final_answer(response, dataset)
    if pred is None:
        return 0.0
    if dataset == "math":
        return float(math_answers_equal([(pred, gold_answer)])[0])
    return 1.0 if pred.replace(",", "").lower() == gold_answer.strip().replace(",", "").lower() else 0.0


def grade_batch(responses: list[str], gold_answers: list[str], dataset: str) -> list[float]:
    """grade of every (response, gold answer) pair, the same numbers: GSM8K and arithmetic one by one (string
    comparisons, microseconds), MATH in one call, so that the comparisons math-verify must make run together in the
    worker pool, each distinct (answer, gold) pair once (math_answers_equal). A response of None (an unfinished
    answer, as the callers pass it) scores 0.0 and is not graded."""
    if dataset != "math":
        return [grade(r, g, dataset) if r is not None else 0.0 for r, g in zip(responses, gold_answers, strict=True)]
    preds = [final_answer(r, dataset) if isinstance(r, str) and isinstance(g, str) else None
             for r, g in zip(responses, gold_answers, strict=True)]
    verdicts = iter(math_answers_equal([(p, g) for p, g in zip(preds, gold_answers) if p is not None]))
    return [float(next(verdicts)) if p is not None else 0.0 for p in preds]


def final_answer(response: str, dataset: str) -> str | None:
    """extract_answer of the response cut at the first stop string (departure 4: what vLLM's `stop` would have cut off
    is not part of the answer)."""
    for stop in STOP_STRINGS:
        response = response.split(stop, 1)[0]
    return extract_answer(response, dataset)


class MathVerifyDeadline(BaseException):
    """Raised by our SIGPROF handler. A BaseException, so math-verify's own `except Exception` blocks let it pass."""


def raise_deadline(signum: int, frame) -> None:
    """SIGPROF handler: interrupt whatever math-verify is doing when its CPU budget is spent. One deadline can be
    swallowed (Python prints and drops an exception raised inside a __del__ or a garbage-collector callback, which may
    be what runs when the signal is handled), so the timer repeats until verify_within cancels it; a signal handled
    after the cancel finds the timer off and is ignored."""
    if signal.getitimer(signal.ITIMER_PROF)[0] > 0:
        raise MathVerifyDeadline()


def exponent_groups(text: str) -> list[str]:
    r"""What follows each "^": a balanced {..} group, or else one character or \command."""
    groups = []
    for match in re.finditer(r"\^\s*", text):
        start = match.end()
        if text.startswith("{", start):
            depth = 0
            for end in range(start, len(text)):
                depth += (text[end] == "{") - (text[end] == "}")
                if depth == 0:
                    break
            groups.append(text[start : end + 1])
        else:
            command = re.match(r"\\[A-Za-z]+|.", text[start:], re.DOTALL)
            groups.append(command.group(0) if command else "")
    return groups


def too_big_to_verify(answer: str) -> bool:
    """Would a computer algebra system try to build an astronomically large number from this answer? A power whose
    exponent holds another power (10^{10^{10}}: sympy works out the integer, GIL held, no signal can stop it), an
    exponent with a number of 5 or more digits, the factorial of such a number or of a power. No MATH gold answer
    comes close: their largest exponent has 4 digits (2^{2005}-style) and no tower."""
    if re.search(r"\d{5,}\s*!", answer) or re.search(r"\^\s*(\{[^{}]*\}|\d+)\s*\)?\s*!", answer):
        return True
    for group in exponent_groups(answer):
        if "^" in group or re.search(r"\d{5,}", group) or "\\uparrow" in group:
            return True
    return bool(re.search(r"\d\s*\^\s*\d+\s*\^", answer))  # 9^9^9 without braces


def math_answers_equal(pairs: list[tuple[str, str]]) -> list[bool]:
    """Is each predicted MATH answer equivalent to its gold one? Identical strings are; answers longer than
    MAX_ANSWER_CHARS or too big to compute (too_big_to_verify) are not; math-verify decides the rest, in the worker
    processes of GRADING_POOL (verify_in_worker), each distinct (answer, gold) pair once. A comparison that ran out of
    time (None from the worker, or the pool's default None for a worker killed or lost) counts as not equal this time
    but is not kept: MATH_CACHE keeps only verdicts (the K continuations of a state often reach the same answer). This
    process sets no timer and no signal handler."""
    verdicts, ask = [], {}
    for pred, gold in pairs:
        if pred.strip() == gold.strip():  # includes two MATH train problems whose gold box is empty ("\\boxed{}")
            verdicts.append(True)
        elif len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS or too_big_to_verify(pred):
            verdicts.append(False)
        else:
            verdicts.append(MATH_CACHE.get((pred, gold)))
            if verdicts[-1] is None:
                ask[(pred, gold)] = None
    if ask:
        ask = dict(zip(ask, GRADING_POOL.run(list(ask), default=None)))
        for pair, verdict in ask.items():
            if verdict is not None:  # a timeout is no verdict: the pair is asked again next time
                MATH_CACHE[pair] = verdict
        while len(MATH_CACHE) > MATH_CACHE_SIZE:
            MATH_CACHE.popitem(last=False)  # the oldest verdicts go first
    return [bool(ask[pair]) if verdict is None else verdict for verdict, pair in zip(verdicts, pairs)]


def set_grading_workers(workers: int) -> None:
    """MATH comparisons use this many worker processes from the next grading on (train.py --grading-workers), at
    most one per CPU core (cpu_cores; a bigger request is capped, and says so in one line): more workers than cores
    only make every comparison wait for a core."""
    if workers < 1:
        raise ValueError(f"grading workers must be at least 1, got {workers}")
    if workers > cpu_cores():
        print(f"grading workers: {workers} asked, {cpu_cores()} used (one per CPU core)")
        workers = cpu_cores()
    GRADING_POOL.close()
    GRADING_POOL.size = workers


def verify_in_worker(pred: str, gold: str) -> bool | None:
    """math-verify on one pair, in a grading worker's main thread: True or False, or None when it ran out of time.
    It gets MATH_VERIFY_SECONDS of CPU time, then, if that ran out, one more try with MATH_RETRY_SECONDS (the parses
    that finished are cached, and sympy has set up what this kind of answer needs). CPU time, not wall clock, so that
    other processes on a busy machine cannot use the budget up (departure 3). math-verify's own timeouts
    (signal.alarm, whole seconds) are turned off. The pool kills a worker that overruns MATH_WALL_SECONDS by a second
    (a C computation that holds the GIL)."""
    if not hasattr(signal, "setitimer"):  # no interval timers on this platform (Windows): the pool's kill bounds it
        return verify_boxed(pred, gold)
    old_handler = signal.signal(signal.SIGPROF, raise_deadline)
    try:
        verdict = verify_within(MATH_VERIFY_SECONDS, pred, gold)
        return verdict if verdict is not None else verify_within(MATH_RETRY_SECONDS, pred, gold)
    finally:
        signal.signal(signal.SIGPROF, old_handler if old_handler is not None else signal.SIG_DFL)


def verify_within(seconds: float, pred: str, gold: str) -> bool | None:
    """verify_boxed under a SIGPROF timer of `seconds` of this process's CPU time that raises MathVerifyDeadline and
    fires again every DEADLINE_REPEAT seconds until the comparison returns; None when it fired. raise_deadline must be
    the SIGPROF handler."""
    verdict = None
    try:
        signal.setitimer(signal.ITIMER_PROF, seconds, DEADLINE_REPEAT)
        verdict = verify_boxed(pred, gold)
    except MathVerifyDeadline:
        pass
    finally:
        while True:  # a deadline may come during the cancel itself: until the timer is off (none can come after)
            try:
                signal.setitimer(signal.ITIMER_PROF, 0)
                break
            except MathVerifyDeadline:
                pass
    return verdict


def verify_boxed(pred: str, gold: str) -> bool:
    """math-verify on "$\\boxed{..}$"-wrapped answers; gold goes first, as verify() is not symmetric."""
    return bool(verify(parse_boxed(gold), parse_boxed(pred), timeout_seconds=None))


@lru_cache(maxsize=16384)
def parse_boxed(answer: str) -> list:
    """math-verify's parse of one answer (sympy objects and the raw string), cached: gold answers repeat for every
    sample of a prompt. An interrupted parse raises, so nothing half-done is cached."""
    return parse("$\\boxed{" + answer + "}$", parsing_timeout=None)
