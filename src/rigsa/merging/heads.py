"""A merged model's readouts, one per source task: each task keeps its own classification head (SpaRTA §8: the
merged SST-2 + CoLA model keeps both heads) or its own label words (the answer-token readout), and one forward pass
scores every task.

`TaskReadouts.scores_all(model, batch)` runs the model once for the batch and gives each task's [B, classes] scores
from the final hidden state at the answer position (heads) and from the logits there (label words), exactly what
each task's readout computes alone (`rigsa.readout`). The heads are saved in the merge's folder as
`heads/<task>/classifier_head.safetensors`, the form `rigsa.adapters` reads beside any adapter.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rigsa.adapters import ClassificationHead
from rigsa.adapters.load import head_module
from rigsa.adapters.read import read_head, read_json
from rigsa.adapters.write import write_head
from rigsa.evaluate import forward_last
from rigsa.readout import AnswerToken, ClassifierHead, Readout

HEADS_FOLDER, HEADS_FILE = "heads", "heads.json"


@dataclass
class TaskReadouts:
    """The readout of each source task of a merged model, by task name, in the sources' order."""
    readouts: dict[str, Readout]

    @torch.no_grad()
    def scores_all(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Every task's scores for `batch` from one forward pass of `model`."""
        output = forward_last(model, batch, hidden=any(isinstance(readout, ClassifierHead)
                                                       for readout in self.readouts.values()))
        logits = output.logits[:, -1, :].float()
        scores = {}
        for task, readout in self.readouts.items():
            if isinstance(readout, ClassifierHead):
                scores[task] = readout.head(output.hidden_states[-1][:, -1, :]).float()
            else:
                scores[task] = logits[:, readout.label_token_ids.to(logits.device)]
        return scores


def task_readout(head: ClassificationHead | None, label_token_ids: torch.Tensor, device=None) -> Readout:
    """A source task's readout on the merged model: its saved classification head, else its label words."""
    if head is None:
        return AnswerToken(label_token_ids)
    return ClassifierHead(head_module(head).to(device), head.label_words or [])


def write_heads(heads: dict[str, ClassificationHead | None], directory: Path) -> list[Path]:
    """Each task's classification head in `directory/heads/<task>/`, and heads.json naming each task's readout."""
    written = []
    kinds = {}
    for task, head in heads.items():
        kinds[task] = "answer_token" if head is None else "classifier_head"
        if head is not None:
            written += write_head(head.weight, head.label_words or [], directory / HEADS_FOLDER / task)
    (directory / HEADS_FOLDER).mkdir(parents=True, exist_ok=True)
    (directory / HEADS_FOLDER / HEADS_FILE).write_text(json.dumps({"readouts": kinds}, indent=2))
    return [*written, directory / HEADS_FOLDER / HEADS_FILE]


def read_heads(directory: Path) -> dict[str, ClassificationHead | None]:
    """The heads `write_heads` wrote, by task (None for a task read by its label words)."""
    kinds = read_json(directory / HEADS_FOLDER / HEADS_FILE)["readouts"]
    return {task: read_head(directory / HEADS_FOLDER / task) if kind == "classifier_head" else None
            for task, kind in kinds.items()}
