"""Memory accounting in results.json, counted from tensors, against counts worked out by hand."""
from __future__ import annotations

import pytest

from rigsa.run import run

TINY_PARAMS = 3_219_776  # the tiny Llama's parameters (tied embeddings once), float32


def test_lora_memory_is_its_factors_their_gradients_and_two_adam_moments(tiny_cfg, tmp_path, private_cache):
    results = run(tiny_cfg("eval=none"), tmp_path / "run")
    memory, trainable = results["memory"], results["trainable_params"]
    assert trainable == 16384 and results["total_params"] == TINY_PARAMS
    assert memory["base_weight_bytes"] == 4 * TINY_PARAMS  # every base weight, frozen, float32
    assert memory["adapter_bytes"] == memory["gradient_bytes"] == 4 * trainable
    factors = 2 * 7 * 2  # lora_A and lora_B of 7 projections in 2 layers, each with a scalar float32 step count
    assert memory["optimizer_state_bytes"] == 2 * 4 * trainable + 4 * factors


def test_a_sparse_adapter_counts_indices_values_and_stored_base_values(tiny_cfg, tmp_path, private_cache):
    results = run(tiny_cfg("eval=none", "method=sparta", "method.budget.density=0.1", "method.target_modules=[all-linear]",
                           "task.readout=classifier_head"), tmp_path / "run")
    memory, values, layers = results["memory"], results["sparse"]["values"], results["sparse"]["layers"]
    head = results["target"]["head_params"]
    assert head == 10 * 64 and layers == 14
    # int32 index + float32 value + float32 stored base value per value, one float32 gate per layer, the head
    assert memory["adapter_bytes"] == 12 * values + 4 * layers + 4 * head
    assert memory["gradient_bytes"] == 4 * (values + head)  # the values' gradient only: no dense weight gradient
    assert memory["base_weight_bytes"] == 4 * TINY_PARAMS  # the merged weights are the base's own tensors
    assert memory["optimizer_state_bytes"] == 8 * (values + head) + 4 * (layers + 1)


def test_rigsa_reports_its_dense_phase_as_the_largest_gradient_and_optimizer_state(tiny_cfg, tmp_path, private_cache):
    results = run(tiny_cfg("eval=none", "method=rigsa", "pruning=imp", "pruning.iterations=1",
                           "pruning.steps_per_iteration=1", "pruning.final_retrain_steps=1"), tmp_path / "run")
    dense = results["initial_trainable_params"]  # 73,728 delta entries + 14 gates
    assert results["memory"]["gradient_bytes"] == 4 * dense
    assert results["memory"]["optimizer_state_bytes"] == pytest.approx(8 * dense, rel=0.01)
    values = results["sparse"]["values"]  # after the prune: half the entries, as engine values
    # int32 index, value, stored base value and RIGSA's initial value (for rewind and the sign rule), 14 gates
    assert values == 73728 // 2 and results["memory"]["adapter_bytes"] == 16 * values + 4 * 14


def test_a_4_bit_base_counts_its_packed_weights_and_their_quantization_state(tiny_cfg, tmp_path, private_cache):
    results = run(tiny_cfg("eval=none", "method=qlora"), tmp_path / "run")
    linear = 73_728  # the 14 projections' weights, packed two per byte
    unquantized = 4 * (TINY_PARAMS - linear)  # embeddings and norms stay float32
    state = results["memory"]["base_weight_bytes"] - unquantized - linear // 2
    assert 0 < state <= 4 * linear // 64 + 14 * 1024  # absmax per 64-value block (+ nested statistics, code tables)
    assert results["memory"]["adapter_bytes"] == 4 * results["trainable_params"]
