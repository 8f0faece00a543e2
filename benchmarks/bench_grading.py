"""Grading at Monte Carlo volume: answers graded per second by the one-by-one loop that graded them before the pool
(math-verify in this process, each comparison bounded by a SIGPROF timer here) against reward.grade_batch (the same
verdicts, the MATH comparisons in grading.py's worker pool, each distinct answer pair once), measured in one run.

    python benchmarks/bench_grading.py                  # 11,520 MATH continuations (two mixes), and GSM8K
    python benchmarks/bench_grading.py --problems 5     # smaller

The MC-shaped MATH mix: the K = 9 continuations of a state often reach the same answer, and the states of one
problem's answers draw from the same few: 20 problems (MATH500 answers as golds) x 8 answers x 8 step states x 9
continuations. A problem's candidates are its gold, the gold reformatted (\\dfrac, spaces) and two other problems'
answers; each answer has a likely final answer (the gold with chance 1/2, else the reformatted gold or a wrong one)
and each continuation of each of its states writes it with chance 0.7, else a random candidate, as "The answer is
$\\boxed{...}$.". The second MATH row is the worst case: every state has candidates of its own (no answer shared
beyond its 9 continuations). GSM8K: the test split's gold solutions against their own and the next problem's answer
(string comparisons, no pool). Both arms start cold: the in-process parse cache and the pool's
verdict cache emptied, the pool's workers started before the clock. The batches are iteration-sized (--batch).
"""

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reward  # noqa: E402


def reformatted(answer: str) -> str:
    """The same answer written another way (as in tests/test_reward.py)."""
    return answer.replace("\\frac", "\\dfrac").replace(",", ", ") + " "


def math_mix(num_problems: int, seed: int, answers: int = 8, states: int = 8, k: int = 9, shared: bool = True):
    """(responses, gold answers) of an MC-shaped MATH workload (module docstring): num_problems problems x answers x
    states x k continuations. shared: a problem's continuations draw from its own few candidates (its gold, the gold
    reformatted, two other problems' answers); else every state draws its own (unrelated states, the worst case)."""
    rng = random.Random(seed)
    golds = [p["answer"] for p in reward.load_problems("math", "test")]
    responses, targets = [], []
    for _ in range(num_problems * (1 if shared else answers * states)):
        gold = rng.choice(golds)
        candidates = [gold, reformatted(gold), rng.choice(golds), rng.choice(golds)]
        for _ in range(answers * states if shared else 1):
            likely = candidates[0 if rng.random() < 0.5 else 1 if rng.random() < 0.3 else rng.choice((2, 3))]
            for _ in range(k):
                answer = likely if rng.random() < 0.7 else rng.choice(candidates)
                responses.append(f"The answer is $\\boxed{{{answer}}}$.")
                targets.append(gold)
    return responses, targets


def gsm8k_mix() -> tuple[list[str], list[str]]:
    problems = reward.load_problems("gsm8k", "test")
    responses = [p["solution"] for p in problems] * 2
    return responses, [p["answer"] for p in problems] + [q["answer"] for q in problems[1:] + problems[:1]]


def graded_before(response: str, gold: str, dataset: str) -> float:
    """One answer as grade graded it before the pool: math-verify here, bounded by a SIGPROF timer in this process
    (reward.verify_in_worker, what a worker now runs)."""
    if dataset != "math":
        return reward.grade(response, gold, dataset)
    pred = reward.final_answer(response, dataset)
    if pred is None:
        return 0.0
    if pred.strip() == gold.strip():
        return 1.0
    if len(pred) > reward.MAX_ANSWER_CHARS or len(gold) > reward.MAX_ANSWER_CHARS or reward.too_big_to_verify(pred):
        return 0.0
    return float(bool(reward.verify_in_worker(pred, gold)))  # None: out of time, a 0


def time_loop(responses, golds, dataset) -> tuple[list[float], float, float]:
    """The one-by-one loop: (rewards, seconds, the slowest single grading)."""
    reward.parse_boxed.cache_clear()
    rewards, worst, start = [], 0.0, time.perf_counter()
    for response, gold in zip(responses, golds):
        t = time.perf_counter()
        rewards.append(graded_before(response, gold, dataset))
        worst = max(worst, time.perf_counter() - t)
    return rewards, time.perf_counter() - start, worst


def time_batches(responses, golds, dataset, batch: int) -> tuple[list[float], float, float]:
    """reward.grade_batch over batches of `batch` answers: (rewards, seconds, the slowest batch)."""
    reward.MATH_CACHE.clear()
    reward.GRADING_POOL.close()
    reward.GRADING_POOL.run([("1", "2")] * reward.GRADING_POOL.size, default=False)  # workers up, outside the clock
    rewards, worst, start = [], 0.0, time.perf_counter()
    for first in range(0, len(responses), batch):
        t = time.perf_counter()
        rewards += reward.grade_batch(responses[first : first + batch], golds[first : first + batch], dataset)
        worst = max(worst, time.perf_counter() - t)
    return rewards, time.perf_counter() - start, worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=20, help="problems of the MATH mixes (x 8 x 8 x 9 answers)")
    parser.add_argument("--batch", type=int, default=4608, help="answers per grade_batch call (an iteration's share)")
    parser.add_argument("--workers", type=int, default=0, help="grading workers (0: reward's default)")
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args(argv)
    if cli.workers:
        reward.set_grading_workers(cli.workers)
    print(f"grading workers: {reward.GRADING_POOL.size}, CPU cores: {os.cpu_count()}")
    print(f"{'mix':11s} {'answers':>8s} {'loop/s':>9s} {'batch/s':>9s} {'ratio':>6s} {'worst call':>11s} "
          f"{'worst batch':>12s} same")
    for name, (responses, golds), dataset in [
        ("MATH, MC", math_mix(cli.problems, cli.seed), "math"),
        ("MATH, apart", math_mix(cli.problems, cli.seed, shared=False), "math"),
        ("GSM8K", gsm8k_mix(), "gsm8k"),
    ]:
        looped, loop_seconds, worst_call = time_loop(responses, golds, dataset)
        batched, batch_seconds, worst_batch = time_batches(responses, golds, dataset, cli.batch)
        n = len(responses)
        print(f"{name:11s} {n:>8d} {n / loop_seconds:>9.0f} {n / batch_seconds:>9.0f} "
              f"{loop_seconds / batch_seconds:>5.1f}x {1000 * worst_call:>9.1f}ms {1000 * worst_batch:>10.1f}ms "
              f"{looped == batched}")
    reward.GRADING_POOL.close()


if __name__ == "__main__":
    main()
