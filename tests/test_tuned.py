"""Tuned comparisons (hydra/sweeper=rigsa_tuned) and early stopping: the search reads the validation split only,
prunes weak trials and records its choice; a resubmission recomputes nothing; the final runs are what the plain
command at the chosen setting computes; early stopping keeps the best step."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY

from rigsa.sweep import read_log

# float32, 64 training digits, 20 validation digits, validated every 2 steps
TUNED = [arg for arg in TINY if not arg.startswith(("task.val_size", "train.max_steps", "method="))] + [
    "task.val_size=20", "train.max_steps=6", "train.eval_every=2", "hydra/sweeper=rigsa_tuned",
    "hydra.sweeper.n_trials=3", "hydra.sweeper.pruner.startup_trials=1", "run.name=${variant}-seed${seed}"]

# Runs rigsa-run with the task's test split replaced, in every search trial (eval.split=validation), by an object
# that fails the trial when anything reads it.
GUARDED_RUN = """
import dataclasses, rigsa.run
from rigsa.cli import run_main

class UntouchableTestSplit:
    def __getattr__(self, name):
        raise AssertionError(f"the test split was read during the search ({name})")
    def __len__(self):
        raise AssertionError("the test split was read during the search (len)")

experiment = rigsa.run.experiment
def guarded(cfg, method, tokenizer, data, run_dir):
    if cfg.eval.split == "validation":
        data = dataclasses.replace(data, test=UntouchableTestSplit())
    return experiment(cfg, method, tokenizer, data, run_dir)
rigsa.run.experiment = guarded
run_main()
"""


def rigsa_run(*arguments: str, guarded: bool = False) -> subprocess.CompletedProcess:
    code = GUARDED_RUN if guarded else "from rigsa.cli import run_main; run_main()"
    return subprocess.run([sys.executable, "-c", code, *arguments], capture_output=True, text=True, timeout=900)


def files(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file() and ".sweeps" not in path.parts}


@pytest.mark.slow  # a whole tuned search, its final runs and a resubmission in process (40 s): make test-slow
def test_a_tuned_comparison_searches_on_validation_only_runs_the_choice_and_recomputes_nothing(tmp_path):
    root = tmp_path / "tuned"
    arguments = ["--multirun", *TUNED, "variant=lora_r8,sparta_5pct", "seed=0", f"run.root={root}"]
    first = rigsa_run(*arguments, guarded=True)
    assert first.returncode == 0, first.stderr[-3000:]

    for row, method in (("lora_r8", "lora"), ("sparta_5pct", "sparta")):
        folder = root / "search" / row
        selection = yaml.safe_load((folder / "selection.yaml").read_text())
        trials = selection["trials"]
        assert len(trials) == 3 and selection["counts"]["fail"] == 0  # no trial touched the test split
        assert not list(folder.glob("trial*/error.json"))
        for trial in trials:
            trial_dir = folder / f"trial{trial['number']:03d}"
            if trial["state"] == "complete":  # its value is the validation loss its run measured at the end
                results = json.loads((trial_dir / "results.json").read_text())
                assert results["target"]["split"] == "validation" and results["target"]["test_size"] == 20
                assert trial["value"] == results["target"]["loss"]
                logged = [json.loads(line) for line in (trial_dir / "metrics.jsonl").read_text().splitlines()]
                assert trial["validation_losses"] == {line["step"]: line["val/loss"] for line in logged
                                                      if "val/loss" in line}
            else:  # pruned: recorded in its folder, never finished
                assert trial["state"] == "pruned", trial
                assert (trial_dir / "pruned.json").exists() and not (trial_dir / "results.json").exists()
        complete = [trial for trial in trials if trial["state"] == "complete"]
        best = min(complete, key=lambda trial: trial["value"])
        assert selection["chosen"] == {"trial": best["number"], "params": best["params"], "value": best["value"]}

        final = root / f"{row}-seed0"
        assert json.loads((final / "results.json").read_text())["target"]["split"] == "test"
        if row != "lora_r8":
            continue
        # the final run is the plain command at the chosen rate: the same numbers, the same adapter bytes
        chosen_lr = best["params"]["train.lr"]
        plain_root = tmp_path / "plain"
        plain = rigsa_run(*[arg for arg in TUNED if not arg.startswith("hydra")], f"variant={row}",
                          f"train.lr={chosen_lr}", "seed=0", f"run.root={plain_root}")
        assert plain.returncode == 0, plain.stderr[-3000:]
        ours, theirs = (json.loads((path / "results.json").read_text()) for path in (final, plain_root / final.name))
        assert ours["method"] == method and ours["target"]["split"] == "test"
        for key in ("target", "train"):
            for drop in ("seconds", "tokens_per_second"):
                ours[key].pop(drop, None), theirs[key].pop(drop, None)
            assert ours[key] == theirs[key], key
        adapters = [{path.name: path.read_bytes() for path in (folder / "adapter").iterdir()}
                    for folder in (final, plain_root / final.name)]
        assert adapters[0] == adapters[1]

    log = read_log(sorted((root / ".sweeps").glob("*.jsonl"))[-1])
    pruned = [line for line in log if line["outcome"] == "pruned"]
    assert all("pruned at step" in line["reason"] for line in pruned)
    assert f"{len(pruned)} pruned" in first.stdout

    before = files(root)
    second = rigsa_run(*arguments)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "sweep: 2 jobs: 0 done, 0 resumed, 2 finished before" in second.stdout  # the finals; no trial relaunched
    assert files(root) == before  # the studies, trials, selections and finals untouched


def test_a_trial_the_pruner_stops_is_recorded_as_pruned(tmp_path):
    # The sampler seeds 1, 2, 3 of trials 0, 1, 2 ask 1e-12, 0.01, 1e-12 (the random start; checked below). At
    # 1e-12 the validation loss does not move, at 0.01 it drops; once both finished (startup_trials=2), the third
    # trial's loss at its first validation is worse than their median, so the pruner stops it there.
    root = tmp_path / "tuned"
    result = rigsa_run("--multirun", *TUNED, "variant=lora_r8", "seed=0", f"run.root={root}",
                       "hydra.sweeper.pruner.startup_trials=2", "hydra.sweeper.final_runs=false",
                       "hydra.sweeper.sampler_seed=1",
                       "hydra.sweeper.space={train.lr: 'choice(0.01, 1e-12)'}")
    assert result.returncode == 0, result.stderr[-3000:]
    selection = yaml.safe_load((root / "search" / "lora_r8" / "selection.yaml").read_text())
    trials = selection["trials"]
    assert [(trial["params"]["train.lr"], trial["state"]) for trial in trials] == [
        ("1e-12", "complete"), ("0.01", "complete"), ("1e-12", "pruned")]
    assert trials[1]["value"] < trials[0]["value"]
    assert trials[2]["last_step"] == 2 and trials[2]["validation_losses"] == {2: trials[0]["validation_losses"][2]}
    assert selection["counts"] == {"complete": 2, "pruned": 1, "fail": 0} and selection["chosen"]["trial"] == 1
    assert (root / "search" / "lora_r8" / "trial002" / "pruned.json").exists()
    assert not (root / "lora_r8-seed0").exists()  # final_runs=false: searched and selected only


@pytest.mark.slow  # several rigsa-run processes or an lm-eval run (10-25 s): make test-slow
def test_a_search_whose_trials_all_fail_ends_non_zero_naming_the_row(tmp_path):
    root = tmp_path / "tuned"
    result = rigsa_run("--multirun", *TUNED, "variant=lora_r8", "seed=0", f"run.root={root}", "hydra.sweeper.n_trials=1",
                       "method.r=0")
    assert result.returncode != 0
    assert "no trial of lora_r8" in result.stderr and "have no final runs" in result.stderr
    assert (root / "search" / "lora_r8" / "trial000" / "error.json").exists()


def test_early_stopping_keeps_the_best_step_and_a_resumed_run_stops_where_it_did(tiny_cfg, tmp_path):
    from rigsa.run import run

    # a rate high enough that the validation loss rises after its first improvements
    overrides = ("task.val_size=20", "train.max_steps=40", "train.eval_every=2", "train.early_stopping=2",
                 "train.lr=0.05", "eval.split=validation")
    cfg = tiny_cfg(*overrides)
    results = run(cfg, tmp_path / "first")
    stopping = results["train"]["early_stopping"]
    logged = [json.loads(line) for line in (tmp_path / "first" / "metrics.jsonl").read_text().splitlines()]
    losses = {line["step"]: line["val/loss"] for line in logged if "val/loss" in line}
    best_step = min(losses, key=losses.get)
    assert stopping["stopped_at"] is not None and stopping["stopped_at"] < 40, stopping
    assert max(losses) == stopping["stopped_at"] == results["train"]["steps"]
    assert stopping["best_step"] == best_step and stopping["best_val_loss"] == losses[best_step]
    # the adapter measured at the end is the best step's: its validation loss is the best one logged
    assert results["target"]["loss"] == losses[best_step]
    # a run killed after its stop (results not yet written) resumes to the same stop and the same adapter
    (tmp_path / "first" / "results.json").unlink()
    (tmp_path / "first" / "adapter").rename(tmp_path / "adapter_before")
    again = run(cfg, tmp_path / "first")
    assert again["train"]["early_stopping"] == stopping and again["target"]["loss"] == results["target"]["loss"]
    for path in (tmp_path / "adapter_before").iterdir():
        assert (tmp_path / "first" / "adapter" / path.name).read_bytes() == path.read_bytes()


def test_early_stopping_needs_validations_and_no_pruning_schedule(tiny_cfg):
    from rigsa.validate import validate
    from rigsa.vocabulary import ConfigError

    with pytest.raises(ConfigError, match=r"train.eval_every=0 is invalid: expected > 0 with train.early_stopping=2"):
        validate(tiny_cfg("train.early_stopping=2"))
    with pytest.raises(ConfigError, match=r"train.early_stopping=2 is invalid: expected 0 with pruning=imp"):
        validate(tiny_cfg("train.early_stopping=2", "train.eval_every=2", "method=rigsa", "pruning=imp_cpu"))
    with pytest.raises(ConfigError, match=r"eval.split='train' is invalid: expected test or validation"):
        validate(tiny_cfg("eval.split=train"))


def test_early_stopping_without_a_validation_split_is_refused_before_the_model_loads(tiny_cfg, tmp_path):
    from rigsa.run import run
    from rigsa.vocabulary import ConfigError

    with pytest.raises(ConfigError, match=r"train.early_stopping=2 is invalid: expected a task with a validation split"):
        run(tiny_cfg("train.early_stopping=2", "train.eval_every=2"), tmp_path / "run")  # TINY has task.val_size=0
    assert not (tmp_path / "run").exists()


def test_a_validation_measures_accuracy_and_loss_in_one_pass_equal_to_the_training_loss(tiny_cfg):
    from rigsa import models
    from rigsa.evaluate import target_accuracy
    from rigsa.readout import build_readout
    from rigsa.tasks import build_task

    cfg = tiny_cfg("task.val_size=20")
    model, tokenizer = models.load_model(cfg.model, 0)
    data = build_task(cfg.task, tokenizer, 256)
    for kind in ("answer_token", "classifier_head"):
        cfg.task.readout = kind
        readout = build_readout(cfg.task, data, model, tokenizer, 0)
        measured = target_accuracy(model, data.val, readout, 7, torch.device("cpu"), "float32", with_loss=True)
        with torch.no_grad():  # the training loss of each example alone, averaged
            alone = [float(readout.loss(model, data.val.batch(torch.tensor([i])))) for i in range(len(data.val))]
        assert measured["loss"] == pytest.approx(sum(alone) / len(alone), rel=1e-5)
        assert measured["n"] == 20


@pytest.mark.slow  # several rigsa-run processes or an lm-eval run (10-25 s): make test-slow
def test_a_search_stopped_after_some_trials_asks_the_same_next_trial_as_one_that_ran_through(tmp_path):
    import optuna

    common = ["--multirun", *TUNED, "variant=lora_r8", "seed=0", "hydra.sweeper.final_runs=false",
              "hydra.sweeper.pruner.startup_trials=5", f"run.root={tmp_path}"]
    stopped = rigsa_run(*common, "hydra.sweeper.n_trials=2")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    resumed = rigsa_run(*common)  # the rest of the search, in a new process
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "sweep: 1 jobs: 1 done" in resumed.stdout  # only the missing trial ran
    trials = [trial["params"]["train.lr"] for trial in yaml.safe_load(
        (tmp_path / "search" / "lora_r8" / "selection.yaml").read_text())["trials"]]
    # what a search that ran through asks: trial N from a sampler seeded N (in its random start, whatever came before)
    space = {"train.lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)}  # rigsa_tuned.yaml's default
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    through = [optuna.create_study(sampler=optuna.samplers.TPESampler(seed=number)).ask(space).params["train.lr"]
               for number in range(3)]
    assert trials == pytest.approx(through, rel=1e-12) and len(set(trials)) == 3  # the same 3 distinct rates
