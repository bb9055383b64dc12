"""Textual MNIST (RIGSA paper, Fig. 1): a digit image written as a grid of the characters 0-9.

Pixel value v (0-255, after mean-pooling to `image_size`) becomes the character `v * 10 // 256`;
rows are joined by newlines. The prompt asks which digit the image shows; the answer is the one
digit token that follows the prompt, so training and evaluation read the logits at the last
prompt position only.
"""
from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from rigsa import assets

IMAGE_SIZES = (28, 14, 7)
DIGITS_PER_CLASS = 500
TEST_PER_CLASS = 100  # the fixed test set: 1,000 digits, 100 per class
QUESTION = ("Which digit from 0 to 9 does this {size}x{size} image show? Each character is one pixel's "
            "brightness, 0 = dark, 9 = bright.\n\n{grid}\n\nAnswer with the digit only.")


@dataclass
class Split:
    input_ids: torch.Tensor  # [N, L] prompt tokens, left-padded
    attention_mask: torch.Tensor  # [N, L]
    labels: torch.Tensor  # [N] token id of the answer digit
    digits: torch.Tensor  # [N] the digit 0-9

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[indices], "attention_mask": self.attention_mask[indices],
                "labels": self.labels[indices]}


@dataclass
class TaskData:
    name: str
    train: Split
    val: Split
    test: Split
    answer_token_ids: torch.Tensor  # [10] token id of "0".."9"
    test_key: str  # hash of the test prompts and answers: keys the base-accuracy cache


def check_config(task: DictConfig, fail) -> None:
    """Value checks for the task group (called by rigsa.config.validate)."""
    if task.image_size not in IMAGE_SIZES:
        fail("task.image_size", task.image_size, f"one of {list(IMAGE_SIZES)} (28 = paper, 14/7 = mean-pooled)",
             "pass task.image_size=14")
    pool = 10 * (DIGITS_PER_CLASS - TEST_PER_CLASS)
    for key in ("train_size", "test_size"):
        if task[key] < 1:
            fail(f"task.{key}", task[key], "a number >= 1", f"pass task.{key}=100")
    if task.val_size < 0:
        fail("task.val_size", task.val_size, "a number >= 0", "pass task.val_size=200")
    if task.train_size + task.val_size > pool:
        fail("task.train_size", task.train_size, f"train_size + val_size <= {pool} (the digits left after the test set)",
             f"lower task.train_size to {pool - task.val_size}")
    if task.test_size > 10 * TEST_PER_CLASS:
        fail("task.test_size", task.test_size, f"<= {10 * TEST_PER_CLASS} (the fixed test set)",
             f"pass task.test_size={10 * TEST_PER_CLASS}")


def load_digits(path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 packaged MNIST digits: images [5000, 28, 28] uint8 and labels [5000]."""
    path = path or assets.locate("mnist")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


def format_grid(image: np.ndarray, size: int) -> str:
    """28x28 uint8 image -> `size` lines of `size` characters 0-9 (mean-pooled when size < 28)."""
    factor = 28 // size
    pooled = image.astype(np.float64).reshape(size, factor, size, factor).mean(axis=(1, 3))
    levels = (np.floor(pooled).astype(np.int64) * 10) // 256
    return "\n".join("".join(str(level) for level in row) for row in levels)


def split_indices(labels: np.ndarray, seed: int, train_size: int, val_size: int, test_size: int):
    """Deterministic stratified split. Each class is shuffled once with `seed`; its first 100 digits
    form the fixed test set, the next ones val, then train. Each split is ordered round-robin over
    classes, so any prefix of it is stratified (test_size < 1000 takes a prefix of the same set)."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == digit)) for digit in range(10)]

    def round_robin(start: int, count: int) -> np.ndarray:
        columns = np.stack([indices[start:start + (count + 9) // 10] for indices in per_class], axis=1)
        return columns.reshape(-1)[:count]

    test = round_robin(0, test_size)
    val = round_robin(TEST_PER_CLASS, val_size)
    train = round_robin(TEST_PER_CLASS + (val_size + 9) // 10, train_size)
    return train, val, test


def build_prompt(grid: str, size: int, tokenizer, chat_template: bool) -> str:
    question = QUESTION.format(size=size, grid=grid)
    if chat_template and tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return question + "\nAnswer: "


def answer_token_ids(tokenizer) -> torch.Tensor:
    ids = []
    for digit in range(10):
        encoded = tokenizer.encode(str(digit), add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"the tokenizer splits the digit {digit!r} into {encoded}: Textual MNIST needs one token per digit")
        ids.append(encoded[0])
    return torch.tensor(ids)


def _encode(prompts: list[str], digits: np.ndarray, tokenizer, answer_ids: torch.Tensor, max_seq_len: int) -> Split:
    encoded = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    if encoded["input_ids"].shape[1] > max_seq_len:
        raise ValueError(f"Textual MNIST prompts are {encoded['input_ids'].shape[1]} tokens, more than "
                         f"train.max_seq_len={max_seq_len}: raise train.max_seq_len or lower task.image_size")
    digit_tensor = torch.as_tensor(digits, dtype=torch.long)
    return Split(encoded["input_ids"], encoded["attention_mask"], answer_ids[digit_tensor], digit_tensor)


def build(task: DictConfig, tokenizer, max_seq_len: int) -> TaskData:
    images, labels = load_digits()
    answer_ids = answer_token_ids(tokenizer)
    train, val, test = split_indices(labels, task.split_seed, task.train_size, task.val_size, task.test_size)

    def make(indices: np.ndarray) -> tuple[Split, list[str]]:
        if len(indices) == 0:
            empty = torch.zeros(0, 1, dtype=torch.long)
            return Split(empty, empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)), []
        prompts = [build_prompt(format_grid(images[i], task.image_size), task.image_size, tokenizer, task.chat_template)
                   for i in indices]
        return _encode(prompts, labels[indices], tokenizer, answer_ids, max_seq_len), prompts

    test_split, test_prompts = make(test)
    key = hashlib.sha256("\x00".join(test_prompts).encode() + str(labels[test].tolist()).encode()).hexdigest()
    return TaskData(task.name, make(train)[0], make(val)[0], test_split, answer_ids, key)
