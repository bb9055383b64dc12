"""A tuned comparison's search, seen from one of its trials (the sweeper is hydra_plugins' rigsa_tuned).

Each row's search keeps its Optuna study in `<its run.root>/study.log` (Optuna's journal file: plain appends
under a file lock, so trials in other processes, submitit's or SLURM's, share it, and a resubmitted search reads
what was done). A trial is an ordinary run with `optuna_trial=N`: every validation loss it logs is reported to
the study as trial N's intermediate value at that step, and when the pruner (settings kept in the study, so the
trial builds the same one) says the trial is weaker than the median of earlier trials at that step, it stops.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

STUDY_FILE = "study.log"
STUDY_NAME = "search"
SELECTION_FILE = "selection.yaml"
PRUNED_FILE = "pruned.json"


def journal_storage(path: Path):
    import optuna

    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def median_pruner(settings: dict):
    """Optuna's median pruner: a trial stops when its validation loss at a step is worse than the median of the
    earlier trials' at that step, once `startup_trials` trials finished and after `warmup_steps` steps."""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=int(settings["startup_trials"]),
                                       n_warmup_steps=int(settings["warmup_steps"]))


def trial_reporter(run_root: str | Path, number: int | None) -> Callable[[int, float], None] | None:
    """For a trial run (optuna_trial=N): report(global step, validation loss), raising optuna.TrialPruned when the
    study's pruner stops the trial. None for an ordinary run."""
    if number is None:
        return None
    import optuna

    path = Path(run_root) / STUDY_FILE
    if not path.exists():
        raise FileNotFoundError(f"optuna_trial={number}: no study at {path}. Fix: optuna_trial is set by "
                                "hydra/sweeper=rigsa_tuned; pass optuna_trial=null for a run outside a search")
    storage = journal_storage(path)
    study_id = storage.get_study_id_from_name(STUDY_NAME)
    pruner = median_pruner(storage.get_study_user_attrs(study_id)["pruner"])
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage, pruner=pruner)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    trial = optuna.trial.Trial(study, trial_id)

    def report(step: int, loss: float) -> None:
        if step in storage.get_trial(trial_id).intermediate_values:
            return  # replayed after a resume: reported before
        trial.report(loss, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"trial {number} pruned at step {step}: validation loss {loss:.4f} is worse than "
                                     "the median of the earlier trials at that step")
    return report
