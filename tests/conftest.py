"""Shared fixtures: configs composed exactly as the CLI does, on the tiny model, offline."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch slows 8-12x on a busy 2-core machine without it
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402

from rigsa.config import compose  # noqa: E402

# A run that takes seconds: tiny random Llama, 7x7 digits, a few steps, no W&B.
TINY = ["model=tiny", "method=lora", "pruning=none", "eval=target", "task.image_size=7", "task.train_size=64", "task.val_size=0", "task.test_size=40",
        "logger=none", "train.max_steps=4", "train.checkpoint_every=2", "train.warmup_steps=0", "dtype=float32"]


@pytest.fixture
def tiny_cfg(tmp_path):
    """Compose a tiny run config whose run folder lives in tmp_path; extra overrides win."""
    def make(*overrides: str):
        return compose(TINY + [f"run.root={tmp_path}", *overrides])
    return make


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A fresh base-score cache (the packaged assets stay where they are)."""
    from rigsa import cache

    monkeypatch.setattr(cache, "scores_root", lambda: tmp_path / "cache")
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def tokenizer():
    from rigsa import assets
    from rigsa.models import _finish_tokenizer
    from transformers import AutoTokenizer

    return _finish_tokenizer(AutoTokenizer.from_pretrained(str(assets.locate("smollm2_135m"))))
