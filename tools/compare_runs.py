"""Head-to-head of advantage estimators from train.py runs that share a starting model: per-arm test Pass@1 with paired
bootstrap confidence intervals at chosen iterations, the cost of each arm, the value-diagnostic figures, and the
learning curves against iteration and against seconds.

    python tools/compare_runs.py runs/h2h/*_s* --out runs/h2h/report --at 1 2 10 --slip

A run folder's arm is its name without the "_s<seed>" suffix (vine_s1, vine_s2 -> vine); its RL seed is in its
run_args.json. experiments/head_to_head.sh makes such runs; the README reads its output.

Statistics: train.py writes each problem's score (the mean reward of --eval-samples answers at T = 0.35: the paper's
Pass@1) to run_dir/evals/<iteration>.json at every evaluation. Its draws depend on --seed and the iteration only, so
runs from one starting model are scored on the same problems with the same random numbers: a paired comparison. The
difference of two arms is the mean over their seeds and the test problems; its 95% interval is a bootstrap that
resamples the problems (one draw for both arms) and, independently, each arm's seeds, so it carries the problem noise
and the RL-seed noise. With 3 seeds the seed part is coarse. "start" is the iteration-0 evaluation (before any update).

Cost: generated tokens (answers plus MC rollouts) and seconds per iteration by phase, from metrics.jsonl, leaving
out evaluation and the value diagnostic, which are measurements and not part of any method.
--slip (arithmetic, train.py --sft-slip or --sft-slip-each): re-samples each final policy and the starting model on
the runs' test problems, and reports how often the first multiplication line is written as an addition, among the
answers that reach it, and (in brackets) the slipped multiplications per answer (cached in OUT/slips/).

Writes OUT/summary.md, OUT/summary.json, and OUT/curves.png when matplotlib is installed.

What cannot be paired is refused in one line on stderr with exit code 2, naming the runs: evaluations on different
numbers of problems (a --resume with another --eval-problems), runs of different --seed, a run given twice or two
runs of one arm on one --rl-seed, a damaged file. As train.py --resume does, a cut last line of metrics.jsonl
(kill -9) is left out with a note; so are a problem whose score is NaN in some run (from every run's scores) and
cost values that are not finite numbers.
"""

import argparse
import dataclasses
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint  # noqa: E402
import reward  # noqa: E402
import rollout  # noqa: E402
import train  # noqa: E402

PHASES = ("sample", "values", "train")  # the method's phases; eval and diagnostic are measurements


def refuse(message: str) -> None:
    """Stop on input that cannot give numbers worth printing: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def note(message: str) -> None:
    """One line on stderr about input that was left out of the figures."""
    print(f"note: {message}", file=sys.stderr)


def at_least(minimum: int):
    """An argparse type: an integer >= minimum, or a one-line error naming the option."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "runs", nargs="+", type=Path, help="train.py run folders (their --run-dir), named <arm>_s<seed>"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the summary and the plot (made if needed)")
    parser.add_argument("--at", type=at_least(0), nargs="*", help="iterations to compare (default: the last evaluated)")
    parser.add_argument(
        "--bootstrap", type=at_least(100), default=4000, help="bootstrap replicates, at least 100 (default: 4000)"
    )
    parser.add_argument("--slip", action="store_true", help="measure the slip rate of the final policies (arithmetic)")
    parser.add_argument("--samples", type=at_least(1), default=8, help="answers per problem for --slip (default: 8)")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give a folder")
    args.at = list(dict.fromkeys(args.at)) if args.at else None  # each iteration once, in the order given
    return args


def arm_of(run: Path) -> str:
    return re.sub(r"_s\d+$", "", run.name)


def number(x) -> float | None:
    """x as a float if it is a finite number (not a bool), else None."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl. A cut last line (kill -9 in the middle of a write) is dropped with a note, as
    train.py --resume drops it (checkpoint.trim_metrics); any other line that is not a row is refused."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError as e:
        refuse(f"cannot read {path}: {e.strerror}")
    rows = []
    for line_number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("iteration"), int):
            rows.append(row)
        elif line_number == len(lines):
            note(f"{path}: left out its last line, cut short (as train.py --resume drops it)")
        else:
            refuse(
                f"{path}, line {line_number}, is damaged (not a JSON row with an iteration); only a cut last line is "
                "left out by itself"
            )
    return rows


def read_evals(run: Path) -> dict[int, list[float]]:
    """Each problem's test score at each evaluation, {iteration: [score, ...]}, from run/evals/<iteration>.json
    (train.py's "eval/pass1"; null, as NaN, counts as not scored). Files of other names are skipped with a note; one
    of that name without such a list is refused (train.py writes each whole)."""
    evals = {}
    for path in sorted((run / "evals").glob("*.json")):
        if not path.stem.isdigit():
            note(f"skipped {path}: not an evaluation of train.py's (<iteration>.json)")
            continue
        try:
            scores = json.loads(path.read_text(errors="replace"))["eval/pass1"]
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            scores = None
        if not isinstance(scores, list) or not all(x is None or isinstance(x, (int, float)) for x in scores):
            refuse(f"{path} is damaged: it holds no list of test scores under eval/pass1")
        evals[int(path.stem)] = [float("nan") if x is None else float(x) for x in scores]
    return evals


def read_run(run: Path) -> dict:
    """metrics.jsonl rows, run_args.json and the per-problem test scores {iteration: scores} of a run."""
    metrics, args_file = run / "metrics.jsonl", run / "checkpoint" / "run_args.json"
    if not metrics.is_file() or not args_file.is_file():
        refuse(f"{run} is not a finished train.py run (no metrics.jsonl or checkpoint/run_args.json)")
    try:
        run_args = json.loads(args_file.read_text(errors="replace"))
    except (OSError, ValueError):
        run_args = None
    if not isinstance(run_args, dict):
        refuse(f"{args_file} is damaged (not a JSON object)")
    evals = read_evals(run)
    if not evals:
        refuse(f"{run}/evals/ holds no evaluation; run train.py with --eval-every > 0")
    return {"rows": read_metrics(metrics), "args": run_args, "evals": evals}


def bootstrap_diff(a: np.ndarray, b: np.ndarray, replicates: int, rng: np.random.Generator) -> tuple[float, float]:
    """95% interval of mean(a) - mean(b) for (seeds x problems) score matrices over the same problems: the problems
    are resampled together (paired), each arm's seeds separately."""
    num_problems = a.shape[1]
    diffs = np.empty(replicates)
    for r in range(replicates):
        problems = rng.integers(num_problems, size=num_problems)
        seeds_a, seeds_b = rng.integers(len(a), size=len(a)), rng.integers(len(b), size=len(b))
        diffs[r] = a[seeds_a][:, problems].mean() - b[seeds_b][:, problems].mean()
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(low), float(high)


DIAGNOSTIC = ("diag/mc_mae", "diag/critic_mae", "diag/mc_rank_acc", "diag/critic_rank_acc")


def total(*values) -> float | None:
    """The sum of values if each is a finite number (number()), else None."""
    numbers = [number(x) for x in values]
    return None if None in numbers else sum(numbers)


def cost(rows: list[dict], name: str = "a run") -> dict:
    """Means per training iteration: seconds of each phase, generated tokens (answers + MC rollouts), and the value
    diagnostic's figures when it ran. A value that is not a finite number is left out of its mean, with a note
    naming the run; a figure with no value (no training iteration logged) is absent."""
    steps = [r for r in rows if "time/train" in r]
    if not steps:
        note(f"{name} logged no training iteration: its cost is left blank")
    columns = {f"s_{phase}": (f"time/{phase}", [r.get(f"time/{phase}", 0.0) for r in steps]) for phase in PHASES}
    tokens = [total(r.get("tokens/answers", 0), r.get("vine/mc_tokens", 0)) for r in steps]
    columns["tokens"] = ("tokens/answers + vine/mc_tokens", tokens)
    columns |= {key: (key, [r[key] for r in steps if key in r]) for key in DIAGNOSTIC}
    out = {}
    for key, (label, values) in columns.items():
        finite = [x for x in map(number, values) if x is not None]
        if len(finite) < len(values):
            note(f"{name}: left {len(values) - len(finite)} value(s) of {label} out of its mean: not finite numbers")
        if finite:
            out[key] = float(np.mean(finite))
    if all(f"s_{phase}" in out for phase in PHASES):
        out["s_iteration"] = sum(out[f"s_{phase}"] for phase in PHASES)
    return out


def first_multiplication(solution: str) -> tuple[int, int] | None:
    """(left operand, factor) of a gold arithmetic solution's first multiplication line, or None."""
    for line in solution.split("\n"):
        match = reward.ARITHMETIC_LINE_RE.fullmatch(line)
        if match and match[2] == "*":
            return int(match[1]), int(match[3])
    return None


def slips_of(text: str, solution: str) -> tuple[int, int]:
    """(slips, multiplications reached) of an answer: a line of the answer that stands where the gold solution
    multiplies by n (same line number) and adds n instead is a slip (sft.slipped_solution); one that multiplies
    by n is a right decision."""
    slips = reached = 0
    answer = text.split("\n")
    for i, line in enumerate(solution.split("\n")):
        gold = reward.ARITHMETIC_LINE_RE.fullmatch(line)
        written = reward.ARITHMETIC_LINE_RE.fullmatch(answer[i]) if gold and i < len(answer) else None
        if gold and gold[2] == "*" and written and written[3] == gold[3] and written[2] in "*+":
            reached, slips = reached + 1, slips + (written[2] == "+")
    return slips, reached


def slip_rate(path: Path, cache: Path, samples: int, task: list[str]) -> dict:
    """How the policy in path slips, from `samples` answers (T = 0.35) to each test problem of the task (train.py
    options): "slip", the share of answers to problems with a multiplication that write the first one as an
    addition, among those that write either; "slips_per_answer", the mean number of slipped multiplications per
    answer over all test problems; "decisions_per_answer", the multiplications reached per answer."""
    if cache.is_file() and "slips_per_answer" in (cached := json.loads(cache.read_text())):
        return cached
    train_args = train.parse_args(["--dataset", "arithmetic", "--device", "cpu", *task])
    all_test = train.load_data(train_args)[2]
    test = [p for p in all_test if first_multiplication(p["solution"])]  # the others cannot slip: they add 0
    model, tokenizer = checkpoint.load_model(str(path), "cpu")
    prompts = [p.prompt_ids for p in reward.to_problems(test, tokenizer, "arithmetic")]
    sampling = train.sampling_settings(train_args, model, tokenizer)
    sampling = dataclasses.replace(sampling, temperature=train_args.eval_temperature)
    outs = train.sample_answers(train.State(model, None, None, tokenizer=tokenizer), prompts, samples, sampling,
                                torch.Generator().manual_seed(12345), train_args)
    first, counts = [], np.zeros(2)
    for i, ids in enumerate(outs.response_ids):
        solution, text = test[i // samples]["solution"], tokenizer.decode(ids, **rollout.DECODE_KWARGS)
        counts += slips_of(text, solution)
        a, n = first_multiplication(solution)
        if f"\n{a} + {n} = " in text or f"\n{a} * {n} = " in text:
            first.append(f"\n{a} + {n} = " in text)
    result = {"slip": float(np.mean(first)) if first else 0.0, "answers": len(first)}
    slips, reached = counts / (samples * len(all_test))
    result |= {"slips_per_answer": float(slips), "decisions_per_answer": float(reached)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result))
    return result


TASK_OPTIONS = ("arithmetic_steps", "arithmetic_multiply", "max_new_tokens", "max_length", "eval_problems")


def task_of(run_args: dict) -> list[str]:
    """The train.py options of a run that set its test problems and how they are sampled."""
    return [x for k in TASK_OPTIONS if k in run_args for x in (f"--{k.replace('_', '-')}", str(run_args[k]))]


def seed_points(rows: list[dict]) -> list[tuple[int, float, float, float]]:
    """(iteration, seconds, tokens, test Pass@1) at each evaluation in a run's metrics rows: seconds of the method's
    phases and generated tokens summed before it. Values that are not finite numbers count as none."""
    points, seconds, tokens = [], 0.0, 0.0
    for r in rows:
        if (pass1 := number(r.get("eval/pass1"))) is not None:
            points.append((r["iteration"], seconds, tokens, pass1))
        seconds += sum(number(r.get(f"time/{phase}", 0.0)) or 0.0 for phase in PHASES)
        tokens += (number(r.get("tokens/answers", 0)) or 0.0) + (number(r.get("vine/mc_tokens", 0)) or 0.0)
    return points


def curves(runs_by_arm: dict, out: Path) -> None:
    """Test Pass@1 against iteration, seconds of the method's phases and generated tokens (answers and MC rollouts,
    the compute-matched view): one thin line per seed, one thick line for the mean over seeds (at the seeds' mean
    seconds and tokens, over the evaluations every seed logged)."""
    try:
        import matplotlib
    except ImportError:
        print("(no curves: pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for color, (arm, runs) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], runs_by_arm.items()):
        per_seed = [points for points in (seed_points(run["rows"]) for run in runs) if points]
        for points in per_seed:
            xs = list(zip(*points))
            for ax, x in zip(axes, xs[:3]):
                ax.plot(x, xs[3], "-", color=color, alpha=0.25, linewidth=1)
        n = min((len(p) for p in per_seed), default=0)
        if n:
            mean = np.array([p[:n] for p in per_seed]).mean(axis=0)  # (n, 4)
            for k, ax in enumerate(axes):
                ax.plot(mean[:, k], mean[:, 3], "-o", color=color, markersize=3, label=f"{arm} ({len(runs)} seeds)")
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("seconds of sampling, values and updates")
    axes[2].set_xlabel("generated tokens (answers + MC rollouts)")
    for ax in axes:
        ax.set_ylabel("test Pass@1 (T = 0.35)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right")
    fig.suptitle("advantage estimators from one starting model: thin lines are RL seeds, thick their mean")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    print(f"wrote {out / 'curves.png'}")


def load_runs(paths: list[Path]) -> dict[str, list[dict]]:
    """The runs grouped by arm, {arm: [run, ...]} in sorted path order: each run is read_run's dict plus its path.
    A folder given twice (under any spelling of its path) is refused: it would count as two seeds."""
    seen = {}
    for path in paths:
        if path.resolve() in seen:
            refuse(f"{seen[path.resolve()]} and {path} are the same run folder: give each run once")
        seen[path.resolve()] = path
    runs_by_arm = {}
    for path in sorted(paths):
        runs_by_arm.setdefault(arm_of(path), []).append({"path": path, **read_run(path)})
    return runs_by_arm


def check_seeds(runs_by_arm: dict) -> None:
    """Refuse runs that are not paired or not distinct seeds, naming them: runs whose --seed (the starting model's and
    the evaluation's draws) differ, and two runs of one arm on one --rl-seed (a copy of a run is not a second seed).
    What a run_args.json does not hold is not checked."""
    all_runs = [run for runs in runs_by_arm.values() for run in runs]
    seeds = {f"{run['path']}: {run['args']['seed']}": run["args"]["seed"] for run in all_runs if "seed" in run["args"]}
    if len(set(seeds.values())) > 1:
        refuse(f"the runs differ in --seed ({', '.join(seeds)}), so their evaluations are not paired")
    for arm, runs in runs_by_arm.items():
        by_rl_seed = {}
        for run in runs:
            rl_seed = run["args"].get("rl_seed")
            if rl_seed is not None and rl_seed in by_rl_seed:
                refuse(
                    f"{by_rl_seed[rl_seed]} and {run['path']} are both arm {arm} on --rl-seed {rl_seed}: one run "
                    "cannot count as two seeds"
                )
            by_rl_seed[rl_seed] = run["path"]


def check_problem_counts(all_runs: list[dict], iterations: list[int]) -> None:
    """Refuse evaluations of different numbers of test problems, naming each run and iteration by its count: they
    are not the same problems (a --resume with another --eval-problems), so they cannot be paired."""
    counts = {}
    for run in all_runs:
        for iteration in dict.fromkeys(iterations):
            counts.setdefault(len(run["evals"][iteration]), []).append(f"{run['path']} at {iteration}")
    if len(counts) > 1:
        named = "; ".join(f"{n} problems: {', '.join(where)}" for n, where in sorted(counts.items()))
        refuse(
            f"the evaluations differ in their number of test problems ({named}), so they cannot be paired (a "
            "--resume with another --eval-problems?); choose iterations evaluated alike with --at"
        )
    if 0 in counts:
        refuse("the evaluations hold no test problem")


def shared_start(all_runs: list[dict], at: list[int] | None) -> tuple[list[int], np.ndarray]:
    """The iterations to compare (default: the last that every run evaluated) and the start's scores, (1, problems).
    A paired comparison needs every run evaluated at iteration 0 and at those iterations on as many problems, and one
    starting model: the same iteration-0 scores everywhere."""
    common = set.intersection(*(set(run["evals"]) for run in all_runs))
    at = at or [max(common, default=0)]
    if 0 not in common or not set(at) <= common:
        refuse(f"every run must be evaluated at iteration 0 and at {at}; all have {sorted(common)}")
    check_problem_counts(all_runs, [0, *at])
    start = np.array([all_runs[0]["evals"][0]])
    for run in all_runs:
        if not np.array_equal(run["evals"][0], start[0], equal_nan=True):
            refuse(
                f"the iteration-0 evaluations of {all_runs[0]['path']} and {run['path']} differ: they do not share a "
                "starting model and --seed"
            )
    return at, start


def paired_scores(runs_by_arm: dict, iteration: int, start: np.ndarray) -> tuple[dict, np.ndarray, str]:
    """Each arm's (seeds, problems) test scores after iteration and the start's (1, problems), over the problems with
    a finite score in every run at 0 and at iteration: a problem whose score is NaN anywhere is left out of every
    run's (the pairing holds), with a note; and the words that say so in the table's title."""
    scores = {arm: np.array([run["evals"][iteration] for run in runs]) for arm, runs in runs_by_arm.items()}
    keep = np.isfinite(start).all(axis=0)
    for arm_scores in scores.values():
        keep &= np.isfinite(arm_scores).all(axis=0)
    if keep.all():
        return scores, start, ""
    if not keep.any():
        refuse(f"no test problem has a finite score in every run at iterations 0 and {iteration}")
    left_out = f"{(~keep).sum()} of {keep.size} test problems left out: not scored with a finite number in every run"
    note(f"iteration {iteration}: {left_out}")
    return {arm: x[:, keep] for arm, x in scores.items()}, start[:, keep], f" ({left_out})"


def pass1_tables(
    runs_by_arm: dict, iteration: int, start: np.ndarray, replicates: int, rng: np.random.Generator, summary: dict
) -> list[str]:
    """The lines of the two tables after one iteration: each arm's test Pass@1 with its gain over the start, and every
    pair of arms' difference, with paired bootstrap intervals (over the problems of paired_scores); the same figures
    go to summary["arms"]."""
    scores, start, remark = paired_scores(runs_by_arm, iteration, start)
    lines = [
        f"after iteration {iteration}{remark}:",
        "",
        "| arm | test Pass@1, mean of seeds | per seed | gain over start, 95% CI |",
        "|---|---|---|---|",
    ]
    for arm in runs_by_arm:
        low, high = bootstrap_diff(scores[arm], start, replicates, rng)
        mean, per_seed = float(scores[arm].mean()), scores[arm].mean(axis=1).tolist()
        summary["arms"].setdefault(arm, {})[iteration] = {"pass1": mean, "per_seed": per_seed, "gain": [low, high]}
        seeds = " / ".join(f"{p:.3f}" for p in per_seed)
        lines.append(f"| {arm} | {mean:.3f} | {seeds} | {mean - start.mean():+.3f} [{low:+.3f}, {high:+.3f}] |")
    lines += ["", "| difference | test Pass@1 points, 95% CI |", "|---|---|"]
    arms = list(runs_by_arm)
    for i, a in enumerate(arms):
        for b in arms[i + 1 :]:
            low, high = bootstrap_diff(scores[a], scores[b], replicates, rng)
            diff = scores[a].mean() - scores[b].mean()
            summary["arms"][a][iteration][f"minus {b}"] = [float(diff), low, high]
            lines.append(f"| {a} - {b} | {100 * diff:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] |")
    lines.append("")
    return lines


def cost_header(slip: bool) -> list[str]:
    """The header of the cost table: one row per arm, with a slip-rate column under --slip."""
    return [
        "| arm | tokens generated / iteration | seconds / iteration (sample + values + update) | MC value MAE "
        "| critic MAE | MC rank acc. | critic rank acc. |" + (" slip rate (per answer), final |" if slip else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if slip else ""),
    ]


def start_slip_line(first_run: dict, args: argparse.Namespace, task: list[str], summary: dict) -> str:
    """--slip: the starting model's slip rates (the model every run started from, in its run_args.json), into summary
    and as a line for the top of the report."""
    if not isinstance(first_run["args"].get("model"), str):
        refuse(f"{first_run['path']}/checkpoint/run_args.json names no starting model, which --slip samples")
    start_path, start_cache = Path(first_run["args"]["model"]), args.out / "slips" / "start.json"
    start_slips = slip_rate(start_path, start_cache, args.samples, task)
    summary["start_slip"], summary["start_slips"] = start_slips["slip"], start_slips
    return (
        f"start model: first-multiplication slip rate {start_slips['slip']:.3f}, slips per answer "
        f"{start_slips['slips_per_answer']:.2f} of {start_slips['decisions_per_answer']:.2f} reached"
    )


def cost_row(arm: str, runs: list[dict], args: argparse.Namespace, task: list[str] | None, summary: dict) -> str:
    """An arm's row of the cost table: the means over its seeds of cost(), and under --slip the slip rates of its
    final policies; the same figures go to summary["arms"][arm]. A figure no seed logged is left blank."""
    costs = [cost(run["rows"], str(run["path"])) for run in runs]
    keys = {k: None for x in costs for k in x}  # the diagnostic may have run on some seeds only
    c = {k: float(np.mean([x[k] for x in costs if k in x])) for k in keys}
    summary["arms"][arm]["cost"] = c
    diag = [f"{c[k]:.3f}" if k in c else "" for k in ("diag/mc_mae", "diag/critic_mae")]
    diag += [f"{c[k]:.2f}" if k in c else "" for k in ("diag/mc_rank_acc", "diag/critic_rank_acc")]
    seconds = ""
    if "s_iteration" in c:
        seconds = f"{c['s_iteration']:.1f} ({c['s_sample']:.1f} + {c['s_values']:.1f} + {c['s_train']:.1f})"
    tokens = f"{c['tokens']:.0f}" if "tokens" in c else ""
    row = f"| {arm} | {tokens} | {seconds} | " + " | ".join(diag) + " |"
    if args.slip:
        caches = [args.out / "slips" / f"{run['path'].name}.json" for run in runs]
        slips = [slip_rate(run["path"] / "checkpoint", c, args.samples, task) for run, c in zip(runs, caches)]
        summary["arms"][arm]["slip"] = [x["slip"] for x in slips]
        summary["arms"][arm]["slips_per_answer"] = [x["slips_per_answer"] for x in slips]
        row += " " + " / ".join(f"{x['slip']:.3f} ({x['slips_per_answer']:.2f})" for x in slips) + " |"
    return row


def start_line(start: np.ndarray, summary: dict) -> str:
    """The report's first line, the start's test Pass@1 over its problems with a finite score (a note says how many
    are left out); the same figure goes to summary["start_pass1"]."""
    kept = start[0][np.isfinite(start[0])]
    if not kept.size:
        refuse("no test problem has a finite score at iteration 0")
    if kept.size < start.shape[1]:
        note(f"iteration 0: {start.shape[1] - kept.size} of {start.shape[1]} test scores are not finite numbers")
    summary["start_pass1"] = float(kept.mean())
    return f"start model (iteration 0): test Pass@1 {kept.mean():.3f} on {kept.size} problems"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs_by_arm = load_runs(args.runs)
    check_seeds(runs_by_arm)
    all_runs = [run for runs in runs_by_arm.values() for run in runs]
    at, start = shared_start(all_runs, args.at)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        refuse(f"cannot make the folder --out {args.out}: {e.strerror}")
    rng = np.random.default_rng(0)  # one stream for every bootstrap, in table order
    summary = {"start_pass1": None, "arms": {}}
    lines = [start_line(start, summary), ""]
    for iteration in at:
        lines += pass1_tables(runs_by_arm, iteration, start, args.bootstrap, rng, summary)
    lines += cost_header(args.slip)
    task = None
    if args.slip:
        task = task_of(all_runs[0]["args"])
        lines.insert(1, start_slip_line(all_runs[0], args, task, summary))
    for arm, runs in runs_by_arm.items():
        lines.append(cost_row(arm, runs, args, task, summary))
    text = "\n".join(lines)
    print(text)
    try:
        (args.out / "summary.md").write_text(text + "\n")
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    except OSError as e:
        refuse(f"cannot write to --out {args.out}: {e.strerror}")
    curves(runs_by_arm, args.out)


if __name__ == "__main__":
    main()
