"""An Optuna search as a Hydra sweeper (`hydra/sweeper=rigsa_optuna`, set by conf/hparams_search/*.yaml).

Why not hydra-optuna-sweeper: its latest release (1.3.0) pins optuna<3. That installs here (optuna 2.10.1,
Python 3.11, numpy 2.4) and its in-memory TPE search runs, but optuna 2.10's database storage fails under
SQLAlchemy 2 (AssertionError in get_current_version), so a search could not be stored or shared between
cluster jobs, and the pin would downgrade a user's optuna. This sweeper drives Optuna's current ask/tell API
(optuna>=4) and launches each batch of trials through whatever Hydra launcher is configured (the basic one,
or submitit's local or SLURM launcher), so a trial is an ordinary rigsa-run job in run.root/run.name.

The search space is hydra.sweeper.params in Hydra's sweep grammar: choice(a, b) -> categorical, range(start,
stop, step) -> integers (floats when a bound is a float), interval(low, high) -> float, tag(log, ...) -> log
scale. Each trial's value is what rigsa-run returns (conf objective: e.g. target accuracy minus a weight
times forgetting); a failed trial is told to Optuna as failed. The TPE sampler is seeded, so a resubmitted
search asks the same trials in the same order and, its run folders being complete, recomputes nothing.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf

log = logging.getLogger(__name__)
RESULTS_FILE = "optimization_results.yaml"


def distribution(override):
    """The Optuna distribution of one swept key."""
    import optuna.distributions as dist

    sweep = override.value()
    log_scale = "log" in sweep.tags
    if isinstance(sweep, ChoiceSweep):
        return dist.CategoricalDistribution([str(value) for value in sweep.list])
    if isinstance(sweep, RangeSweep):
        if all(isinstance(value, int) for value in (sweep.start, sweep.stop, sweep.step)):
            return dist.IntDistribution(int(sweep.start), int(sweep.stop) - 1, step=int(sweep.step), log=log_scale)
        return dist.FloatDistribution(float(sweep.start), float(sweep.stop), step=float(sweep.step))
    if isinstance(sweep, IntervalSweep):
        return dist.FloatDistribution(float(sweep.start), float(sweep.end), log=log_scale)
    raise ValueError(f"hydra.sweeper.params.{override.get_key_element()}={override.input_line!r} is not a search "
                     "range. Fix: use choice(a, b), range(start, stop, step), interval(low, high) or tag(log, ...)")


# hydra.plugins.sweeper.Sweeper is Hydra's abstract plugin interface (setup, sweep): Hydra accepts only its
# subclasses, found in the hydra_plugins package. Nothing is inherited but the interface.
class RigsaOptunaSweeper(Sweeper):
    def __init__(self, n_trials: int, n_jobs: int, direction: str, sampler_seed: int, storage: Optional[str],
                 study_name: Optional[str], params: Optional[dict] = None) -> None:
        self.n_trials, self.n_jobs, self.direction = n_trials, n_jobs, direction
        self.sampler_seed, self.storage, self.study_name = sampler_seed, storage, study_name
        self.params = dict(params or {})
        self.config = self.launcher = self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        import optuna

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        parsed = parser.parse_overrides([f"{key}={value}" for key, value in self.params.items()] + list(arguments))
        space = {item.get_key_element(): distribution(item) for item in parsed if item.is_sweep_override()}
        fixed = [item.input_line for item in parsed if not item.is_sweep_override()]
        if not space:
            raise ValueError("hydra.sweeper.params holds no search range. Fix: e.g. "
                             "hydra.sweeper.params.train.lr='tag(log, interval(1e-4, 1e-2))'")
        study = optuna.create_study(study_name=self.study_name, storage=self.storage, direction=self.direction,
                                    sampler=optuna.samplers.TPESampler(seed=self.sampler_seed), load_if_exists=True)
        job_index = len(study.trials)
        while len(study.trials) < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - len(study.trials)))]
            batch = [fixed + [f"{key}={value}" for key, value in trial.params.items()] for trial in trials]
            self.validate_batch_is_legal(batch)
            for trial, job in zip(trials, self.launcher.launch(batch, initial_job_idx=job_index)):
                value = job.return_value if job.status == JobStatus.COMPLETED else None
                if isinstance(value, (int, float)) and math.isfinite(value):
                    study.tell(trial, float(value))
                else:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
            job_index += len(trials)
        return self.write_results(study)

    def write_results(self, study) -> dict:
        import optuna

        finished = [trial for trial in study.trials if trial.state == optuna.trial.TrialState.COMPLETE]
        results = {"direction": self.direction, "n_trials": len(study.trials), "n_failed": len(study.trials) -
                   len(finished), "best_value": study.best_value if finished else None,
                   "best_params": study.best_params if finished else None,
                   "trials": [{"number": trial.number, "params": trial.params, "value": trial.value,
                               "state": trial.state.name} for trial in study.trials]}
        folder = Path(self.config.hydra.sweep.dir)
        folder.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), folder / RESULTS_FILE)
        log.info("Optuna search: best value %s with %s (%s)", results["best_value"], results["best_params"],
                 folder / RESULTS_FILE)
        print(f"search: best {results['best_value']} with {results['best_params']} "
              f"({results['n_trials']} trials, {results['n_failed']} failed); {folder / RESULTS_FILE}")
        return results
