"""Sweeps: resumable multirun in run.root/run.name, failure isolation, the summary, per-job peak memory, the
Optuna search, submitit's launcher and the experiment configs."""
from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY

from rigsa.config import CONF_DIR, compose
from rigsa.sweep import job_overrides, objective_value, read_log, shared_folders

SWEEP = [arg for arg in TINY if not arg.startswith("train.checkpoint_every")] + ["train.max_steps=2"]


def rigsa_run(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from rigsa.cli import run_main; run_main()", *arguments],
                          capture_output=True, text=True, timeout=600)


def sweep_log(root: Path) -> list[dict]:
    """The newest sweep log's lines (one per job)."""
    newest = sorted((root / ".sweeps").glob("*.jsonl"))[-1]
    return read_log(newest)


@pytest.mark.slow  # a multi-process or lm-eval end-to-end run (15-40 s): make test-slow
def test_a_2x2_sweep_finishes_and_a_resubmission_recomputes_nothing(tmp_path):
    arguments = ["--multirun", *SWEEP, "method=lora,dora", "seed=0,1", f"run.root={tmp_path}"]
    first = rigsa_run(*arguments)
    assert first.returncode == 0, first.stderr[-2000:]
    folders = sorted(path.name for path in tmp_path.iterdir() if not path.name.startswith(".") and path.is_dir())
    assert folders == ["tiny-dora-textual_mnist7-seed0", "tiny-dora-textual_mnist7-seed1",
                       "tiny-lora-textual_mnist7-seed0", "tiny-lora-textual_mnist7-seed1"]
    assert [line["outcome"] for line in sweep_log(tmp_path)] == ["done"] * 4
    assert "sweep: 4 jobs: 4 done, 0 resumed, 0 finished before, 0 failed, 0 busy" in first.stdout
    written = {name: (tmp_path / name / "results.json").stat().st_mtime_ns for name in folders}

    second = rigsa_run(*arguments)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "sweep: 4 jobs: 0 done, 0 resumed, 4 finished before, 0 failed, 0 busy" in second.stdout
    assert {name: (tmp_path / name / "results.json").stat().st_mtime_ns for name in folders} == written
    objectives = {Path(line["run_dir"]).name: line["objective"] for line in sweep_log(tmp_path)}
    for name in folders:  # a finished job still returns its objective (the target accuracy)
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert objectives[name] == results["target"]["accuracy"]


def test_a_job_with_a_bad_value_fails_alone_and_the_others_finish(tmp_path):
    result = rigsa_run("--multirun", *SWEEP, "train.lr=1e-3,-1,2e-3", "run.name=lr${train.lr}", f"run.root={tmp_path}")
    assert result.returncode == 1, result.stderr[-2000:]  # a sweep that did not do all it was asked is not a success
    assert result.stderr.strip().splitlines()[-1] == (
        f"rigsa-run: error: 1 sweep job(s) failed: {tmp_path / 'lr-1.0'}. Fix what their error.json says and resubmit "
        "the same command (finished jobs are not recomputed)")
    assert (tmp_path / "lr0.001" / "results.json").exists() and (tmp_path / "lr0.002" / "results.json").exists()
    error = json.loads((tmp_path / "lr-1.0" / "error.json").read_text())
    assert error["error"].startswith("ConfigError: train.lr=-1.0 is invalid: expected a number > 0")
    assert error["config"]["train"]["lr"] == -1.0  # the report places the failure in its row
    assert not (tmp_path / "lr-1.0" / "results.json").exists()
    assert "sweep: 3 jobs: 2 done, 0 resumed, 0 finished before, 1 failed, 0 busy, 0 pruned" in result.stdout
    assert f"failed          {tmp_path / 'lr-1.0'}: ConfigError: train.lr=-1.0 is invalid" in result.stdout


@pytest.mark.slow  # a multi-process or lm-eval end-to-end run (15-40 s): make test-slow
def test_a_job_whose_folder_another_process_holds_is_left_to_it_and_reported_busy(tmp_path):
    from rigsa.run_folder import claimed

    with claimed(tmp_path / "lr0.002"):  # as a sibling sweep sharing run.root would hold it
        result = rigsa_run("--multirun", *SWEEP, "train.lr=1e-3,2e-3", "run.name=lr${train.lr}",
                           f"run.root={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sweep: 2 jobs: 1 done, 0 resumed, 0 finished before, 0 failed, 1 busy" in result.stdout
    assert (tmp_path / "lr0.001" / "results.json").exists()
    assert sorted(os.listdir(tmp_path / "lr0.002")) == [".lock"]  # no error.json, nothing written


def test_a_sweep_whose_jobs_would_share_a_folder_is_refused_before_any_job(tmp_path):
    result = rigsa_run("--multirun", *SWEEP, "train.lr=1e-3,2e-3", f"run.root={tmp_path}")
    assert result.returncode == 2
    assert "train.lr=0.001 and with train.lr=0.002 would share the run folder" in result.stderr
    assert "Fix: put the swept keys (train.lr) in run.name" in result.stderr
    assert not any(tmp_path.iterdir())


def test_job_overrides_follow_hydras_basic_sweeper_and_the_command_line_wins():
    jobs = job_overrides(["seed=0,1", "variant=full"], {"variant": "full,head", "seed": "5"})
    assert jobs == [["variant=full", "seed=0"], ["variant=full", "seed=1"]]
    assert shared_folders(["seed=0,1"], {"variant": "full,head"}) is None


def test_the_objective_is_the_metric_minus_the_weighted_forgetting():
    results = {"target": {"accuracy": 0.75}, "forgetting": {"mean_forgetting": 0.05}}
    assert objective_value(results, compose(["objective.forgetting_weight=2"]).objective) == pytest.approx(0.65)
    assert objective_value(results, compose([]).objective) == 0.75
    assert math.isnan(objective_value({"target": {"accuracy": None}}, compose([]).objective))
    assert math.isnan(objective_value({"target": {"accuracy": 0.5}, "forgetting": None},
                                      compose(["objective.forgetting_weight=1"]).objective))


def test_peak_memory_is_reset_per_job():
    import torch

    from rigsa.memory import reset_peak_memory, resident_peak_bytes

    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    high = resident_peak_bytes()
    del big
    assert reset_peak_memory(torch.device("cpu")) == "job"
    assert resident_peak_bytes() < high - 48 * 2**20  # the previous job's 64 MiB no longer counts


@pytest.mark.slow  # a multi-process or lm-eval end-to-end run (15-40 s): make test-slow
def test_the_optuna_search_runs_3_trials_and_returns_the_best_value(tmp_path):
    # the objective is the final training loss (it differs between trials; the tiny model's accuracy does not)
    result = rigsa_run("--multirun", "hparams_search=lora_lr", *SWEEP, "hydra.sweeper.n_trials=3",
                       "hydra.sweeper.direction=minimize", "objective.metric=train.final_loss",
                       "objective.forgetting_weight=0", f"run.root={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    found = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    losses = {}
    for folder in tmp_path.glob("lora-r*"):
        losses[folder.name] = json.loads((folder / "results.json").read_text())["train"]["final_loss"]
    assert len(losses) == 3 and found["n_trials"] == 3 and found["n_failed"] == 0
    assert sorted(trial["value"] for trial in found["trials"]) == pytest.approx(sorted(losses.values()))
    assert found["best_value"] == pytest.approx(min(losses.values()))
    best = found["best_params"]
    assert f"lora-r{best['method.r']}-lr{best['train.lr']}-seed0" in {name for name, loss in losses.items()
                                                                      if loss == pytest.approx(found["best_value"])}
    assert f"search: best {found['best_value']}" in result.stdout


@pytest.mark.slow  # an lm-eval or multi-process end-to-end run (30-50 s): make test-slow
def test_submitits_local_launcher_runs_a_2_job_sweep(tmp_path):
    result = rigsa_run("--multirun", "hydra/launcher=submitit_local", *SWEEP, "seed=0,1", f"run.root={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Submitit 'local' sweep output dir" in result.stdout + result.stderr
    for seed in (0, 1):
        results = json.loads((tmp_path / f"tiny-lora-textual_mnist7-seed{seed}" / "results.json").read_text())
        assert results["seed"] == seed and results["train"]["steps"] == 2
    assert [line["outcome"] for line in sweep_log(tmp_path)] == ["done", "done"]  # the jobs' own processes wrote it


def test_the_slurm_launcher_config_composes_with_its_settings():
    launcher = compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], with_hydra=True).hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.array_parallelism) == ("gpu", 1, 16)


EXPERIMENTS = sorted(Path(path).stem for path in glob.glob(os.path.join(CONF_DIR, "experiment", "*.yaml")))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_config_composes_with_its_command_in_the_header(experiment):
    from rigsa.config import check_declared

    text = (Path(CONF_DIR) / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    check_declared(compose([f"experiment={experiment}"]))
    cfg = compose([f"experiment={experiment}"], with_hydra=True)
    params = cfg.hydra.sweeper.params
    if experiment == "tuned_cpu":  # the tuned experiments' shared search budget: its params hold their seeds only
        assert set(params) == {"seed"}
        return
    if params:  # a sweep: its header names the exact command, and every job composes into its own folder
        assert f"rigsa-run --multirun experiment={experiment}\n" in text
        if not experiment.endswith("_tuned_cpu"):  # a tuned one's final folders follow its parent's run.name
            assert shared_folders([f"experiment={experiment}"], dict(params)) is None  # composes every job
        job = compose([f"experiment={experiment}", *job_overrides([], dict(params))[0]])
        assert job.run.root.startswith("runs/") and job.report.name == experiment
        if experiment.endswith("_cpu"):
            assert job.model.name == "smollm2_135m" and job.model.source == "embedded"
        if cfg.hydra.sweeper._target_.endswith("RigsaTunedSweeper"):  # each row's method has its family's range
            methods = {compose([f"experiment={experiment}", *row]).method.name
                       for row in job_overrides([], {key: value for key, value in params.items() if key != "seed"})}
            assert methods <= set(cfg.hydra.sweeper.space_by_method), methods


def test_cpu_experiments_validate_offline_and_share_runs_with_their_siblings():
    from rigsa.validate import validate

    figure2 = {tuple(job): compose(["experiment=rigsa_fig2_cpu", *job]) for job in
               job_overrides([], dict(compose(["experiment=rigsa_fig2_cpu"], with_hydra=True).hydra.sweeper.params))}
    for cfg in figure2.values():
        validate(cfg)
    from rigsa.run_folder import _comparable

    rigsa = compose(["experiment=rigsa_fig4_cpu", "variant=rigsa", "seed=1"])
    same_in_figure2 = figure2[("variant=rigsa", "seed=1")]
    # one folder, one config (but the report): whichever sweep runs second reports the run without recomputing
    assert (rigsa.run.root, rigsa.run.name) == (same_in_figure2.run.root, same_in_figure2.run.name)
    assert _comparable(rigsa) == _comparable(same_in_figure2) and rigsa.report != same_in_figure2.report
    steps = (rigsa.pruning.steps_per_iteration, rigsa.pruning.final_retrain_steps, rigsa.train.max_steps)
    assert steps == (60, 150, 450)
    mask = figure2[("variant=random_mask_rigsa_budget", "seed=0")]
    assert (mask.method.name, mask.pruning.name, mask.method.budget.density) == ("random_mask", "none", 0.5 ** 5)
