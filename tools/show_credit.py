"""Show which steps of an answer got the credit: the samples that train.py logs (--log-samples, run_dir/samples/),
in the terminal, as one HTML page, or as a picture.

    python tools/show_credit.py runs/arithmetic                      # the terminal: the first logged iteration
    python tools/show_credit.py runs/arithmetic --iteration 4        # another iteration
    python tools/show_credit.py runs/h2h/vine_s1 runs/h2h/grpo_s1 --html credit.html   # runs side by side
    python tools/show_credit.py runs/h2h/vine_s1 runs/h2h/grpo_s1 --png credit.png --answer 0:5

Each step of an answer is coloured by the sign and size of its advantage A before whitening: green for credit, red
for blame, full colour at |A| >= 1 (GRPO's (R - mean) / std can exceed 1; whitening, which the update applies per
minibatch, rescales every estimator's advantages alike). Beside each step: A, the V(s) before and after it
(vine: the MC values; after the last step the reward R, as V(terminal) = 0 and A = R - V), the critic's V_old at
its first token (critic), and A after whitening in each epoch.

Runs of one starting model and one RL seed sample the same answers at iteration 0, whatever their --advantage, so
the page and the picture put each answer's credit under every run side by side (the head-to-head). Later
iterations differ: each run's policy has moved. The HTML page has no script and loads nothing: the values show on
hover and in a table under each answer. --png needs matplotlib.

A line of samples/ that cannot be shown (not JSON, a key missing) is left out with a note on stderr, and so is a
file not named <iteration>.jsonl; an advantage that is not a finite number is shown as such, uncoloured. Bad
options, a run given twice, or a folder with nothing to show stop with one line on stderr and exit code 2.
"""

import argparse
import html
import json
import math
import sys
from pathlib import Path

NAMES = {"vine": "VinePPO", "critic": "PPO (critic)", "grpo": "GRPO", "rloo": "RLOO"}
CREDIT = {  # how each estimator credits the tokens of an answer (the picture's subtitles)
    "vine": "each step's A = V(s) after - V(s) before, from MC rollouts",
    "critic": "A_t = R - V_old(s_t) per token (shown: each step's mean)",
    "grpo": "one A = (R - mean) / std of the group, on every token",
    "rloo": "one A = R - mean of the other answers, on every token",
}


def refuse(message: str) -> None:
    """Stop on input that cannot be shown: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def note(message: str) -> None:
    """One line on stderr about input that is left out or shown differently."""
    print(f"note: {message}", file=sys.stderr)


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def finite(x) -> bool:
    return x is not None and math.isfinite(x)


# what show_credit reads of a record (train.write_samples, vine.credit_record): key -> (accepted types, in words)
RECORD_KEYS = {
    "iteration": (int, "an integer"),
    "answer_index": (int, "an integer"),
    "estimator": (str, "a string"),
    "question": (str, "a string"),
    "gold": (object, "anything"),
    "reward": ((int, float), "a number"),
    "finished": ((bool, int), "true or false"),
    "steps": (list, "a list"),
}


def step_problem(step) -> str | None:
    """What makes a step unshowable (a missing or mistyped field), or None."""
    if not isinstance(step, dict) or not isinstance(step.get("text"), str):
        return "has no text"
    if "advantage" not in step or not (step["advantage"] is None or is_number(step["advantage"])):
        return "has no advantage (a number or null)"
    if not isinstance(step.get("whitened"), list) or not all(w is None or is_number(w) for w in step["whitened"]):
        return "has no whitened list of numbers"
    if "v_before" in step and not (is_number(step["v_before"]) and is_number(step.get("v_after"))):
        return "has no numbers for V before and after"
    if "v_old" in step and not (isinstance(step["v_old"], list) and all(is_number(v) for v in step["v_old"])):
        return "has a v_old that is not a list of numbers"
    return None


def record_problem(record) -> str | None:
    """Why a line of samples/<iteration>.jsonl cannot be shown (not a record, a missing or mistyped key), or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for key, (kind, words) in RECORD_KEYS.items():
        if key not in record:
            return f"no {key!r}"
        if not isinstance(record[key], kind):
            return f"{key!r} is not {words}"
    if "advantage" in record and not (record["advantage"] is None or is_number(record["advantage"])):
        return "'advantage' is not a number"
    for k, step in enumerate(record["steps"]):
        if problem := step_problem(step):
            return f"step {k} {problem}"
    return None


def read_records(path: Path) -> list[dict]:
    """The records of one samples/<iteration>.jsonl; a line that is not a record show_credit can show is left out,
    with a note naming it and why."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        note(f"skipped {path}: {e.strerror}")
        return []
    if not any(line.strip() for line in lines):
        note(f"skipped {path}: it is empty")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if problem := "not JSON" if record is None else record_problem(record):
            note(f"skipped {path}, line {number}: {problem}")
            continue
        records.append(record)
    unshown = sum(not finite(s["advantage"]) for r in records for s in r["steps"] if s["advantage"] is not None)
    if unshown:
        note(f"{path}: {unshown} step(s) with an advantage that is not a finite number, shown without colour")
    return records


def load_samples(run_dir: Path) -> dict[int, list[dict]]:
    """{iteration: its records}, from run_dir/samples/<iteration>.jsonl (files of other names are skipped with a
    note), with a one-line error when there are none."""
    folder = run_dir / "samples"
    paths = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    for path in paths:
        if not path.stem.isdigit():
            note(f"skipped {path}: not train.py's samples/<iteration>.jsonl")
    files = [path for path in paths if path.stem.isdigit()]
    if not files:
        refuse(f"{folder} holds no samples: train.py writes them with --log-samples N (N > 0)")
    out = {int(path.stem): records for path in files if (records := read_records(path))}
    if not out:
        refuse(f"{folder} holds no record that can be shown (the notes above say why)")
    return dict(sorted(out.items()))


def values(record: dict, step: dict, arrow: str = "->") -> str:
    """vine's V(s) before -> after a step; after the last one, the reward (A = R - V(s_{n-1}), V(terminal) = 0)."""
    if "v_before" not in step:
        return ""
    after = f"R {record['reward']:g}" if step is record["steps"][-1] else f"{step['v_after']:.2f}"
    return f"V {step['v_before']:.2f} {arrow} {after}"


def step_notes(record: dict, step: dict) -> str:
    """One line of a step's numbers: A, V before -> after (vine) or V_old (critic), A whitened per epoch."""
    parts = [f"A {fmt(step['advantage'])}"]
    if "v_before" in step:
        parts.append(values(record, step))
    if step.get("v_old"):
        parts.append(f"V_old {step['v_old'][0]:.2f}")
    if any(w is not None for w in step["whitened"]):
        parts.append("whitened " + " ".join(fmt(w) for w in step["whitened"]))
    return ", ".join(parts)


def fmt(x) -> str:
    """An advantage as +0.00: "-" for none, "nan" or "inf" for what is not a finite number."""
    return "-" if x is None else f"{x:+.2f}" if math.isfinite(x) else str(x)


def verdict(record: dict) -> str:
    if not math.isfinite(record["reward"]):
        return "not graded"
    return "right" if record["reward"] == 1 else "wrong" if record["finished"] else "unfinished"


def header(record: dict, run: str) -> str:
    return (
        f"{run} | {NAMES.get(record['estimator'], record['estimator'])} | iteration {record['iteration']}, answer "
        f"{record['answer_index']} | reward {record['reward']:g} ({verdict(record)}), gold {record['gold']}"
    )


def colour(advantage: float | None) -> tuple[int, int, int, float]:
    """(red, green, blue 0-255, opacity) of an advantage: green for credit, red for blame, opacity |A| (full at 1);
    transparent for a step without tokens or whose advantage is not a finite number. The page (rgba) and the picture
    use it."""
    if not finite(advantage):
        return (255, 255, 255, 0.0)
    alpha = min(1.0, abs(advantage)) * 0.85
    return (0, 160, 60, alpha) if advantage >= 0 else (220, 30, 30, alpha)


# ---------------------------------------------------------------------------------------------------------------------
# the terminal


def ansi(advantage: float | None) -> str:
    """A 256-colour ANSI background for an advantage: 5 greens for credit, 5 reds for blame, none near 0 (or for an
    advantage that is not a finite number)."""
    if not finite(advantage) or abs(advantage) < 0.05:
        return ""
    level = min(4, int(abs(advantage) * 5))  # 0..4
    greens, reds = [22, 28, 34, 40, 46], [52, 88, 124, 160, 196]
    return f"\033[48;5;{(greens if advantage > 0 else reds)[level]}m\033[97m"


def show_in_terminal(records: list[dict], run: str, color: bool) -> None:
    """Each record's header, question and steps, one line of text and one of numbers per step."""
    for record in records:
        print("=" * 100)
        print(header(record, run))
        print("Q: " + record["question"])
        for k, step in enumerate(record["steps"]):
            text = step["text"].strip("\n").replace("\n", " / ") or "(empty)"
            if color and ansi(step["advantage"]):
                text = ansi(step["advantage"]) + text + "\033[0m"
            print(f"  {k:>2} {text}")
            print(f"     {step_notes(record, step)}")
        if "advantage" in record:
            print(f"  one advantage for every token: {fmt(record['advantage'])}")


# ---------------------------------------------------------------------------------------------------------------------
# the HTML page

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h2 { border-bottom: 2px solid #888; margin-top: 2em; }
.row { display: flex; gap: 1em; align-items: flex-start; margin-bottom: 1.5em; }
.cell { flex: 1; min-width: 0; overflow-x: auto; border: 1px solid #ccc; border-radius: 6px; padding: 0.6em; }
.head { font-weight: 600; margin-bottom: 0.3em; }
.question { color: #555; margin-bottom: 0.5em; }
.answer { font: 13px/1.6 ui-monospace, monospace; white-space: pre-wrap; overflow-wrap: anywhere; background: #fafafa;
  padding: 0.4em; }
.step { border-radius: 3px; outline: 1px solid #bbb; }
table { border-collapse: collapse; margin-top: 0.5em; font-size: 12px; width: 100%; }
td, th { border: 1px solid #ddd; padding: 2px 5px; text-align: right; vertical-align: top; }
td.text { text-align: left; font-family: ui-monospace, monospace; white-space: pre-wrap; min-width: 9em; }
td.num { white-space: nowrap; }
.legend span { padding: 0 0.5em; margin-right: 0.3em; }
"""


def rgba(advantage: float | None) -> str:
    """colour() as a CSS background."""
    red, green, blue, alpha = colour(advantage)
    return f"rgba({red}, {green}, {blue}, {alpha:.2f})"


def answer_cell(record: dict | None, run: str) -> str:
    if record is None:
        return f'<div class="cell"><div class="head">{html.escape(run)}</div>no record of this answer</div>'
    spans, rows = [], []
    for k, step in enumerate(record["steps"]):
        notes = html.escape(f"step {k}: {step_notes(record, step)}")
        body = step["text"].lstrip("\n")  # a step's leading newline goes outside its span (the first one's: away)
        newlines = "\n" * (len(step["text"]) - len(body)) if k else ""
        spans.append(
            f'{newlines}<span class="step" style="background:{rgba(step["advantage"])}" title="{notes}">'
            f"{html.escape(body)}</span>"
        )
        v = values(record, step, "&rarr;").removeprefix("V ")
        v_old = f"{step['v_old'][0]:.2f}" if step.get("v_old") else ""
        whitened = " ".join(fmt(w) for w in step["whitened"])
        rows.append(
            f'<tr><td>{k}</td><td class="text" style="background:{rgba(step["advantage"])}">'
            f"{html.escape(step['text'].strip(chr(10)))}</td><td class='num'>{fmt(step['advantage'])}</td>"
            f"<td class='num'>{whitened}</td><td class='num'>{v}</td><td class='num'>{v_old}</td></tr>"
        )
    return (
        f'<div class="cell"><div class="head">{html.escape(header(record, run))}</div>'
        f'<div class="question">Q: {html.escape(record["question"])}</div>'
        f'<div class="answer">{"".join(spans)}</div>'
        "<table><tr><th>step</th><th>text</th><th>A</th><th>whitened, per epoch</th><th>V(s) before &rarr; after"
        f"</th><th>V_old, first token</th></tr>{''.join(rows)}</table></div>"
    )


def write_html(runs: dict[str, dict[int, list[dict]]], iterations: list[int], path: Path) -> None:
    """One section per iteration, one row per answer, one column per run."""
    legend = "".join(
        f'<span style="background:{rgba(a)}">A = {a:+.1f}</span>' for a in (-1.0, -0.5, -0.2, 0.0, 0.2, 0.5, 1.0)
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>Credit per step</title>',
        f"<style>{CSS}</style></head><body><h1>Credit per step</h1>",
        f"<p>Runs: {html.escape(', '.join(runs))}. Each step of an answer is coloured by its advantage before "
        "whitening (hover a step for its numbers; the table under each answer lists them).</p>",
        f'<p class="legend">{legend}</p>',
    ]
    for iteration in iterations:
        parts.append(f"<h2>Iteration {iteration}</h2>")
        by_run = {run: {r["answer_index"]: r for r in samples.get(iteration, [])} for run, samples in runs.items()}
        for index in sorted({i for records in by_run.values() for i in records}):
            cells = "".join(answer_cell(records.get(index), run) for run, records in by_run.items())
            parts.append(f'<div class="row">{cells}</div>')
    parts.append("</body></html>")
    path.write_text("\n".join(parts))


# ---------------------------------------------------------------------------------------------------------------------
# the picture


def write_png(runs: dict[str, dict[int, list[dict]]], iteration: int, index: int, path: Path) -> None:
    """One answer under every run, side by side: each step a line on its advantage's colour, its numbers beside;
    written to path (output_path: with .png added when it has no suffix)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: --png needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = {}
    for run, samples in runs.items():
        match = [r for r in samples.get(iteration, []) if r["answer_index"] == index]
        if not match:
            refuse(f"{run} logged no answer {index} at iteration {iteration}")
        chosen[run] = match[0]
    path = output_path(path, "--png", picture=True)
    lines = max(len(r["steps"]) for r in chosen.values())
    fig, axes = plt.subplots(1, len(chosen), figsize=(6.2 * len(chosen), 1.5 + 0.42 * lines), squeeze=False)
    for ax, (run, record) in zip(axes[0], chosen.items()):
        ax.set_axis_off()
        ax.set_xlim(0, 1)
        ax.set_ylim(lines + 0.2, -2.2)
        name = NAMES.get(record["estimator"], record["estimator"])
        ax.text(0, -1.7, f"{name}: reward {record['reward']:g} ({verdict(record)}, gold {record['gold']})",
                fontsize=11, weight="bold")
        ax.text(0, -1.0, CREDIT.get(record["estimator"], ""), fontsize=9, color="#444")
        for k, step in enumerate(record["steps"]):
            text = step["text"].strip("\n").replace("\n", " / ") or "(empty)"
            red, green, blue, alpha = colour(step["advantage"])
            ax.text(0, k, text, family="monospace", fontsize=10, va="center",
                    bbox=dict(boxstyle="round,pad=0.25", fc=(red / 255, green / 255, blue / 255, alpha), ec="#999"))
            ax.text(0.62, k, f"A {fmt(step['advantage'])}   {values(record, step)}", fontsize=9, va="center")
    question = chosen[next(iter(chosen))]["question"]
    fig.suptitle(f"Q: {question}   (colour: A before whitening; red blames, green credits)", fontsize=10, x=0.01,
                 ha="left")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        refuse(f"cannot write --png {path}: {e.strerror}")
    plt.close(fig)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------------------------------


def at_least_0(text: str) -> int:
    """An argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def answer_of(text: str) -> tuple[int, int]:
    """An argparse type: ITERATION:ANSWER_INDEX, two integers >= 0."""
    parts = text.split(":")
    if len(parts) != 2 or not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected ITERATION:ANSWER_INDEX, two integers >= 0, got {text!r}")
    return int(parts[0]), int(parts[1])


def output_path(path: Path, option: str, picture: bool) -> Path:
    """Where to write --html or --png: its folder made if needed; refused in one line if it is a folder, cannot be
    made, or (a picture) names a format matplotlib cannot write. A picture without a suffix gets .png, as matplotlib
    would add."""
    if path.is_dir():
        refuse(f"{option} {path} is a folder; give a file name")
    if picture:
        from matplotlib.backend_bases import FigureCanvasBase

        path = path if path.suffix else path.with_suffix(".png")
        if path.suffix[1:].lower() not in FigureCanvasBase.get_supported_filetypes():
            refuse(f"{option} {path}: matplotlib cannot write {path.suffix} files; use .png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        refuse(f"cannot make the folder of {option} {path}: {e.strerror}")
    return path


def load_runs(run_dirs: list[Path]) -> dict[str, dict[int, list[dict]]]:
    """{name: load_samples} of each run folder, named by its folder (by its path where two names clash); a folder
    given twice is refused."""
    runs, seen = {}, {}
    for run_dir in run_dirs:
        if run_dir.resolve() in seen:
            refuse(f"{seen[run_dir.resolve()]} and {run_dir} are the same run folder: give each run once")
        seen[run_dir.resolve()] = run_dir
        name = run_dir.name if run_dir.name not in runs else str(run_dir)
        runs[name] = load_samples(run_dir)
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="train.py run folders (with samples/)")
    parser.add_argument(
        "--iteration",
        type=at_least_0,
        help="the iteration to show (default: the first logged; the HTML page shows all unless this is given)",
    )
    parser.add_argument("--html", type=Path, help="write the page here (its folder is made if needed)")
    parser.add_argument("--png", type=Path, help="write a picture of one answer (--answer) here")
    parser.add_argument("--answer", type=answer_of, default=(0, 0), help="ITERATION:ANSWER_INDEX of the --png picture")
    args = parser.parse_args(argv)
    runs = load_runs(args.run_dirs)
    everything = sorted({i for samples in runs.values() for i in samples})
    if args.iteration is not None and args.iteration not in everything:
        refuse(f"no run logged iteration {args.iteration}; logged: {everything}")
    if args.png:
        write_png(runs, *args.answer, args.png)
    if args.html:
        path = output_path(args.html, "--html", picture=False)
        try:
            write_html(runs, everything if args.iteration is None else [args.iteration], path)
        except OSError as e:
            refuse(f"cannot write --html {path}: {e.strerror}")
        print(f"wrote {path}")
    if not args.png and not args.html:
        iteration = everything[0] if args.iteration is None else args.iteration
        for run, samples in runs.items():
            if iteration not in samples:
                print(f"{run}: no answer logged at iteration {iteration}")
            show_in_terminal(samples.get(iteration, []), run, color=sys.stdout.isatty())


if __name__ == "__main__":
    main()
