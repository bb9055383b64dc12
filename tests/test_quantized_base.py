"""model.quantize=nf4: the sparse methods and RIGSA over a bitsandbytes 4-bit base. The engine's unmerged
path against float64 over the dequantized weights, training without touching the base, the CPU trap
(train -> evaluate -> train keeps its gradients) and an adapter that reloads onto its 4-bit base."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TINY, assert_an_evaluation_keeps_the_gradients, attach_method, digit_readout, method_cfg
from rigsa.config import ConfigError, compose, validate
from rigsa.methods import PruneStep
from rigsa.quantize import dequantized_weight, is_quantized, linear4bit, quantize_linear_layers
from rigsa.sparse.engine import SparseDeltaLinear, sparse_layers
from rigsa.train import train
from test_sparse_engine import assert_matches_reference

CPU = torch.device("cpu")


def quantized(method_name, tiny_data):
    """(cfg, model, method): the tiny model with the method attached, then its base quantized to nf4 (as run() does)."""
    cfg = method_cfg(method_name, ["model.quantize=nf4"])
    model, method = attach_method(cfg, tiny_data)
    quantize_linear_layers(model, "nf4", torch.float32)
    return cfg, model, method


def train_steps(model, method, cfg, data, path, steps, lr=1e-2):
    train_cfg = cfg.train.copy()
    train_cfg.max_steps, train_cfg.lr, train_cfg.lr_schedule = steps, lr, "constant"
    return train(model, method, data, train_cfg, readout=digit_readout(), seed=0, device=CPU, dtype="float32",
                 eval_batch_size=8, checkpoint_path=path, log_metrics=lambda metrics, step: None)


def test_unmerged_path_over_nf4_matches_float64_over_the_dequantized_weights():
    """Tolerance: relative error < 1e-5 against float64 over the weights the 4-bit layer computes with
    (bitsandbytes dequantizes, then multiplies in float32)."""
    torch.manual_seed(0)
    base = nn.Linear(96, 80, bias=True)
    layer4 = linear4bit(base.weight, base.bias, "nf4", torch.float32)
    dequantized = dequantized_weight(layer4).float()
    indices = torch.randperm(96 * 80)[:400]
    layer = SparseDeltaLinear(layer4, indices, torch.randn(400) * 0.1, gate=0.7, train_gate=True)
    assert layer.weight is None and not layer.merged and is_quantized(layer.base_layer)
    assert_matches_reference(layer, dequantized, base.bias, (5, 37))


@pytest.mark.parametrize("method_name", ["sparta", "gallop", "snip", "block_sparse", "random_mask", "rigsa"])
def test_sparse_methods_train_over_an_nf4_base_without_touching_it(method_name, tiny_data, tmp_path):
    cfg, model, method = quantized(method_name, tiny_data)
    four_bit = {name: m.weight.detach().clone() for name, m in model.named_modules() if is_quantized(m)}
    assert len(four_bit) == 2 * 7  # every linear layer of the 2 decoder layers
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    result = train_steps(model, method, cfg, tiny_data, tmp_path / "state.pt", steps=12)
    # the random tiny model starts confidently wrong (loss ~17); it must come down clearly
    assert sum(result.losses[-3:]) / 3 < result.losses[0] - 1.0, result.losses
    if method_name == "rigsa":  # that was the dense phase over the 4-bit base: one prune into the engine
        method.prune(PruneStep(iteration=1, keep_fraction=0.1))
        train_steps(model, method, cfg, tiny_data, tmp_path / "more.pt", steps=3)
    layers = sparse_layers(model)
    assert layers and all(layer.base_layer is not None and layer.weight is None for layer in layers.values())
    for name, module in model.named_modules():
        if is_quantized(module):
            assert torch.equal(module.weight, four_bit[name]), name
    for name, parameter in model.named_parameters():
        if name in frozen and not parameter.requires_grad:
            assert torch.equal(parameter, frozen[name]), f"{method_name} changed base {name}"


def test_the_cpu_trap_train_evaluate_train_keeps_the_gradients(tiny_data, tmp_path):
    """bitsandbytes on an AVX512-BF16 CPU repacks 4-bit weights after a no-grad forward, and later gradients
    through them vanish. The engine's 4-bit base layers keep the plain path: the same batch's loss and value
    gradients are unchanged by an evaluation in between."""
    cfg, model, method = quantized("sparta", tiny_data)
    train_steps(model, method, cfg, tiny_data, tmp_path / "a.pt", steps=2)
    assert_an_evaluation_keeps_the_gradients(model, tiny_data)


def test_an_adapter_trained_on_an_nf4_base_reloads_onto_it_with_identical_logits(tiny_data, tmp_path):
    from rigsa.apply import apply_adapter
    from rigsa.models import load_model

    cfg, model, method = quantized("sparta", tiny_data)
    train_steps(model, method, cfg, tiny_data, tmp_path / "state.pt", steps=3)
    method.save(tmp_path / "adapter")
    ids = torch.tensor([[1, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        reloaded_model = apply_adapter(load_model(cfg.model, 0)[0], tmp_path / "adapter")
        assert all(layer.base_layer is not None for layer in sparse_layers(reloaded_model).values())
        assert torch.equal(reloaded_model(input_ids=ids).logits, trained)
        plain = load_model(cfg.model, 0)[0]
        quantize_linear_layers(plain, "nf4", torch.float32)
        assert not torch.equal(plain(input_ids=ids).logits, trained)  # the adapter matters


@pytest.mark.parametrize("method_name,message", [
    ("full", r"model.quantize='nf4' is invalid: expected null for method=full"),
    ("head", r"model.quantize='nf4' is invalid: expected null for method=head"),
    ("lora", r"LoRA's 4-bit base is PEFT's: method=qlora.*Fix: pass model.quantize=null, or method=qlora"),
])
def test_methods_without_a_4bit_path_refuse_it(method_name, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(TINY + [f"method={method_name}", "model.quantize=nf4"]))


def test_bad_quantize_values_are_refused():
    with pytest.raises(ConfigError, match=r"model.quantize='int8' is invalid: expected null or one of \['nf4', 'fp4'\]"):
        validate(compose(TINY + ["method=sparta", "model.quantize=int8"]))
    with pytest.raises(ConfigError, match=r"method.reselect_every=5 is invalid.*4-bit"):
        validate(compose(TINY + ["method=snip", "method.reselect_every=5", "model.quantize=nf4"]))


def test_a_4bit_run_reports_the_quantized_bases_own_share_of_forgetting(tiny_cfg, tmp_path, private_cache):
    """results.forgetting.quantized_base: the suite on the 4-bit base before training, against the unquantized
    base's scores; it equals a direct evaluation of that quantized, unadapted model."""
    from rigsa import forgetting
    from rigsa.models import load_model
    from rigsa.run import run

    cfg = tiny_cfg("method=sparta", "method.budget.density=0.1", "model.quantize=nf4", "eval=offline",
                   "eval.forgetting=[{task: rigsa_gsm8k_bpb, num_fewshot: 0, limit: 3}]")
    results = run(cfg, tmp_path / "run")
    share = results["forgetting"]["quantized_base"]
    model, tokenizer = load_model(cfg.model, 0)
    base = forgetting.evaluate_suite(model, tokenizer, cfg.eval, CPU, cfg.dtype, cfg.seed)
    quantize_linear_layers(model, "nf4", torch.float32)
    quantized = forgetting.evaluate_suite(model, tokenizer, cfg.eval, CPU, cfg.dtype, cfg.seed)
    expected = (quantized["rigsa_gsm8k_bpb"]["metrics"]["bits_per_byte"]
                - base["rigsa_gsm8k_bpb"]["metrics"]["bits_per_byte"])
    assert expected != 0  # 4 bits move the tiny model's scores
    assert share["mean_forgetting"] == pytest.approx(expected, rel=1e-6)
    assert results["forgetting"]["mean_forgetting"] != share["mean_forgetting"]  # training moved it further
