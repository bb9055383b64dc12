"""Fixed sparse masks: SpaRTA (random), GaLLoP, SNIP, magnitude and block-sparse selection.

A selection rule picks indices once in `attach` (from calibration gradients where the rule needs
them); the sparse engine then trains only those values. Each variant is a YAML in conf/method/
naming this class with its own defaults.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rigsa.methods import PruneStep, freeze, replace_module, trainable_named, untie_head
from rigsa.sparse import adapter as sparse_adapter
from rigsa.sparse.engine import SparseDeltaLinear, sparse_layers
from rigsa.sparse.selection import NEEDS_GRADIENT, select
from rigsa.sparse.targets import find_targets, lora_layer_counts, resolve_budget


def calibration_gradients(model: nn.Module, targets: dict[str, nn.Linear], calib, loss_fn) -> dict[str, torch.Tensor]:
    """Mean gradient of the loss w.r.t. each target weight over the calibration batches. The one
    place a dense weight gradient exists, before training, one tensor at a time kept as the sum."""
    sums = {name: torch.zeros_like(layer.weight, dtype=torch.float32) for name, layer in targets.items()}
    count = 0
    for layer in targets.values():
        layer.weight.requires_grad_(True)
    try:
        for batch in calib:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            for name, layer in targets.items():
                sums[name] += layer.weight.grad.float()
            count += 1
    finally:
        for layer in targets.values():
            layer.weight.requires_grad_(False)
            layer.weight.grad = None
    if count == 0:
        raise ValueError("this selection rule needs calibration batches: set method.calib_batches >= 1")
    return {name: total / count for name, total in sums.items()}


class SparseMask:
    def __init__(self, name: str, selection: str = "random", target_modules=("sparta",), budget=None,
                 scope: str = "per_tensor", block_size: int = 0, calib_batches: int = 4, eps: float = 1e-8,
                 train_head: bool = False, reselect_every: int = 0, seed: int = 0, **_ignored):
        self.name, self.selection, self.scope = name, selection, scope
        self.target_modules = list(target_modules)
        self.budget = dict(budget or {"density": 0.005})
        self.block_size, self.calib_batches, self.eps = int(block_size), int(calib_batches), float(eps)
        self.train_head, self.seed = bool(train_head), int(seed)
        self.reselect_every = int(reselect_every)
        self.model: nn.Module | None = None
        self.head: nn.Parameter | None = None
        self.target_numel = 0

    def attach(self, model: nn.Module, calib=None) -> nn.Module:
        from omegaconf import OmegaConf

        from rigsa.evaluate import answer_loss

        freeze(model)
        targets = find_targets(model, self.target_modules)
        budget = OmegaConf.create(self.budget)
        total = resolve_budget(budget, model, targets)
        counts = lora_layer_counts(model, budget, targets) if self.scope == "per_tensor" and not self.block_size else None
        grads = None
        if self.selection in NEEDS_GRADIENT:
            batches = [] if calib is None else [batch for _, batch in zip(range(self.calib_batches), calib)]
            grads = calibration_gradients(model, targets, batches, answer_loss)
        weights = {name: layer.weight for name, layer in targets.items()}
        indices = select(self.selection, weights, total, grads=grads, scope=self.scope, block_size=self.block_size,
                         eps=self.eps, seed=self.seed, counts=counts)
        for name, layer in targets.items():
            replace_module(model, name, SparseDeltaLinear(layer, indices[name]))
        self.target_numel = sum(layer.weight.numel() for layer in targets.values())
        if self.train_head:
            self.head = untie_head(model)
        self.model = model
        return model

    def after_step(self, step: int, optimizer, batch: dict, steps_per_epoch: int) -> dict:
        """SNIP-style re-selection (`reselect_every` > 0, scored rules): every N steps of the first
        epoch, re-score on the current batch with the current weights and move each layer's m values
        to the new top positions. Values (and AdamW moments) at positions kept carry over; new
        positions start at zero. Returns {"reselect/moved": fraction of positions that changed}."""
        if not self.reselect_every or self.selection == "random" or step % self.reselect_every or step > steps_per_epoch:
            return {}
        from rigsa.evaluate import answer_loss

        layers = sparse_layers(self.model)
        for layer in layers.values():
            layer.merge()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        for parameter in trainable:  # the layers fall back to a plain linear: a dense gradient, once
            parameter.requires_grad_(False)
        try:
            grads = calibration_gradients(self.model, layers, [batch], answer_loss)
        finally:
            for parameter in trainable:
                parameter.requires_grad_(True)
        weights = {name: layer.weight for name, layer in layers.items()}
        counts = {name: layer.indices.numel() for name, layer in layers.items()}
        chosen = select(self.selection, weights, sum(counts.values()), grads=grads, eps=self.eps,
                        block_size=self.block_size, counts=None if self.block_size else counts)
        moved = 0
        for name, layer in layers.items():
            source, found = layer.reindex(chosen[name])
            moved += int((~found).sum())
            state = optimizer.state.get(layer.values, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = torch.where(found, state[key][source], torch.zeros_like(state[key]))
        return {"reselect/moved": moved / max(1, sum(counts.values()))}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(trainable_named(self.model).values())

    def prune(self, step: PruneStep) -> dict[str, float]:
        return {}

    def stats(self) -> dict:
        values = sum(layer.indices.numel() for layer in sparse_layers(self.model).values())
        return {"values": values, "density": values / self.target_numel, "layers": len(sparse_layers(self.model))}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        state = sparse_adapter.sparse_state(self.model)
        if self.head is not None:
            state["lm_head.weight"] = self.head
        return state

    def save(self, directory: Path) -> list[Path]:
        return sparse_adapter.save(self.model, self.adapter_state(), directory, {"method": self.name, **self.stats()})
