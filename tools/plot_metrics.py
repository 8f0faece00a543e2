"""Draw the metrics.jsonl of one or more train.py run folders as learning curves: one line per run.

    python tools/plot_metrics.py runs/arithmetic                       # writes runs/arithmetic/curves.png
    python tools/plot_metrics.py runs/a runs/b --out compare.png       # two runs in one picture

Panels: test Pass@1 and greedy accuracy against iteration and against seconds; validation Pass@1 (the number the
best/ checkpoint is chosen by); training reward; answer length; KL to the reference and between consecutive
policies; clip fraction; mean seconds per phase. A run is labelled by its folder name. "Seconds" are the sum of
the logged phase times (evaluation, sampling, values, update), so they leave out the SFT warm-up and checkpoint
writes. The README explains each metric.

Needs matplotlib, which nothing else in the project does: pip install matplotlib
"""

import argparse
import json
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
    """The rows of run_dir/metrics.jsonl, with a one-line error if the file is missing or damaged."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; pass the folder of a train.py run (its --run-dir)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}, line {number}: {e}") from None
    return rows


def series(rows: list[dict], key: str, x_key: str = "iteration") -> tuple[list[float], list[float]]:
    """(x, y) over the rows that have `key`; x_key "seconds" is the running sum of the phase times."""
    xs, ys, seconds = [], [], 0.0
    for row in rows:
        seconds += sum(row.get(f"time/{phase}", 0.0) for phase in PHASES)
        if key in row:
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="train.py run folders, each with a metrics.jsonl")
    parser.add_argument("--out", type=Path, help="PNG to write (default: curves.png in the first run folder)")
    args = parser.parse_args(argv)
    runs = {}
    for run_dir in args.run_dirs:
        name = run_dir.resolve().name
        runs[name if name not in runs else str(run_dir)] = read_run(run_dir)
    out = args.out or args.run_dirs[0] / "curves.png"
    draw(runs, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
