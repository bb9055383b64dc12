"""RIGSA: gated start equal to the base, the pruning schedule, sign constraint, both pruned_value readings."""
from __future__ import annotations

import pytest
import torch

from rigsa.config import compose
from rigsa.methods import Calibration, PruneStep, build_method
from rigsa.methods.rigsa import DenseGatedLinear, initial_delta
from rigsa.models import load_model
from rigsa.sparse.engine import SparseDeltaLinear
from rigsa.sparse.schedule import phases

from conftest import TINY, answer_loss

IDS = torch.tensor([[5, 17, 300, 42, 7, 9, 11, 2]])


def tiny_model():
    model, _ = load_model(compose(TINY).model, 0)
    return model


def attach(*overrides: str):
    model = tiny_model()
    method = build_method(compose(TINY + ["method=rigsa", *overrides]).method)
    return method.attach(model, Calibration([], answer_loss)), method


def test_starts_with_the_base_models_outputs():
    base = tiny_model()
    with torch.no_grad():
        expected = base(IDS).logits
        model, method = attach()
        assert all(isinstance(layer, DenseGatedLinear) for layer in method.layers().values())
        logits = model(IDS).logits
        # alpha * dW ~ 1e-6 * 0.125 per weight: the next-token distribution is unchanged to 1e-5,
        # the logits (up to ~17 here) to 1e-6 of their scale
        assert (logits.softmax(-1) - expected.softmax(-1)).abs().max() < 1e-5
        assert (logits - expected).abs().max() < 1e-6 * expected.abs().max()
        layer = next(iter(method.layers().values()))
        assert layer.gate.item() == pytest.approx(1e-6)
        assert layer.delta.std().item() == pytest.approx(0.1 / 64 ** 0.5, rel=0.1)  # init_scale / sqrt(in)


def test_density_follows_the_schedule_and_dense_tensors_are_freed():
    model, method = attach()
    total = method.target_numel
    for iteration in range(1, 4):
        stats = method.prune(PruneStep(iteration, 0.5))
        assert stats["dense_layers"] == 0
        assert all(isinstance(layer, SparseDeltaLinear) for layer in method.layers().values())
    counts = [layer.indices.numel() for layer in method.layers().values()]
    sizes = [layer.weight.numel() for layer in method.layers().values()]
    assert counts == [round(0.5 * round(0.5 * round(0.5 * n))) for n in sizes]
    assert method.stats()["density"] == pytest.approx(sum(counts) / total)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == sum(counts) + len(counts)  # values + one gate per layer
    assert not any(isinstance(m, DenseGatedLinear) for m in model.modules())


def test_pruned_value_zero_is_truly_sparse_and_keeps_the_largest():
    model, method = attach()
    name, layer = next(iter(method.layers().items()))
    base_weight = layer.weight.detach().clone()
    with torch.no_grad():
        layer.delta.copy_(torch.randn_like(layer.delta))
    magnitudes = layer.delta.detach().abs().reshape(-1)
    method.prune(PruneStep(1, 0.25))
    sparse = method.layers()[name]
    kept = sparse.indices.long()
    assert torch.equal(kept, torch.sort(torch.topk(magnitudes, kept.numel()).indices).values)
    sparse.merge()
    outside = torch.ones(base_weight.numel(), dtype=torch.bool)
    outside[kept] = False
    assert torch.equal(sparse.weight.reshape(-1)[outside], base_weight.reshape(-1)[outside])


def test_sign_constraint_never_keeps_a_flipped_entry():
    model, method = attach()
    name, layer = next(iter(method.layers().items()))
    init = initial_delta(layer.weight.shape, "normal", method.init_scale, method.layer_seeds[name]).reshape(-1)
    with torch.no_grad():
        flipped = torch.topk(init.abs(), 100).indices  # the largest entries change sign and grow
        layer.delta.view(-1)[flipped] = -10 * init[flipped]
    method.prune(PruneStep(1, 0.5, sign_constraint=True))
    kept = set(method.layers()[name].indices.long().tolist())
    assert kept.isdisjoint(flipped.tolist())
    model2, unconstrained = attach()
    layer2 = unconstrained.layers()[name]
    with torch.no_grad():
        layer2.delta.view(-1)[flipped] = -10 * init[flipped]
    unconstrained.prune(PruneStep(1, 0.5))
    assert set(flipped.tolist()) <= set(unconstrained.layers()[name].indices.long().tolist())


def test_pruned_value_init_resets_and_freezes_pruned_entries():
    model, method = attach()
    name, layer = next(iter(method.layers().items()))
    init = initial_delta(layer.weight.shape, "normal", method.init_scale, method.layer_seeds[name])
    with torch.no_grad():
        layer.delta.add_(torch.randn_like(layer.delta))
    method.prune(PruneStep(1, 0.5, pruned_value="init"))
    layer = method.layers()[name]
    assert isinstance(layer, DenseGatedLinear)
    live = layer.live.bool()
    assert int(live.sum()) == round(0.5 * layer.weight.numel())
    effective = layer.effective_delta().detach() / layer.gate.detach()
    assert torch.allclose(effective[~live], init[~live])  # pruned entries back at their initial value
    assert torch.allclose(effective[live], layer.delta.detach()[live])
    model(IDS).logits.sum().backward()
    assert layer.delta.grad[~live].abs().sum() == 0 and layer.delta.grad[live].abs().sum() > 0
    assert method.stats()["values"] == sum(round(0.5 * l.weight.numel()) for l in method.layers().values())


def test_rewind_and_global_gate():
    model, method = attach("method.gate=global", "method.gate_init=1e-6")
    gates = {id(layer.gate) for layer in method.layers().values()}
    assert len(gates) == 1
    with torch.no_grad():
        for layer in method.layers().values():
            layer.gate.fill_(0.5)
            layer.delta.mul_(3.0)
    method.prune(PruneStep(1, 0.5, rewind=True))
    layers = method.layers()
    assert len({id(layer.gate) for layer in layers.values()}) == 1
    for name, layer in layers.items():
        assert layer.gate.item() == pytest.approx(1e-6)
        init = initial_delta(layer.weight.shape, "normal", method.init_scale, method.layer_seeds[name]).reshape(-1)
        assert torch.equal(layer.values.detach(), init[layer.indices.long()])
    named = dict(model.named_parameters())
    assert sum(1 for n in named if n.endswith("gate")) == 1  # shared: counted once


def test_imp_schedule_phases():
    cfg = compose(TINY + ["method=rigsa", "pruning=imp", "pruning.iterations=3", "pruning.steps_per_iteration=4",
                          "pruning.final_retrain_steps=2"])
    schedule = phases(cfg.pruning, cfg.train, 64)
    assert [(p.name, p.steps) for p in schedule] == [("iteration1", 4), ("iteration2", 4), ("iteration3", 4),
                                                     ("final_retrain", 2)]
    assert [p.prune.iteration if p.prune else None for p in schedule] == [1, 2, 3, None]
    epochs = compose(TINY + ["method=rigsa", "pruning=imp", "train.batch_size=8"])
    assert [p.steps for p in phases(epochs.pruning, epochs.train, 64)] == [8] * 6  # 1 epoch = 64 / 8 steps
