"""Draw the metrics.jsonl of one or more train.py run folders as learning curves: one line per run.

    python tools/plot_metrics.py runs/arithmetic                       # writes runs/arithmetic/curves.png
    python tools/plot_metrics.py runs/a runs/b --out compare.png       # two runs in one picture

Panels: test Pass@1 and greedy accuracy against iteration and against seconds; validation Pass@1 (the number the
best/ checkpoint is chosen by); training reward; answer length; KL to the reference and between consecutive
policies; clip fraction; mean seconds per phase. A run is labelled by its folder name. "Seconds" are the sum of
the logged phase times (evaluation, sampling, values, update), so they leave out the SFT warm-up and checkpoint
writes. The README explains each metric.

As train.py --resume does, a cut last line of metrics.jsonl (kill -9) is left out, with a note on stderr; so are
values that are not finite numbers (NaN, null). Another damaged line, a run given twice, or an --out that is a
folder or a format matplotlib cannot write stop with one line on stderr and exit code 2; --out's folder is made.

Needs matplotlib, which nothing else in the project does: pip install matplotlib
"""

import argparse
import json
import math
import sys
from pathlib import Path

PHASES = ("eval", "sample", "values", "train")  # train.py's time/<phase> keys
# (panel title, y label, y scale, [(metrics.jsonl key, line style, legend suffix)]), each drawn against iteration
CURVES = [
    ("validation Pass@1", "accuracy", "linear", [("eval/val_pass1", "-", "")]),
    ("training reward (T = 0.6)", "mean reward", "linear", [("reward/mean", "-", "")]),
    ("answer length", "tokens", "linear", [("response/length", "-", "")]),
    ("KL", "nats", "log", [("kl/ref", "-", " to reference"), ("loss/approx_kl", ":", " old to new, per update")]),
    ("clip fraction", "fraction of tokens", "linear", [("loss/clipfrac", "-", "")]),
]
PLOTTED = ["eval/pass1", "eval/greedy"] + [key for *_, lines in CURVES for key, _, _ in lines]
PLOTTED += [f"time/{phase}" for phase in PHASES]


def refuse(message: str) -> None:
    """Stop on input that cannot be drawn: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def note(message: str) -> None:
    """One line on stderr about values left out of the picture."""
    print(f"note: {message}", file=sys.stderr)


def number(x) -> float | None:
    """x if it is a finite number (not a bool), else None."""
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def import_pyplot():
    """matplotlib.pyplot with a file-only backend, or a clean exit that says how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: drawing needs matplotlib, which is optional here: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_run(run_dir: Path) -> list[dict]:
    """The rows of run_dir/metrics.jsonl. A last line that is not a row (cut by kill -9 in the middle of a write) is
    left out with a note, as train.py --resume drops it (checkpoint.trim_metrics); another such line, a missing file
    or one without a row is a one-line error."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        refuse(f"{path} not found; pass the folder of a train.py run (its --run-dir)")
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError as e:
        refuse(f"cannot read {path}: {e.strerror}")
    rows = []
    for line_number, line in enumerate(lines, start=1):
        try:
            row, why = json.loads(line), "not a JSON object with an integer iteration"
        except json.JSONDecodeError as e:
            row, why = None, str(e)
        if isinstance(row, dict) and isinstance(row.get("iteration"), int):
            rows.append(row)
        elif line_number == len(lines):
            note(f"{path}: left out its last line, cut short (as train.py --resume drops it)")
        else:
            refuse(f"{path}, line {line_number}: {why}; only a cut last line is left out by itself")
    if not rows:
        refuse(f"{path} holds no row yet: nothing to draw")
    return rows


def note_unplotted(name: str, rows: list[dict]) -> None:
    """A note for each drawn key whose values include some that are not finite numbers (NaN, null, text): series
    leaves them out."""
    for key in PLOTTED:
        left_out = sum(key in row and number(row[key]) is None for row in rows)
        if left_out:
            note(f"{name}: left out {left_out} value(s) of {key} that are not finite numbers")


def series(rows: list[dict], key: str, x_key: str = "iteration") -> tuple[list[float], list[float]]:
    """(x, y) over the rows whose `key` is a finite number; x_key "seconds" is the running sum of the phase times
    (those that are finite numbers)."""
    xs, ys, seconds = [], [], 0.0
    for row in rows:
        seconds += sum(number(row.get(f"time/{phase}", 0.0)) or 0.0 for phase in PHASES)
        if number(row.get(key)) is not None:
            xs.append(seconds if x_key == "seconds" else row[x_key])
            ys.append(row[key])
    return xs, ys


def draw(runs: dict[str, list[dict]], out: Path) -> None:
    """One figure of 2 x 4 panels, one color per run; saved as a PNG."""
    plt = import_pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    axes = axes.ravel()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, rows) in enumerate(runs.items()):
        color = colors[k % len(colors)]
        for ax, x_key in ((axes[0], "iteration"), (axes[1], "seconds")):
            for key, style, label in (("eval/pass1", "-", "Pass@1"), ("eval/greedy", "--", "greedy")):
                ax.plot(*series(rows, key, x_key), style, marker="o", color=color, label=f"{name} {label}")
        for ax, (_, _, _, lines) in zip(axes[2:7], CURVES):
            for key, style, suffix in lines:
                xs, ys = series(rows, key)
                if xs:
                    ax.plot(xs, ys, style, marker="o" if len(xs) < 30 else None, color=color, label=name + suffix)
        num_iterations = max(1, len(series(rows, "time/train")[0]))
        means = [sum(series(rows, f"time/{phase}")[1]) / num_iterations for phase in PHASES]
        width = 0.8 / len(runs)
        axes[7].bar([i + k * width for i in range(len(PHASES))], means, width, color=color, label=name)
    axes[0].set(title="test accuracy", xlabel="iteration", ylabel="accuracy")
    axes[1].set(title="test accuracy", xlabel="seconds (sum of phase times)", ylabel="accuracy")
    for ax, (title, ylabel, yscale, _) in zip(axes[2:7], CURVES):
        ax.set(title=title, xlabel="iteration", ylabel=ylabel, yscale=yscale)
    axes[7].set(title="seconds per iteration, by phase", ylabel="seconds")
    axes[7].set_xticks([i + 0.4 - 0.4 / len(runs) for i in range(len(PHASES))], PHASES)
    for ax in axes:
        if ax.has_data():
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def output_path(path: Path) -> Path:
    """Where to write the picture: its folder made if needed; refused in one line if it is a folder, cannot be made,
    or names a format matplotlib cannot write. Without a suffix it gets .png, as matplotlib would add."""
    from matplotlib.backend_bases import FigureCanvasBase

    if path.is_dir():
        refuse(f"--out {path} is a folder; give a file name such as {path / 'curves.png'}")
    path = path if path.suffix else path.with_suffix(".png")
    if path.suffix[1:].lower() not in FigureCanvasBase.get_supported_filetypes():
        refuse(f"--out {path}: matplotlib cannot write {path.suffix} files; use .png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        refuse(f"cannot make the folder of --out {path}: {e.strerror}")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="train.py run folders, each with a metrics.jsonl")
    parser.add_argument("--out", type=Path, help="PNG to write (default: curves.png in the first run folder)")
    args = parser.parse_args(argv)
    runs, seen = {}, {}
    for run_dir in args.run_dirs:
        if run_dir.resolve() in seen:
            refuse(f"{seen[run_dir.resolve()]} and {run_dir} are the same run folder: give each run once")
        seen[run_dir.resolve()] = run_dir
        name = run_dir.resolve().name
        name = name if name not in runs else str(run_dir)
        runs[name] = read_run(run_dir)
        note_unplotted(name, runs[name])
    import_pyplot()  # before output_path, which needs matplotlib too: a missing one is said first
    out = output_path(args.out or args.run_dirs[0] / "curves.png")
    try:
        draw(runs, out)
    except OSError as e:
        refuse(f"cannot write {out}: {e.strerror}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
