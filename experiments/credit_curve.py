"""The credit-assignment curve: how far each estimator is from VinePPO as the number of decisions per answer D grows,
per iteration and per generated token, from one tools/compare_runs.py summary.json per D.

    python experiments/credit_curve.py runs/curve/d1/report/summary.json runs/curve/d2/report/summary.json \
        runs/curve/d4/report/summary.json --out runs/curve/report

D is read from each summary's path (.../d<D>/report/summary.json or .../d<D>.json); the slips per answer of the
starting model (compare_runs.py --slip) say what D is in fact. experiments/credit_curve.sh makes the runs and calls
this; docs/credit_curve.md reads its output. Writes OUT/credit_curve.md (the table) and, with matplotlib,
OUT/credit_curve.png (the figure).

"Tokens to gain" --gain over the start's test Pass@1 (a fixed accuracy per D: the starts differ) interpolates the
mean-over-seeds curve linearly between evaluations, against the generated tokens (answers + MC rollouts) of the
iterations before it; "-" when it is not reached.
"At vine's tokens" is each arm's mean Pass@1 interpolated at the tokens VinePPO spent by --early iterations (an
arm that spent fewer tokens by its last evaluation is read at its last), minus VinePPO's: a gap per generated token.
"""

import argparse
import json
import re
from pathlib import Path

import numpy as np

ORDER = ("vine", "grpo", "rloo", "grpo_matched", "critic")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summaries", nargs="+", type=Path, help="compare_runs.py summary.json files, one per D")
    parser.add_argument("--out", type=Path, required=True, help="folder for credit_curve.md and credit_curve.png")
    parser.add_argument("--early", type=int, default=2, help="the 'after a few iterations' column (default: 2)")
    parser.add_argument("--gain", type=float, default=0.15, help="'tokens to gain': test Pass@1 points over the start, "
                        "as a fraction (default: 0.15)")
    return parser.parse_args()


def read(path: Path) -> tuple[int, dict]:
    found = re.findall(r"\bd(\d+)\b", str(path.resolve()))  # the last d<D> of the path: d4/report/summary.json, d4.json
    if not found:
        raise SystemExit(f"error: {path}: no d<D> in its path, so its number of decisions is unknown")
    return int(found[-1]), json.loads(path.read_text())


def curve(summary: dict, arm: str) -> tuple[np.ndarray, np.ndarray]:
    """(cumulative generated tokens before each evaluation, mean test Pass@1 there), from iteration 0."""
    entry = summary["arms"][arm]
    iterations = sorted(int(k) for k in entry if k.isdigit())
    tokens = np.array([0] + iterations, dtype=float) * entry["cost"]["tokens"]
    return tokens, np.array([summary["start_pass1"]] + [entry[str(i)]["pass1"] for i in iterations])


def tokens_to_reach(tokens: np.ndarray, pass1: np.ndarray, target: float) -> float | None:
    """The generated tokens at which the curve first reaches target (linear between evaluations), or None."""
    if pass1[0] >= target:
        return 0.0
    for i in range(1, len(pass1)):
        if pass1[i] >= target > pass1[i - 1]:
            share = (target - pass1[i - 1]) / (pass1[i] - pass1[i - 1])
            return float(tokens[i - 1] + share * (tokens[i] - tokens[i - 1]))
    return None


def per_token_gap(summary: dict, arm: str, early: int) -> float:
    """Mean Pass@1 of arm at the tokens vine spent by iteration `early`, minus vine's there (points)."""
    budget = early * summary["arms"]["vine"]["cost"]["tokens"]
    tokens, pass1 = curve(summary, arm)
    return 100 * (float(np.interp(budget, tokens, pass1)) - summary["arms"]["vine"][str(early)]["pass1"])


def diff(summary: dict, arm: str, iteration: int) -> list[float]:
    """[arm - vine, low, high] in points at iteration."""
    return [100 * x for x in summary["arms"][arm][str(iteration)]["minus vine"]]


def table(results: dict, early: int, last: int, gain: float) -> str:
    lines = [
        f"| D: start slips per answer (of multiplications) | arm | test Pass@1 after {early} | after {last} | "
        f"minus vine after {early}, points (95% CI) | after {last} | at vine's tokens of iteration {early} | "
        f"tokens / iteration | seconds / iteration | tokens to gain {100 * gain:.0f} points | "
        f"slips per answer after {last} |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d, s in sorted(results.items()):
        slips = s.get("start_slips", {"slips_per_answer": float("nan"), "decisions_per_answer": float("nan")})
        head = f"{d}: {slips['slips_per_answer']:.2f} of {slips['decisions_per_answer']:.2f}"
        head += f", start {100 * s['start_pass1']:.1f}%"
        for arm in [a for a in ORDER if a in s["arms"]]:
            e, c = s["arms"][arm], s["arms"][arm]["cost"]
            gaps = ["", "", ""] if arm == "vine" else [
                "{:+.1f} [{:+.1f}, {:+.1f}]".format(*diff(s, arm, early)),
                "{:+.1f} [{:+.1f}, {:+.1f}]".format(*diff(s, arm, last)),
                f"{per_token_gap(s, arm, early):+.1f}",
            ]
            reached = tokens_to_reach(*curve(s, arm), s["start_pass1"] + gain)
            slip = " / ".join(f"{x:.2f}" for x in e.get("slips_per_answer", []))
            lines.append(
                f"| {head} | `{arm}` | {100 * e[str(early)]['pass1']:.1f}% | {100 * e[str(last)]['pass1']:.1f}% | "
                + " | ".join(gaps)
                + f" | {c['tokens']:,.0f} | {c['s_iteration']:.1f} | "
                + (f"{reached:,.0f}" if reached is not None else "-")
                + f" | {slip} |"
            )
            head = ""
    return "\n".join(lines)


def diagnostic_table(results: dict) -> str:
    """The value diagnostic (train.py --value-diagnostic, paper §7) of the runs that had it, per D."""
    lines = ["| D | arm | MC value MAE (K rollouts vs the reference) | critic MAE | MC rank acc. | critic rank acc. |",
             "|---|---|---|---|---|---|"]
    keys = ("diag/mc_mae", "diag/critic_mae", "diag/mc_rank_acc", "diag/critic_rank_acc")
    for d, s in sorted(results.items()):
        for arm in [a for a in ORDER if a in s["arms"] and "diag/mc_mae" in s["arms"][a]["cost"]]:
            cost = s["arms"][arm]["cost"]
            lines.append(f"| {d} | `{arm}` | " + " | ".join(f"{cost[k]:.3f}" if k in cost else "" for k in keys) + " |")
    return "\n".join(lines)


def figure(results: dict, early: int, last: int, out: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("(no figure: pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = sorted(results)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = ((early, f"after iteration {early}"), (last, f"after iteration {last}"), (None, ""))
    for ax, (iteration, title) in zip(axes, panels):
        for k, arm in enumerate(a for a in ORDER[1:4] if any(a in results[d]["arms"] for d in ds)):  # no critic
            xs = [d for d in ds if arm in results[d]["arms"]]
            x = np.array(xs, dtype=float) * (1 + 0.03 * (k - 1.5))  # spread the bars apart
            if iteration is None:
                ax.plot(x, [per_token_gap(results[d], arm, early) for d in xs], "-o", label=arm)
                continue
            mid, low, high = np.array([diff(results[d], arm, iteration) for d in xs]).T
            ax.errorbar(x, mid, yerr=[mid - low, high - mid], fmt="-o", capsize=3, label=arm)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ds, [str(d) for d in ds])
        ax.set_xlabel("D: decisions (multiplications) per answer")
        ax.set_title(title if iteration is None else f"{title} (95% CI)")
        ax.set_ylabel("test Pass@1 minus VinePPO's, points")
        ax.grid(alpha=0.3)
    axes[2].set_title(f"at the tokens VinePPO generated in {early} iteration{'s' * (early > 1)}")
    axes[0].legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "credit_curve.png", dpi=110)
    print(f"wrote {out / 'credit_curve.png'}")


def main() -> None:
    args = parse_args()
    results = dict(read(path) for path in args.summaries)
    iterations = set.intersection(*(set(int(k) for k in e if k.isdigit()) for s in results.values()
                                    for e in s["arms"].values()))
    if args.early not in iterations:
        raise SystemExit(f"error: not every arm was compared at iteration {args.early}; all at {sorted(iterations)}")
    text = table(results, args.early, max(iterations), args.gain) + "\n\n" + diagnostic_table(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "credit_curve.md").write_text(text + "\n")
    figure(results, args.early, max(iterations), args.out)


if __name__ == "__main__":
    main()
