"""What every adapter layer says of itself, so that no code outside the layer reads its internals: memory
accounting counts `own_tensors`, checkpoints save and restore `positions`, an export writes `float_weight`.

An adapter layer is an nn.Module a method puts in place of a frozen base linear layer (the sparse engine's
SparseDeltaLinear, RIGSA's DenseGatedLinear). A new layer type implements this protocol or is caught by
tests/test_layers.py, which checks every nn.Module class the package defines.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class AdapterLayer(Protocol):
    in_features: int
    out_features: int
    base_layer: nn.Module | None  # a 4-bit base layer it wraps; None when it holds the base's weight and bias

    def own_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors this layer holds beyond the frozen base layer's weight and bias (memory)."""

    def positions(self) -> torch.Tensor | None:
        """Where its trained values sit, when that can change during training (a checkpoint saves it); else None."""

    def move_to(self, positions: torch.Tensor) -> None:
        """Put the trained values at `positions` (a checkpoint's); the values themselves are restored after."""

    def float_weight(self) -> torch.Tensor:
        """The dense float32 weight this layer computes with now: base plus delta (what an export writes)."""


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, AdapterLayer)}
