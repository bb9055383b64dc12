"""Head only: train a copy of the output head; every other weight stays frozen.

SmolLM2 ties the output head to the input embeddings. Training the tied tensor would also change
the embeddings, so `attach` unties them: the head gets its own trainable copy, initialised equal.
With task.readout=classifier_head the head trained is the classification head the run adds beside
the model (SpaRTA's "Head" baseline, §6.3): this method then freezes every model weight and adds nothing.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rigsa.adapters.write import write_dense
from rigsa.methods import Calibration, no_pruning, no_sparse_stats, nothing_after_step, one_param_group
from rigsa.model_edits import freeze, untie_head
from rigsa.vocabulary import BASE_DTYPES


class HeadOnly:
    prunes = False
    bases = BASE_DTYPES  # its head is a float32 copy
    quantize_first = False
    param_groups = one_param_group
    after_step = nothing_after_step
    prune = no_pruning
    stats = no_sparse_stats

    def __init__(self, *, name: str):
        self.name = name
        self.head: nn.Module | None = None
        self.model: nn.Module | None = None

    def attach(self, model: nn.Module, calibration: Calibration) -> nn.Module:
        freeze(model)
        self.model = model
        if calibration.readout != "classifier_head":
            untie_head(model)
            self.head = model.get_output_embeddings()
        return model

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [] if self.head is None else [self.head.weight]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {} if self.head is None else {"lm_head.weight": self.head.weight}

    def save(self, directory: Path) -> list[Path]:
        return write_dense(self.adapter_state(), directory, {"method": self.name}, self.model)
