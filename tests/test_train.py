"""The training loop: data order, accumulation, and resume to a bit-identical adapter."""
from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from rigsa import tracking
from rigsa.run import run
from rigsa.train import micro_batch_indices, total_steps


def test_data_order_covers_each_epoch_once_and_depends_only_on_seed_and_step():
    stream = torch.cat([micro_batch_indices(10, 4, seed=3, micro_step=k) for k in range(5)])  # 20 = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert torch.equal(micro_batch_indices(10, 4, 3, 2), stream[8:12])  # straddles the epoch boundary
    assert not torch.equal(micro_batch_indices(10, 4, 4, 0), micro_batch_indices(10, 4, 3, 0))


def test_total_steps_from_epochs_or_max_steps():
    cfg = OmegaConf.create({"max_steps": 0, "epochs": 2, "batch_size": 8, "grad_accum": 2})
    assert total_steps(cfg, 100) == 14  # ceil(100 / 16) = 7 per epoch
    cfg.max_steps = 5
    assert total_steps(cfg, 100) == 5


def adapter_tensors(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_grad_accumulation_matches_one_large_batch(tiny_cfg, tmp_path):
    big = run(tiny_cfg("eval=none", "train.batch_size=8", "run.name=big"), tmp_path / "big")
    small = run(tiny_cfg("eval=none", "train.batch_size=4", "train.grad_accum=2", "run.name=acc"), tmp_path / "acc")
    assert big["train"]["tokens"] == small["train"]["tokens"]
    a, b = adapter_tensors(tmp_path / "big"), adapter_tensors(tmp_path / "acc")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_interrupted_run_resumes_to_a_bit_identical_adapter(tiny_cfg, tmp_path, monkeypatch):
    overrides = ("eval=none", "train.max_steps=6", "train.checkpoint_every=2", "method.dropout=0.1")
    reference = run(tiny_cfg(*overrides), tmp_path / "reference")

    original_log = tracking.Tracker.log

    def crash_at_step_5(self, metrics, step, **kwargs):
        original_log(self, metrics, step, **kwargs)
        if step == 5:
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(tracking.Tracker, "log", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_cfg(*overrides), tmp_path / "resumed")
    assert torch.load(tmp_path / "resumed" / "checkpoint" / "train.pt", weights_only=False)["step"] == 4
    monkeypatch.setattr(tracking.Tracker, "log", original_log)

    resumed = run(tiny_cfg(*overrides), tmp_path / "resumed")
    assert resumed["train"]["resumed_from_step"] == {"train": 4}
    a, b = adapter_tensors(tmp_path / "reference"), adapter_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the line logged after the checkpoint was dropped, then logged again
    assert reference["train"]["final_loss"] == resumed["train"]["final_loss"]


def test_rigsa_run_interrupted_between_prunes_resumes_to_the_same_adapter(tiny_cfg, tmp_path, monkeypatch):
    overrides = ("eval=none", "method=rigsa", "pruning=imp", "pruning.iterations=2", "pruning.steps_per_iteration=3",
                 "pruning.final_retrain_steps=2", "train.checkpoint_every=1")
    run(tiny_cfg(*overrides), tmp_path / "reference")
    original_log = tracking.Tracker.log

    def crash_in_second_iteration(self, metrics, step, **kwargs):
        original_log(self, metrics, step, **kwargs)
        if step == 5 and "train/loss" in metrics:
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(tracking.Tracker, "log", crash_in_second_iteration)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_cfg(*overrides), tmp_path / "resumed")
    monkeypatch.setattr(tracking.Tracker, "log", original_log)
    resumed = run(tiny_cfg(*overrides), tmp_path / "resumed")
    a = load_file(str(tmp_path / "reference" / "adapter" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    assert resumed["train"]["steps"] == 8 and resumed["sparse"]["density"] == pytest.approx(0.25)
    # iteration1 replayed from its final checkpoint, iteration2 from step 1 (the crash was in its step 2)
    assert resumed["train"]["resumed_from_step"] == {"iteration1": 3, "iteration2": 1, "final_retrain": 0}
    assert metrics_without_timings(tmp_path / "resumed") == metrics_without_timings(tmp_path / "reference")


TIMINGS = ("train/tokens_per_second",)


def metrics_without_timings(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in line.items() if key not in TIMINGS} for line in lines]


RIGSA_SHORT = ("eval=none", "method=rigsa", "pruning=imp", "pruning.iterations=2", "pruning.steps_per_iteration=2",
               "pruning.final_retrain_steps=2", "train.checkpoint_every=1")


@pytest.mark.parametrize("kill_point", ["before a phase's imp row", "before results.json"])
def test_a_kill_between_a_checkpoint_and_what_follows_it_resumes_to_the_same_files(kill_point, tiny_cfg, tmp_path,
                                                                                    monkeypatch):
    """A phase's imp/* row is logged after its last checkpoint, results.json after the final one: a kill in
    between must still give the uninterrupted run's metrics.jsonl and results (final_loss included)."""
    reference = run(tiny_cfg(*RIGSA_SHORT), tmp_path / "reference")
    original_log, original_finish = tracking.Tracker.log, tracking.Tracker.finish

    def crash_before_first_imp_row(self, metrics, step, **kwargs):
        if "imp/density" in metrics:
            raise KeyboardInterrupt("killed after iteration1's last checkpoint")
        original_log(self, metrics, step, **kwargs)

    def crash_before_results(self, results, *args):
        raise KeyboardInterrupt("killed after the final checkpoint")

    if kill_point == "before results.json":
        monkeypatch.setattr(tracking.Tracker, "finish", crash_before_results)
    else:
        monkeypatch.setattr(tracking.Tracker, "log", crash_before_first_imp_row)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_cfg(*RIGSA_SHORT), tmp_path / "resumed")
    monkeypatch.setattr(tracking.Tracker, "log", original_log)
    monkeypatch.setattr(tracking.Tracker, "finish", original_finish)
    resumed = run(tiny_cfg(*RIGSA_SHORT), tmp_path / "resumed")
    assert metrics_without_timings(tmp_path / "resumed") == metrics_without_timings(tmp_path / "reference")
    assert resumed["train"]["final_loss"] == reference["train"]["final_loss"] is not None
    assert resumed["iterations"] == reference["iterations"]


def test_the_resume_step_is_the_latest_global_step_read_without_loading_tensors(tiny_cfg, tmp_path, monkeypatch):
    from rigsa import checkpoints

    run(tiny_cfg(*RIGSA_SHORT), tmp_path / "run")
    mapped = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: mapped.append(k.get("mmap")) or real(*a, **k))
    assert checkpoints.resume_step(tmp_path / "run") == 6 and mapped == [True, True, True]  # 3 phases, 6 steps
    assert checkpoints.resume_step(tmp_path / "nothing") == 0


@pytest.mark.slow  # a multi-process or lm-eval end-to-end run (15-40 s): make test-slow
def test_float16_scales_the_loss_skips_overflowed_steps_and_resumes_with_the_scale(tiny_data, tmp_path, monkeypatch):
    """#12: float16 had no GradScaler. At a loss scale of 2**24 the float16 backward overflows: those steps are
    skipped and the scale halves until it fits, and training goes on; the scale is in the checkpoint."""
    import functools

    from rigsa.train import train

    from conftest import attach_method, digit_readout, method_cfg

    monkeypatch.setattr(torch.amp.GradScaler, "__init__",
                        functools.partialmethod(torch.amp.GradScaler.__init__, init_scale=2.0 ** 24))

    def trained(stops: list[int], folder):
        cfg = method_cfg("lora", ["dtype=float16"])
        torch.manual_seed(0)
        model, method = attach_method(cfg)
        train_cfg = cfg.train.copy()
        train_cfg.lr, train_cfg.lr_schedule = 1e-2, "constant"
        for steps in stops:
            train_cfg.max_steps = steps
            result = train(model, method, tiny_data, train_cfg, readout=digit_readout(), seed=0,
                           device=torch.device("cpu"), dtype="float16", eval_batch_size=8,
                           checkpoint_path=folder / "state.pt", log_metrics=lambda metrics, step: None)
        return result, [p.detach().clone() for p in method.trainable_parameters()], torch.load(
            folder / "state.pt", weights_only=True)["scaler"]

    straight, values, scaler = trained([16], tmp_path / "straight")
    assert 0 < straight.skipped_steps < 16 and scaler["scale"] < 2.0 ** 24  # overflowed, then trained
    assert all(math.isfinite(loss) for loss in straight.losses) and straight.losses[-1] < straight.losses[0]
    resumed, resumed_values, resumed_scaler = trained([6, 16], tmp_path / "resumed")
    assert resumed_scaler == scaler and resumed.skipped_steps == straight.skipped_steps
    assert all(torch.equal(a, b) for a, b in zip(resumed_values, values))
