"""model.quantize=nf4: the sparse methods, RIGSA and the LoRA family (method=qlora) over a bitsandbytes 4-bit base.
The engine's unmerged path against float64 over the dequantized weights, training without touching the base, the CPU trap
(train -> evaluate -> train keeps its gradients) and an adapter that reloads onto its 4-bit base."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import (TINY, assert_an_evaluation_keeps_the_gradients, attach_method, digit_readout, killed_at_step,
                      method_cfg)
from rigsa.adapters import AdapterMismatch
from rigsa.apply import apply_adapter
from rigsa.config import compose
from rigsa.methods import PruneStep
from rigsa.models import load_model
from rigsa.quantize import dequantized_weight, is_quantized, linear4bit, quantize_linear_layers
from rigsa.sparse.engine import SparseDeltaLinear, sparse_layers
from rigsa.train import train
from rigsa.validate import validate
from rigsa.vocabulary import ConfigError
from test_sparse_engine import assert_matches_reference

CPU = torch.device("cpu")


def quantized(method_name, tiny_data):
    """(cfg, model, method): the tiny model with the method attached over an nf4 base (as run() does)."""
    cfg = method_cfg(method_name, ["model.quantize=nf4"])
    model, method = attach_method(cfg, tiny_data)
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


def test_rigsas_dense_adapter_trained_on_an_nf4_base_reloads_to_its_logits(tiny_data, tmp_path):
    """Before its first prune RIGSA saves a dense delta; over a 4-bit base it records `quantize`, and the reload
    computes the dequantized weight plus the delta in a float32 layer: the trained float32 sum, up to its rounding."""
    import json

    cfg, model, method = quantized("rigsa", tiny_data)
    train_steps(model, method, cfg, tiny_data, tmp_path / "state.pt", steps=3)
    method.save(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter.json").read_text())["quantize"]["quant_type"] == "nf4"
    ids = torch.tensor([[1, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        reloaded = apply_adapter(load_model(cfg.model, 0)[0], tmp_path / "adapter")
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)
        plain = load_model(cfg.model, 0)[0]
        quantize_linear_layers(plain, "nf4", torch.float32)
        assert (plain(input_ids=ids).logits - trained).abs().max() > 1e-3  # the adapter matters


@pytest.mark.parametrize("method_name,message", [
    ("full", r"model.quantize='nf4' is invalid: expected null for method=full"),
    ("head", r"model.quantize='nf4' is invalid: expected null for method=head"),
])
def test_methods_without_a_4bit_path_refuse_it(method_name, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(TINY + [f"method={method_name}", "model.quantize=nf4"]))


@torch.no_grad()
def give_lora_an_effect(model):
    """LoRA's B starts at zero: random B matrices, so that a reload that lost the adapter shows."""
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.normal_()


def test_qlora_is_lora_over_a_quantized_base():
    """method=qlora is a preset: the config of method=lora with model.quantize=nf4 but for the name; without a 4-bit
    base it is refused (it would be plain LoRA under QLoRA's name)."""
    qlora, lora = compose(TINY + ["method=qlora"]), compose(TINY + ["method=lora", "model.quantize=nf4"])
    assert qlora.model.quantize == "nf4" and qlora.method.name == "qlora"
    qlora.method.name = "lora"
    assert qlora == lora
    assert compose(TINY + ["method=qlora", "model.quantize=fp4"]).model.quantize == "fp4"
    with pytest.raises(ConfigError, match=r"model.quantize=None is invalid: expected nf4 or fp4 for method=qlora.*"
                                          r"Fix: pass model.quantize=nf4, or method=lora"):
        validate(compose(TINY + ["method=qlora", "model.quantize=null"]))


@pytest.mark.parametrize("method_name,quant_type", [("qlora", "nf4"), ("qlora", "fp4"), ("dora", "nf4")])
def test_peft_methods_wrap_the_4bit_layers_and_their_adapters_reload(method_name, quant_type, tmp_path):
    """LoRA-family adapters over model.quantize: PEFT's LoRA layers wrap the 4-bit layers (quantized before attach),
    in the requested format; the saved adapter records it and reloads onto a freshly loaded base with equal logits."""
    import bitsandbytes as bnb

    cfg = method_cfg(method_name, [f"model.quantize={quant_type}"])
    model, method = attach_method(cfg)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14 and {layer.weight.quant_type for layer in layers} == {quant_type}
    assert {type(m.base_layer) for m in model.modules() if hasattr(m, "lora_A")} == {bnb.nn.Linear4bit}
    give_lora_an_effect(model)
    method.save(tmp_path / "adapter")
    ids = torch.tensor([[1, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        reloaded = apply_adapter(load_model(cfg.model, 0)[0], tmp_path / "adapter", merge=False)
        assert torch.equal(reloaded(input_ids=ids).logits, trained)
    with pytest.raises(AdapterMismatch, match="trained on a different base model"):  # the 4-bit base's fingerprint
        apply_adapter(load_model(cfg.model, 1)[0], tmp_path / "adapter")


@pytest.mark.parametrize("method_name", ["sparta", "qlora", "rigsa"])  # rigsa: its dense phase's adapter
def test_rigsa_apply_exports_a_4bit_trained_adapter_as_the_float_model_it_trained(method_name, tiny_data, tmp_path):
    """The merged model of an adapter trained over nf4 is the function trained: dequantized 4-bit weights plus the
    delta, in float32 layers a plain from_pretrained loads (merging into the 4-bit weights would re-quantize them)."""
    from transformers import AutoModelForCausalLM

    from rigsa.apply import main as apply_main

    cfg, model, method = quantized(method_name, tiny_data)
    train_steps(model, method, cfg, tiny_data, tmp_path / "state.pt", steps=3)
    method.save(tmp_path / "adapter")
    ids = torch.tensor([[1, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    assert apply_main([str(tmp_path / "adapter"), "--model", "tiny", "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(is_quantized(module) for module in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-4)
        plain = load_model(cfg.model, 0)[0]
        quantize_linear_layers(plain, "nf4", torch.float32)
        assert (plain(input_ids=ids).logits - trained).abs().max() > 1e-3  # the delta is in the export


def test_a_qlora_adapter_saved_before_the_preset_still_reloads(tmp_path):
    """Adapters written when QLoRA was `method.load_in_4bit` record {load_in_4bit, quant_type, compute_dtype} and the
    fingerprint of the weights as loaded (not of the 4-bit base): they reload as before."""
    from rigsa.adapters import PEFT_BASE_FILE as BASE_FILE
    from rigsa.models import fingerprint

    cfg = method_cfg("qlora")
    model, method = attach_method(cfg)
    give_lora_an_effect(model)
    method.save(tmp_path / "adapter")
    meta_path = tmp_path / "adapter" / BASE_FILE
    meta = json.loads(meta_path.read_text())
    assert meta["quantize"] == {"quant_type": "nf4", "compute_dtype": "float32"}
    del meta["quantize"]
    meta.update(load_in_4bit=True, quant_type="nf4", compute_dtype="float32",
                base_fingerprint=fingerprint(load_model(cfg.model, 0)[0]))
    meta_path.write_text(json.dumps(meta))
    ids = torch.tensor([[1, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        reloaded = apply_adapter(load_model(cfg.model, 0)[0], tmp_path / "adapter", merge=False)
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(AdapterMismatch, match="trained on a different base model"):
        apply_adapter(load_model(cfg.model, 1)[0], tmp_path / "adapter")


def test_bad_quantize_values_are_refused():
    with pytest.raises(ConfigError, match=r"model.quantize='int8' is invalid: expected null or one of \['nf4', 'fp4'\]"):
        validate(compose(TINY + ["method=sparta", "model.quantize=int8"]))
    with pytest.raises(ConfigError, match=r"method.reselect_every=5 is invalid.*4-bit"):
        validate(compose(TINY + ["method=snip", "method.reselect_every=5", "model.quantize=nf4"]))


@pytest.mark.slow  # an lm-eval or multi-process end-to-end run (30-50 s): make test-slow
def test_a_4bit_run_reports_the_quantized_bases_own_share_of_forgetting(tiny_cfg, tmp_path, private_cache):
    """results.forgetting.quantized_base: the suite on the 4-bit base before training, against the unquantized
    base's scores; it equals a direct evaluation of that quantized, unadapted model."""
    from rigsa import forgetting
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


@pytest.mark.slow  # an lm-eval or multi-process end-to-end run (30-50 s): make test-slow
def test_a_resumed_4bit_run_reads_the_quantized_bases_share_instead_of_measuring_it_again(tiny_cfg, tmp_path,
                                                                                           private_cache, monkeypatch):
    from rigsa import run as run_module

    overrides = ("method=sparta", "method.budget.density=0.1", "model.quantize=nf4", "eval=offline",
                 "eval.forgetting=[{task: rigsa_gsm8k_bpb, num_fewshot: 0, limit: 2}]", "train.checkpoint_every=1")
    restore = killed_at_step(monkeypatch, 3)  # after the checkpoint of step 2
    with pytest.raises(KeyboardInterrupt):
        run_module.run(tiny_cfg(*overrides), tmp_path / "run")
    restore()
    kept = json.loads((tmp_path / "run" / run_module.QUANTIZED_BASE_FILE).read_text())
    labels = []
    real = run_module.adapted_forgetting
    monkeypatch.setattr(run_module, "adapted_forgetting", lambda *args: labels.append(args[5:]) or real(*args))
    results = run_module.run(tiny_cfg(*overrides), tmp_path / "run")
    assert results["train"]["resumed_from_step"] == {"train": 2}
    assert labels == [()]  # the final evaluation only: the 4-bit base's share was read back
    assert results["forgetting"]["quantized_base"]["mean_forgetting"] == kept["mean_forgetting"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (none here)")
def test_qlora_on_cuda_quantizes_on_the_cpu_and_only_then_moves_the_model(tiny_cfg, tmp_path, monkeypatch):
    """#12: the device never holds the full-precision base for training: QLoRA's base is quantized where it was
    loaded (the CPU); the model reaches the GPU 4-bit. The base's target score (not cached here) went there and back."""
    from rigsa import run as run_module

    seen = []
    real = run_module.quantize_linear_layers

    def recording(model, *args):
        seen.append({parameter.device.type for parameter in model.parameters()})
        return real(model, *args)

    monkeypatch.setattr(run_module, "quantize_linear_layers", recording)
    results = run_module.run(tiny_cfg("method=qlora", "device=cuda", "eval=target"), tmp_path / "run")
    assert seen == [{"cpu"}]
    assert results["target"]["base_accuracy"] is not None
