r"""The task layer: load problems, format the prompt, extract and grade final answers.

As the paper's code does it: docs/paper.md §4.1 (prompt), §4.3 (GSM8K reward), §4.4 (MATH reward and splits). A third
data set, `arithmetic`, is ours: synthetic word problems in GSM8K's format for a tiny model on a CPU.

    prompt   = format_prompt(question, dataset)       "[MATH_TASK] Problem:\n{question}\n\nSolution:"
    response = "\n" + worked solution + "\n"          GSM8K/arithmetic end with "#### 72\n", MATH with \boxed{..}
    reward   = grade(response, gold_answer, dataset)  1.0 or 0.0; grade_batch for many

Test: python -m pytest tests/test_reward.py -q   (reads data/, see data/README.md)

Departures from the paper (numbered):
1. GSM8K gold answers lose their commas too; the paper's code strips them from the prediction only, so the 93 of
   8792 problems whose gold is written "1,080" could never be graded correct.
2. MATH answers are compared with `math-verify`, not the paper's Minerva normaliser and sympy grader, and only a
   \boxed{..} (or \fbox{..}) answer counts: no fallback to "The answer is ..." or to the last number.
3. MATH comparisons run in worker processes (grading.py) under CPU-time limits (MATH_*_SECONDS); a timeout scores 0,
   uncached. Answers longer than MAX_ANSWER_CHARS or too_big_to_verify count as wrong.
4. grade() cuts the response at the first stop string, as vLLM's `stop` does in the paper.
5. The validation subsets (GSM8K: 373 of train, MATH: 500 of PRM800K train) are our own seeded draws; PRM800K train
   is rebuilt from MATH (data/README.md).
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
STOP_STRINGS = ("\n\n\nProblem:",)  # docs/paper.md pitfall 11
# docs/paper.md §4.1, §9: no space or newline after "Solution:"
PROMPT_TEMPLATE = "[MATH_TASK] Problem:\n{question}\n\nSolution:"

DATA_DIR = Path(__file__).resolve().parent / "data"  # data/README.md
# "validation" is drawn from "train" (departure 5)
SOURCE_FILES = {"gsm8k": {"train": "train.jsonl", "test": "test.jsonl"},
                "math": {"train": "prm800k_train.jsonl", "test": "math500_test.jsonl"}}
# (repository, config, split) on the Hugging Face hub; PRM800K train's is an unofficial copy
HUB_SOURCES = {"train.jsonl": ("openai/gsm8k", "main", "train"), "test.jsonl": ("openai/gsm8k", "main", "test"),
               "prm800k_train.jsonl": ("zzy1123/MATH_train_test_split", None, "train"),
               "math500_test.jsonl": ("HuggingFaceH4/MATH-500", None, "test")}
NUM_VALIDATION = {"gsm8k": 373, "math": 500}  # docs/paper.md §4.3, §4.4
VALIDATION_SEED = 2410
ARITHMETIC_SPLITS = {"train": (20_000, 0), "validation": (500, 1), "test": (500, 2)}  # (num_problems, seed)

MAX_ANSWER_CHARS = 1000  # the longest MATH gold answer has 159 characters
MATH_VERIFY_SECONDS = 0.5  # CPU seconds for one comparison (parse + verify)
MATH_RETRY_SECONDS = 1.0  # CPU seconds for the one retry
MATH_WALL_SECONDS = 5.0  # wall-clock backstop: the pool kills a worker 1 s past it
DEADLINE_REPEAT = 0.05  # CPU seconds between repeats of a deadline
# Each worker compares these first, so that no task's budget pays sympy's set-up.
WARM_UP = [("(1+x)^2", "x^2+2x+1"), ("\\frac12", "0.5"), ("[1, 2)", "[1,2)"), ("\\{2,1\\}", "\\{1,2\\}"),
           ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})")]
MATH_CACHE_SIZE = 2**16  # (answer, gold) verdicts kept
UNBRACED_BOX = re.compile(r" +([^\s{$][^$\n]*)")  # "\boxed 5$" (old MATH style): to "$" or the end of the line
OPENING_BRACE = re.compile(r" *\{")

# math-verify's own timeouts are off: silence their warning
logging.getLogger("math_verify").setLevel(logging.ERROR)



def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity, where known), at least 1."""
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
    """One split as dicts of "question", "answer" (gold) and "solution" (the SFT response, docs/paper.md §4.1), from
    data_dir (None: data/; "hub": the Hugging Face hub); arithmetic is generated with `difficulty`."""
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
        # small problems repeat: keep the held-out questions out of train
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
    """data_dir/dataset/filename or data_dir/filename, plain or with ".gz" added."""
    candidates = [Path(data_dir) / dataset / filename, Path(data_dir) / filename]
    for path in candidates:
        for candidate in (path, path.with_name(path.name + ".gz")):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"{candidates[0]} not found (nor {candidates[1]}, nor either with .gz); data_dir must "
                            f"hold gsm8k/{{train,test}}.jsonl and math/{{prm800k_train,math500_test}}.jsonl")


def read_jsonl_problems(path: Path, dataset: str) -> list[dict]:
    """One problem per non-blank line of a JSONL (or .gz) file; a malformed line raises ValueError naming it."""
    problems = []
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for line_number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")  # per line, to name the line of a bad byte
                    if line.strip():
                        problems.append(row_to_problem(json.loads(line), dataset))
                except ValueError as e:
                    raise ValueError(f"{path}, line {line_number}: {e}") from e
    except (gzip.BadGzipFile, EOFError) as e:  # a damaged or cut-off gzip file
        raise ValueError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e
    return problems


def load_hub_problems(dataset: str, filename: str) -> list[dict]:
    """The file's copy on the Hugging Face hub (HUB_SOURCES), through `datasets`."""
    repo, config, split = HUB_SOURCES[filename]
    try:
        import datasets

        rows = list(datasets.load_dataset(repo, config, split=split))
    except Exception as e:  # no network, offline mode, moved repository...
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
    # the SFT target drops GSM8K's calculator annotations ("<<48/2=24>>"), docs/paper.md §4.1
    solution = re.sub(r"<<.*?>>", "", row["answer"], flags=re.DOTALL)
    final_answer = row["answer"].rsplit("####", 1)[1].strip()
    return {"question": row["question"].strip(), "answer": final_answer, "solution": "\n" + solution + "\n"}


def split_validation(problems: list[dict], *, num_validation: int, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded subset of num_validation problems, and the rest, in file order; drawn from the problems sorted by
    content, so the row order cannot change it."""
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
    """Word problems in GSM8K's format; a step doubles or triples with probability `multiply`, else adds or subtracts
    up to max_number, results in [0, 999]. "Tom has 12 apples. He buys 7 more, then doubles them. How many now?" ->
    "\\nTom has 12 apples.\\n12 + 7 = 19\\n19 * 2 = 38\\n#### 38\\n"."""
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
    """A row of load_problems with its prompt's token ids (to_problems)."""

    question: str
    answer: str  # the gold final answer
    solution: str  # the gold worked solution (sft.py's target)
    prompt_ids: list[int]  # BOS + format_prompt(question)


def to_problems(rows: list[dict], tokenizer, dataset: str) -> list[Problem]:
    """load_problems' rows as Problems, prompt ids with BOS if the tokenizer has one."""
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
    """The final answer, or None (docs/paper.md §4.3, §4.4): GSM8K, arithmetic: all after the LAST "####", stripped
    (so "#### 72\\nextra" fails, as in the paper); MATH: the last \\boxed{..}'s contents."""
    if dataset in ("gsm8k", "arithmetic"):
        position = text.rfind("####")
        return None if position < 0 else text[position + len("####"):].strip()
    if dataset == "math":
        return last_boxed_content(text)
    raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")


def counts_as_finished(response: str, dataset: str) -> bool:
    """Does an answer that stopped by itself count as finished (docs/paper.md pitfall 10)? As in the official code,
    not a GSM8K one without "####" (reward 0, no EOS); every MATH one."""
    check_dataset(dataset)
    return dataset == "math" or extract_answer(response, dataset) is not None


def last_boxed_content(text: str) -> str | None:
    """Contents of the last \\boxed{..} or \\fbox{..} ("\\boxed 5$" gives "5"); None when there is none, it never
    closes, or its contents pass MAX_ANSWER_CHARS. Escaped braces "\\{1,2\\}" balance by themselves."""
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
    """1.0 if the final answer equals the gold one, else 0.0. GSM8K (docs/paper.md §4.3): pred.replace(",", "").lower()
    == gold.strip().replace(",", "").lower() ("72.0" is wrong); MATH (§4.4): equal under math-verify."""
    if not isinstance(response, str) or not isinstance(gold_answer, str):
        return 0.0
    pred = final_answer(response, dataset)
    if pred is None:
        return 0.0
    if dataset == "math":
        return float(math_answers_equal([(pred, gold_answer)])[0])
    return 1.0 if pred.replace(",", "").lower() == gold_answer.strip().replace(",", "").lower() else 0.0


def grade_batch(responses: list[str | None], gold_answers: list[str], dataset: str) -> list[float]:
    """grade of every pair, MATH's in one math_answers_equal call; None (an unfinished answer) scores 0.0."""
    if dataset != "math":
        return [grade(r, g, dataset) if r is not None else 0.0 for r, g in zip(responses, gold_answers, strict=True)]
    preds = [final_answer(r, dataset) if isinstance(r, str) and isinstance(g, str) else None
             for r, g in zip(responses, gold_answers, strict=True)]
    verdicts = iter(math_answers_equal([(p, g) for p, g in zip(preds, gold_answers) if p is not None]))
    return [float(next(verdicts)) if p is not None else 0.0 for p in preds]



# What a right answer ends with, per data set (reward_signal's warning names it).
ANSWER_FORMATS = {"gsm8k": 'a final line "#### N"', "arithmetic": 'a final line "#### N"', "math": "\\boxed{...}"}


def reward_signal(rewards: list[float], *, samples_per_prompt: int, dataset: str, iteration: int) -> dict:
    """The fraction of prompts whose answers all got the same reward (no outcome signal: GRPO/RLOO give them 0, MC
    values can still rank their steps); a warning when no answer of the iteration was right, or none wrong."""
    groups = [rewards[i : i + samples_per_prompt] for i in range(0, len(rewards), samples_per_prompt)]  # per prompt
    same = f"warning: iteration {iteration}: every one of the {len(rewards)} answers got reward"
    if max(rewards) == 0:
        print(f"{same} 0, so there is nothing to learn from. On {dataset} an answer is right only if it ends with "
              f"{ANSWER_FORMATS[dataset]}: a model that never writes that format always scores 0 (teach it with "
              "--sft-steps N, or start from an SFT model); answers cut at --max-new-tokens also score 0 (see "
              "response/unfinished)")
    elif min(rewards) == 1:
        print(f"{same} 1, so there is nothing to learn from; the problems are too easy for this policy")
    return {"reward/no_signal_groups": sum(min(g) == max(g) for g in groups) / len(groups)}


def final_answer(response: str, dataset: str) -> str | None:
    """extract_answer of the response cut at the first stop string (departure 4)."""
    for stop in STOP_STRINGS:
        response = response.split(stop, 1)[0]
    return extract_answer(response, dataset)


class MathVerifyDeadline(BaseException):
    """Raised by raise_deadline; a BaseException, so math-verify's `except Exception` blocks let it pass."""


def raise_deadline(signum: int, frame) -> None:
    """SIGPROF handler: interrupt math-verify. A deadline raised inside a __del__ or a GC callback is dropped, so the
    timer repeats until verify_within cancels it; a signal handled after the cancel is ignored."""
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
    """Would sympy build a huge integer from this answer (GIL held: no signal stops it)? A power tower (10^{10^{10}}),
    an exponent with a number of 5+ digits, or the factorial of one or of a power. No MATH gold comes close."""
    if re.search(r"\d{5,}\s*!", answer) or re.search(r"\^\s*(\{[^{}]*\}|\d+)\s*\)?\s*!", answer):
        return True
    for group in exponent_groups(answer):
        if "^" in group or re.search(r"\d{5,}", group) or "\\uparrow" in group:
            return True
    return bool(re.search(r"\d\s*\^\s*\d+\s*\^", answer))  # 9^9^9 without braces


def math_answers_equal(pairs: list[tuple[str, str]]) -> list[bool]:
    """Is each predicted MATH answer equivalent to its gold one? Identical strings are, too long or too_big_to_verify
    ones are not; GRADING_POOL decides the rest, each distinct pair once; timeouts are not cached (departure 3)."""
    verdicts, ask = [], {}
    for pred, gold in pairs:
        if pred.strip() == gold.strip():  # includes two MATH train golds that are empty ("\\boxed{}")
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
            MATH_CACHE.popitem(last=False)  # oldest first
    return [bool(ask[pair]) if verdict is None else verdict for verdict, pair in zip(verdicts, pairs)]


def set_grading_workers(workers: int) -> None:
    """Grade MATH with this many worker processes from now on (train.py --grading-workers), at most cpu_cores()."""
    if workers < 1:
        raise ValueError(f"grading workers must be at least 1, got {workers}")
    if workers > cpu_cores():
        print(f"grading workers: {workers} asked, {cpu_cores()} used (one per CPU core)")
        workers = cpu_cores()
    GRADING_POOL.close()
    GRADING_POOL.size = workers


def verify_in_worker(pred: str, gold: str) -> bool | None:
    """math-verify on one pair in a grading worker: True, False, or None when both tries ran out of time. CPU time,
    not wall clock, so that other processes on a busy machine cannot use the budget up."""
    if not hasattr(signal, "setitimer"):  # no interval timers (Windows): the pool's kill bounds it
        return verify_boxed(pred, gold)
    old_handler = signal.signal(signal.SIGPROF, raise_deadline)
    try:
        verdict = verify_within(MATH_VERIFY_SECONDS, pred, gold)
        return verdict if verdict is not None else verify_within(MATH_RETRY_SECONDS, pred, gold)
    finally:
        signal.signal(signal.SIGPROF, old_handler if old_handler is not None else signal.SIG_DFL)


def verify_within(seconds: float, pred: str, gold: str) -> bool | None:
    """verify_boxed under a SIGPROF timer of `seconds` of CPU time (raise_deadline must be the handler); None when
    it fired."""
    verdict = None
    try:
        signal.setitimer(signal.ITIMER_PROF, seconds, DEADLINE_REPEAT)
        verdict = verify_boxed(pred, gold)
    except MathVerifyDeadline:
        pass
    finally:
        while True:  # a deadline may fire during the cancel itself
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
    """math-verify's parse of one answer, cached; an interrupted parse raises, so nothing half-done is cached."""
    return parse("$\\boxed{" + answer + "}$", parsing_timeout=None)
