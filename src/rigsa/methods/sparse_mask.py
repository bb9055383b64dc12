"""Fixed sparse masks: SpaRTA (random), GaLLoP, SNIP, magnitude and block-sparse selection.

A selection rule picks indices once in `attach` (from calibration gradients where the rule needs
them); the sparse engine then trains only those values. Each variant is a YAML in conf/method/
naming this class with its own defaults.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rigsa.adapters.write import sparse_state, write_sparse
from rigsa.methods import Calibration, no_pruning, one_param_group
from rigsa.model_edits import freeze, replace_module, trainable_named, untie_head
from rigsa.sparse.engine import SparseDeltaLinear, sparse_layers
from rigsa.sparse.selection import NEEDS_GRADIENT, RULES, select
from rigsa.sparse.targets import check_budget, find_targets, lora_layer_counts, resolve_budget
from rigsa.vocabulary import BASE_DTYPES, QUANTIZED_BASE, fail


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
    prunes = False
    bases = (*BASE_DTYPES, QUANTIZED_BASE)  # the engine keeps the delta unmerged over a bf16 base
    quantize_first = False
    param_groups = one_param_group
    prune = no_pruning

    def __init__(self, *, name: str, selection: str, target_modules: list[str], budget: dict, scope: str,
                 block_size: int, calib_batches: int, eps: float, train_head: bool, reselect_every: int, seed: int):
        check_budget(budget)
        if selection not in RULES:
            fail("method.selection", selection, f"one of {list(RULES)}", "pass method.selection=random")
        if block_size < 0 or scope not in ("per_tensor", "global"):
            fail("method.scope", scope, "per_tensor or global (block_size >= 0)", "pass method.scope=per_tensor")
        self.name, self.selection, self.scope = name, selection, scope
        self.target_modules = list(target_modules)
        self.budget = dict(budget)
        self.block_size, self.calib_batches, self.eps = int(block_size), int(calib_batches), float(eps)
        self.train_head, self.seed = bool(train_head), int(seed)
        self.reselect_every = int(reselect_every)
        self.model: nn.Module | None = None
        self.head: nn.Parameter | None = None
        self.loss = None  # the task's loss, from `attach`'s calibration: SNIP re-selection scores with it
        self.target_numel = 0

    def attach(self, model: nn.Module, calibration: Calibration) -> nn.Module:
        from omegaconf import OmegaConf

        freeze(model)
        self.loss = calibration.loss
        targets = find_targets(model, self.target_modules)
        budget = OmegaConf.create(self.budget)
        total = resolve_budget(budget, model, targets)
        counts = lora_layer_counts(model, budget, targets) if self.scope == "per_tensor" and not self.block_size else None
        grads = None
        if self.selection in NEEDS_GRADIENT:
            batches = [batch for _, batch in zip(range(self.calib_batches), calibration.batches)]
            grads = calibration_gradients(model, targets, batches, self.loss)
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
        layers = sparse_layers(self.model)
        for layer in layers.values():
            layer.merge()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        for parameter in trainable:  # the layers fall back to a plain linear: a dense gradient, once
            parameter.requires_grad_(False)
        try:
            grads = calibration_gradients(self.model, layers, [batch], self.loss)
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

    def stats(self) -> dict:
        values = sum(layer.indices.numel() for layer in sparse_layers(self.model).values())
        return {"values": values, "density": values / self.target_numel, "layers": len(sparse_layers(self.model))}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        state = sparse_state(self.model)
        if self.head is not None:
            state["lm_head.weight"] = self.head
        return state

    def save(self, directory: Path) -> list[Path]:
        return write_sparse(self.model, self.adapter_state(), directory, {"method": self.name, **self.stats()})
