"""Tasks: one file per task family; `build_task` turns the `task` config group into tokenized splits."""
from __future__ import annotations

from omegaconf import DictConfig


def build_task(task_cfg: DictConfig, tokenizer, max_seq_len: int):
    """Return the task's TaskData (train/val/test splits, answer tokens, a key of the test set)."""
    if task_cfg.name == "textual_mnist":
        from rigsa.tasks import textual_mnist

        return textual_mnist.build(task_cfg, tokenizer, max_seq_len)
    raise ValueError(f"task.name={task_cfg.name!r} has no builder: expected one of ['textual_mnist']")
