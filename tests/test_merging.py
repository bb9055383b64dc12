"""Merge methods against hand computations, and merged adapters of every kind against the models they must give."""
from __future__ import annotations

import pytest
import torch

from rigsa.adapters import SparseDelta
from rigsa.merging.combine import MergeSettings, combine
from rigsa.merging.deltas import merge_parameter


def settings(method: str, n: int, density: float = 1.0, weights=None, **extra) -> MergeSettings:
    return MergeSettings(method, tuple(weights or [1.0] * n), (density,) * n, **extra)


def sparse(indices, values, gate=1.0) -> SparseDelta:
    return SparseDelta(torch.tensor(indices, dtype=torch.int32), torch.tensor(values, dtype=torch.float32),
                       torch.tensor([gate]))


def test_overlap_mean_divides_each_position_by_the_adapters_that_trained_it():
    """mttl's uniform sparse merge: A trained positions 0-2, B positions 2-3; only position 2 is shared."""
    merged = merge_parameter("w", [sparse([0, 1, 2], [1.0, 2.0, 3.0]), sparse([3, 2], [7.0, 5.0])],
                             settings("overlap_mean", 2), shape=(2, 2))
    assert merged.indices.tolist() == [0, 1, 2, 3] and merged.indices.dtype == torch.int32
    assert merged.values.tolist() == [1.0, 2.0, 4.0, 7.0]  # (3 + 5) / 2 at the shared position
    mean = merge_parameter("w", [sparse([0, 1, 2], [1.0, 2.0, 3.0]), sparse([3, 2], [7.0, 5.0])],
                           settings("mean", 2), shape=(2, 2))
    assert mean.values.tolist() == [0.5, 1.0, 4.0, 3.5]


def test_a_gate_is_folded_into_the_merged_values():
    merged = merge_parameter("w", [sparse([4], [2.0], gate=0.5)], settings("sum", 1), shape=(3, 3))
    assert merged.values.tolist() == [1.0] and merged.gate.tolist() == [1.0]


HAND = torch.tensor([[1.0, -2.0, 3.0, -4.0], [-1.0, -3.0, 2.0, 1.0], [2.0, 1.0, -1.0, -5.0]])


@pytest.mark.parametrize("weights,expected", [((1.0, 1.0, 1.0), [2.0, -3.0, 2.5, -4.5]),
                                              ((2.0, 1.0, 1.0), [2.0, -3.0, 4.0, -6.5])])
def test_ties_against_a_hand_computation(weights, expected):
    """Density 0.5 keeps each task's 2 largest: [0,0,3,-4], [0,-3,2,0], [2,0,0,-5]; the signs of their sum
    [2,-3,5,-9] are elected; the agreeing weighted values are summed and divided by how many agree (PEFT, mttl)."""
    own = torch.ones_like(HAND, dtype=torch.bool)
    merged = combine(HAND, own, settings("ties", 3, 0.5, weights), "w")
    assert merged.tolist() == expected
    assert combine(HAND, own, settings("ties", 3, 0.5, weights, scale=0.5), "w").tolist() == [v / 2 for v in expected]


def test_magnitude_pruning_keeps_the_density_of_each_adapters_own_values():
    """A sparse adapter with 10 values among 20 union positions keeps its 3 largest at density 0.3 (not 6)."""
    values = [float(v) for v in range(1, 11)]
    first = sparse(list(range(0, 20, 2)), values)
    second = sparse(list(range(1, 20, 2)), [0.01] * 10)
    merged = merge_parameter("w", [first, second], MergeSettings("magnitude_prune", (1.0, 0.0), (0.3, 0.3)),
                             shape=(4, 5))
    assert merged.values.nonzero().reshape(-1).tolist() == [14, 16, 18]  # positions 14, 16, 18: values 8, 9, 10
    assert merged.values[[14, 16, 18]].tolist() == [8.0, 9.0, 10.0]


def test_dare_drops_at_the_density_and_rescales_the_rest_seeded():
    values = torch.linspace(0.1, 1.0, 10_000).reshape(1, -1)
    own = torch.ones_like(values, dtype=torch.bool)
    merged = combine(values, own, settings("dare_linear", 1, 0.25, seed=3), "w")
    kept = merged != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    torch.testing.assert_close(merged[kept], values[0][kept] / 0.25)  # the kept ones divided by the density
    assert torch.equal(merged, combine(values, own, settings("dare_linear", 1, 0.25, seed=3), "w"))
    assert not torch.equal(merged, combine(values, own, settings("dare_linear", 1, 0.25, seed=4), "w"))
    assert not torch.equal(merged, combine(values, own, settings("dare_linear", 1, 0.25, seed=3), "other"))
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    combine(values, own, settings("dare_ties", 1, 0.25), "w")
    assert torch.equal(torch.rand(1), before)  # the global random state is left as it was


def test_dare_ties_elects_signs_after_the_random_drop():
    stacked = torch.tensor([[1.0, 2.0], [-3.0, 2.0]])
    own = torch.ones_like(stacked, dtype=torch.bool)
    merged = combine(stacked, own, settings("dare_ties", 2, 1.0), "w")  # nothing dropped: TIES' election alone
    assert merged.tolist() == [-3.0, 2.0]


def test_mixed_sparse_and_dense_inputs_merge_densely():
    dense = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    merged = merge_parameter("w", [sparse([3], [2.0]), dense], settings("overlap_mean", 2), shape=(2, 2))
    assert merged.tolist() == [[1.0, 1.0], [1.0, 1.5]]


# ---------------------------------------------------------------- merged adapters on the tiny model
def merged_model(adapters, settings_, folder, cfg):
    """A fresh base with `adapters` merged, written to folder/merged and applied from disk as a trained one is."""
    from rigsa.adapters.load import apply_adapter
    from rigsa.merging.deltas import merge_adapters, write_merged
    from rigsa.models import load_model

    model, _ = load_model(cfg.model, 0)
    merged = merge_adapters(adapters, settings_, model)
    write_merged(merged, folder / "merged")
    return apply_adapter(model, folder / "merged", merge=not adapters[0].quantize), merged


# Every kind of adapter; a sparse one, LoRA and full fine-tuning in the default suite, the rest in make test-slow
KINDS = [(option, [], None) for option in ("sparta", "snip", "lora", "dora", "qlora", "full", "head", "rigsa")] + [
    ("sparta", ["method.train_head=true"], None), ("rigsa", [], "zero")]
DEFAULT_KINDS = {("sparta", None), ("lora", None), ("full", None), ("rigsa", "zero")}


@pytest.mark.parametrize("option,overrides,pruned_value", [
    pytest.param(o, x, p, id=f"{o}{''.join(x)}{'-pruned_' + p if p else ''}",
                 marks=() if (o, p) in DEFAULT_KINDS and not x else pytest.mark.slow) for o, x, p in KINDS])
def test_one_adapter_merged_with_weight_one_gives_its_own_logits(option, overrides, pruned_value, tiny_data,
                                                                 tmp_path):
    from rigsa.adapters import SPARSE_FORMAT
    from rigsa.adapters.read import read_adapter

    from test_adapters import logits, trained_and_saved

    cfg, _, trained = trained_and_saved(option, overrides, pruned_value, tiny_data, tmp_path)
    adapter = read_adapter(tmp_path / "adapter")
    model, merged = merged_model([adapter], settings("sum", 1), tmp_path, cfg)
    torch.testing.assert_close(logits(model), trained, rtol=1e-5, atol=1e-5)
    assert (merged.format == SPARSE_FORMAT) == (adapter.format == SPARSE_FORMAT)  # sparse stays sparse


def test_mean_of_a_twice_is_a_and_sum_of_a_and_minus_a_is_the_base(tiny_data, tmp_path):
    import dataclasses

    from rigsa.adapters.read import read_adapter
    from rigsa.models import load_model

    from test_adapters import logits, trained_and_saved

    cfg, _, trained = trained_and_saved("sparta", [], None, tiny_data, tmp_path)
    a = read_adapter(tmp_path / "adapter")
    model, merged = merged_model([a, a], settings("mean", 2), tmp_path / "mean", cfg)
    for name, delta in a.layers.items():
        assert torch.equal(merged.layers[name].indices, delta.indices)
        torch.testing.assert_close(merged.layers[name].values, delta.gate * delta.values, rtol=0, atol=0)
    torch.testing.assert_close(logits(model), trained, rtol=1e-5, atol=1e-5)
    minus_a = dataclasses.replace(a, layers={name: dataclasses.replace(delta, values=-delta.values)
                                             for name, delta in a.layers.items()})
    model, merged = merged_model([a, minus_a], settings("sum", 2), tmp_path / "sum", cfg)
    assert all(not delta.values.any() for delta in merged.layers.values())
    assert torch.equal(logits(model), logits(load_model(cfg.model, 0)[0]))


def test_a_merged_sparse_adapter_saves_reloads_and_exports_to_the_same_logits(tiny_data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from rigsa.adapters.load import apply_adapter
    from rigsa.adapters.read import read_adapter
    from rigsa.apply import main as apply_main
    from rigsa.merging.deltas import merge_adapters
    from rigsa.models import load_model

    from test_adapters import logits, trained_and_saved

    cfg, _, _ = trained_and_saved("sparta", [], None, tiny_data, tmp_path / "a")
    trained_and_saved("snip", [], None, tiny_data, tmp_path / "b")
    adapters = [read_adapter(tmp_path / "a" / "adapter"), read_adapter(tmp_path / "b" / "adapter")]
    base, _ = load_model(cfg.model, 0)
    in_memory = apply_adapter(base, merge_adapters(adapters, settings("ties", 2, 0.5), base))
    expected = logits(in_memory)
    reloaded, merged = merged_model(adapters, settings("ties", 2, 0.5), tmp_path, cfg)
    assert merged.format == "rigsa-sparse-v1"
    assert torch.equal(logits(reloaded), expected)
    assert read_adapter(tmp_path / "merged").meta["merge"]["method"] == "ties"
    assert apply_main([str(tmp_path / "merged"), "--model", "tiny", "--out", str(tmp_path / "export")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    torch.testing.assert_close(logits(exported), expected, rtol=1e-6, atol=1e-6)


def test_each_task_scored_in_one_forward_pass_equals_its_readout_alone(tiny_data):
    from torch import nn

    from rigsa.adapters import ClassificationHead
    from rigsa.merging.heads import TaskReadouts, task_readout
    from rigsa.models import load_model

    from conftest import TINY, compose

    model, _ = load_model(compose(TINY).model, 0)
    generator = torch.Generator().manual_seed(0)
    hidden = model.config.hidden_size
    readouts = TaskReadouts({
        "digits": task_readout(None, tiny_data.label_token_ids),
        "two": task_readout(ClassificationHead(torch.randn(2, hidden, generator=generator), ["a", "b"]), None),
        "three": task_readout(ClassificationHead(torch.randn(3, hidden, generator=generator), ["x", "y", "z"]), None),
    })
    batch = tiny_data.test.batch(list(range(6)))
    together = readouts.scores_all(model, batch)
    assert [scores.shape for scores in together.values()] == [(6, 10), (6, 2), (6, 3)]
    for task, readout in readouts.readouts.items():
        with torch.no_grad():
            assert torch.equal(together[task], readout.scores(model, batch)), task
    assert isinstance(readouts.readouts["two"].head, nn.Linear)
