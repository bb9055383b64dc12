"""Pruning schedules: the training phases of a run and the prune step after each.

`none`: one phase over the whole training budget. `imp` (RIGSA): `iterations` phases, each
followed by a prune that keeps `keep_fraction` of the live entries, then a final retrain phase.
With the defaults (5 iterations x 0.5) the final density is 0.5**5 = 3.125% of the targeted
weights, our reading of the paper's reported ~3.46% final density (which no whole number of
halvings gives exactly; 0.5**5 is the closest).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig

from rigsa.methods import PruneStep
from rigsa.train import steps_per_epoch, total_steps


@dataclass
class Phase:
    name: str
    steps: int
    prune: PruneStep | None  # applied after the phase's training


def _steps(steps: int, epochs: float, train_cfg: DictConfig, train_size: int) -> int:
    if steps > 0:
        return int(steps)
    return max(1, math.ceil(epochs * steps_per_epoch(train_cfg, train_size)))


def phases(pruning: DictConfig, train_cfg: DictConfig, train_size: int) -> list[Phase]:
    if pruning.name == "none":
        return [Phase("train", total_steps(train_cfg, train_size), None)]
    if pruning.name != "imp":
        raise ValueError(f"pruning={pruning.name!r}: expected none or imp")
    result = []
    for iteration in range(1, pruning.iterations + 1):
        step = PruneStep(iteration, pruning.keep_fraction, pruning.sign_constraint, pruning.pruned_value, pruning.rewind)
        result.append(Phase(f"iteration{iteration}",
                            _steps(pruning.steps_per_iteration, pruning.epochs_per_iteration, train_cfg, train_size), step))
    final = _steps(pruning.final_retrain_steps, pruning.final_retrain_epochs, train_cfg, train_size)
    if final > 0 and (pruning.final_retrain_steps > 0 or pruning.final_retrain_epochs > 0):
        result.append(Phase("final_retrain", final, None))
    return result
