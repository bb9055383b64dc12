"""rigsa-report's figures (matplotlib, PNG): the learning-forgetting plane (the headline), the tuned searches'
validation score against the learning rate, accuracy and forgetting per pruning iteration with error bars (the
RIGSA paper's Figure 2), accuracy against trainable parameters (its Figure 4), forgetting per method. Legends sit
beside the plots, so they never cover a point."""
from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
import matplotlib.pyplot as plt  # noqa: E402


def readable_log_x(axis, values: list[float]) -> None:
    """A log x axis whose tick labels do not run into each other: minor ticks unlabelled when the values span more
    than a decade (matplotlib labels them then, and they overlap)."""
    from matplotlib.ticker import NullFormatter

    axis.set_xscale("log")
    if values and max(values) > 10 * min(values):
        axis.xaxis.set_minor_formatter(NullFormatter())


def saved(figure, path: Path, legend_of=None) -> bool:
    """Write the figure (its legend, if any, beside the plot at the right: never over a point) and close it."""
    if legend_of is not None:
        legend_of.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return True


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for a single seed) of the values."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def phase_series(row, key: str) -> tuple[list[str], list[float], list[float]]:
    """The phases of a row's runs and, per phase, the mean and std over seeds of iterations[key]."""
    by_phase: dict[str, list[float]] = {}
    for run in row.runs:
        for item in run.results.get("iterations") or []:
            if item.get(key) is not None:
                by_phase.setdefault(item["phase"], []).append(float(item[key]))
    phases = list(by_phase)
    stats = [spread(by_phase[phase]) for phase in phases]
    return phases, [mean for mean, _ in stats], [std for _, std in stats]


def final_values(row, read) -> list[float]:
    return [float(value) for value in (read(run.results) for run in row.runs) if isinstance(value, (int, float))]


def accuracy_of(results: dict):
    return (results.get("target") or {}).get("accuracy")


def forgetting_of(results: dict):
    return (results.get("forgetting") or {}).get("mean_forgetting")


def iterations_figure(rows, base, path: Path) -> bool:
    """Accuracy (and forgetting, when measured) after each pruning iteration; rows without iterations and the
    base model as horizontal lines."""
    pruned = [row for row in rows if any(run.results.get("iterations") for run in row.runs)]
    if not pruned:
        return False
    panels = [("accuracy", "test accuracy (%)", 100.0, accuracy_of)]
    if any(phase_series(row, "mean_forgetting")[0] for row in pruned):
        panels.append(("mean_forgetting", "mean forgetting (positive = worse)", 1.0, forgetting_of))
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for axis, (key, ylabel, scale, read) in zip(axes[0], panels):
        phases = []
        for row in pruned:
            names, means, stds = phase_series(row, key)
            phases = names if len(names) > len(phases) else phases
            axis.errorbar(range(len(names)), [m * scale for m in means], yerr=[s * scale for s in stds],
                          marker="o", capsize=3, label=row.label)
        others = [row for row in rows if row not in pruned] + ([base] if base else [])
        for number, row in enumerate(others, start=len(pruned)):
            values = final_values(row, read)
            if values:  # a line in its own colour (the pruned rows took the first ones); the base model gray
                axis.axhline(statistics.fmean(values) * scale, linestyle="--" if row is not base else ":",
                             color="gray" if row is base else f"C{number}", label=row.label)
        axis.set_xticks(range(len(phases)), phases, rotation=30, ha="right")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    figure.suptitle("after each pruning iteration (mean ± std over seeds)")
    return saved(figure, path, legend_of=axes[0][-1])


def accuracy_vs_trainable_figure(rows, path: Path) -> bool:
    points = [(row, final_values(row, lambda r: r.get("trainable_params")), final_values(row, accuracy_of))
              for row in rows]
    points = [(row, trainable, accuracy) for row, trainable, accuracy in points if trainable and accuracy]
    if not points:
        return False
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for row, trainable, accuracy in points:
        mean, std = spread([value * 100 for value in accuracy])
        axis.errorbar(statistics.fmean(trainable), mean, yerr=std, marker="o", capsize=3, linestyle="none",
                      label=row.label)
    readable_log_x(axis, [value for _, trainable, _ in points for value in trainable])
    axis.set_xlabel("trainable parameters")
    axis.set_ylabel("test accuracy (%)")
    axis.grid(alpha=0.3, which="both")
    return saved(figure, path, legend_of=axis)


def forgetting_figure(rows, path: Path) -> bool:
    bars = [(row.label, spread(values)) for row in rows if (values := final_values(row, forgetting_of))]
    if not bars:
        return False
    figure, axis = plt.subplots(figsize=(max(5.0, 1.3 * len(bars)), 4.2))
    axis.bar(range(len(bars)), [mean for _, (mean, _) in bars], yerr=[std for _, (_, std) in bars], capsize=4,
             color="tab:orange")
    axis.set_xticks(range(len(bars)), [label for label, _ in bars], rotation=20, ha="right")
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_ylabel("mean forgetting (positive = worse)")
    axis.grid(alpha=0.3, axis="y")
    return saved(figure, path)


def learning_forgetting_figure(rows, base, path: Path) -> bool:
    """The headline: target accuracy against mean forgetting, every seed a small point, each method's mean ± std
    over seeds a large one with error bars on both axes; up and to the left is better."""
    points = [(row, final_values(row, forgetting_of), final_values(row, accuracy_of)) for row in rows]
    points = [(row, forgets, learns) for row, forgets, learns in points if forgets and len(forgets) == len(learns)]
    if not points:
        return False
    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    for number, (row, forgets, learns) in enumerate(points):
        color = f"C{number % 10}"
        axis.scatter(forgets, [value * 100 for value in learns], color=color, alpha=0.45, s=18)
        (x, x_std), (y, y_std) = spread(forgets), spread([value * 100 for value in learns])
        axis.errorbar(x, y, xerr=x_std, yerr=y_std, color=color, marker="o", markersize=8, capsize=3,
                      label=f"{row.label} (n={len(forgets)})")
    if base is not None and base.runs:
        axis.axhline(base.runs[0].results["target"]["accuracy"] * 100, color="gray", linestyle=":",
                     label="base model")
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set_xlabel("mean forgetting over the suite (positive = worse)")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title("learning against forgetting (points: seeds; bars: mean ± std)")
    axis.grid(alpha=0.3)
    return saved(figure, path, legend_of=axis)


def learning_rate_figure(selections: list[dict], path: Path) -> bool:
    """Each tuned search's trials: the validation score against the learning rate, one curve per row (log x);
    pruned trials hollow at their last score, the chosen one ringed."""
    curves = []
    for selection in selections:
        trials = [trial for trial in selection["trials"] if "train.lr" in (trial.get("params") or {})
                  and isinstance(trial.get("value"), (int, float)) and trial.get("state") in ("complete", "pruned")]
        if trials:
            curves.append((Path(selection["path"]).parent.name, selection, sorted(
                trials, key=lambda trial: float(trial["params"]["train.lr"]))))
    if not curves:
        return False
    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    for number, (label, selection, trials) in enumerate(curves):
        color = f"C{number % 10}"
        rates = [float(trial["params"]["train.lr"]) for trial in trials]
        values = [float(trial["value"]) for trial in trials]
        axis.plot(rates, values, color=color, alpha=0.6, label=label)
        for rate, value, trial in zip(rates, values, trials):
            axis.scatter(rate, value, color=color, facecolors=color if trial["state"] == "complete" else "none", s=28)
        chosen = (selection.get("chosen") or {}).get("params", {}).get("train.lr")
        if chosen is not None:
            axis.scatter(float(chosen), selection["chosen"]["value"], color=color, s=140, facecolors="none",
                         linewidths=1.5)
    readable_log_x(axis, [float(trial["params"]["train.lr"]) for _, _, trials in curves for trial in trials])
    axis.set_xlabel("learning rate")
    axis.set_ylabel(f"validation {curves[0][1].get('objective', 'score')}")
    axis.set_title("learning-rate search per method (hollow: pruned; ringed: chosen)")
    axis.grid(alpha=0.3, which="both")
    return saved(figure, path, legend_of=axis)


def write_figures(rows, base, out: Path, selections: list[dict] | None = None) -> list[Path]:
    """The figures the runs have data for; returns their paths."""
    made = []
    for name, draw in (("learning_forgetting.png", lambda p: learning_forgetting_figure(rows, base, p)),
                       ("learning_rate.png", lambda p: learning_rate_figure(selections or [], p)),
                       ("iterations.png", lambda p: iterations_figure(rows, base, p)),
                       ("accuracy_vs_trainable.png", lambda p: accuracy_vs_trainable_figure(rows, p)),
                       ("forgetting.png", lambda p: forgetting_figure(rows, p))):
        if draw(out / name):
            made.append(out / name)
    return made
