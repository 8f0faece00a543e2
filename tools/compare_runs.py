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
"""

import argparse
import dataclasses
import json
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "runs", nargs="+", type=Path, help="train.py run folders (their --run-dir), named <arm>_s<seed>"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the summary and the plot")
    parser.add_argument("--at", type=int, nargs="*", help="iterations to compare (default: the last evaluated)")
    parser.add_argument("--bootstrap", type=int, default=4000, help="bootstrap replicates (default: 4000)")
    parser.add_argument("--slip", action="store_true", help="measure the slip rate of the final policies (arithmetic)")
    parser.add_argument("--samples", type=int, default=8, help="answers per problem for --slip (default: 8)")
    return parser.parse_args()


def arm_of(run: Path) -> str:
    return re.sub(r"_s\d+$", "", run.name)


def read_run(run: Path) -> dict:
    """metrics.jsonl rows, run_args.json and the per-problem evaluations {iteration: {name: scores}} of a run."""
    metrics, args_file = run / "metrics.jsonl", run / "checkpoint" / "run_args.json"
    if not metrics.is_file() or not args_file.is_file():
        raise SystemExit(f"error: {run} is not a finished train.py run (no metrics.jsonl or checkpoint/run_args.json)")
    evals = {int(f.stem): json.loads(f.read_text()) for f in (run / "evals").glob("*.json")}
    if not evals:
        raise SystemExit(f"error: {run}/evals/ is empty; run train.py with --eval-every > 0")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {"rows": rows, "args": json.loads(args_file.read_text()), "evals": evals}


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


def cost(rows: list[dict]) -> dict:
    """Means per training iteration: seconds of each phase, generated tokens (answers + MC rollouts), and the value
    diagnostic's figures when it ran."""
    steps = [r for r in rows if "time/train" in r]
    out = {f"s_{phase}": float(np.mean([r.get(f"time/{phase}", 0.0) for r in steps])) for phase in PHASES}
    out["s_iteration"] = sum(out[f"s_{phase}"] for phase in PHASES)
    out["tokens"] = float(np.mean([r.get("tokens/answers", 0) + r.get("vine/mc_tokens", 0) for r in steps]))
    for key in ("diag/mc_mae", "diag/critic_mae", "diag/mc_rank_acc", "diag/critic_rank_acc"):
        values = [r[key] for r in steps if key in r]
        if values:
            out[key] = float(np.mean(values))
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
    outs = train.sample_answers(
        model,
        tokenizer,
        prompts,
        num_samples=samples,
        sampling=dataclasses.replace(sampling, temperature=train_args.eval_temperature),
        generator=torch.Generator().manual_seed(12345),
        args=train_args,
    )
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


def curves(runs_by_arm: dict, out: Path) -> None:
    """Test Pass@1 against iteration, seconds of the method's phases and generated tokens (answers and MC rollouts,
    the compute-matched view): one thin line per seed, one thick line for the mean over seeds (at the seeds' mean
    seconds and tokens)."""
    try:
        import matplotlib
    except ImportError:
        print("(no curves: pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for color, (arm, runs) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], runs_by_arm.items()):
        per_seed = []
        for run in runs:
            points, seconds, tokens = [], 0.0, 0
            for r in run["rows"]:
                if "eval/pass1" in r:
                    points.append((r["iteration"], seconds, tokens, r["eval/pass1"]))
                seconds += sum(r.get(f"time/{phase}", 0.0) for phase in PHASES)
                tokens += r.get("tokens/answers", 0) + r.get("vine/mc_tokens", 0)
            per_seed.append(points)
            xs = list(zip(*points))
            for ax, x in zip(axes, xs[:3]):
                ax.plot(x, xs[3], "-", color=color, alpha=0.25, linewidth=1)
        n = min(len(p) for p in per_seed)
        mean = np.array([[p[i] for i in range(n)] for p in per_seed]).mean(axis=0)  # (n, 4)
        for k, ax in enumerate(axes):
            ax.plot(mean[:, k], mean[:, 3], "-o", color=color, markersize=3, label=f"{arm} ({len(runs)} seeds)")
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("seconds of sampling, values and updates")
    axes[2].set_xlabel("generated tokens (answers + MC rollouts)")
    for ax in axes:
        ax.set_ylabel("test Pass@1 (T = 0.35)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle("advantage estimators from one starting model: thin lines are RL seeds, thick their mean")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    print(f"wrote {out / 'curves.png'}")


def load_runs(paths: list[Path]) -> dict[str, list[dict]]:
    """The runs grouped by arm, {arm: [run, ...]} in sorted path order: each run is read_run's dict plus its path."""
    runs_by_arm = {}
    for path in sorted(paths):
        runs_by_arm.setdefault(arm_of(path), []).append({"path": path, **read_run(path)})
    return runs_by_arm


def shared_start(all_runs: list[dict], at: list[int] | None) -> tuple[list[int], np.ndarray]:
    """The iterations to compare (default: the last that every run evaluated) and the start's scores, (1, problems).
    A paired comparison needs every run evaluated at iteration 0 and at those iterations, and one starting model: the
    same iteration-0 scores everywhere."""
    common = set.intersection(*(set(run["evals"]) for run in all_runs))
    at = at or [max(common)]
    if 0 not in common or not set(at) <= common:
        raise SystemExit(f"error: every run must be evaluated at iteration 0 and at {at}; all have {sorted(common)}")
    start = np.array([all_runs[0]["evals"][0]["eval/pass1"]])
    if any(run["evals"][0]["eval/pass1"] != start[0].tolist() for run in all_runs):
        raise SystemExit(
            "error: the runs' iteration-0 evaluations differ: they do not share a starting model and --seed"
        )
    return at, start


def pass1_tables(
    runs_by_arm: dict, iteration: int, start: np.ndarray, replicates: int, rng: np.random.Generator, summary: dict
) -> list[str]:
    """The lines of the two tables after one iteration: each arm's test Pass@1 with its gain over the start, and every
    pair of arms' difference, with paired bootstrap intervals; the same figures go to summary["arms"]."""
    lines = [
        f"after iteration {iteration}:",
        "",
        "| arm | test Pass@1, mean of seeds | per seed | gain over start, 95% CI |",
        "|---|---|---|---|",
    ]
    scores = {}
    for arm, runs in runs_by_arm.items():
        scores[arm] = np.array([run["evals"][iteration]["eval/pass1"] for run in runs])  # (seeds, problems)
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
    start_path, start_cache = Path(first_run["args"]["model"]), args.out / "slips" / "start.json"
    start_slips = slip_rate(start_path, start_cache, args.samples, task)
    summary["start_slip"], summary["start_slips"] = start_slips["slip"], start_slips
    return (
        f"start model: first-multiplication slip rate {start_slips['slip']:.3f}, slips per answer "
        f"{start_slips['slips_per_answer']:.2f} of {start_slips['decisions_per_answer']:.2f} reached"
    )


def cost_row(arm: str, runs: list[dict], args: argparse.Namespace, task: list[str] | None, summary: dict) -> str:
    """An arm's row of the cost table: the means over its seeds of cost(), and under --slip the slip rates of its
    final policies; the same figures go to summary["arms"][arm]."""
    costs = [cost(run["rows"]) for run in runs]
    keys = {k: None for x in costs for k in x}  # the diagnostic may have run on some seeds only
    c = {k: float(np.mean([x[k] for x in costs if k in x])) for k in keys}
    summary["arms"][arm]["cost"] = c
    diag = [f"{c[k]:.3f}" if k in c else "" for k in ("diag/mc_mae", "diag/critic_mae")]
    diag += [f"{c[k]:.2f}" if k in c else "" for k in ("diag/mc_rank_acc", "diag/critic_rank_acc")]
    seconds = f"{c['s_iteration']:.1f} ({c['s_sample']:.1f} + {c['s_values']:.1f} + {c['s_train']:.1f})"
    row = f"| {arm} | {c['tokens']:.0f} | {seconds} | " + " | ".join(diag) + " |"
    if args.slip:
        caches = [args.out / "slips" / f"{run['path'].name}.json" for run in runs]
        slips = [slip_rate(run["path"] / "checkpoint", c, args.samples, task) for run, c in zip(runs, caches)]
        summary["arms"][arm]["slip"] = [x["slip"] for x in slips]
        summary["arms"][arm]["slips_per_answer"] = [x["slips_per_answer"] for x in slips]
        row += " " + " / ".join(f"{x['slip']:.3f} ({x['slips_per_answer']:.2f})" for x in slips) + " |"
    return row


def main() -> None:
    args = parse_args()
    runs_by_arm = load_runs(args.runs)
    all_runs = [run for runs in runs_by_arm.values() for run in runs]
    at, start = shared_start(all_runs, args.at)
    rng = np.random.default_rng(0)  # one stream for every bootstrap, in table order
    summary = {"start_pass1": float(start.mean()), "arms": {}}
    lines = [f"start model (iteration 0): test Pass@1 {start.mean():.3f} on {start.shape[1]} problems", ""]
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
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text(text + "\n")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    curves(runs_by_arm, args.out)


if __name__ == "__main__":
    main()
