"""Target-task metrics, and the on-disk cache of the base model's scores.

Textual MNIST accuracy is the argmax over the ten digit tokens' logits at the answer position
(the last prompt position), measured the same way for the base and the adapted model.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from typing import Callable

import torch
from torch import nn

from rigsa.assets import cache_root

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # bump when the way a metric is computed changes


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


def cached(kind: str, key_parts: dict, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """Return (result, was_cached): `compute()` once per key, then read from $RIGSA_CACHE/<kind>/."""
    key = hashlib.sha256(json.dumps({**key_parts, "cache_version": CACHE_VERSION}, sort_keys=True).encode()).hexdigest()
    path = cache_root() / kind / f"{key}.json"
    if path.exists():
        log.info("base %s: cache hit (%s)", kind, path)
        return json.loads(path.read_text())["result"], True
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key_parts, "result": result}, indent=2))
    tmp.replace(path)
    return result, False
