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

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
from omegaconf import DictConfig, OmegaConf
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
