"""No adapter: the base model as loaded, frozen. A run with method=none (and pruning=none) trains no step and measures
the base model like any adapted one (target task and forgetting suite), writing results.json: how to score a
base model, or another model folder (model=local), without training. Its adapter folder holds an empty dense adapter."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rigsa.adapters.write import write_dense
from rigsa.methods import Calibration, no_pruning, no_sparse_stats, nothing_after_step, one_param_group
from rigsa.model_edits import freeze
from rigsa.vocabulary import BASE_DTYPES, QUANTIZED_BASE


class NoAdapter:
    prunes = False
    bases = (*BASE_DTYPES, QUANTIZED_BASE)  # nothing is trained over the base
    quantize_first = True
    param_groups = one_param_group
    after_step = nothing_after_step
    prune = no_pruning
    stats = no_sparse_stats

    def __init__(self, *, name: str):
        self.name = name

    def attach(self, model: nn.Module, calibration: Calibration) -> nn.Module:
        freeze(model)
        return model

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {}

    def save(self, directory: Path) -> list[Path]:
        return write_dense({}, directory, {"method": self.name}, None)
