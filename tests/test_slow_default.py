"""The default experiment's code path on the real embedded SmolLM2-135M, with a tiny budget (slow)."""
from __future__ import annotations

import json

import pytest

from rigsa.config import compose
from rigsa.run import run


@pytest.mark.slow
def test_default_experiment_on_smollm2_135m_with_a_tiny_budget(tmp_path):
    cfg = compose(["pruning.steps_per_iteration=1", "pruning.final_retrain_steps=1", "task.train_size=16",
                   "task.test_size=20", "logger.mode=offline", f"run.root={tmp_path}"])
    assert cfg.model.name == "smollm2_135m" and cfg.method.name == "rigsa" and cfg.pruning.iterations == 5
    assert cfg.eval.name == "offline"
    results = run(cfg, tmp_path / "default")
    assert results["total_params"] == 134_515_008  # SmolLM2-135M, tied embeddings counted once
    # dense phase: every weight of the 7 projections x 30 layers, plus one gate per layer
    assert results["initial_trainable_params"] == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) + 210
    assert results["sparse"]["density"] == pytest.approx(0.5 ** 5, rel=1e-3)
    assert [row["phase"] for row in results["iterations"]][-1] == "final_retrain" and len(results["iterations"]) == 6
    # The base model answers '0' for nearly every image (993 of the 1,000 test digits at 7x7): chance.
    assert results["target"]["base_accuracy"] == pytest.approx(0.1, abs=0.05)
    assert results["target"]["base_answer_counts"][0] >= 18
    bpb = results["forgetting"]["tasks"]["rigsa_gsm8k_bpb"]["bits_per_byte"]
    assert bpb["base"] == pytest.approx(0.9408, abs=2e-3)  # SmolLM2-135M on 100 GSM8K solutions, measured here
    assert json.loads((tmp_path / "default" / "results.json").read_text())["train"]["steps"] == 6
