"""`rigsa-report <folder>...`: the runs' results as tables (markdown and CSV) and figures (PNG), and on W&B.

Every run folder under the given folders is read (config.yaml with results.json, or error.json for a failed
run). Runs whose configs differ only in seed (and in keys that do not change what is computed: run, logger,
report, objective, threads, eval batch size) form one row: mean +- sample std over seeds, n, and the seeds
missing from that row (the union of seeds seen in the report is what each row is expected to have). With
`--experiment NAME`, the rows follow that experiment config's report (conf/experiment/NAME.yaml): its
order, its labels, its columns and the paper's numbers beside ours.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from rigsa.report_compare import (add_selection_columns, confusion_markdown, differences_markdown, merged_tasks_markdown,
                                  one_class_markdown, read_selections)
from rigsa.run_folder import has_checkpoint, upgraded

# Config keys that do not change what a run computes (a seed is what a row averages over).
IGNORED_PREFIXES = ("run.", "logger.", "report.", "objective.")
IGNORED_KEYS = {"seed", "train.threads", "eval.batch_size"}
# column -> its table columns: (header, how to read it from results.json, scale, decimals)
COLUMNS = {
    "accuracy": [("accuracy (%)", lambda r: (r.get("target") or {}).get("accuracy"), 100.0, 1)],
    "macro_f1": [("macro-F1 (%)", lambda r: ((r.get("target") or {}).get("metrics") or {}).get("macro_f1"), 100.0, 1)],
    "forgetting": [("mean forgetting", lambda r: (r.get("forgetting") or {}).get("mean_forgetting"), 1.0, 4)],
    "forget_ratio": [("forget ratio", lambda r: (r.get("forgetting") or {}).get("mean_forget_ratio"), 1.0, 4)],
    "collapsed": [("collapsed", lambda r: (r.get("forgetting") or {}).get("collapsed"), 1.0, 1)],
    "trainable": [("trainable", lambda r: r.get("trainable_params"), 1.0, 0)],
    "peak_memory": [("peak memory (MiB)", lambda r: r.get("peak_memory_bytes"), 2.0 ** -20, 0)],
    "memory": [(f"{name} (MiB)", (lambda key: lambda r: (r.get("memory") or {}).get(key))(key), 2.0 ** -20, 1)
               for name, key in (("base weights", "base_weight_bytes"), ("adapter", "adapter_bytes"),
                                 ("gradients", "gradient_bytes"), ("optimizer state", "optimizer_state_bytes"))],
    "minutes": [("train minutes", lambda r: (r.get("train") or {}).get("seconds"), 1 / 60, 1)],
}


class ReportError(ValueError):
    """A folder or experiment the report cannot read; the message names it and the fix."""


@dataclass
class Run:
    folder: Path
    config: dict  # flattened, dotted keys
    results: dict | None  # None for a failed run
    error: str | None = None

    @property
    def seed(self):
        return self.config.get("seed")


@dataclass
class Row:
    label: str
    runs: list[Run]
    paper: dict = field(default_factory=dict)
    failed: list[Run] = field(default_factory=list)

    def values(self, read, scale: float) -> list[float]:
        found = [read(run.results) for run in self.runs]
        return [float(value) * scale for value in found if isinstance(value, (int, float))]


def flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        flat = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: json.dumps(tree) if isinstance(tree, list) else tree}


def comparable(config: dict) -> tuple:
    return tuple(sorted((key, str(value)) for key, value in config.items() if key not in IGNORED_KEYS
                        and not key.startswith(IGNORED_PREFIXES) and not key.endswith(".seed")))


def find_runs(folders: list[Path]) -> list[Run]:
    runs = []
    for folder in folders:
        if not folder.is_dir():
            raise ReportError(f"{folder} is not a folder. Fix: pass a run folder or a sweep's run.root")
        folders_with_runs = {path.parent for name in ("results.json", "error.json", "config.yaml")
                             for path in folder.rglob(name)}
        for run_dir in sorted(folders_with_runs):
            try:
                found = read_run(run_dir)
            except Exception as error:  # one damaged file: that run is left out, named, and the report goes on
                print(f"rigsa-report: skipped {run_dir}: a file there is not readable ({type(error).__name__}: "
                      f"{' '.join(str(error).split())[:160]}). Fix: rerun that run (the same command resumes or "
                      "recomputes it) or delete its folder", file=sys.stderr)
                continue
            if found is not None:
                runs.append(found)
    # a tuned search's trials (measured on validation) are not methods' rows: the learning-rate figure shows them
    return [run for run in runs if run.config.get("optuna_trial") is None
            and run.config.get("eval.split", "test") != "validation"]


def read_run(run_dir: Path) -> Run | None:
    """A finished run (config.yaml and results.json), a failed one (error.json holds its config), a started one (a
    checkpoint), or None."""
    results_path, config_path = run_dir / "results.json", run_dir / "config.yaml"
    if results_path.exists() and config_path.exists():
        results = json.loads(results_path.read_text())
        if not isinstance(results, dict):
            raise ValueError(f"{results_path} holds a {type(results).__name__}, not a results record")
        return Run(run_dir, saved_config(OmegaConf.load(config_path)), results)
    if (run_dir / "error.json").exists():
        error = json.loads((run_dir / "error.json").read_text())
        return Run(run_dir, saved_config(error.get("config") or {}), None, error.get("error"))
    if has_checkpoint(run_dir):  # started, not finished (running, or stopped: rerun to resume)
        return Run(run_dir, saved_config(OmegaConf.load(config_path)), None)
    return None


def saved_config(config) -> dict:
    """A run's saved config, flat, with the keys added since it was written at their old values (a run from
    before model.base_dtype existed groups with today's float32 runs)."""
    tree = OmegaConf.to_container(config) if not isinstance(config, dict) else config
    return flatten(upgraded(tree))


# The keys that usually tell runs apart, in the order a row label names them, with their short names.
LABEL_KEYS = {"variant": None, "method.name": None, "task.readout": "readout", "train.lr": "lr", "method.r": "r",
              "method.budget.density": "density", "pruning.name": "pruning", "model.quantize": "quantize",
              "model.base_dtype": "base", "train.max_steps": "steps", "dtype": "dtype",
              "name": None, "merge_method": None, "density": "density", "scale": "lambda"}  # the last: rigsa-merge's


def auto_label(config: dict, varying: list[str], others: list[dict] | None = None) -> str:
    """A short row label: the variant (or method) and the few LABEL_KEYS that differ between rows, as `lr=0.001`;
    other differing keys (by their last part) only while the label does not yet tell this row from the others."""
    def shown(key: str) -> str:
        value = config.get(key)
        name = LABEL_KEYS.get(key, key.split(".")[-1])
        return str(value) if name is None else f"{name}={value}"

    chosen = [key for key in LABEL_KEYS if key in varying and config.get(key) is not None]
    if "variant" in chosen:  # a variant names its method and settings
        chosen = [key for key in chosen if key == "variant" or not key.startswith(("method.", "pruning."))]
    for key in varying:
        if others is None or not any(all(str(other.get(k)) == str(config.get(k)) for k in chosen) for other in others):
            break
        if key not in chosen and config.get(key) is not None:
            chosen.append(key)
    merge = ", ".join(str(config[key]) for key in ("name", "merge_method") if config.get(key))  # rigsa-merge's
    fallback = config.get("variant") or config.get("method.name") or merge or "all runs"  # nothing differs: the method
    return ", ".join(shown(key) for key in chosen) or str(fallback)


def matches(config: dict, match: dict) -> bool:
    return all(str(config.get(key)) == str(value) for key, value in match.items())


def group_rows(runs: list[Run], spec: dict | None) -> list[Row]:
    """Runs that differ only in seed form a row; with spec['rows'] (label, match, paper), the rows are those."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(comparable(run.config), []).append(run)
    keys = sorted({key for group in groups for key, _ in group})
    varying = [key for key in keys if len({dict(group).get(key) for group in groups}) > 1]
    rows, placed = [], set()
    for wanted in (spec or {}).get("rows") or []:
        found = [key for key, members in groups.items()
                 if key not in placed and matches(members[0].config, wanted.get("match") or {})]
        for group_key in found:
            label = wanted.get("label") or auto_label(groups[group_key][0].config, varying)
            rows.append(make_row(label, groups[group_key], wanted.get("paper") or {}))
            placed.add(group_key)
        if not found:  # no run yet: the row is shown with every seed missing
            rows.append(Row(wanted.get("label") or str(wanted.get("match")), [], wanted.get("paper") or {}))
    if not (spec or {}).get("rows"):  # an experiment's rows are its table: other runs in the folder are left out
        firsts = [members[0].config for members in groups.values()]
        for group_key, members in groups.items():
            if group_key not in placed:
                others = [config for config in firsts if config is not members[0].config]
                rows.append(make_row(auto_label(members[0].config, varying, others), members, {}))
    return rows


def make_row(label: str, members: list[Run], paper: dict) -> Row:
    done = sorted((run for run in members if run.results is not None), key=lambda run: str(run.seed))
    done_seeds = {run.seed for run in done}
    failed = [run for run in members if run.results is None and run.seed not in done_seeds]
    return Row(label, done, paper, failed)


def base_row(runs: list[Run]) -> Row | None:
    """The base model: its accuracy (the same for every run on one task and model) with zero forgetting."""
    bases = {}
    for run in runs:
        target = (run.results or {}).get("target") or {}
        if target.get("base_accuracy") is not None:
            bases.setdefault((run.config.get("model.name"), run.config.get("task.name")), target["base_accuracy"])
    if len(bases) != 1:
        return None
    accuracy = next(iter(bases.values()))
    return Row("base model", [Run(Path("."), {}, {"target": {"accuracy": accuracy}, "trainable_params": 0,
                                                      "forgetting": {"mean_forgetting": 0.0}})])


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(mean: float | None, std: float | None, digits: int) -> str:
    if mean is None:
        return "-"
    text = f"{mean:,.{digits}f}"
    return text + (f" ± {std:,.{digits}f}" if std is not None else "")


def table(rows: list[Row], columns: list[str], expected_seeds: set) -> tuple[list[str], list[list[str]], list[dict]]:
    """(markdown headers, markdown cells, CSV records) for the rows."""
    unknown = [column for column in columns if column not in COLUMNS]
    if unknown:
        raise ReportError(f"report.columns has {unknown}: expected names among {sorted(COLUMNS)}")
    paper_columns = [column for column in columns if any(column in row.paper for row in rows)]
    headers = ["method", "n"] + [header for column in columns for header, *_ in COLUMNS[column]]
    headers += [f"paper {column}" for column in paper_columns] + ["missing seeds"]
    cells, records = [], []
    for row in rows:
        seeds = {run.seed for run in row.runs}
        missing = sorted(expected_seeds - seeds, key=str) if row.label != "base model" else []
        line, record = [row.label, str(len(row.runs))], {"method": row.label, "n": len(row.runs),
                                                         "seeds": " ".join(str(s) for s in sorted(seeds, key=str))}
        for column in columns:
            for header, read, scale, digits in COLUMNS[column]:
                mean, std = mean_std(row.values(read, scale))
                line.append(fmt(mean, std, digits))
                record[f"{header} mean"], record[f"{header} std"] = mean, std
        for column in paper_columns:
            line.append(str(row.paper.get(column, "-")))
            record[f"paper {column}"] = row.paper.get(column)
        failures = {run.seed: run.error or "unfinished" for run in row.failed}
        line.append(", ".join(f"{seed}" + (f" ({'unfinished' if failures[seed] == 'unfinished' else 'failed'})"
                                          if seed in failures else "") for seed in missing) or "")
        record["missing seeds"] = " ".join(str(seed) for seed in missing)
        record["failed"] = "; ".join(f"seed {seed}: {error}" for seed, error in failures.items())
        cells.append(line)
        records.append(record)
    return headers, cells, records


def markdown(title: str, source: str | None, headers: list[str], cells: list[list[str]], rows: list[Row]) -> str:
    lines = [f"## {title}", ""]
    if source:
        lines += [f"Paper: {source}", ""]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(line) + " |" for line in cells]
    for row in rows:
        for run in row.failed:
            if run.error:
                lines.append(f"\nFailed: {run.folder}: {run.error}")
    return "\n".join(lines) + "\n"


def experiment_spec(name: str) -> dict:
    """The experiment's report section, with the seeds its sweep runs (hydra.sweeper.params.seed)."""
    from rigsa.config import CONF_DIR, compose

    if not (Path(CONF_DIR) / "experiment" / f"{name}.yaml").exists():
        from rigsa.config import options

        raise ReportError(f"--experiment {name!r} is not an experiment config. Fix: one of {options('experiment')}")
    cfg = compose([f"experiment={name}"], with_hydra=True)
    seeds = str((cfg.hydra.sweeper.params or {}).get("seed", cfg.seed))
    return {**OmegaConf.to_container(cfg.report, resolve=True),
            "seeds": [int(seed) for seed in seeds.split(",")]}


def report(folders: list[Path], out: Path, experiment: str | None = None, log_to_wandb: bool = True) -> dict:
    """Write report.md, report.csv and the figures to `out`: one table (and figure set) per task and model the runs
    cover; returns {markdown, records, figures}."""
    runs = find_runs(folders)
    if not runs:
        raise ReportError(f"no finished or failed runs under {', '.join(map(str, folders))}. Fix: pass the folder "
                          "holding the run folders (a sweep's run.root), after the runs have finished")
    spec = experiment_spec(experiment) if experiment else shared_spec(runs)
    selections = read_selections(folders)
    by_setting: dict[tuple, list[Run]] = {}
    for run in runs:
        by_setting.setdefault((str(run.config.get("task.name")), str(run.config.get("model.name"))), []).append(run)
    out.mkdir(parents=True, exist_ok=True)
    texts, records, figures, tables = [], [], [], []
    for (task, model), members in sorted(by_setting.items()):
        name = "" if len(by_setting) == 1 else f"{task}-{model}"
        text, rows_records, made, table_cells = setting_report(members, spec, selections, out, name,
                                                               f" ({task} on {model})" if name else "")
        texts.append(text)
        records += [{"task": task, "model": model, **record} for record in rows_records]
        figures += made
        tables.append(table_cells)
    text = "\n".join(texts)
    (out / "report.md").write_text(text)
    with open(out / "report.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(key for record in records for key in record)))
        writer.writeheader()
        writer.writerows(records)
    if log_to_wandb and any((run.folder / "wandb_id.txt").exists() for run in runs):
        log_wandb_table(runs, spec, *tables[0])
    return {"markdown": text, "records": records, "figures": figures}


def setting_report(runs: list[Run], spec: dict | None, selections: list[dict], out: Path, name: str,
                   subtitle: str) -> tuple[str, list[dict], list[Path], tuple]:
    """One task on one model: the table (with each row's tuned setting when a search chose it), the differences
    against the first row, the flags, the confusion matrices and the figures."""
    from rigsa.report_figures import write_figures

    rows = group_rows(runs, spec)
    reported = [run for row in rows for run in row.runs + row.failed]
    expected = set((spec or {}).get("seeds") or []) or {run.seed for run in reported}
    base = base_row(reported)
    shown = rows + ([base] if base else [])
    columns = list((spec or {}).get("columns") or ["accuracy", "forgetting", "trainable"])
    if "macro_f1" not in columns and any(row.values(COLUMNS["macro_f1"][0][1], 1.0) for row in rows):
        columns.insert(1, "macro_f1")  # more than two classes: accuracy alone hides a one-class answerer
    headers, cells, records = table(shown, columns, expected)
    add_selection_columns(headers, cells, records, shown, selections)
    title = ((spec or {}).get("title") or "rigsa runs") + subtitle
    text = markdown(title, (spec or {}).get("source"), headers, cells, rows)
    if len(reported) < len(runs):
        text += f"\n{len(runs) - len(reported)} other runs here are not in this table.\n"
    text += "\n" + differences_markdown(rows)
    text += one_class_markdown(shown) + confusion_markdown(shown) + merged_tasks_markdown(rows)
    folder = out / name if name else out
    folder.mkdir(parents=True, exist_ok=True)
    return text, records, write_figures(rows, base, folder, selections), (headers, cells)


def shared_spec(runs: list[Run]) -> dict | None:
    """The report section the runs' configs agree on (one sweep's runs), else None."""
    names = {run.config.get("report.name") for run in runs}
    if len(names) != 1 or None in names:
        return None
    first = runs[0].config
    return {"title": first.get("report.title"), "source": first.get("report.source"),
            "columns": json.loads(first.get("report.columns") or "null"), "rows": json.loads(first.get("report.rows")
                                                                                           or "null")}


def log_wandb_table(runs: list[Run], spec: dict | None, headers: list[str], cells: list[list[str]]) -> None:
    """The table as a W&B Table in the runs' project, in their sweep's group (report.name)."""
    import wandb

    from rigsa.tracking import wandb_mode

    first = runs[0].config
    group = (spec or {}).get("name") or first.get("report.name")
    mode = wandb_mode(str(first.get("logger.mode", "auto")))
    if mode == "disabled":
        return
    wandb_run = wandb.init(project=first.get("logger.project", "rigsa"), entity=first.get("logger.entity"),
                           group=group, job_type="report", name=f"report-{group or 'runs'}", mode=mode,
                           dir=str(runs[0].folder.parent), settings=wandb.Settings(silent=True))
    wandb_run.log({"report": wandb.Table(columns=headers, data=cells)})
    wandb_run.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rigsa-report", description=__doc__.split("\n\n")[0],
                                     epilog="columns (report.columns): " + ", ".join(COLUMNS))
    parser.add_argument("folders", nargs="+", type=Path, help="run folders, or folders holding them (run.root)")
    parser.add_argument("--experiment", help="shape the table like conf/experiment/<name>.yaml's report")
    parser.add_argument("--out", type=Path, help="where report.md, report.csv and the PNGs go "
                                                 "(default: <first folder>/report)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the table to W&B")
    args = parser.parse_args(argv)
    out = args.out or args.folders[0] / ("report" + (f"-{args.experiment}" if args.experiment else ""))
    try:
        made = report(args.folders, out, args.experiment, not args.no_wandb)
    except ReportError as error:
        print(f"rigsa-report: error: {error}", file=sys.stderr)
        return 2
    print(made["markdown"])
    print(f"written: {out / 'report.md'}, {out / 'report.csv'}" + "".join(f", {p}" for p in made["figures"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
