"""Checkpoints and resumption, in one place.

Each training phase checkpoints to `<run dir>/checkpoint/<phase>.pt`: the step within the phase,
the global step, the trainable tensors, the optimizer and scheduler states, the RNG states, the
tokens and seconds so far and the last loss. A rerun of the same command resumes every phase from
its checkpoint (a finished phase is replayed from its final one), and metrics.jsonl is cut back to
the latest global step any checkpoint holds (`resume_step`), so the lines after it are logged again.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rigsa.cache import replace_atomically


def phase_path(run_dir: Path, phase: str) -> Path:
    return Path(run_dir) / "checkpoint" / f"{phase}.pt"


def _read(path: Path, mmap: bool = False) -> dict:
    # mmap=True maps the tensors instead of reading them: resume_step needs only the step numbers
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)


def resume_step(run_dir: Path) -> int:
    """The latest global step any phase's checkpoint holds (0 for a fresh run)."""
    return max((_read(path, mmap=True)["global_step"] for path in (Path(run_dir) / "checkpoint").glob("*.pt")), default=0)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save(path: Path, step: int, named: dict[str, nn.Parameter], optimizer, scheduler, progress: dict) -> None:
    """Write the checkpoint atomically: a crash mid-write leaves the previous one intact.

    `progress`: global_step, tokens, seconds and the last loss, restored with the tensors."""
    state = {"step": step, "trainable": {name: p.detach().clone() for name, p in named.items()},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(), **progress}
    replace_atomically(path, lambda temporary: torch.save(state, temporary))


def load(path: Path, named: dict[str, nn.Parameter], optimizer, scheduler) -> dict:
    """Restore tensors, optimizer, scheduler and RNG states from `path`; return the checkpoint's progress."""
    state = _read(path)
    missing = set(named) ^ set(state["trainable"])
    if missing:
        raise RuntimeError(f"checkpoint {path} does not match the adapter (differs in {sorted(missing)[:5]}): "
                           "delete the run directory or pass run.overwrite=true")
    with torch.no_grad():
        for name, parameter in named.items():
            parameter.copy_(state["trainable"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state
