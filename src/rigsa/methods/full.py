"""Full fine-tuning: every base weight is trainable (the reference for how much a model can forget)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rigsa.adapters.write import write_dense
from rigsa.methods import Calibration, no_pruning, no_sparse_stats, nothing_after_step, one_param_group
from rigsa.model_edits import trainable_named


class FullFineTuning:
    prunes = False
    bases = ("float32",)  # it updates the base weights themselves
    quantize_first = False
    param_groups = one_param_group
    after_step = nothing_after_step
    prune = no_pruning
    stats = no_sparse_stats

    def __init__(self, *, name: str, train_embeddings: bool):
        self.name = name
        self.train_embeddings = bool(train_embeddings)
        self.model: nn.Module | None = None

    def attach(self, model: nn.Module, calibration: Calibration) -> nn.Module:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        if not self.train_embeddings:
            # With tied embeddings (SmolLM2) this also freezes the output head: they are one tensor.
            model.get_input_embeddings().weight.requires_grad_(False)
        self.model = model
        return model

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(trainable_named(self.model).values())

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return dict(trainable_named(self.model))

    def save(self, directory: Path) -> list[Path]:
        return write_dense(self.adapter_state(), directory, {"method": self.name}, self.model)
