"""A whole run: results.json keys, metrics.jsonl, W&B offline, the base-accuracy cache, run-folder safety."""
from __future__ import annotations

import json

import pytest

from rigsa import evaluate
from rigsa.config import ConfigError
from rigsa.run import run

RESULT_KEYS = {"method", "model", "task", "seed", "trainable_params", "total_params", "target", "train",
               "peak_memory_bytes", "base_fingerprint", "run_dir"}


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A fresh base-score cache (the packaged assets stay where they are)."""
    monkeypatch.setattr(evaluate, "cache_root", lambda: tmp_path / "cache")
    return tmp_path / "cache"


def test_run_writes_every_result_key_and_a_wandb_offline_run(tiny_cfg, tmp_path, private_cache):
    results = run(tiny_cfg("logger=wandb", "logger.mode=offline"), tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk == results and RESULT_KEYS <= set(results)
    assert set(results["target"]) >= {"base_accuracy", "accuracy", "test_size"}
    assert set(results["train"]) >= {"seconds", "tokens_per_second", "steps"}
    assert results["target"]["test_size"] == 40 and 0 <= results["target"]["accuracy"] <= 1
    assert results["trainable_params"] == 16384  # r=8 on 7 projections x 2 layers of the tiny Llama
    assert results["peak_memory_bytes"] > 0 and results["train"]["steps"] == 4
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
