"""What a reviewer asks of a comparison (rigsa-report): each method against the first row as a difference with a
95% interval over seeds, never two means side by side; the tuned search behind each row (its chosen setting and
best validation score, read from `<run.root>/search/*/selection.yaml`); and which rows answer one class only.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import yaml

SELECTION_FILE = "selection.yaml"  # rigsa.tuning.SELECTION_FILE (the report reads files, it imports no run code)


def difference_interval(first: list[float], second: list[float], level: float = 0.95) -> dict | None:
    """mean(second) - mean(first) with Welch's t interval (unequal variances, Welch-Satterthwaite degrees of
    freedom) at `level`; None when either side has fewer than 2 values (no spread to build an interval from).
    When both sides have no spread at all the interval is the difference itself."""
    from scipy import stats

    if len(first) < 2 or len(second) < 2:
        return None
    difference = statistics.fmean(second) - statistics.fmean(first)
    var_first, var_second = statistics.variance(first) / len(first), statistics.variance(second) / len(second)
    error = math.sqrt(var_first + var_second)
    if error == 0:
        return {"difference": difference, "low": difference, "high": difference, "n": [len(first), len(second)],
                "df": math.inf}
    df = (var_first + var_second) ** 2 / (var_first ** 2 / (len(first) - 1) + var_second ** 2 / (len(second) - 1))
    half = stats.t.ppf(0.5 + level / 2, df) * error
    return {"difference": difference, "low": difference - half, "high": difference + half,
            "n": [len(first), len(second)], "df": df}


def verdict(interval: dict | None, higher_is_better: bool) -> str:
    """How the second row compares with the first at 95%: better, worse, or cannot tell (the interval holds 0)."""
    if interval is None:
        return "cannot tell (fewer than 2 seeds)"
    if interval["low"] <= 0 <= interval["high"]:
        return "cannot tell"
    return "better" if (interval["difference"] > 0) == higher_is_better else "worse"


# (header, read from results.json, scale, decimals, higher is better)
COMPARED = [("accuracy (points)", lambda r: (r.get("target") or {}).get("accuracy"), 100.0, 1, True),
            ("mean forgetting", lambda r: (r.get("forgetting") or {}).get("mean_forgetting"), 1.0, 4, False)]


def differences_markdown(rows) -> str:
    """Each row against the first: the difference of the means (this row minus the first) and its 95% interval."""
    if len(rows) < 2 or not rows[0].runs:
        return ""
    reference = rows[0]
    lines = [f"### Against {reference.label} (this row minus it; 95% Welch interval over seeds)", "",
             "| method | n | " + " | ".join(f"{header} difference | 95% interval | verdict"
                                          for header, *_ in COMPARED) + " |",
             "|---|---|" + "---|---|---|" * len(COMPARED)]
    for row in rows[1:]:
        cells = [row.label, f"{len(row.runs)} vs {len(reference.runs)}"]
        for header, read, scale, digits, higher in COMPARED:
            interval = difference_interval(reference.values(read, scale), row.values(read, scale))
            if interval is None:
                cells += ["-", "-", verdict(None, higher)]
            else:
                cells += [f"{interval['difference']:+.{digits}f}",
                          f"[{interval['low']:+.{digits}f}, {interval['high']:+.{digits}f}]", verdict(interval, higher)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_selections(folders: list[Path]) -> list[dict]:
    """Every tuned search's selection under the folders (run.root/search/<row>/selection.yaml), with its path."""
    found = []
    for folder in folders:
        for path in sorted(Path(folder).rglob(SELECTION_FILE)):
            try:
                record = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(record, dict) and isinstance(record.get("trials"), list):
                found.append({**record, "path": path})
    return found


def selection_of(row, selections: list[dict]) -> dict | None:
    """The search that chose this row's setting: its row overrides and chosen params hold in the row's configs."""
    if not row.runs:
        return None
    config = row.runs[0].config
    for selection in selections:
        chosen = (selection.get("chosen") or {}).get("params") or {}
        # a selection written before it recorded its row names the variant by its folder
        overrides = (dict(item.split("=", 1) for item in selection["row"]) if "row" in selection
                     else {"variant": Path(selection["path"]).parent.name})
        if not chosen or any(str(config.get(key)) != value for key, value in overrides.items()):
            continue
        if all(same_value(config.get(key), value) for key, value in chosen.items()):
            return selection
    return None


def same_value(saved, chosen) -> bool:
    try:
        return math.isclose(float(saved), float(chosen), rel_tol=1e-12)
    except (TypeError, ValueError):
        return str(saved) == str(chosen)


def selection_cells(selection: dict | None) -> tuple[str, str]:
    """(the chosen setting, the search's best validation score and its trial counts) for a row."""
    if selection is None:
        return "-", "-"
    chosen = selection["chosen"]
    setting = ", ".join(f"{key.split('.')[-1]}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
                        for key, value in chosen["params"].items())
    counts = selection.get("counts") or {}
    return setting, (f"{chosen['value']:.4f} ({counts.get('complete', 0)} complete, {counts.get('pruned', 0)} "
                     f"pruned, {counts.get('fail', 0)} failed)")


def add_selection_columns(headers: list, cells: list, records: list, rows, selections: list[dict]) -> None:
    """When a tuned search chose any row's setting: the chosen setting and the search's best validation score,
    before the table's last column ('-' for rows no search chose)."""
    chosen = [selection_of(row, selections) for row in rows]
    if not any(chosen):
        return
    headers[-1:-1] = ["tuned setting", "search's best validation score"]
    for line, record, selection in zip(cells, records, chosen):
        setting, best = selection_cells(selection)
        line[-1:-1] = [setting, best]
        record["tuned setting"], record["search best"] = setting, best


def one_class_markdown(rows) -> str:
    """The rows with a run that answered one class for every test example (its accuracy is then that class's
    share, not learning), as a line; empty when none did."""
    flagged = []
    for row in rows:
        for run in row.runs:
            counts = ((run.results or {}).get("target") or {}).get("answer_counts") or []
            if len(counts) > 1 and max(counts) == sum(counts) > 0:
                flagged.append(f"{row.label} (seed {run.seed}: every answer is class {counts.index(max(counts))})")
    if not flagged:
        return ""
    return ("\nAnswers one class for every example (its accuracy is that class's share, not learning): "
            + "; ".join(flagged) + "\n")


def confusion_markdown(rows) -> str:
    """Each row's confusion matrix (more than two classes), summed over its seeds: rows the true class."""
    parts = []
    for row in rows:
        matrices = [((run.results.get("target") or {}).get("metrics") or {}).get("confusion") for run in row.runs]
        matrices = [matrix for matrix in matrices if matrix]
        if not matrices:
            continue
        total = [[sum(matrix[i][j] for matrix in matrices) for j in range(len(matrices[0]))]
                 for i in range(len(matrices[0]))]
        lines = [f"\nConfusion matrix of {row.label} ({len(matrices)} seeds summed; row: true class, column: "
                 "answered):", "", "| true | " + " | ".join(str(j) for j in range(len(total))) + " |",
                 "|---|" + "---|" * len(total)]
        lines += [f"| {i} | " + " | ".join(str(count) for count in counts) + " |" for i, counts in enumerate(total)]
        parts.append("\n".join(lines) + "\n")
    return "".join(parts)


def merged_tasks_markdown(rows) -> str:
    """For merges (rigsa-merge): each source task's score of the base, of its own adapter and of the merged model,
    means over the row's seeds, and what the merge kept of the adapter's gain over the base."""
    tasks = list(dict.fromkeys(task for row in rows for run in row.runs if run.results.get("kind") == "merge"
                               for task in run.results.get("tasks") or {}))
    if not tasks:
        return ""

    def mean_of(row, task: str, key: str):
        values = [((run.results.get("tasks") or {}).get(task) or {}).get(key) for run in row.runs]
        values = [value for value in values if value is not None]
        return sum(values) / len(values) if values else None

    def shown(value) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    lines = ["\nPer source task (test split; %): base model, the task's own adapter, the merged model, and the share "
             "of the adapter's gain over the base that the merge kept (merged - base) / (adapter - base):", "",
             "| merge | " + " | ".join(f"{task}: base | adapter | merged | kept" for task in tasks) + " |",
             "|---|" + "---|---|---|---|" * len(tasks)]
    for row in rows:
        if not any(run.results.get("kind") == "merge" for run in row.runs):
            continue
        cells = []
        for task in tasks:
            base, own, merged = (mean_of(row, task, key) for key in ("base", "individual", "merged"))
            gain = None if None in (base, own, merged) or own == base else (merged - base) / (own - base)
            cells += [shown(base), shown(own), shown(merged), "-" if gain is None else f"{gain:.2f}"]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
