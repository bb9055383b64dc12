"""A tuned comparison as a Hydra sweeper (`hydra/sweeper=rigsa_tuned`, set by the `*_tuned` experiments).

Why: a table that gives every method one learning rate ranks the rates, not the methods (PEFT's method
comparison, Biderman et al. 2024, SpaRTA Tables 12-13 all tune each method on its own). For each row of the
comparison (each combination of the swept keys in `params` or on the command line but `seed`, e.g. `variant`):

1. **search**: an Optuna study (TPE, seeded) over the row's space (`space`, or `space_by_method[method.name]`:
   a range per method family) on the task's *validation* split. Each trial is an ordinary run in
   `<run.root>/search/<row>/trialNNN` with `search_overrides` (eval.split=validation: the test split is never
   read; no forgetting suite), which reports its validation loss at every `train.eval_every` to the study; the
   median pruner stops trials weaker than the earlier ones' median at the same step. The study is kept in the
   row's folder (rigsa.tuning), so a resubmitted search relaunches only interrupted trials (their folders resume)
   and asks only the trials still missing; a finished search launches nothing.
2. **selection**: the complete trial with the best `objective` (default: the lowest validation loss, as SpaRTA
   selects), written with every trial's value and state to `<run.root>/search/<row>/selection.yaml`.
3. **final runs**: the row at the chosen setting, once per seed (the values of `seed` in `params` or on the
   command line; the search runs at the first; `final_runs=false` stops after the searches), as plain jobs in
   run.root/run.name: the same
   folders (and results) the plain command `rigsa-run <row> <chosen setting> seed=S` gives.

A row whose search ends without one complete trial gets no final runs; the sweep then ends with an error naming
it (after every other row ran), so a scheduler sees it.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf

from hydra_plugins.rigsa_optuna_sweeper.rigsa_optuna_sweeper import distribution

log = logging.getLogger(__name__)


def row_label(row: list[str]) -> str:
    """The row's folder name: a variant's name, other keys' last part and value (`lora_r8`, `qlora_r8-r4`)."""
    parts = []
    for item in row:
        key, value = item.split("=", 1)
        parts.append(value if key == "variant" else f"{key.split('.')[-1]}{value}")
    return "-".join(parts).replace("/", "_") or "all"


# hydra.plugins.sweeper.Sweeper is Hydra's abstract plugin interface (setup, sweep): Hydra accepts only its
# subclasses, found in the hydra_plugins package. Nothing is inherited but the interface.
class RigsaTunedSweeper(Sweeper):
    def __init__(self, params: Optional[dict], space: dict, space_by_method: Optional[dict], search_overrides: list,
                 search_overrides_by_method: Optional[dict], n_trials: int, n_jobs: int,
                 sampler_seed: int, pruner: dict, objective: str, direction: str, final_runs: bool) -> None:
        self.params, self.space = dict(params or {}), dict(space)
        self.space_by_method = {key: dict(value) for key, value in (space_by_method or {}).items()}
        self.search_overrides = list(search_overrides)
        self.search_overrides_by_method = {key: list(value)
                                           for key, value in (search_overrides_by_method or {}).items()}
        self.n_trials, self.n_jobs = n_trials, n_jobs
        self.sampler_seed, self.pruner = sampler_seed, dict(pruner)
        self.objective, self.direction, self.final_runs = objective, direction, final_runs
        self.config = self.launcher = self.hydra_context = None
        self.job_index = 0

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def launch(self, batch: list[list[str]]):
        self.validate_batch_is_legal(batch)
        returns = self.launcher.launch(batch, initial_job_idx=self.job_index)
        self.job_index += len(batch)
        return returns

    def sweep(self, arguments: List[str]) -> Any:
        if self.direction not in ("minimize", "maximize"):
            raise ValueError(f"hydra.sweeper.direction={self.direction!r} is not minimize or maximize. Fix: pass "
                             "hydra.sweeper.direction=minimize (a loss) or maximize (an accuracy)")
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        parsed = parser.parse_overrides([f"{key}={value}" for key, value in self.params.items()] + list(arguments))
        last = {item.get_key_element(): item for item in parsed}  # the command line wins over params
        seed = last.pop("seed", None)
        seeds = [0] if seed is None else list(seed.sweep_string_iterator()) if seed.is_sweep_override() else [
            seed.get_value_element_as_str()]
        fixed = [item.input_line for item in last.values() if not item.is_sweep_override()]
        swept = [item for item in last.values() if item.is_sweep_override()]
        rows = BasicSweeper.split_arguments(swept, None)[0] if swept else [[]]
        unselected, chosen = [], {}
        for row in rows:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, fixed + row + [f"seed={seeds[0]}"])
            method = cfg.method.name
            space = self.space_by_method.get(method, self.space)
            extra = self.search_overrides + self.search_overrides_by_method.get(method, [])
            label = row_label(row) if row else cfg.variant or cfg.method.name  # one row: the variant's name
            folder = Path(cfg.run.root) / "search" / label
            best = self.search(parser, fixed + row + [f"seed={seeds[0]}"] + extra, space, folder, row)
            if best is None:
                unselected.append(f"{label} ({folder / 'selection.yaml'})")
                continue
            chosen[label] = best
            finals = [fixed + row + [f"{key}={value}" for key, value in best.items()] + [f"seed={seed}"]
                      for seed in seeds]
            if self.final_runs:
                self.launch(finals)
        if unselected:
            raise RuntimeError(f"no trial of {', '.join(unselected)} completed, so those rows have no final runs. "
                               "Fix: read the trials' error.json, widen the row's space, then resubmit the sweep")
        return chosen

    def search(self, parser, overrides: list[str], space: dict, folder: Path, row: list[str]) -> dict | None:
        """The row's study: interrupted trials relaunched, missing ones asked, the best complete trial's params."""
        import optuna

        from rigsa.sweep import PRUNED
        from rigsa.tuning import STUDY_FILE, STUDY_NAME, journal_storage, median_pruner

        distributions = {item.get_key_element(): distribution(item)
                         for item in parser.parse_overrides([f"{key}={value}" for key, value in space.items()])}
        storage = journal_storage(folder / STUDY_FILE)
        settings = dict(study_name=STUDY_NAME, storage=storage, pruner=median_pruner(self.pruner),
                        sampler=optuna.samplers.TPESampler(seed=self.sampler_seed))
        if STUDY_NAME in {summary.study_name for summary in optuna.get_all_study_summaries(storage)}:
            study = optuna.load_study(**settings)  # a resubmitted search: read, nothing appended
        else:
            study = optuna.create_study(direction=self.direction, **settings)
            study.set_user_attr("pruner", self.pruner)  # the trials build the same pruner (rigsa.tuning)

        def trial_job(trial) -> list[str]:
            return overrides + [f"{key}={value}" for key, value in trial.params.items()] + [
                f"run.root={folder}", f"run.name=trial{trial.number:03d}", f"optuna_trial={trial.number}",
                f"objective.metric={self.objective}", "objective.forgetting_weight=0"]

        def run(trials) -> None:
            for trial, job in zip(trials, self.launch([trial_job(trial) for trial in trials])):
                value = job.return_value if job.status == JobStatus.COMPLETED else None
                if value == PRUNED:
                    study.tell(trial.number, state=optuna.trial.TrialState.PRUNED)
                elif isinstance(value, (int, float)) and math.isfinite(value):
                    study.tell(trial.number, float(value))
                else:
                    study.tell(trial.number, state=optuna.trial.TrialState.FAIL)

        interrupted = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if interrupted:  # a search stopped mid-trial: the same trials again, their folders resume from checkpoints
            run(interrupted)
        while len(study.trials) < self.n_trials:
            asked = []
            for _ in range(min(self.n_jobs, self.n_trials - len(study.trials))):
                # trial N is asked by a sampler seeded with sampler_seed + N: a search resumed after an interruption
                # asks the same trials as one that ran through (one sampler kept across asks would start its
                # sequence again in the resumed process, and repeat the first trial's setting)
                study.sampler = optuna.samplers.TPESampler(seed=self.sampler_seed + len(study.trials))
                asked.append(study.ask(distributions))
            run(asked)
        return self.write_selection(study, folder, space, row)

    def write_selection(self, study, folder: Path, space: dict, row: list[str]) -> dict | None:
        import optuna

        from rigsa.tuning import SELECTION_FILE

        states = optuna.trial.TrialState
        complete = [trial for trial in study.trials if trial.state == states.COMPLETE]
        best = study.best_trial if complete else None
        counts = {state.name.lower(): sum(trial.state == state for trial in study.trials)
                  for state in (states.COMPLETE, states.PRUNED, states.FAIL)}
        record = {
            "row": row, "objective": self.objective, "direction": self.direction, "space": space,
            "n_trials": self.n_trials,
            "pruner": self.pruner, "sampler_seed": self.sampler_seed, "counts": counts,
            "chosen": None if best is None else {"trial": best.number, "params": best.params, "value": best.value},
            "reason": (f"the {'lowest' if self.direction == 'minimize' else 'highest'} {self.objective} of "
                       f"{counts['complete']} complete trials ({counts['pruned']} pruned, {counts['fail']} failed)"
                       if best is not None else "no trial completed"),
            "trials": [{"number": trial.number, "params": trial.params, "state": trial.state.name.lower(),
                        "value": trial.value, "last_step": max(trial.intermediate_values, default=None),
                        "validation_losses": dict(sorted(trial.intermediate_values.items()))}
                       for trial in study.trials]}
        text = OmegaConf.to_yaml(OmegaConf.create(record))
        path = folder / SELECTION_FILE
        if not path.exists() or path.read_text() != text:  # a resubmission that changed nothing rewrites nothing
            path.write_text(text)
        print(f"search {folder}: {record['reason']}: chosen {record['chosen']}")
        return None if best is None else best.params
