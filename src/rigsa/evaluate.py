"""Target-task metrics: the forward pass at the answer position, and the scores of a readout's predictions.

Every task is a classification read at the last prompt position (prompts are left-padded), measured
the same way for the base and the adapted model. A readout (rigsa.readout) turns that position into
one score per class; the prediction is the argmax over the classes.
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


def forward_last(model: nn.Module, batch: dict[str, torch.Tensor], hidden: bool = False):
    """The model's output at the last prompt position: position ids count the real tokens of each left-padded
    row (0 at its first token), so a padded prompt is computed as if it stood alone."""
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, logits_to_keep=1,
                 output_hidden_states=hidden)


def answer_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [B, vocab] at the last prompt position."""
    return forward_last(model, batch).logits[:, -1, :].float()


@torch.no_grad()
def predict(model: nn.Module, split, readout, batch_size: int, device: torch.device, dtype: str,
            limit: int = 0, losses: list | None = None) -> torch.Tensor:
    """The readout's predicted class of the first `limit` examples (all when limit is 0); given a list `losses`,
    each batch's summed loss is appended to it, from the same forward pass."""
    was_training = model.training
    model.eval()
    predictions = []
    n = min(limit, len(split)) if limit > 0 else len(split)
    for start in range(0, n, batch_size):
        indices = torch.arange(start, min(start + batch_size, n))
        batch = {key: value.to(device) for key, value in split.batch(indices).items()}
        with autocast(device, dtype):
            if losses is None:
                scores = readout.scores(model, batch)
            else:
                scores, loss = readout.scores_and_loss(model, batch)
                losses.append(float(loss) * len(indices))
        predictions.append(scores.argmax(-1).cpu())
    model.train(was_training)
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)


def classification_metrics(predicted: torch.Tensor, classes: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy; for more than two classes also macro-F1 and the confusion matrix; for two classes F1 of class 1
    (GLUE's positive class: equivalent, duplicate, ...) and the Matthews correlation (CoLA's metric), both 0.0 where
    undefined (no positive prediction or a constant one)."""
    metrics = {"accuracy": int((predicted == classes).sum()) / len(classes) if len(classes) else 0.0}
    if num_classes > 2:  # macro-F1 (each class's F1, 0 where undefined, averaged) and the confusion matrix
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
        confusion.index_put_((classes.long(), predicted.long()), torch.ones(len(classes), dtype=torch.long),
                             accumulate=True)
        true_positive = confusion.diag()
        denominator = confusion.sum(0) + confusion.sum(1)  # predicted + actual = 2tp + fp + fn
        f1 = torch.where(true_positive > 0, 2 * true_positive / denominator.clamp(min=1), torch.zeros(()))
        metrics["macro_f1"] = float(f1.double().mean())
        metrics["confusion"] = confusion.tolist()  # rows: the true class; columns: the answered class
    if num_classes == 2:
        tp = int(((predicted == 1) & (classes == 1)).sum())
        fp = int(((predicted == 1) & (classes == 0)).sum())
        fn = int(((predicted == 0) & (classes == 1)).sum())
        tn = int(((predicted == 0) & (classes == 0)).sum())
        metrics["f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        denominator = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
        metrics["mcc"] = (tp * tn - fp * fn) / denominator if denominator else 0.0
    return metrics


def target_accuracy(model: nn.Module, split, readout, batch_size: int, device: torch.device, dtype: str,
                    limit: int = 0, with_loss: bool = False) -> dict:
    """Accuracy (and F1/MCC for two classes) of the readout's argmax, and how often each class was answered; with
    `with_loss`, also the readout's training loss averaged over the examples (a validation loss).

    limit > 0 evaluates the first `limit` examples only (a prefix of Textual MNIST's test set is stratified)."""
    losses = [] if with_loss else None
    predicted = predict(model, split, readout, batch_size, device, dtype, limit, losses)
    n = len(predicted)
    metrics = classification_metrics(predicted, split.classes[:n], readout.num_classes)
    result = {"accuracy": metrics["accuracy"], "n": n, "metrics": metrics,
              "answer_counts": torch.bincount(predicted, minlength=readout.num_classes).tolist()}
    if with_loss:
        result["loss"] = sum(losses) / n if n else float("nan")
    return result


def accuracy_problem(result, n: int, answers: int) -> str | None:
    """What is wrong with a stored target_accuracy result for a test set of n examples and `answers`
    classes (a base-score cache entry), or None."""
    if not isinstance(result, dict) or set(result) - {"loss"} != {"accuracy", "n", "answer_counts", "metrics"}:
        return f"not an accuracy record (keys {sorted(result) if isinstance(result, dict) else type(result).__name__})"
    counts = result["answer_counts"]
    if result["n"] != n or not isinstance(counts, list) or len(counts) != answers or sum(counts) != n:
        return f"measured on {result['n']} examples with {len(counts) if isinstance(counts, list) else '?'} answers"
    if not isinstance(result["accuracy"], (int, float)) or not 0 <= result["accuracy"] <= 1:
        return f"accuracy {result['accuracy']!r} is not in [0, 1]"
    if not isinstance(result["metrics"], dict) or result["metrics"].get("accuracy") != result["accuracy"]:
        return "its metrics do not hold its accuracy"
    return None
