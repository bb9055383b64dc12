"""Sweeps as the unit of work: each job runs in run.root/run.name like a single run (so resubmitting a sweep
resumes unfinished jobs and reports finished ones without recomputing), a failing job writes its error to
its folder and the sweep goes on, and the sweep ends with a summary of every job's outcome.

Outcomes: done (trained in this sweep), resumed (continued from a checkpoint), finished before (its
results.json was reported, nothing recomputed), failed (error.json in its folder says why).
Each job appends its outcome to the sweep's log (`run.root/.sweeps/<start>-<pid>.jsonl`, named in the
environment so jobs in other processes, submitit's or SLURM's, append to the same file).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

SWEEP_LOG_ENV = "RIGSA_SWEEP_LOG"
ERROR_FILE = "error.json"
# busy: another process holds the job's folder (a sibling sweep sharing run.root): left to it, no error written.
# pruned: a tuned search's trial its pruner stopped early (hydra/sweeper=rigsa_tuned), recorded in its folder.
OUTCOMES = ("done", "resumed", "finished before", "failed", "busy", "pruned")
PRUNED = "pruned"  # what a pruned trial returns to the sweeper


def objective_value(results: dict, objective: DictConfig) -> float:
    """The number a sweeper optimises: results[objective.metric] minus forgetting_weight x mean forgetting."""
    value = results
    for key in objective.metric.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    if not isinstance(value, (int, float)):
        return math.nan
    if objective.forgetting_weight:
        forgetting = (results.get("forgetting") or {}).get("mean_forgetting")
        if forgetting is None:
            return math.nan
        value -= objective.forgetting_weight * forgetting
    return float(value)


def one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:400]


def write_error(run_dir: Path, error: BaseException, cfg: DictConfig) -> None:
    """The failed job's error and config in its folder (created when the failure removed it): what a rerun must
    fix, and the row rigsa-report lists the failure in."""
    from rigsa.cache import write_text_atomically

    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # a value that does not resolve may be what failed
        config = OmegaConf.to_container(cfg, resolve=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(run_dir / ERROR_FILE, json.dumps(
        {"error": one_line(error), "type": type(error).__name__, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
         "traceback": traceback.format_exception(type(error), error, error.__traceback__), "config": config},
        indent=2, default=str))


def record(run_dir: Path, outcome: str, reason: str | None = None, objective: float | None = None,
           trial: bool = False) -> None:
    """Append this job's outcome to the sweep's log (one short line: O_APPEND writes do not interleave). `trial`:
    a tuned search's trial, whose failure the search records and outlives (not a failed sweep)."""
    path = os.environ.get(SWEEP_LOG_ENV)
    if not path:
        return
    line = json.dumps({"run_dir": str(run_dir), "outcome": outcome, "reason": reason, "objective": objective,
                       **({"trial": True} if trial else {})})
    with open(path, "a") as handle:
        handle.write(line + "\n")


def run_job(cfg: DictConfig, run_dir: Path, in_sweep: bool, run=None) -> float | str:
    """One job of `rigsa-run` (or of `rigsa-merge`, given its `run`); returns the objective. A single run lets errors
    through (the CLI turns them into exit codes); in a sweep every error is written to the job's folder and the
    sweep goes on."""
    from rigsa import run_folder

    if run is None:
        from rigsa.run import run

    try:
        before = run_folder.inspect(cfg, run_dir)
        results = run(cfg, run_dir)
    except run_folder.RunFolderBusy as error:
        if not in_sweep:
            raise
        record(run_dir, "busy", one_line(error))
        print(f"rigsa-run: job {run_dir} is running in another process; resubmit the sweep later to report it",
              file=sys.stderr)
        return math.nan
    except Exception as error:
        if not in_sweep:
            raise
        if type(error).__name__ == "TrialPruned":  # optuna's: the search's pruner stopped this trial
            from rigsa.cache import write_text_atomically
            from rigsa.tuning import PRUNED_FILE

            run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomically(run_dir / PRUNED_FILE, json.dumps({"reason": str(error)}))
            record(run_dir, "pruned", str(error))
            print(f"rigsa-run: job {run_dir}: {error}", file=sys.stderr)
            return PRUNED
        try:
            if (run_dir / "results.json").exists():  # a finished run's folder is never written into
                print(f"rigsa-run: {run_dir} holds a finished run; its error is not written there", file=sys.stderr)
            else:
                write_error(run_dir, error, cfg)
        except OSError as unwritable:  # a full or read-only disk: the summary and the exit code still say it
            print(f"rigsa-run: could not write {run_dir / ERROR_FILE}: {one_line(unwritable)}", file=sys.stderr)
        record(run_dir, "failed", one_line(error), trial=cfg.get("optuna_trial") is not None)
        print(f"rigsa-run: job {run_dir} failed: {one_line(error)}", file=sys.stderr)
        return math.nan
    (run_dir / ERROR_FILE).unlink(missing_ok=True)  # an earlier attempt's error no longer holds
    value = objective_value(results, cfg.objective)
    outcome = {"complete": "finished before", "resume": "resumed"}.get(before, "done")
    record(run_dir, outcome, objective=None if math.isnan(value) else value)
    return value


def summary(lines: list[dict]) -> str:
    """done / failed (with the one-line reason) / resumed / finished before, one line per job."""
    counts = {outcome: sum(line["outcome"] == outcome for line in lines) for outcome in OUTCOMES}
    text = [f"sweep: {len(lines)} jobs: " + ", ".join(f"{counts[o]} {o}" for o in OUTCOMES)]
    for line in lines:
        detail = f": {line['reason']}" if line.get("reason") else ""
        text.append(f"  {line['outcome']:<16}{shown_path(line['run_dir'])}{detail}")
    return "\n".join(text)


def shown_path(path: str) -> str:
    """A run folder as the user named it: relative to the working folder when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


_FAILED: list[str] = []  # the last sweep's failed jobs (not a search's trials), for rigsa-run's exit code


def failed_jobs() -> list[str]:
    """The run folders of the last sweep in this process whose jobs failed (empty after a single run)."""
    return list(_FAILED)


class SweepSummary:
    """Hydra callback (hydra.callbacks.sweep_summary): opens the sweep's log before the first job and prints
    the summary after the last. Hydra calls every hook by name, so the unused ones are here, empty."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        folder = Path(OmegaConf.select(config, "run.root", default="runs")) / ".sweeps"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl"
        path.touch()
        os.environ[SWEEP_LOG_ENV] = str(path.resolve())

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        path = os.environ.pop(SWEEP_LOG_ENV, None)
        if path:
            lines = read_log(Path(path))
            print(summary(lines) + f"\n(sweep log: {path})")
            _FAILED[:] = [shown_path(line["run_dir"]) for line in lines
                          if line["outcome"] == "failed" and not line.get("trial")]

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        pass

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        pass

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        pass

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        pass


def job_overrides(arguments: list[str], sweeper_params: dict | None) -> list[list[str]]:
    """Each job's overrides, as Hydra's basic sweeper will launch them (hydra.sweeper.params first, then the
    command line's, which win for the same key)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    listed = [f"{key}={value}" for key, value in (sweeper_params or {}).items()] + list(arguments)
    return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(listed), None)[0]


def shared_folders(arguments: list[str], sweeper_params: dict | None, limit: int = 500) -> str | None:
    """Why the sweep would send two jobs to one run folder (the second would be refused as another config's
    run), or None. Checked before any job starts; sweeps of more than `limit` jobs are left to each job."""
    from rigsa.config import compose

    jobs = job_overrides(arguments, sweeper_params)
    if len(jobs) > limit:
        return None
    seen: dict[str, list[str]] = {}
    for overrides in jobs:
        cfg = compose([item for item in overrides if not item.startswith("hydra.")])
        folder = str(Path(cfg.run.root) / cfg.run.name)
        if folder in seen and seen[folder] != overrides:
            mine = [item for item in overrides if item not in seen[folder]]
            theirs = [item for item in seen[folder] if item not in overrides]
            swept = [item.split("=")[0] for item in mine]
            return (f"the sweep's jobs with {' '.join(theirs)} and with {' '.join(mine)} would share the run folder "
                    f"{folder}. Fix: put the swept keys ({', '.join(swept)}) in run.name, e.g. "
                    f"run.name='${{model.name}}-${{method.name}}-{swept[0].split('.')[-1]}${{{swept[0]}}}"
                    f"-seed${{seed}}'")
        seen[folder] = overrides
    return None
