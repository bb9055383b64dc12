"""The training loop: AdamW, warmup + decay, accumulation, clipping, validation, checkpoint/resume.

Data order is a function of (seed, step) only: an endless stream of per-epoch permutations, cut
into micro-batches. A checkpoint therefore needs just the step, the trainable tensors, the
optimizer and scheduler states and the RNG states; a resumed run replays the same batches and
ends with a bit-identical adapter.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from rigsa import checkpoints
from rigsa.adapters import HEAD_NAME
from rigsa.early_stopping import EarlyStopping, best_path
from rigsa.evaluate import autocast, target_accuracy
from rigsa.memory import training_bytes

log = logging.getLogger(__name__)
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
# A gradient norm of exactly zero this many steps in a row means nothing is learning (e.g. a saturated
# softmax after a too-large lr): warn once, since the loss alone looks merely flat.
ZERO_GRADIENT_STEPS = 10


class TrainingDiverged(RuntimeError):
    """The loss or the gradients stopped being finite (train.on_nonfinite=stop)."""


@dataclass
class TrainResult:
    steps: int
    seconds: float
    tokens: int
    final_loss: float
    resumed_from: int = 0
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0  # updates dropped for a non-finite loss or gradient (train.on_nonfinite=skip_step)
    memory: dict = field(default_factory=dict)  # gradient_bytes, optimizer_state_bytes (rigsa.memory.training_bytes)
    early_stopping: dict | None = None  # best step and validation loss, where it stopped (train.early_stopping)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def steps_per_epoch(train_cfg: DictConfig, train_size: int) -> int:
    """Optimizer steps in one pass over the training set."""
    return math.ceil(train_size / (train_cfg.batch_size * train_cfg.grad_accum))


def total_steps(train_cfg: DictConfig, train_size: int) -> int:
    """Optimizer steps: train.max_steps when > 0, else train.epochs passes over the training set."""
    if train_cfg.max_steps > 0:
        return int(train_cfg.max_steps)
    return max(1, math.ceil(train_cfg.epochs * steps_per_epoch(train_cfg, train_size)))


def micro_batch_indices(size: int, batch_size: int, seed: int, micro_step: int) -> torch.Tensor:
    """Indices of micro-batch `micro_step` in the stream of per-epoch permutations (seeded by seed, epoch)."""
    start = micro_step * batch_size
    chunks, position = [], start
    while position < start + batch_size:
        epoch, offset = divmod(position, size)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        permutation = torch.randperm(size, generator=generator)
        take = min(size - offset, start + batch_size - position)
        chunks.append(permutation[offset:offset + take])
        position += take
    return torch.cat(chunks)


def trained_parameters_by_name(model: nn.Module, method, readout) -> dict[str, nn.Parameter]:
    """The method's trainable parameters (`trainable_parameters()`), named as in the model, and the readout's
    classification head (HEAD_NAME): the checkpoint keys."""
    trainable = {id(parameter) for parameter in method.trainable_parameters()}
    named = {name: parameter for name, parameter in model.named_parameters() if id(parameter) in trainable}
    if len(named) != len(trainable):
        raise RuntimeError(f"{method.name}: {len(trainable) - len(named)} trainable parameters are not in the model")
    head = readout.trainable_parameters()
    return {**named, **({HEAD_NAME: head[0]} if head else {})}


def train(model: nn.Module, method, data, train_cfg: DictConfig, *, readout, seed: int, device: torch.device,
          dtype: str,
          checkpoint_path: Path, log_metrics: Callable[[dict, int], None], eval_batch_size: int,
          steps: int | None = None, step_offset: int = 0, desc: str = "train",
          on_validation: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train the method's parameters (and the readout's head, if any) on data.train with the readout's loss;
    checkpoint to `checkpoint_path`; resume from it.

    `method` (rigsa.methods.Method) gives the AdamW parameter groups and `after_step(global_step,
    optimizer, batch, steps_per_epoch) -> metrics`, run after every optimizer step (SNIP re-selection).
    `steps` defaults to the train config's budget; `step_offset` numbers the steps of a later phase
    after the earlier ones (logging and data order continue). Every `train.eval_every` steps the validation
    accuracy and loss are logged and the loss is given to `on_validation(global step, loss)` (a tuned search's
    pruner, which may raise to stop the trial) and to early stopping (`train.early_stopping`)."""
    steps = total_steps(train_cfg, len(data.train)) if steps is None else steps
    parameters = trained_parameters_by_name(model, method, readout)
    groups = method.param_groups(train_cfg.weight_decay)
    if readout.trainable_parameters():  # SpaRTA trains the head densely beside every method, at train.weight_decay
        groups = [*groups, {"params": readout.trainable_parameters(), "weight_decay": train_cfg.weight_decay}]
    optimizer = torch.optim.AdamW([group for group in groups if group["params"]], lr=train_cfg.lr)
    scheduler = get_scheduler(SCHEDULES[train_cfg.lr_schedule], optimizer,
                              num_warmup_steps=min(train_cfg.warmup_steps, steps), num_training_steps=steps)
    # float16's range overflows in the backward pass without loss scaling; bfloat16 and float32 need none (disabled,
    # the scaler passes everything through unchanged)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
    epoch_steps = steps_per_epoch(train_cfg, len(data.train))
    start, tokens_before, seconds_before, loss_value, skipped = 0, 0, 0.0, float("nan"), 0
    stopper = EarlyStopping(train_cfg.early_stopping, best_path(checkpoint_path)) if train_cfg.early_stopping else None
    if checkpoint_path.exists():
        state = checkpoints.load(checkpoint_path, parameters, optimizer, scheduler, model)
        start, tokens_before, seconds_before = state["step"], state["tokens"], state["seconds"]
        loss_value, skipped = state["loss"], state["skipped_steps"]
        if stopper is not None and state.get("early_stopping"):
            stopper.restore_state(state["early_stopping"])
        if scaler.is_enabled() and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        log.info("resumed from %s at step %d/%d", checkpoint_path, start, steps)
    model.train()
    tokens, losses, zero_gradient_run = tokens_before, [], 0
    clock = time.perf_counter()
    progress = tqdm(total=steps, initial=start, desc=desc, dynamic_ncols=True, mininterval=1.0)
    first = start if stopper is None or stopper.stopped_at is None else steps  # a run that stopped early stays stopped
    for step in range(first, steps):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(train_cfg.grad_accum):
            micro_step = (step_offset + step) * train_cfg.grad_accum + micro
            indices = micro_batch_indices(len(data.train), train_cfg.batch_size, seed, micro_step)
            batch = {key: value.to(device) for key, value in data.train.batch(indices).items()}
            with autocast(device, dtype):
                loss = readout.loss(model, batch) / train_cfg.grad_accum
            scaler.scale(loss).backward()
            step_loss += loss.item()
            tokens += int(batch["attention_mask"].sum())
        scaler.unscale_(optimizer)  # the true gradients, for the norm and the clipping
        grad_norm = gradient_norm(parameters, train_cfg.max_grad_norm)
        done = step + 1
        finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
        # float16: gradients that overflowed at this loss scale are the scaler's to handle (skip, lower the scale)
        overflowed = scaler.is_enabled() and math.isfinite(step_loss) and not finite
        if not finite and not overflowed and train_cfg.on_nonfinite == "stop":
            raise diverged(step_offset + done, step_loss, grad_norm, loss_value, train_cfg, checkpoint_path)
        if finite:
            scaler.step(optimizer)
            loss_value = step_loss
        elif overflowed:
            skipped += 1
            log.info("step %d: float16 gradients overflowed at loss scale %g: update skipped, scale lowered",
                     step_offset + done, scaler.get_scale())
        else:  # skip_step: drop this update, as a mixed-precision trainer drops an overflowed one
            skipped += 1
            log.warning("step %d: loss %s, gradient norm %s: update skipped (%d so far)", step_offset + done,
                        step_loss, grad_norm, skipped)
        scaler.update()
        with warnings.catch_warnings():
            # a skipped update (a float16 overflow, skip_step) still advances the schedule, on purpose; torch warns
            # once when that happens before any optimizer step, which a user can do nothing about
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            scheduler.step()
        zero_gradient_run = zero_gradient_run + 1 if grad_norm == 0 else 0
        if zero_gradient_run == ZERO_GRADIENT_STEPS:
            warnings.warn(f"rigsa: the gradient norm has been exactly 0 for {ZERO_GRADIENT_STEPS} steps (to step "
                          f"{step_offset + done}, loss {step_loss:.4f}): nothing is learning. Try a lower train.lr "
                          f"(now {train_cfg.lr:g}).", stacklevel=2)
        extra = method.after_step(step_offset + step + 1, optimizer, batch, epoch_steps)
        losses.append(step_loss)
        seconds = seconds_before + time.perf_counter() - clock
        metrics = {"train/loss": step_loss, "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": grad_norm,
                   "train/tokens_per_second": tokens / seconds if seconds else 0.0, **extra}
        if skipped:
            metrics["train/skipped_steps"] = skipped
        stop = False
        if train_cfg.eval_every and done % train_cfg.eval_every == 0 and len(data.val):
            val = target_accuracy(model, data.val, readout, eval_batch_size, device, dtype, with_loss=True)
            metrics["val/accuracy"], metrics["val/loss"] = val["accuracy"], val["loss"]
            model.train()
            if on_validation is not None:
                on_validation(step_offset + done, metrics["val/loss"])
            if stopper is not None:
                stop = stopper.observe(step_offset + done, metrics["val/loss"], lambda path: checkpoints.save(
                    path, done, parameters, optimizer, scheduler, model, {"global_step": step_offset + done}))
        log_metrics(metrics, step_offset + done)
        progress.set_postfix(loss=f"{loss_value:.3f}", lr=f"{metrics['train/lr']:.2e}",
                             tok_s=f"{metrics['train/tokens_per_second']:.0f}", refresh=False)
        progress.update(1)
        if (train_cfg.checkpoint_every and done % train_cfg.checkpoint_every == 0) or done == steps or stop:
            if not all(bool(torch.isfinite(parameter).all()) for parameter in parameters.values()):
                raise diverged(step_offset + done, step_loss, grad_norm, loss_value, train_cfg, checkpoint_path,
                               "the trained values became non-finite")
            checkpoints.save(checkpoint_path, done, parameters, optimizer, scheduler, model,
                             {"tokens": tokens, "seconds": seconds_before + time.perf_counter() - clock,
                              "global_step": step_offset + done, "loss": loss_value, "skipped_steps": skipped,
                              "scaler": scaler.state_dict(),
                              **({"early_stopping": stopper.state()} if stopper is not None else {})})
        if stop:
            log.info("early stopping at step %d: no lower validation loss for %d validations; restoring step %d "
                     "(validation loss %.4f)", step_offset + done, stopper.patience, stopper.best_step,
                     stopper.best_loss)
            break
    progress.close()
    seconds = seconds_before + time.perf_counter() - clock
    trained = steps
    if stopper is not None:
        if stopper.best_step:  # the best step's tensors and positions (its optimizer state too: training is over)
            checkpoints.load(stopper.best_path, parameters, optimizer, scheduler, model)
        if stopper.stopped_at is not None:
            trained = stopper.stopped_at - step_offset
    return TrainResult(steps=trained, seconds=seconds, tokens=tokens, final_loss=loss_value, resumed_from=start,
                       losses=losses, skipped_steps=skipped, memory=training_bytes(parameters.values(), optimizer),
                       early_stopping=stopper.summary() if stopper is not None else None)


def gradient_norm(parameters: dict[str, nn.Parameter], max_norm: float) -> float:
    """The total gradient norm, before clipping to max_norm (when > 0); a non-finite norm clips nothing."""
    gradients = [p.grad for p in parameters.values() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(gradients)
    if max_norm > 0 and torch.isfinite(norm):
        torch.nn.utils.clip_grads_with_norm_(list(parameters.values()), max_norm, norm)
    return norm.item()


def diverged(step: int, loss: float, grad_norm: float, last_finite: float, train_cfg: DictConfig,
             checkpoint_path: Path, what: str = "") -> TrainingDiverged:
    saved = (f"the last good checkpoint {checkpoint_path} stays" if checkpoint_path.exists()
             else "no checkpoint was written")
    return TrainingDiverged(
        f"training diverged at step {step}: {what or f'loss {loss}, gradient norm {grad_norm}'} (last finite loss "
        f"{last_finite:.4f}). Nothing was saved as the adapter or results; {saved}. Try a lower train.lr (now "
        f"{train_cfg.lr:g}), dtype=float32, or train.on_nonfinite=skip_step to drop such updates.")
