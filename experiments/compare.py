"""One driver for the project's comparisons: a starting model, then arms x RL seeds of train.py from it, then
tools/compare_runs.py over exactly those runs.

    python experiments/compare.py OUT --setting "--dataset arithmetic --sft-slip 0.5" \
        --arm vine "" --arm grpo "--advantage grpo" --seeds 1 2 3 [--workers 2] [--compare "--at 1 2 10"]

1. The starting model: train.py SETTING --num-iterations 0 --run-dir OUT/start (SFT only, then its evaluation),
   skipped once OUT/start/metrics.jsonl holds that evaluation. It runs alone, on all cores.
2. Every arm on every seed, seed by seed: train.py SETTING --model OUT/start/init --sft-steps 0 OPTIONS --rl-seed S
   --run-dir OUT/NAME_sS, its output in OUT/NAME_sS.log. --run NAME SEED OPTIONS adds OPTIONS to that one run, or
   adds the run (after the grid) when NAME is no --arm or SEED not in --seeds: the value diagnostic on one seed, an
   arm on one seed only. --workers N runs N at a time, each with --threads 1 when N > 1 (two 2-thread torch
   processes slow each other 15-50x on 2 cores) unless the setting or the run's options give --threads.
3. tools/compare_runs.py OUT/NAME_sS/ ... --out OUT/report COMPARE (unless --no-compare), once every run finished.

It can be stopped (Ctrl-C: each run saves a checkpoint) and run again: a finished run (checkpoint/trainer_state.pt,
and in metrics.jsonl the final evaluation, the line whose "iteration" is the run's --num-iterations and which holds
"eval/pass1") is skipped; one stopped half-way goes on with --resume, its log appended to. A run whose options
changed since is not noticed when finished, refused by train.py --resume when half-way. With --eval-every 0 a run
writes no final evaluation, so each call resumes it (a no-op once at its end) and repeats the start's (empty) run.

Options are one string each, split as a shell does (shlex): --compare "--slip" is compare_runs.py's option.
--dry-run prints the commands (and "# NAME: finished, skipped" for finished runs) and runs nothing. A run that fails
is named with its log; the others go on, compare_runs is not called, and the exit code is 1.
experiments/head_to_head.sh and experiments/credit_curve.sh are its two uses.
"""

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PER_RUN = {"--run-dir", "--rl-seed", "--resume"}  # the driver sets them for each run
FROM_START = {"--model", "--sft-steps"}  # every arm starts from OUT/start/init, as it is
OPTIONS_AT = {"--setting": 1, "--compare": 1, "--arm": 2, "--run": 3}  # which value of these is an options string


@dataclasses.dataclass
class Job:
    name: str  # "start" or NAME_sSEED: the folder OUT/name, its log OUT/name.log
    argv: list[str]
    log: Path
    state: str  # "new", "resume" or "finished"


def python() -> str:
    """The interpreter running this driver, as "python" when that is what the PATH finds (short commands)."""
    found = shutil.which("python")
    return "python" if found and os.path.samefile(found, sys.executable) else sys.executable


def script(name: str) -> str:
    """A script of the repository, as a path relative to the working directory (short commands)."""
    return os.path.relpath(ROOT / name)


def option_names(tokens: list[str]) -> set[str]:
    """The long options among tokens, dashes for underscores and without "=value": {"--rl-seed", ...}."""
    return {t.split("=")[0].replace("_", "-") for t in tokens if t.startswith("--")}


def shield(argv: list[str]) -> list[str]:
    """argv with a space before each options string, which argparse would take for an option of its own when it
    starts with "-" (--compare "--slip"); shlex.split drops the space."""
    argv = list(argv)
    for i, token in enumerate(argv):
        if token in OPTIONS_AT and i + OPTIONS_AT[token] < len(argv):
            argv[i + OPTIONS_AT[token]] = " " + argv[i + OPTIONS_AT[token]]
    return argv


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("out", type=Path, help="folder of the runs: OUT/start, OUT/NAME_sSEED, OUT/report")
    parser.add_argument("--setting", default="", help="train.py options of the starting model and of every run")
    parser.add_argument(
        "--arm",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "OPTIONS"),
        help="an arm: its name (the folders NAME_sSEED) and its train.py options; repeat it",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[], help="the RL seeds of every --arm")
    parser.add_argument(
        "--run",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "SEED", "OPTIONS"),
        help="more options for the run NAME_sSEED, or one more run; repeat it",
    )
    parser.add_argument("--workers", type=int, default=1, help="runs side by side (default: 1)")
    parser.add_argument("--compare", default="", help='more tools/compare_runs.py options, e.g. "--at 1 2 10"')
    parser.add_argument("--no-compare", action="store_true", help="make the runs only")
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    args = parser.parse_args(shield(sys.argv[1:] if argv is None else argv))
    try:
        args.setting, args.compare = shlex.split(args.setting), shlex.split(args.compare)
        args.arm = [(name, shlex.split(options)) for name, options in args.arm]
        args.run = [(name, int(seed), shlex.split(options)) for name, seed, options in args.run]
    except ValueError as e:  # an unclosed quote, a seed that is no integer
        parser.error(f"{e} (an options string that is no shell words, or a --run SEED that is no integer)")
    problems = check(args)
    if problems:
        parser.error("; ".join(problems))
    return args


def check(args: argparse.Namespace) -> list[str]:
    """What is wrong with the arms, runs and options: names that are not folders of their own, a run given twice,
    options that the driver sets itself."""
    problems = []
    names = [name for name, _ in args.arm]
    for name in names + [name for name, _, _ in args.run]:
        if not re.fullmatch(r"[A-Za-z0-9][\w.+-]*", name, re.ASCII) or re.search(r"_s\d+$", name):
            problems.append(f"arm name {name!r}: letters, digits and _.+- only, not ending in _s<digits>")
        if name in ("start", "report"):
            problems.append(f"arm name {name!r} is taken: OUT/{name} is the driver's")
    problems += [f"--arm {n} given twice" for n in sorted({n for n in names if names.count(n) > 1})]
    problems += [f"seed {s} given twice" for s in sorted({s for s in args.seeds if args.seeds.count(s) > 1})]
    runs = [(name, seed) for name, seed, _ in args.run]
    problems += [f"--run {n} {s} given twice" for n, s in sorted({r for r in runs if runs.count(r) > 1})]
    if args.arm and not args.seeds:
        problems.append("--arm needs --seeds")
    if not args.arm and not args.run:
        problems.append("nothing to run: give --arm NAME OPTIONS (and --seeds) or --run NAME SEED OPTIONS")
    if args.workers < 1:
        problems.append(f"--workers must be at least 1, got {args.workers}")
    for where, tokens, refused in [("--setting", args.setting, PER_RUN)] + [
        (f"the options of {name}", tokens, PER_RUN | FROM_START) for name, *_, tokens in args.arm + args.run
    ]:
        problems += [f"{where}: {o} is set by the driver" for o in sorted(option_names(tokens) & refused)]
    return problems


def final_evaluation(run_dir: Path, iterations: int) -> bool:
    """Whether run_dir/metrics.jsonl holds the evaluation after the last iteration: a line with "iteration" equal to
    iterations and "eval/pass1" (a line cut by kill -9 is no line)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines()
    except OSError:
        return False
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("iteration") == iterations and "eval/pass1" in row:
            return True
    return False


def run_state(run_dir: Path) -> str:
    """ "finished", "resume" (a checkpoint, no final evaluation: stopped half-way) or "new" (no checkpoint).
    checkpoint.old is a checkpoint whose save a crash cut; train.py puts it back in place on --resume."""
    saved = [run_dir / c for c in ("checkpoint", "checkpoint.old") if (run_dir / c / "trainer_state.pt").exists()]
    if not saved:
        return "new"
    try:
        iterations = json.loads((saved[0] / "run_args.json").read_text())["num_iterations"]
    except (OSError, ValueError, KeyError, TypeError):
        return "resume"  # train.py --resume names what is damaged
    return "finished" if saved[0].name == "checkpoint" and final_evaluation(run_dir, iterations) else "resume"


def arm_runs(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(NAME_sSEED, its options) of every run: the arms seed by seed, --run's options added to their run, then the
    --run runs that are not in that grid, in their order."""
    extra = {(name, seed): options for name, seed, options in args.run}
    runs = [
        (f"{name}_s{seed}", options + extra.pop((name, seed), []), seed)
        for seed in args.seeds
        for name, options in args.arm
    ]
    runs += [(f"{name}_s{seed}", options, seed) for (name, seed), options in extra.items()]
    return [(name, options + ["--rl-seed", str(seed)]) for name, options, seed in runs]


def plan(args: argparse.Namespace) -> tuple[Job, list[Job]]:
    """The starting model's job and the arm runs' jobs, in order, each with its state on disk."""
    out, train = args.out, [python(), script("train.py")]
    start = Job(
        "start",
        [*train, *args.setting, "--num-iterations", "0", "--run-dir", str(out / "start")],
        out / "start.log",
        "finished" if final_evaluation(out / "start", 0) else "new",
    )
    jobs = []
    for name, options in arm_runs(args):
        run_dir = out / name
        argv = [*train, *args.setting, "--model", str(out / "start" / "init"), "--sft-steps", "0", *options]
        if args.workers > 1 and "--threads" not in option_names(args.setting + options):
            argv += ["--threads", "1"]
        state = run_state(run_dir)
        argv += ["--run-dir", str(run_dir)] + (["--resume"] if state == "resume" else [])
        jobs.append(Job(name, argv, out / f"{name}.log", state))
    return start, jobs


def compare_command(args: argparse.Namespace, jobs: list[Job]) -> list[str]:
    """tools/compare_runs.py on exactly the arm runs, into OUT/report."""
    runs = [f"{args.out / job.name}/" for job in jobs]
    return [python(), script("tools/compare_runs.py"), *runs, "--out", str(args.out / "report"), *args.compare]


def show(job: Job) -> str:
    """The job as one shell line, its output to its log (appended to when it resumes)."""
    return f"{shlex.join(job.argv)} {'>>' if job.state == 'resume' else '>'} {shlex.quote(str(job.log))} 2>&1"


def execute(job: Job, dry_run: bool, stopping: threading.Event) -> int:
    """Run one job (or print it), its output to its log. Returns its exit code (0 when skipped or printed)."""
    if job.state == "finished":
        print(f"# {job.name}: finished, skipped", flush=True)
        return 0
    if dry_run:
        print(show(job), flush=True)
        return 0
    if stopping.is_set():  # Ctrl-C came: start nothing more
        return 130
    print(f"{job.name}: {'resuming' if job.state == 'resume' else 'running'}, log in {job.log}", flush=True)
    with open(job.log, "a" if job.state == "resume" else "w") as log:
        code = subprocess.run(job.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if code != 0 and not stopping.is_set():
        print(f"{job.name}: failed with exit code {code}; its last line: {last_line(job.log)}", flush=True)
    return code


def last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


def run_all(jobs: list[Job], workers: int, dry_run: bool) -> list[str]:
    """The jobs, workers at a time, in order. Returns the names of those that failed. On Ctrl-C (which the runs get
    too, and save a checkpoint on), wait for the running ones and exit 130."""
    stopping, failed = threading.Event(), []
    pool = ThreadPoolExecutor(max_workers=workers)
    futures = {pool.submit(execute, job, dry_run, stopping): job for job in jobs}
    try:
        for future in as_completed(futures):
            if future.result() != 0:
                failed.append(futures[future].name)
    except KeyboardInterrupt:
        stopping.set()
        print("interrupted: waiting for the running runs to save their checkpoints; run the same command again")
        pool.shutdown(wait=True, cancel_futures=True)
        raise SystemExit(130) from None
    pool.shutdown()
    return [job.name for job in jobs if job.name in failed]  # in the jobs' order


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start, jobs = plan(args)
    if not args.dry_run:
        args.out.mkdir(parents=True, exist_ok=True)
    if run_all([start], 1, args.dry_run):
        raise SystemExit(f"error: the starting model failed, see {start.log}")
    failed = run_all(jobs, 1 if args.dry_run else args.workers, args.dry_run)  # printed in order
    if failed:
        raise SystemExit(f"error: {len(failed)} run(s) failed ({', '.join(failed)}); see their logs in {args.out}")
    if not args.no_compare:
        command = compare_command(args, jobs)
        if args.dry_run:
            print(shlex.join(command))
        elif subprocess.run(command).returncode != 0:
            raise SystemExit(f"error: {shlex.join(command)} failed")


if __name__ == "__main__":
    main()
