"""RIGSA (seed 000): a random-init full-rank delta behind a near-zero gate, then iterative magnitude
pruning down to a sparse delta, then a final retrain.

Dense phase: W = W0 + alpha * dW, dW random (normal, std = init_scale / sqrt(in_features), 0.1 by
default), alpha a learnable gate initialised at 1e-6 (per layer or one global gate), weight decay
on dW only (paper: 1.0). At first the outputs equal the base model's (alpha * dW ~ 1e-6 * 1/sqrt(in)).

Each `prune` keeps `keep_fraction` of each layer's live entries by |alpha * dW|; with
`sign_constraint` only entries whose sign still equals their initial sign may be kept.
`pruned_value=zero` (default) removes pruned entries: after the first prune the adapter becomes
sparse-engine indices + values and the dense tensors are freed. `pruned_value=init` is the other
reading of the paper: pruned entries return to their initial value and stay there, frozen; that
keeps a full-size frozen delta, so this reading stays dense-sized throughout. `rewind` resets the
kept values (and the gate) to their initial values before the next training phase.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from rigsa.adapters.write import sparse_state, write_dense, write_sparse
from rigsa.methods import Calibration, PruneStep, nothing_after_step
from rigsa.model_edits import freeze, replace_module, trainable_named
from rigsa.quantize import dequantized_weight, linear4bit, quantization
from rigsa.sparse.engine import SparseDeltaLinear, frozen_base
from rigsa.sparse.targets import find_targets
from rigsa.sparse.unmerged import base_output
from rigsa.vocabulary import BASE_DTYPES, QUANTIZED_BASE, fail


class DenseGatedLinear(nn.Module):
    """W = W0 + gate * (dW * live + frozen): the dense phase of RIGSA (the one full-size delta). Over a 4-bit
    base (`quantize_base`) W0 x comes from the 4-bit layer and the delta's product is added to it."""

    def __init__(self, base: nn.Linear, init: torch.Tensor, gate: nn.Parameter):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.base_layer = None
        self.delta = nn.Parameter(init.clone())
        self.gate = gate
        self.register_buffer("live", None)  # bool mask of trainable entries (pruned_value=init only)
        self.register_buffer("frozen", None)  # pruned entries held at their initial value (pruned_value=init)

    def effective_delta(self) -> torch.Tensor:
        delta = self.delta if self.live is None else self.delta * self.live + self.frozen
        return self.gate * delta

    @torch.no_grad()
    def quantize_base(self, quant_type: str, compute_dtype: torch.dtype) -> None:
        if self.base_layer is None:
            self.base_layer = linear4bit(self.weight, self.bias, quant_type, compute_dtype)
            self.weight = self.bias = None

    # ---- the AdapterLayer protocol (rigsa.adapter_layer)
    def own_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"delta": self.delta, "gate": self.gate, "live": self.live, "frozen": self.frozen}
        return {name: tensor for name, tensor in tensors.items() if tensor is not None}

    def positions(self) -> None:
        return None  # every entry of the layer: nothing moves

    def move_to(self, positions: torch.Tensor) -> None:
        raise ValueError("a dense RIGSA layer has no positions to move to")

    @torch.no_grad()
    def float_weight(self) -> torch.Tensor:
        base = dequantized_weight(self.base_layer) if self.base_layer is not None else self.weight
        return base.float() + self.effective_delta().detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.base_layer is None and self.weight.dtype == torch.float32:
            return F.linear(x, self.weight + self.effective_delta(), self.bias)
        # A bf16 or 4-bit base: W0 + gate * dW cast to bf16 would round a small delta away (W0 has no float32
        # residual to dither it, see rigsa.sparse.unmerged), so the two products are summed in float32.
        delta = self.effective_delta()
        autocast = torch.is_autocast_enabled(x.device.type)
        return base_output(self, x).float() + F.linear(x if autocast else x.to(delta.dtype), delta).float()


def initial_delta(shape: torch.Size, distribution: str, init_scale: float, seed: int) -> torch.Tensor:
    """The random dW of one layer, regenerated from its seed whenever it is needed (no stored copy)."""
    generator = torch.Generator().manual_seed(seed)
    std = init_scale / math.sqrt(shape[1])
    if distribution == "normal":
        return torch.randn(shape, generator=generator) * std
    if distribution == "uniform":  # same std: U(-a, a) has std a / sqrt(3)
        return (torch.rand(shape, generator=generator) * 2 - 1) * std * math.sqrt(3)
    raise ValueError(f"method.init={distribution!r}: expected normal or uniform")


class Rigsa:
    prunes = True
    bases = (*BASE_DTYPES, QUANTIZED_BASE)  # dense phase: W0 + gate * dW in float32; then the engine
    quantize_first = False
    after_step = nothing_after_step

    def __init__(self, *, name: str, target_modules: list[str], init: str, init_scale: float, gate_init: float,
                 gate: str, weight_decay: float, seed: int):
        if gate not in ("layer", "global"):
            fail("method.gate", gate, "layer or global", "pass method.gate=layer")
        if init not in ("normal", "uniform"):
            fail("method.init", init, "normal or uniform", "pass method.init=normal")
        self.name, self.target_modules = name, list(target_modules)
        self.init, self.init_scale, self.gate_init, self.gate_scope = init, float(init_scale), float(gate_init), gate
        self.weight_decay, self.seed = float(weight_decay), int(seed)
        self.model: nn.Module | None = None
        self.layer_seeds: dict[str, int] = {}
        self.target_numel = 0

    def attach(self, model: nn.Module, calibration: Calibration) -> nn.Module:
        freeze(model)
        targets = find_targets(model, self.target_modules)
        shared = nn.Parameter(torch.tensor(self.gate_init)) if self.gate_scope == "global" else None
        for number, (name, layer) in enumerate(targets.items()):
            self.layer_seeds[name] = self.seed * 100_003 + number
            init = initial_delta(layer.weight.shape, self.init, self.init_scale, self.layer_seeds[name])
            gate = shared if shared is not None else nn.Parameter(torch.tensor(self.gate_init))
            replace_module(model, name, DenseGatedLinear(layer, init.to(layer.weight.device), gate))
        self.target_numel = sum(layer.weight.numel() for layer in targets.values())
        self.model = model
        return model

    def layers(self) -> dict[str, nn.Module]:
        return {name: self.model.get_submodule(name) for name in self.layer_seeds}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(trainable_named(self.model).values())

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay method.weight_decay on the delta values only (the paper's 1.0, not train.weight_decay),
        never on the gates."""
        named = trainable_named(self.model)
        gates = [p for name, p in named.items() if name.endswith("gate")]
        values = [p for name, p in named.items() if not name.endswith("gate")]
        return [{"params": values, "weight_decay": self.weight_decay}, {"params": gates, "weight_decay": 0.0}]

    def _initial(self, name: str, layer: nn.Module) -> torch.Tensor:
        shape = torch.Size((layer.out_features, layer.in_features))
        return initial_delta(shape, self.init, self.init_scale, self.layer_seeds[name]).to(layer.gate.device)

    @torch.no_grad()
    def prune(self, step: PruneStep) -> dict[str, float]:
        shared_gates: dict[int, nn.Parameter] = {}
        for name, layer in self.layers().items():
            if isinstance(layer, DenseGatedLinear):
                init = self._initial(name, layer).reshape(-1)
                current = layer.delta.detach().reshape(-1)
                live = torch.ones_like(current, dtype=torch.bool) if layer.live is None else layer.live.reshape(-1).bool()
            else:
                init, current = layer.init_values, layer.values.detach()
                live = torch.ones_like(current, dtype=torch.bool)
            keep = self._keep(current, init, live, step)
            gate = layer.gate
            if step.rewind:
                gate = shared_gates.setdefault(id(gate), nn.Parameter(torch.tensor(self.gate_init, device=gate.device)))
            if isinstance(layer, DenseGatedLinear) and step.pruned_value == "init":
                mask = torch.zeros_like(live)
                mask[keep] = True
                layer.frozen = torch.where(mask, torch.zeros_like(init), init).reshape(layer.delta.shape)
                layer.live = mask.reshape(layer.delta.shape).to(layer.delta.dtype)
                if step.rewind:
                    layer.delta.copy_(init.reshape(layer.delta.shape))
                    layer.gate = gate
                continue
            if isinstance(layer, DenseGatedLinear):
                positions = keep
            else:
                layer.unmerge()
                positions = layer.flat[keep]
            values = (init if step.rewind else current)[keep]
            replace_module(self.model, name, SparseDeltaLinear(frozen_base(layer), positions, values, gate=gate,
                                                               init_values=init[keep]))
            # the dense delta (if any) is dropped with `layer` here: memory falls to O(m)
        return self.stats()

    @staticmethod
    def _keep(current: torch.Tensor, init: torch.Tensor, live: torch.Tensor, step: PruneStep) -> torch.Tensor:
        """Positions (into `current`) kept: the top keep_fraction of live entries by |value|."""
        target = round(step.keep_fraction * int(live.sum()))
        eligible = live.clone()
        if step.sign_constraint:
            eligible &= torch.sign(current) == torch.sign(init)
        score = torch.where(eligible, current.abs().float(), torch.full_like(current, -1.0, dtype=torch.float32))
        count = min(target, int(eligible.sum()))
        return torch.sort(torch.topk(score, count, sorted=False).indices).values

    def stats(self) -> dict:
        values = 0
        for layer in self.layers().values():
            if isinstance(layer, SparseDeltaLinear):
                values += layer.indices.numel()
            else:
                values += layer.delta.numel() if layer.live is None else int(layer.live.sum())
        return {"values": values, "density": values / self.target_numel,
                "dense_layers": sum(isinstance(layer, DenseGatedLinear) for layer in self.layers().values())}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        state = sparse_state(self.model)
        for name, layer in self.layers().items():
            if isinstance(layer, DenseGatedLinear):
                state[f"{name}.dense_delta"] = layer.effective_delta().detach()
        return state

    def save(self, directory: Path) -> list[Path]:
        if any(isinstance(layer, DenseGatedLinear) for layer in self.layers().values()):
            return write_dense(self.adapter_state(), directory, {"method": self.name, **self.stats(),
                                                                 "quantize": quantization(self.model)}, self.model)
        return write_sparse(self.model, self.adapter_state(), directory, {"method": self.name, **self.stats()})
