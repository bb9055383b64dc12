"""Tasks: the interface every task family implements, and what the rest of rigsa reads from a task.

A task family is one module in this folder (named by `task.family` in its YAML) with two functions:
`check_config(task, fail)`, the value checks that need no data (run by `rigsa.validate.validate`), and
`build(task, tokenizer, max_seq_len) -> TaskData`, the tokenized splits. Every task is a
classification: a prompt, and one of a few classes named by label words. Prompts are stored
unpadded; `Split.batch` left-pads each batch to its own longest prompt (the position ids follow the
attention mask, see `rigsa.evaluate.forward_last`), so the answer is always read at position -1.
"""
from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from typing import Protocol

import torch
from omegaconf import DictConfig


@dataclass
class Split:
    prompts: list[torch.Tensor]  # token ids of each prompt (1-D int64), special tokens included, unpadded
    classes: torch.Tensor  # [N] class index of each example (the position of its label word)
    pad_token_id: int

    def __len__(self) -> int:
        return self.classes.shape[0]

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask left-padded to the longest prompt of these examples, and their classes."""
        rows = [self.prompts[int(index)] for index in indices]
        length = max((row.numel() for row in rows), default=1)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for number, row in enumerate(rows):
            input_ids[number, length - row.numel():] = row
            attention_mask[number, length - row.numel():] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "classes": self.classes[indices]}

    def head(self, count: int) -> "Split":
        """The first `count` examples."""
        return Split(self.prompts[:count], self.classes[:count], self.pad_token_id)


@dataclass
class TaskData:
    name: str
    train: Split
    val: Split
    test: Split
    label_words: list[str]  # the word naming each class, in class order
    label_token_ids: torch.Tensor  # [classes] first token of each label word, as it follows a prompt
    metric: str  # the task's primary metric (accuracy, f1 or mcc; every metric is reported)
    test_key: str  # hash of the test prompts and classes: keys the base-score cache
    dropped_train: int = 0  # training examples dropped for prompts over task.max_prompt_tokens


class TaskFamily(Protocol):
    """What a task module provides (a module, not a class: the two functions below)."""

    def check_config(self, task: DictConfig, fail) -> None:
        """Checks of the task's values that read no data (`fail(key, value, expected, fix)` raises)."""

    def build(self, task: DictConfig, tokenizer, max_seq_len: int) -> TaskData:
        """The tokenized splits; raises ConfigError (naming the value) for data that cannot make them."""


def family(task_cfg: DictConfig) -> TaskFamily:
    return importlib.import_module(task_cfg.family)


def build_task(task_cfg: DictConfig, tokenizer, max_seq_len: int) -> TaskData:
    """The task's TaskData: train/val/test splits, label words and their tokens, metric, test-set key."""
    return family(task_cfg).build(task_cfg, tokenizer, max_seq_len)


# ---------------------------------------------------------------- prompts, shared by every family
def special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (e.g. Llama's or Gemma's BOS; none for GPT-2 or
    SmolLM2). Tokens it appends (an EOS) are left out: the answer must follow the prompt directly."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def render_prompts(questions: list[str], tokenizer, chat_template: bool) -> list[torch.Tensor]:
    """Token ids of each question as a prompt whose next token is the answer. With a chat template (an instruct
    model) the question is the user turn and the prompt ends where the assistant's reply starts; the template
    writes the special tokens itself. Without one, "Answer: " follows the question, after the tokenizer's own
    leading special tokens."""
    if chat_template and tokenizer.chat_template:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True) for question in questions]
        prefix = []
    else:
        texts, prefix = [question + "\nAnswer: " for question in questions], special_prefix(tokenizer)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [torch.tensor(prefix + list(ids), dtype=torch.long) for ids in encoded]


def label_token_ids(tokenizer, label_words: list[str]) -> torch.Tensor:
    """The first token of each label word (the answer-token readout scores these logits)."""
    first = []
    for word in label_words:
        ids = tokenizer.encode(str(word), add_special_tokens=False)
        if not ids:
            raise ValueError(f"the label word {word!r} encodes to no token: choose a non-empty word")
        first.append(ids[0])
    if len(set(first)) != len(first):
        clash = [word for word, token in zip(label_words, first) if first.count(token) > 1]
        raise ValueError(f"the label words {clash} start with the same token: choose words whose first tokens differ")
    return torch.tensor(first, dtype=torch.long)


def test_set_key(test: Split, label_words: list[str]) -> str:
    """SHA-256 of the test prompts' tokens, their classes and the label words."""
    digest = hashlib.sha256()
    for prompt in test.prompts:
        digest.update(prompt.numpy().astype("<i8").tobytes())
        digest.update(b"|")
    digest.update(str(test.classes.tolist()).encode())
    digest.update("\x00".join(map(str, label_words)).encode())
    return digest.hexdigest()
