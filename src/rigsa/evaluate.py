"""Target-task metrics: the answer logits, the training loss, and accuracy over the answer tokens.

Textual MNIST accuracy is the argmax over the ten digit tokens' logits at the answer position
(the last prompt position), measured the same way for the base and the adapted model.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def autocast(device: torch.device, dtype: str):
    """bfloat16/float16 autocast over float32 master weights; a no-op context for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def answer_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [B, vocab] at the last prompt position (prompts are left-padded)."""
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    output = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, logits_to_keep=1)
    return output.logits[:, -1, :].float()


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the answer token (the loss of every training step and of calibration)."""
    return nn.functional.cross_entropy(answer_logits(model, batch), batch["labels"])


@torch.no_grad()
def target_accuracy(model: nn.Module, split, answer_token_ids: torch.Tensor, batch_size: int,
                    device: torch.device, dtype: str, limit: int = 0) -> dict:
    """Accuracy of the argmax over the answer tokens, and how often each answer was given.

    limit > 0 evaluates the first `limit` examples only (a prefix of the test set is stratified)."""
    was_training = model.training
    model.eval()
    predictions = []
    n = min(limit, len(split)) if limit > 0 else len(split)
    for start in range(0, n, batch_size):
        indices = torch.arange(start, min(start + batch_size, n))
        batch = {key: value.to(device) for key, value in split.batch(indices).items()}
        with autocast(device, dtype):
            logits = answer_logits(model, batch)
        predictions.append(logits[:, answer_token_ids.to(device)].argmax(-1).cpu())
    model.train(was_training)
    predicted = torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)
    correct = (predicted == split.digits[:n]).sum().item()
    return {"accuracy": correct / max(1, n), "n": n,
            "answer_counts": torch.bincount(predicted, minlength=len(answer_token_ids)).tolist()}


def accuracy_problem(result, n: int, answers: int) -> str | None:
    """What is wrong with a stored target_accuracy result for a test set of n examples and `answers`
    answer tokens (a base-score cache entry), or None."""
    if not isinstance(result, dict) or set(result) != {"accuracy", "n", "answer_counts"}:
        return f"not an accuracy record (keys {sorted(result) if isinstance(result, dict) else type(result).__name__})"
    counts = result["answer_counts"]
    if result["n"] != n or not isinstance(counts, list) or len(counts) != answers or sum(counts) != n:
        return f"measured on {result['n']} examples with {len(counts) if isinstance(counts, list) else '?'} answers"
    if not isinstance(result["accuracy"], (int, float)) or not 0 <= result["accuracy"] <= 1:
        return f"accuracy {result['accuracy']!r} is not in [0, 1]"
    return None
