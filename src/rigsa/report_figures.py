"""rigsa-report's figures (matplotlib, PNG): accuracy and forgetting per pruning iteration with error bars (the
RIGSA paper's Figure 2), accuracy against trainable parameters (its Figure 4), forgetting per method."""
from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
import matplotlib.pyplot as plt  # noqa: E402


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
    axes[0][0].legend(fontsize=8)
    figure.suptitle("after each pruning iteration (mean ± std over seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


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
    axis.set_xscale("log")
    axis.set_xlabel("trainable parameters")
    axis.set_ylabel("test accuracy (%)")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


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
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_figures(rows, base, out: Path) -> list[Path]:
    """The figures the runs have data for; returns their paths."""
    made = []
    for name, draw in (("iterations.png", lambda p: iterations_figure(rows, base, p)),
                       ("accuracy_vs_trainable.png", lambda p: accuracy_vs_trainable_figure(rows, p)),
                       ("forgetting.png", lambda p: forgetting_figure(rows, p))):
        if draw(out / name):
            made.append(out / name)
    return made
