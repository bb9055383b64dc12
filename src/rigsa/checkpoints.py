"""Checkpoints and resumption, in one place.

Each training phase checkpoints to `<run dir>/checkpoint/<phase>.pt`: the step within the phase,
the global step, the trainable tensors, the sparse layers' positions (SNIP re-selection moves
them), the optimizer and scheduler states, the RNG states, the tokens and seconds so far, the last
loss and the skipped-update count. A rerun of the same command resumes every phase from its
checkpoint (a finished phase is replayed from its final one), and metrics.jsonl is cut back to the
latest global step any checkpoint holds (`resume_step`), so the lines after it are logged again.

A checkpoint holds tensors and plain data only and is read with `weights_only=True`: a file placed
in the run folder cannot run code when a run resumes.
"""
from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rigsa.adapter_layer import adapter_layers
from rigsa.cache import UnreadableFile, replace_atomically

FORMAT = "rigsa-checkpoint-v2"
FIX = "delete it to retrain that phase from its start, or pass run.overwrite=true to start the run again"


def phase_path(run_dir: Path, phase: str) -> Path:
    return Path(run_dir) / "checkpoint" / f"{phase}.pt"


def _read(path: Path, mmap: bool = False) -> dict:
    # mmap=True maps the tensors instead of reading them: resume_step needs only the step numbers
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        fault = ("it holds objects other than tensors and plain data, refused because loading it could run code"
                 if "weights_only" in str(error).lower() or "unsupported global" in str(error).lower()
                 else f"not a readable checkpoint ({first_line(error)})")
        raise UnreadableFile(path, fault, FIX) from None
    except Exception as error:  # truncated, garbage, not a zip archive
        raise UnreadableFile(path, f"not a readable checkpoint ({type(error).__name__}: {first_line(error)})",
                             FIX) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise UnreadableFile(path, f"not a {FORMAT} checkpoint (found {found!r})", FIX)
    return state


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:120] if text else ""


def resume_step(run_dir: Path) -> int:
    """The latest global step any phase's checkpoint holds (0 for a fresh run)."""
    paths = (Path(run_dir) / "checkpoint").glob("*.pt")
    return max((_read(path, mmap=True)["global_step"] for path in paths), default=0)


def rng_state() -> dict:
    """The RNG states as tensors and plain data (NumPy's key array becomes a tensor)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))


def save(path: Path, step: int, named: dict[str, nn.Parameter], optimizer, scheduler, model: nn.Module,
         progress: dict) -> None:
    """Write the checkpoint atomically: a crash mid-write leaves the previous one intact.

    `progress`: global_step, tokens, seconds, the last loss and skipped_steps, restored with the tensors."""
    state = {"format": FORMAT, "step": step, "trainable": {name: p.detach().clone() for name, p in named.items()},
             "sparse_indices": moving_positions(model),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(), **progress}
    replace_atomically(path, lambda temporary: torch.save(state, temporary))


def moving_positions(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each adapter layer's positions that training can move (the engine's indices: SNIP re-selection), copied; kept
    under the checkpoint key `sparse_indices`, which checkpoints written before adapter layers described themselves
    use too."""
    return {name: layer.positions().clone() for name, layer in adapter_layers(model).items()
            if layer.positions() is not None}


def load(path: Path, named: dict[str, nn.Parameter], optimizer, scheduler, model: nn.Module) -> dict:
    """Restore positions, tensors, optimizer, scheduler and RNG states from `path`; return the checkpoint's
    progress. A sparse layer whose positions were re-selected before the checkpoint moves to them first."""
    state = _read(path)
    positions = moving_positions(model)
    saved_indices = state["sparse_indices"]
    differs = (set(named) ^ set(state["trainable"])) | (set(positions) ^ set(saved_indices))
    differs |= {name for name, where in positions.items() if name in saved_indices
                and saved_indices[name].numel() != where.numel()}
    if differs:
        raise UnreadableFile(path, f"it does not match this run's adapter (differs in {sorted(differs)[:5]})", FIX)
    layers = adapter_layers(model)
    with torch.no_grad():
        for name in positions:
            layers[name].move_to(saved_indices[name])
        for name, parameter in named.items():
            parameter.copy_(state["trainable"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state
