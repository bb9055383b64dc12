"""Early stopping on the validation loss (`train.early_stopping` = patience, counted in validations, one every
`train.eval_every` steps), as SpaRTA trains every method (seed 001, Tables 12-13).

When the validation loss improves, the step's checkpoint is also written beside the phase's own
(`checkpoint/<phase>.best`: trainable tensors and moving positions, as any checkpoint). After `patience`
validations in a row without a lower loss, training stops; at the end (stopped or at train.max_steps) the best
checkpoint is restored, so the adapter saved, measured and reported is the best step's. The stopper's state rides
in the phase checkpoint, so a resumed run stops, and restores, exactly where an uninterrupted one does.

A pruning schedule (RIGSA's phases) is refused with it (rigsa.validate): each phase ends in a prune of the values
it trained, so "the best step" of a phase would be undone by the prune that follows it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable


@dataclass
class EarlyStopping:
    patience: int
    best_path: Path
    best_loss: float = math.inf
    best_step: int = 0  # the global step of the best validation loss (0: none yet)
    since_best: int = 0  # validations since it
    stopped_at: int | None = None  # the global step training stopped at, when it stopped early

    def state(self) -> dict:
        """Plain data for the phase checkpoint."""
        return {key: value for key, value in asdict(self).items() if key != "best_path"}

    def restore_state(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def observe(self, step: int, loss: float, save_best: Callable[[Path], None]) -> bool:
        """Take the validation loss at global `step`; write the best checkpoint when it improves; True to stop."""
        if loss < self.best_loss:
            self.best_loss, self.best_step, self.since_best = loss, step, 0
            save_best(self.best_path)
        else:
            self.since_best += 1
        if self.since_best >= self.patience:
            self.stopped_at = step
            return True
        return False

    def summary(self) -> dict:
        return {"patience": self.patience, "best_step": self.best_step, "best_val_loss": self.best_loss,
                "stopped_at": self.stopped_at}


def best_path(checkpoint_path: Path) -> Path:
    """Where the phase's best checkpoint is kept: not a `*.pt` file, so resume_step reads the phase's own."""
    return checkpoint_path.with_suffix(".best")
