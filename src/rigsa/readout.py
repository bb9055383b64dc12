"""Readouts: how the model's state at the answer position becomes one score per class (`task.readout`).

- `answer_token` (generative): the scores are the logits of the label words' first tokens; the loss is the
  cross-entropy of the right label word's first token over the whole vocabulary (the model learns to say it).
- `classifier_head` (SpaRTA §6.3): a linear head on the last prompt token's final hidden state, trained densely
  beside every method. It lives beside the base model, not in it, so the forgetting suite still reads the
  untouched LM head; it is saved in the adapter folder (`classifier_head.safetensors`) and reloaded by
  `rigsa.adapters.load.apply_adapter`. For an instruct model it starts as the LM head's rows of the label words, so
  before training it scores exactly as `answer_token` does; for a base model it starts random, std
  0.06 / sqrt(hidden size), as the paper states.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from rigsa.adapters.write import write_head
from rigsa.evaluate import answer_logits, forward_last

READOUTS = ("answer_token", "classifier_head")
HEAD_INITS = ("auto", "label_words", "random")
RANDOM_HEAD_STD = 0.06  # SpaRTA §6.3: N(0, 0.06 / sqrt(d)) for a base model's new head


class Readout(Protocol):
    kind: str
    num_classes: int

    def scores(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """[B, classes] float32 scores at the answer position."""

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The training loss of a batch (and the loss selection rules score on)."""

    def scores_and_loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Both from one forward pass (a validation measures accuracy and loss at once)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters trained beside the method's (the classification head; none for answer_token)."""

    def save(self, directory: Path) -> list[Path]:
        """Write what the readout trained into the adapter folder; return the files written."""


class AnswerToken:
    kind = "answer_token"

    def __init__(self, label_token_ids: torch.Tensor):
        self.label_token_ids = label_token_ids
        self.num_classes = len(label_token_ids)

    def scores(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return answer_logits(model, batch)[:, self.label_token_ids.to(batch["input_ids"].device)]

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return self.scores_and_loss(model, batch)[1]

    def scores_and_loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = answer_logits(model, batch)
        label_ids = self.label_token_ids.to(logits.device)
        return logits[:, label_ids], nn.functional.cross_entropy(logits, label_ids[batch["classes"]])

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    def save(self, directory: Path) -> list[Path]:
        return []


def last_hidden_state(model: nn.Module, batch: dict) -> torch.Tensor:
    """[B, hidden] final hidden state (after the final norm: what the LM head reads) at the last prompt position."""
    return forward_last(model, batch, hidden=True).hidden_states[-1][:, -1, :]


class ClassifierHead:
    kind = "classifier_head"

    def __init__(self, head: nn.Linear, label_words: list[str]):
        self.head, self.label_words = head, list(label_words)
        self.num_classes = head.out_features

    def scores(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return self.head(last_hidden_state(model, batch)).float()

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return self.scores_and_loss(model, batch)[1]

    def scores_and_loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.scores(model, batch)
        return scores, nn.functional.cross_entropy(scores, batch["classes"])

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.head.weight]

    def save(self, directory: Path) -> list[Path]:
        return write_head(self.head.weight, self.label_words, directory)


def head_starts_from_label_words(head_init: str, tokenizer) -> bool:
    """`auto`: an instruct model (its tokenizer has a chat template) starts from the label words' LM-head rows."""
    return head_init == "label_words" or (head_init == "auto" and bool(tokenizer.chat_template))


def build_readout(task_cfg, data, model: nn.Module, tokenizer, seed: int, device=None) -> Readout:
    """The task's readout for `model` (the base model, before any method is attached); a classification head is
    made on `device` (default: the LM head's)."""
    if task_cfg.readout == "answer_token":
        return AnswerToken(data.label_token_ids)
    lm_head = model.get_output_embeddings().weight
    head = nn.Linear(lm_head.shape[1], len(data.label_words), bias=False, device=device or lm_head.device)
    with torch.no_grad():
        if head_starts_from_label_words(task_cfg.head_init, tokenizer):
            head.weight.copy_(lm_head[data.label_token_ids.to(lm_head.device)].float())
        else:
            generator = torch.Generator().manual_seed(seed)
            std = RANDOM_HEAD_STD / math.sqrt(lm_head.shape[1])
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * std)
    head.weight.requires_grad_(True)
    return ClassifierHead(head, data.label_words)
