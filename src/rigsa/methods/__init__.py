"""Adaptation methods. Each is one file here plus one YAML in conf/method/ whose `_target_` names it.

Every method follows the `Method` protocol. `attach` returns the model to train, because peft
methods wrap the model (PeftModel) rather than change it in place.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

import torch
from safetensors.torch import save_file
from torch import nn


@dataclass
class PruneStep:
    """One step of a pruning schedule (RIGSA's iterative magnitude pruning; see conf/pruning/imp.yaml)."""
    iteration: int  # 1 for the first prune
    keep_fraction: float  # fraction of the live entries kept
    sign_constraint: bool = False  # keep only entries whose sign equals their initial sign
    pruned_value: str = "zero"  # zero: removed (truly sparse); init: reset to the initial value and frozen
    rewind: bool = False  # kept values (and gates) back to their initial values before retraining


class Method(Protocol):
    name: str

    def attach(self, model: nn.Module, calib: Iterable[dict] | None) -> nn.Module:
        """Freeze the base, insert adapters; return the model to train. Selection methods score on `calib`."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates."""

    def prune(self, step: PruneStep) -> dict[str, float]:
        """Apply one step of the pruning schedule (no-op for most methods); return stats."""

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Exactly what must be saved to rebuild the adapted model from the base."""

    def save(self, directory: Path) -> list[Path]:
        """Write the adapter into `directory`; return the files written."""


def freeze(model: nn.Module) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


def untie_head(model: nn.Module) -> nn.Parameter:
    """Give the output head its own trainable copy (SmolLM2 ties it to the frozen input embeddings)."""
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=True)
    model.config.tie_word_embeddings = False  # a later tie_weights() must not re-tie the copy
    return head.weight


def trainable_named(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}


def save_state(state: dict[str, torch.Tensor], directory: Path, metadata: dict) -> list[Path]:
    """Save an adapter state as `adapter.safetensors` + `adapter.json` (method, config, base model)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    save_file(tensors, directory / "adapter.safetensors", metadata={"method": str(metadata.get("method"))})
    (directory / "adapter.json").write_text(json.dumps(metadata, indent=2, default=str))
    return [directory / "adapter.safetensors", directory / "adapter.json"]
