"""Full fine-tuning: every base weight is trainable (the reference for how much a model can forget)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rigsa.methods import PruneStep, save_state, trainable_named


class FullFineTuning:
    def __init__(self, name: str = "full", train_embeddings: bool = True, **_ignored):
        self.name = name
        self.train_embeddings = train_embeddings
        self.model: nn.Module | None = None

    def attach(self, model: nn.Module, calib=None) -> nn.Module:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        if not self.train_embeddings:
            # With tied embeddings (SmolLM2) this also freezes the output head: they are one tensor.
            model.get_input_embeddings().weight.requires_grad_(False)
        self.model = model
        return model

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(trainable_named(self.model).values())

    def prune(self, step: PruneStep) -> dict[str, float]:
        return {}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return dict(trainable_named(self.model))

    def save(self, directory: Path) -> list[Path]:
        return save_state(self.adapter_state(), directory, {"method": self.name})
