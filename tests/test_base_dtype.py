"""model.base_dtype=bfloat16: every method but full trains the tiny model over bf16-stored base weights,
the sparse engine keeps its delta unmerged there, and no base weight changes."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY, attach_method, digit_readout, method_cfg
from rigsa.config import compose
from rigsa.methods import PruneStep
from rigsa.models import load_model
from rigsa.sparse.engine import sparse_layers
from rigsa.train import train
from rigsa.validate import validate
from rigsa.vocabulary import ConfigError

SPARSE = ["sparta", "gallop", "snip", "block_sparse", "random_mask", "rigsa"]


def bf16_cfg(method_name):
    return method_cfg(method_name, ["model.base_dtype=bfloat16", "dtype=bfloat16"])


def train_bf16(model, method, cfg, data, path, steps, lr=1e-2):
    train_cfg = cfg.train.copy()
    train_cfg.max_steps, train_cfg.lr, train_cfg.lr_schedule = steps, lr, "constant"
    return train(model, method, data, train_cfg, readout=digit_readout(), seed=0, device=torch.device("cpu"),
                 dtype="bfloat16", eval_batch_size=8, checkpoint_path=path, log_metrics=lambda metrics, step: None)


@pytest.mark.parametrize("method_name", SPARSE)
def test_sparse_methods_train_over_a_bf16_base_without_touching_it(method_name, tiny_data, tmp_path):
    cfg = bf16_cfg(method_name)
    model, _ = load_model(cfg.model, 0)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    model, method = attach_method(cfg, tiny_data, model)
    result = train_bf16(model, method, cfg, tiny_data, tmp_path / "state.pt", steps=12)
    # the random tiny model starts confidently wrong (loss ~17); it must come down clearly
    assert sum(result.losses[-3:]) / 3 < result.losses[0] - 1.0, result.losses
    if method_name == "rigsa":  # that was the dense phase: one prune into the engine, then its retraining
        method.prune(PruneStep(iteration=1, keep_fraction=0.1))
    layers = sparse_layers(model)
    assert layers and not any(layer.merged for layer in layers.values())
    before = {name: layer.values.detach().clone() for name, layer in layers.items()}
    train_bf16(model, method, cfg, tiny_data, tmp_path / "more.pt", steps=3)
    assert any(not torch.equal(layer.values, before[name]) for name, layer in layers.items())
    for name, parameter in model.named_parameters():
        if name in base:
            assert torch.equal(parameter, base[name]), f"{method_name} changed base {name}"


def test_training_over_a_bf16_base_follows_the_float32_base(tiny_data, tmp_path):
    """SpaRTA, same seed and data, float32 vs bf16-stored base (bf16 autocast both): the loss curves differ by
    less than the bf16 base's rounding moves the starting loss, times a small factor."""
    curves = {}
    for base_dtype in ("float32", "bfloat16"):
        cfg = method_cfg("sparta", [f"model.base_dtype={base_dtype}", "dtype=bfloat16"])
        model, method = attach_method(cfg, tiny_data)
        curves[base_dtype] = train_bf16(model, method, cfg, tiny_data, tmp_path / f"{base_dtype}.pt", steps=16).losses
    f32, b16 = torch.tensor(curves["float32"]), torch.tensor(curves["bfloat16"])
    assert f32[-4:].mean() < f32[0] - 1.0  # it learns
    assert (f32 - b16).abs().mean() < 0.05 * f32.abs().mean(), (curves["float32"], curves["bfloat16"])


def test_full_fine_tuning_refuses_a_bf16_base_and_float32_compute_is_refused():
    with pytest.raises(ConfigError, match=r"model.base_dtype='bfloat16'.*method=full.*\['float32'\]"):
        validate(compose(TINY + ["method=full", "model.base_dtype=bfloat16", "dtype=bfloat16"]))
    with pytest.raises(ConfigError, match=r"dtype='float32'.*pass dtype=bfloat16"):
        validate(compose(TINY + ["method=sparta", "model.base_dtype=bfloat16", "dtype=float32"]))
    with pytest.raises(ConfigError, match=r"model.base_dtype='float16'.*one of \['float32', 'bfloat16'\]"):
        validate(compose(TINY + ["model.base_dtype=float16"]))


def test_bf16_base_weights_take_half_the_bytes():
    sizes = {}
    for base_dtype in ("float32", "bfloat16"):
        model, _ = load_model(compose(TINY + [f"model.base_dtype={base_dtype}"]).model, 0)
        sizes[base_dtype] = sum(p.numel() * p.element_size() for p in model.parameters())
    assert sizes["bfloat16"] * 2 == sizes["float32"]


def test_an_adapter_trained_on_a_bf16_base_reloads_onto_it_with_identical_logits(tiny_data, tmp_path):
    from rigsa.apply import apply_adapter

    cfg = bf16_cfg("sparta")
    model, method = attach_method(cfg, tiny_data)
    train_bf16(model, method, cfg, tiny_data, tmp_path / "state.pt", steps=3)
    method.save(tmp_path / "adapter")
    ids = torch.tensor([[1, 17, 42, 99, 7, 3]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        trained = model(input_ids=ids).logits
        reloaded_model = apply_adapter(load_model(cfg.model, 0)[0], tmp_path / "adapter")
        reloaded = reloaded_model(input_ids=ids).logits
    assert sparse_layers(reloaded_model) and not any(layer.merged for layer in sparse_layers(reloaded_model).values())
    assert torch.equal(trained, reloaded)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not torch.equal(load_model(cfg.model, 0)[0](input_ids=ids).logits, trained)  # the adapter matters


def test_rigsas_dense_phase_over_a_bf16_base_sees_a_delta_below_one_ulp():
    """gate * dW at 1e-3 of the weights (far below one bf16 ulp, 2^-8 of them) moves the output by x dW^T gate:
    merged into the bf16 weight and cast, it would be rounded away; summed in float32 it is not."""
    from rigsa.methods.rigsa import DenseGatedLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(64, 16, bias=False).to(torch.bfloat16)
    delta = base.weight.detach().float() * 1e-3
    layer = DenseGatedLinear(base, delta, torch.nn.Parameter(torch.tensor(1.0)))
    x = torch.randn(256, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        change = layer(x).double() - base(x).double()
    true_change = (x.to(torch.bfloat16).double() @ delta.to(torch.bfloat16).double().t())
    slope = (change * true_change).sum() / (true_change * true_change).sum()
    assert 0.99 < slope.item() < 1.01
