"""Every method in conf/method/ trains on `tiny` and leaves the frozen base weights bit-identical."""
from __future__ import annotations

import pytest
import torch

from rigsa.model_edits import trainable_named
from rigsa.models import load_model
from rigsa.sparse.engine import sparse_layers, unmerge_all
from rigsa.train import train

from conftest import (answer_loss, assert_an_evaluation_keeps_the_gradients, attach_method, digit_readout, method_cfg,
                      train_steps, trained_methods)

CPU = torch.device("cpu")


def attach(method_name: str, data=None, overrides=()):
    """(cfg, model, method, the base's parameters, a copy of their values before attach)."""
    cfg = method_cfg(method_name, overrides)
    model, _ = load_model(cfg.model, 0)
    originals = dict(model.named_parameters())
    snapshot = {name: tensor.detach().clone() for name, tensor in originals.items()}
    model, method = attach_method(cfg, data, model)
    return cfg, model, method, originals, snapshot


def run_steps(model, method, cfg, data, path, steps: int, lr: float):
    return train_steps(model, method, cfg, data, path / "state.pt", steps, lr)


@pytest.mark.parametrize("method_name", trained_methods())
def test_method_trains_and_changes_only_its_parameters(method_name, tiny_data, tmp_path):
    data = tiny_data
    cfg, model, method, originals, snapshot = attach(method_name, data)
    merged = {id(layer.weight) for layer in sparse_layers(model).values()}  # hold base + delta: checked below
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()
              if not p.requires_grad and id(p) not in merged}
    trainable = trainable_named(model)
    assert trainable and [p for p in method.trainable_parameters()] == list(trainable.values())
    before = {name: p.detach().clone() for name, p in trainable.items()}

    result = run_steps(model, method, cfg, data, tmp_path, steps=12, lr=1e-2)

    # the random tiny model starts confidently wrong (loss ~17); it must come down clearly
    assert sum(result.losses[-3:]) / 3 < result.losses[0] - 1.0, result.losses
    assert any(not torch.equal(p, before[name]) for name, p in trainable.items())
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"{method_name} changed frozen {name}"
    if method_name == "full":
        assert all(p.requires_grad for p in originals.values())
        return
    sparse = sparse_layers(model)
    for layer in sparse.values():  # merged: only the positions at the indices differ from the base
        outside = torch.ones(layer.weight.numel(), dtype=torch.bool)
        outside[layer.indices.long()] = False
        original = next(snapshot[n] for n, t in originals.items() if t is layer.weight)
        assert torch.equal(layer.weight.reshape(-1)[outside], original.reshape(-1)[outside])
    unmerge_all(model)
    # the original base tensors, bit for bit (qlora keeps them too: its 4-bit copy is checked above)
    for name, tensor in originals.items():
        assert torch.equal(tensor, snapshot[name]), f"{method_name} changed base {name}"
    state = method.adapter_state()
    stored_values = sum(t.numel() for t in state.values() if t.is_floating_point())
    # peft: exactly the trainable tensors; sparse: the values plus one (frozen) gate per layer
    assert 0 < stored_values <= sum(p.numel() for p in trainable.values()) + len(sparse)


def test_head_unties_the_output_head_from_the_embeddings():
    _, model, _, originals, _ = attach("head")
    head, embeddings = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head is not embeddings and torch.equal(head, embeddings)
    assert head.requires_grad and not embeddings.requires_grad
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["lm_head.weight"]


def test_qlora_quantizes_the_base_and_keeps_learning_after_an_evaluation(tiny_data, tmp_path):
    """bitsandbytes on this CPU: after a no-grad forward the 4-bit weights can be repacked for the
    avx512-bf16 path and later gradients are silently zero. Train -> evaluate -> train must still learn."""
    import bitsandbytes as bnb

    data = tiny_data
    cfg, model, method, _, _ = attach("qlora")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert all(layer.weight.dtype == torch.uint8 and not layer.support_avx512bf16_for_cpu for layer in layers)
    run_steps(model, method, cfg, data, tmp_path / "a", steps=3, lr=1e-2)
    loss_before = assert_an_evaluation_keeps_the_gradients(model, data)
    run_steps(model, method, cfg, data, tmp_path / "b", steps=6, lr=1e-2)
    batch = data.train.batch(torch.arange(len(data.train)))
    with torch.no_grad():
        assert answer_loss(model, batch).item() < loss_before - 0.1


def test_snip_reselection_moves_the_mask_during_the_first_epoch_only(tiny_data, tmp_path):
    from rigsa.sparse.engine import sparse_layers

    data = tiny_data
    cfg, model, method, _, _ = attach("snip", data, ["method.reselect_every=2", "method.budget.density=0.02"])
    counts = {name: layer.indices.numel() for name, layer in sparse_layers(model).items()}
    logged = []
    train_cfg = cfg.train.copy()
    train_cfg.max_steps, train_cfg.lr = 8, 1e-2  # 32 digits / batch 8 = 4 steps per epoch
    train(model, method, data, train_cfg, readout=digit_readout(), seed=0, device=CPU, dtype="float32", eval_batch_size=8,
          checkpoint_path=tmp_path / "state.pt", log_metrics=lambda metrics, step: logged.append((step, metrics)))
    moved = {step: metrics["reselect/moved"] for step, metrics in logged if "reselect/moved" in metrics}
    assert sorted(moved) == [2, 4] and any(value > 0 for value in moved.values())  # steps 6, 8: past epoch 1
    assert {name: layer.indices.numel() for name, layer in sparse_layers(model).items()} == counts


def test_selection_scores_with_the_loss_attach_is_given(tiny_data):
    """No method imports the task's loss: gallop/snip score calibration gradients with the one passed in."""
    from rigsa.methods import Calibration, build_method
    from rigsa.run import calibration_batches

    cfg = method_cfg("snip")
    seen = []

    def counting_loss(model, batch):
        seen.append(batch["input_ids"].shape[0])
        return answer_loss(model, batch)

    def selected(loss):
        model, _ = load_model(cfg.model, 0)
        method = build_method(cfg.method)
        method.attach(model, Calibration(calibration_batches(tiny_data, cfg, CPU), loss))
        return {name: layer.indices.clone() for name, layer in sparse_layers(model).items()}

    chosen = selected(counting_loss)
    assert seen == [8] * cfg.method.calib_batches  # four training micro-batches of 8
    negated = selected(lambda model, batch: -answer_loss(model, batch))  # |g * w| is sign-blind: same mask
    assert all(torch.equal(chosen[name], negated[name]) for name in chosen)
    squared = selected(lambda model, batch: answer_loss(model, batch) ** 2)  # another loss, another mask
    assert any(not torch.equal(chosen[name], squared[name]) for name in chosen)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qlora_4_bit_layers_compute_in_the_runs_dtype_and_reload_so(dtype, tmp_path):
    """#12: the 4-bit matmul follows `dtype` (it was float32 whatever the run asked for), and so does the reload."""
    import bitsandbytes as bnb

    from rigsa.apply import apply_adapter

    cfg = method_cfg("qlora", [f"dtype={dtype}"])
    model, method = attach_method(cfg)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14 and {layer.compute_dtype for layer in layers} == {getattr(torch, dtype)}
    method.save(tmp_path / "adapter")
    reloaded = apply_adapter(load_model(cfg.model, 0)[0], tmp_path / "adapter", merge=False)
    assert {m.compute_dtype for m in reloaded.modules() if isinstance(m, bnb.nn.Linear4bit)} == {getattr(torch, dtype)}
