"""The default experiment's code path on the real embedded SmolLM2-135M, with a tiny budget (slow)."""
from __future__ import annotations

import json

import pytest

from rigsa.config import compose
from rigsa.run import run


@pytest.mark.slow
def test_default_experiment_on_smollm2_135m_with_a_tiny_budget(tmp_path):
    cfg = compose(["train.max_steps=2", "task.train_size=16", "task.test_size=20", "logger.mode=offline",
                   f"run.root={tmp_path}"])
    assert cfg.model.name == "smollm2_135m" and cfg.method.name == "lora"
    results = run(cfg, tmp_path / "default")
    assert results["total_params"] == 134_515_008  # SmolLM2-135M, tied embeddings counted once
    assert results["trainable_params"] == 2_442_240  # LoRA r=8 on all 7 projections of 30 layers
    # The base model answers '0' for nearly every image (993 of the 1,000 test digits at 7x7): chance.
    assert results["target"]["base_accuracy"] == pytest.approx(0.1, abs=0.05)
    assert results["target"]["base_answer_counts"][0] >= 18
    assert json.loads((tmp_path / "default" / "results.json").read_text())["train"]["steps"] == 2
