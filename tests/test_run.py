"""A whole run: results.json keys, metrics.jsonl, W&B offline, the base-accuracy cache, run-folder safety."""
from __future__ import annotations

import json

import pytest
import torch

from rigsa import evaluate
from rigsa.readout import AnswerToken
from rigsa.run import run
from rigsa.vocabulary import ConfigError

RESULT_KEYS = {"method", "model", "task", "seed", "trainable_params", "total_params", "target", "train",
               "peak_memory_bytes", "peak_memory_scope", "base_fingerprint", "run_dir"}


def test_run_writes_every_result_key_and_a_wandb_offline_run(tiny_cfg, tmp_path, private_cache):
    results = run(tiny_cfg("logger=wandb", "logger.mode=offline"), tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk == results and RESULT_KEYS <= set(results)
    assert set(results["target"]) >= {"base_accuracy", "accuracy", "test_size"}
    assert set(results["train"]) >= {"seconds", "tokens_per_second", "steps"}
    assert results["target"]["test_size"] == 40 and 0 <= results["target"]["accuracy"] <= 1
    assert results["trainable_params"] == 16384  # r=8 on 7 projections x 2 layers of the tiny Llama
    assert results["peak_memory_bytes"] > 0 and results["train"]["steps"] == 4
    assert results["peak_memory_scope"] == "job"  # reset when the job started (Linux)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4] and all("train/loss" in line for line in lines)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "run" / "adapter").iterdir()}
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
    assert (tmp_path / "run" / "config.yaml").exists()


def test_base_accuracy_is_cached_across_runs(tiny_cfg, tmp_path, private_cache, capsys, monkeypatch):
    first = run(tiny_cfg("run.name=a"), tmp_path / "a")
    assert "(cached)" not in capsys.readouterr().out
    calls = []
    real = evaluate.target_accuracy
    monkeypatch.setattr("rigsa.run.target_accuracy", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = run(tiny_cfg("run.name=b", "method=dora"), tmp_path / "b")
    assert "(cached)" in capsys.readouterr().out
    assert len(calls) == 1  # only the adapted model was evaluated
    assert second["target"]["base_accuracy"] == first["target"]["base_accuracy"]
    assert len(list(private_cache.glob("base_target/*.json"))) == 1


def test_a_run_folder_with_another_config_is_refused_and_kept(tiny_cfg, tmp_path, private_cache):
    run(tiny_cfg("eval=none"), tmp_path / "run")
    before = (tmp_path / "run" / "results.json").read_text()
    with pytest.raises(ConfigError, match=r"train.lr: 0.001 -> 0.002.*run.overwrite=true"):
        run(tiny_cfg("eval=none", "train.lr=2e-3"), tmp_path / "run")
    assert (tmp_path / "run" / "results.json").read_text() == before


def test_rerunning_a_finished_run_returns_its_results(tiny_cfg, tmp_path, private_cache, monkeypatch):
    first = run(tiny_cfg("eval=none"), tmp_path / "run")
    monkeypatch.setattr("rigsa.models.load_model", lambda *a, **k: pytest.fail("a finished run was recomputed"))
    assert run(tiny_cfg("eval=none"), tmp_path / "run") == first


def test_pruning_iterations_are_measured_on_a_prefix_and_the_last_phase_on_all(tiny_cfg, tmp_path, private_cache,
                                                                                 monkeypatch):
    seen = []
    real = evaluate.target_accuracy
    monkeypatch.setattr("rigsa.run.target_accuracy", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    results = run(tiny_cfg("method=rigsa", "pruning=imp", "pruning.iterations=2", "pruning.steps_per_iteration=1",
                           "pruning.final_retrain_steps=1", "eval.iteration_test_size=20"), tmp_path / "run")
    assert [row["test_size"] for row in results["iterations"]] == [20, 20, 40]
    assert [row["accuracy"] for row in results["iterations"]] == [s["accuracy"] for s in seen[1:]]
    assert results["target"]["accuracy"] == results["iterations"][-1]["accuracy"]
    assert results["target"]["test_size"] == 40 and sum(seen[-1]["answer_counts"]) == 40
    assert [sum(s["answer_counts"]) for s in seen[1:3]] == [20, 20]


def test_target_accuracy_on_a_prefix_equals_the_accuracy_of_the_prefix_alone(tiny_cfg):
    from rigsa.models import load_model
    from rigsa.tasks import build_task

    cfg = tiny_cfg()
    model, tokenizer = load_model(cfg.model, 0)
    data = build_task(cfg.task, tokenizer, cfg.train.max_seq_len)
    prefix = data.test.head(13)
    args = (AnswerToken(data.label_token_ids), 4, torch.device("cpu"), "float32")
    assert evaluate.target_accuracy(model, data.test, *args, limit=13) == evaluate.target_accuracy(model, prefix, *args)
    assert evaluate.target_accuracy(model, data.test, *args, limit=0)["n"] == 40


def test_budget_from_run_trains_as_many_values_as_the_finished_run(tiny_cfg, tmp_path, private_cache):
    rigsa = run(tiny_cfg("method=rigsa", "pruning=imp", "pruning.iterations=3", "pruning.steps_per_iteration=1",
                         "pruning.final_retrain_steps=1", "eval=none"), tmp_path / "rigsa")
    assert rigsa["sparse"]["values"] == 73728 // 8  # the 14 layers' 73,728 weights halved three times
    from_run = ["method=random_mask", "method.budget.density=null", f"method.budget.from_run={tmp_path / 'rigsa'}",
                "eval=none"]
    exact = run(tiny_cfg(*from_run, "method.selection=magnitude", "run.name=exact"), tmp_path / "exact")
    assert exact["sparse"]["values"] == exact["trainable_params"] == 9216  # the mask's gates stay frozen
    random = run(tiny_cfg(*from_run, "run.name=random"), tmp_path / "random")  # Bernoulli(p): the count in expectation
    assert abs(random["sparse"]["values"] - 9216) < 4 * 9216 ** 0.5


def test_eval_every_logs_the_validation_accuracy_of_the_model_at_that_step(tiny_cfg, tmp_path, private_cache):
    from rigsa.apply import apply_adapter
    from rigsa.models import load_model
    from rigsa.tasks import build_task

    cfg = tiny_cfg("train.eval_every=2", "task.val_size=30", "train.lr=1e-2", "eval=none")
    run(cfg, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {line["step"]: line["val/accuracy"] for line in lines if "val/accuracy" in line}
    assert sorted(logged) == [2, 4]
    model, tokenizer = load_model(cfg.model, cfg.seed)  # the final adapter (step 4), measured independently
    data = build_task(cfg.task, tokenizer, cfg.train.max_seq_len)
    adapted = apply_adapter(model, tmp_path / "run" / "adapter")
    expected = evaluate.target_accuracy(adapted, data.val, AnswerToken(data.label_token_ids), 16, torch.device("cpu"), "float32")
    assert expected["n"] == 30 and logged[4] == pytest.approx(expected["accuracy"])


@pytest.mark.slow  # an lm-eval or multi-process end-to-end run (30-50 s): make test-slow
def test_iteration_forgetting_measures_the_suite_after_every_pruning_iteration(tiny_cfg, tmp_path, private_cache):
    cfg = tiny_cfg("method=rigsa", "pruning=imp", "pruning.steps_per_iteration=1", "pruning.iterations=2",
                   "pruning.final_retrain_steps=1", "eval=offline", "eval.iteration_forgetting=true",
                   "eval.forgetting=[{task: rigsa_gsm8k_bpb, num_fewshot: 0, limit: 3}]")
    results = run(cfg, tmp_path / "run")
    rows = results["iterations"]
    assert [row["phase"] for row in rows] == ["iteration1", "iteration2", "final_retrain"]
    assert all(isinstance(row["mean_forgetting"], float) for row in rows)
    assert rows[-1]["mean_forgetting"] == results["forgetting"]["mean_forgetting"]  # the last phase is the run's
    assert rows[0]["mean_forgetting"] != rows[1]["mean_forgetting"]  # measured on each phase's own model
