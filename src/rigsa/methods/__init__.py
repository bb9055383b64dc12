"""Adaptation methods. Each is one file here plus one YAML in conf/method/ whose `_target_` names it.

Every method implements the whole `Method` protocol: `run()` and `train()` call each hook below
directly, never through hasattr. The common no-op bodies are the free functions after the protocol
(`no_pruning`, `nothing_after_step`, `one_param_group`, `no_sparse_stats`), which a method binds as
class attributes (`prune = no_pruning`), not a base class. `attach` returns the
model to train, because peft methods wrap the model (PeftModel) rather than change it in place.
A method's constructor takes exactly the fields of its schema in rigsa/config.py, without
defaults (the values live in conf/method/), and raises ConfigError for a bad one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
from omegaconf import DictConfig, OmegaConf
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


@dataclass
class Calibration:
    """What a selection rule scores on: training batches and the task's loss on one of them."""
    batches: Iterable[dict]
    loss: Callable[[nn.Module, dict], torch.Tensor]
    readout: str = "answer_token"  # task.readout: with classifier_head the run trains a classification head itself


class Method(Protocol):
    name: str
    prunes: bool  # True when the method implements a pruning schedule (pruning=imp)
    bases: tuple[str, ...]  # the stored base precisions (model.base_dtype) it can train on
    # With model.quantize: True when the loaded base becomes 4-bit before `attach` (PEFT wraps the 4-bit layers),
    # False when after (selection rules score the weights as loaded; the adapter layers quantize their own base).
    quantize_first: bool

    def attach(self, model: nn.Module, calibration: Calibration) -> nn.Module:
        """Freeze the base, insert adapters; return the model to train. Selection methods score on
        `calibration` (consumed lazily: methods that do not score never touch a batch)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates."""

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups; `weight_decay` is train.weight_decay (a method may set its own)."""

    def after_step(self, step: int, optimizer: torch.optim.Optimizer, batch: dict, steps_per_epoch: int) -> dict:
        """Called after every optimizer step (global step number); returns metrics to log."""

    def prune(self, step: PruneStep) -> dict[str, float]:
        """Apply one step of the pruning schedule (no-op for most methods); return stats."""

    def stats(self) -> dict:
        """{values, density, ...} of a sparse adapter (the exact trained count); {} for the others."""

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Exactly what must be saved to rebuild the adapted model from the base."""

    def save(self, directory: Path) -> list[Path]:
        """Write the adapter into `directory`; return the files written."""


def build_method(method_cfg: DictConfig) -> Method:
    """The method a `method` config names (its `_target_` class), built from exactly its fields."""
    from hydra.utils import get_class

    fields = OmegaConf.to_container(method_cfg, resolve=True)
    return get_class(fields.pop("_target_"))(**fields)


# ---------------------------------------------------------------- the common hook bodies
# Bound as class attributes (`prune = no_pruning`): the first argument is the method itself.
def no_pruning(method: Method, step: PruneStep) -> dict[str, float]:
    return {}


def nothing_after_step(method: Method, step: int, optimizer, batch: dict, steps_per_epoch: int) -> dict:
    return {}


def one_param_group(method: Method, weight_decay: float) -> list[dict]:
    """Every trainable parameter in one AdamW group with train.weight_decay."""
    return [{"params": method.trainable_parameters(), "weight_decay": weight_decay}]


def no_sparse_stats(method: Method) -> dict:
    return {}


# ---------------------------------------------------------------- shared helpers
def freeze(model: nn.Module) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


def untie_head(model: nn.Module) -> nn.Parameter:
    """Give the output head its own trainable copy (SmolLM2 ties it to the frozen input embeddings)."""
    head = model.get_output_embeddings()
    # float32 even over a bfloat16 base: a trained weight needs updates below one bf16 ulp (autocast casts it)
    head.weight = nn.Parameter(head.weight.detach().to(torch.float32, copy=True), requires_grad=True)
    model.config.tie_word_embeddings = False  # a later tie_weights() must not re-tie the copy
    return head.weight


def load_head(model: nn.Module, weight: torch.Tensor) -> None:
    """Give the model a saved output head (frozen), untied from the input embeddings."""
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(weight.to(head.weight.dtype), requires_grad=False)
    model.config.tie_word_embeddings = False


def trainable_named(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}


DENSE_FORMAT = "rigsa-dense-v1"


def save_state(state: dict[str, torch.Tensor], directory: Path, metadata: dict) -> list[Path]:
    """Save a dense adapter state as `adapter.safetensors` + `adapter.json`: tensors named like the model's
    parameters replace them (full, head), `<layer>.dense_delta` tensors are added to a layer's weight
    (RIGSA before its first prune, or with pruned_value=init). `rigsa.apply.apply_adapter` loads it."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    save_file(tensors, directory / "adapter.safetensors", metadata={"format": DENSE_FORMAT})
    (directory / "adapter.json").write_text(json.dumps({**metadata, "format": DENSE_FORMAT}, indent=2, default=str))
    return [directory / "adapter.safetensors", directory / "adapter.json"]
