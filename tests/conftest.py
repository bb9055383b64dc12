"""Shared fixtures: configs composed exactly as the CLI does, on the tiny model, offline."""
from __future__ import annotations

import functools
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


@pytest.fixture(scope="session")
def tiny_data(tokenizer):
    """Textual MNIST 7x7 for the tiny model: 32 training digits, 20 test digits."""
    from rigsa.tasks import build_task

    return build_task(compose(TINY + ["task.train_size=32", "task.test_size=20"]).task, tokenizer, 1024)


@pytest.fixture(scope="session")
def saved_tiny_model(tmp_path_factory, tokenizer):
    """A folder holding the tiny model and its tokenizer, as save_pretrained writes them (a `model=local` folder)."""
    from rigsa.models import build_tiny

    folder = tmp_path_factory.mktemp("tiny_model")
    build_tiny(compose(TINY).model, len(tokenizer), 0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@functools.cache
def digit_readout():
    """The answer-token readout of Textual MNIST's ten digits (the tiny model shares SmolLM2's tokenizer)."""
    from rigsa import assets
    from rigsa.models import _finish_tokenizer
    from rigsa.readout import AnswerToken
    from rigsa.tasks import label_token_ids
    from transformers import AutoTokenizer

    tokenizer = _finish_tokenizer(AutoTokenizer.from_pretrained(str(assets.locate("smollm2_135m"))))
    return AnswerToken(label_token_ids(tokenizer, [str(digit) for digit in range(10)]))


def answer_loss(model, batch):
    """Textual MNIST's training loss: cross-entropy of the answer digit's token."""
    return digit_readout().loss(model, batch)


def trained_methods() -> list[str]:
    """Every method in conf/method/ that trains something (method=none measures the base and trains nothing)."""
    from rigsa.config import options

    return [option for option in options("method") if option != "none"]


def method_cfg(method_name: str, overrides=()):
    """The tiny run config with this method; sparse budgets at 10% (the default 0.5% of a 64-wide random model
    learns too little in a few steps)."""
    cfg = compose(TINY + [f"method={method_name}", *overrides])
    if "budget" in cfg.method:
        cfg = compose(TINY + [f"method={method_name}", "method.budget.density=0.1", *overrides])
    return cfg


def attach_method(cfg, data=None, model=None):
    """(model, method): `model` (default: a fresh tiny model) with cfg's method attached as a run attaches it (over a
    4-bit base when model.quantize), calibrated on data's training batches."""
    import torch

    from rigsa.methods import Calibration, build_method
    from rigsa.models import load_model
    from rigsa.run import attached, calibration_batches

    model = load_model(cfg.model, 0)[0] if model is None else model
    method = build_method(cfg.method)
    batches = [] if data is None else calibration_batches(data, cfg, torch.device("cpu"))
    return attached(model, method, cfg, Calibration(batches, answer_loss), torch.device("cpu")), method


def train_steps(model, method, cfg, data, checkpoint_path, steps: int, lr: float, readout=None):
    """Train `steps` optimizer steps at a constant lr in float32 (the TrainResult); answer-token readout by default."""
    import torch

    from rigsa.train import train

    train_cfg = cfg.train.copy()
    train_cfg.max_steps, train_cfg.lr, train_cfg.lr_schedule = steps, lr, "constant"
    return train(model, method, data, train_cfg, readout=readout or digit_readout(), seed=0, device=torch.device("cpu"), dtype="float32",
                 eval_batch_size=8, checkpoint_path=checkpoint_path, log_metrics=lambda metrics, step: None)


def assert_an_evaluation_keeps_the_gradients(model, data) -> float:
    """The bitsandbytes CPU trap (4-bit weights repacked by a no-grad forward, later gradients silently zero):
    the loss and the gradients of the whole training split are the same before and after an evaluation.
    Returns that loss."""
    import pytest
    import torch

    from rigsa.evaluate import target_accuracy

    batch = data.train.batch(torch.arange(len(data.train)))

    def loss_and_grads() -> tuple[float, dict]:
        model.train()
        model.zero_grad()
        loss = answer_loss(model, batch)
        loss.backward()
        return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    loss_before, grads_before = loss_and_grads()
    assert grads_before and all(grad.abs().sum() > 0 for grad in grads_before.values())
    target_accuracy(model, data.test, digit_readout(), 8, torch.device("cpu"), "float32")  # the no-grad forward
    loss_after, grads_after = loss_and_grads()
    assert loss_after == pytest.approx(loss_before, rel=1e-5)
    for name, grad in grads_before.items():  # the trap leaves only the residual/adapter paths: grads differ
        torch.testing.assert_close(grads_after[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    return loss_before


def killed_at_step(monkeypatch, step: int):
    """Make a run stop (KeyboardInterrupt) when it logs `step`, after the checkpoint before it; returns a function
    that undoes it."""
    from rigsa import tracking

    original = tracking.Tracker.log

    def log(self, metrics, logged_step, **kwargs):
        if logged_step == step:
            raise KeyboardInterrupt(f"killed at step {step}")
        original(self, metrics, logged_step, **kwargs)

    monkeypatch.setattr(tracking.Tracker, "log", log)
    return lambda: monkeypatch.setattr(tracking.Tracker, "log", original)
