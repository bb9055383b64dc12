"""The run folder `run.root/run.name`: what it holds, who may write it, and what a failed run leaves.

- `inspect` reads the folder and writes nothing: a refused rerun (another config over finished
  work) or a rerun of a finished run touches no file.
- `claimed` holds an exclusive lock on `<run dir>/.lock` for the life of a run. The OS releases it
  when the process ends, kill -9 included, so a lock is never stale; a second run on the folder
  stops at once, naming the PID that holds it.
- `kept_until_first_checkpoint`: a run that fails before writing its first checkpoint removes what
  it wrote, so the folder is as it was and a corrected command is not refused.
A config.yaml binds a rerun only when the folder holds work (a checkpoint or results.json).
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
from contextlib import contextmanager, suppress
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rigsa.cache import UnreadableFile
from rigsa.vocabulary import ConfigError, environment_fault

log = logging.getLogger(__name__)
# Keys that may change between a run and its resumption without changing what is computed.
# optuna_trial says where a run reports its validation losses, not what it computes; run.root is where the folder
# is (runs/x and ./runs/x are one folder, and a folder moved to another disk is still its run)
RESUMABLE_KEYS = ("logger", "train.threads", "threads", "eval.batch_size", "run.overwrite", "report", "objective",
                  "optuna_trial", "run.root")
LOCK_FILE = ".lock"
RUN_FILES = ("checkpoint", "adapter", "metrics.jsonl", "results.json", "wandb_id.txt", "wandb", "error.json")


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock."""


# Keys added to the config after runs were written without them, with the value every earlier run had in effect:
# a folder written before the key existed matches a config that holds that value (it resumes, or counts as done).
# Each: (the value in effect before the key existed, a key beside it that a node must hold to get it, or None).
# task.max_test_size belongs to the text-classification family, whose nodes hold max_train_size.
ADDED_KEYS = {"model.base_dtype": ("float32", None), "model.quantize": (None, None),
              "task.max_test_size": (0, "max_train_size"), "train.early_stopping": (0, None),
              "eval.split": ("test", None), "task.encoding": ("utf-8", "max_train_size")}
# LoRA's 4-bit settings before method=qlora became LoRA with model.quantize (their value then moved there).
MOVED_LORA_KEYS = ("load_in_4bit", "quant_type", "compute_dtype")


def upgraded(tree: dict) -> dict:
    """A saved config tree in today's form: LoRA's old `method.load_in_4bit` / `quant_type` / `compute_dtype` become
    model.quantize (compute_dtype was the run's dtype), then every ADDED_KEYS key it lacks is set to the value in
    effect before it existed."""
    method, model = tree.get("method"), tree.get("model")
    if isinstance(method, dict) and isinstance(model, dict) and "load_in_4bit" in method:
        load_in_4bit, quant_type, _ = (method.pop(key, None) for key in MOVED_LORA_KEYS)
        if load_in_4bit:  # model.quantize, when the folder has it, is null then: LoRA with it was refused
            model["quantize"] = quant_type
    for key, (value, beside) in ADDED_KEYS.items():
        *parents, leaf = key.split(".")
        node = tree
        for parent in parents:
            node = node.get(parent)
            if not isinstance(node, dict):
                break
        else:
            if beside is None or beside in node:
                node.setdefault(leaf, value)
    return tree


def same_spelling(value):
    """A path written several ways as one string: an existing file or folder by its real absolute path (`data/x.csv`
    from the run's folder, `./data/x.csv`, `/home/me/proj/data/x.csv`, a link to it), any other path-like string
    normalized (`a//b/./c` is `a/b/c`, `~` expanded); a hub id like `nyu-mll/glue` and other values as they are."""
    if isinstance(value, dict):
        return {key: same_spelling(item) for key, item in value.items()}
    if isinstance(value, list):
        return [same_spelling(item) for item in value]
    if isinstance(value, str) and ("/" in value or value.startswith("~")) and "://" not in value:
        path = os.path.expanduser(value)
        return os.path.realpath(path) if os.path.exists(path) else os.path.normpath(path)
    return value


def _comparable(cfg: DictConfig) -> dict:
    tree = same_spelling(upgraded(OmegaConf.to_container(cfg, resolve=True)))
    for key in RESUMABLE_KEYS:
        *parents, leaf = key.split(".")
        node = tree
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    return tree


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return found


def holds_config(cfg: DictConfig, run_dir: Path) -> bool:
    """The folder's config.yaml is readable and is `cfg` (but the RESUMABLE_KEYS)."""
    try:
        old = OmegaConf.load(run_dir / "config.yaml")
        return isinstance(old, DictConfig) and not _differences(_comparable(old), _comparable(cfg))
    except Exception:  # absent or unreadable: not this config
        return False


def has_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / "checkpoint").glob("*.pt"))


def inspect(cfg: DictConfig, run_dir: Path) -> str:
    """'fresh', 'resume', 'complete' or 'overwrite' (run.overwrite=true over another config's work).
    Raises ConfigError when the folder holds another config's work and run.overwrite is false."""
    config_path = run_dir / "config.yaml"
    has_work = has_checkpoint(run_dir) or (run_dir / "results.json").exists()
    if not config_path.exists():
        if has_work:
            raise UnreadableFile(config_path, "missing, though the folder holds a run's checkpoints or results",
                                 "pass run.overwrite=true to discard that run, or run.name=<new name>")
        return "fresh"
    try:
        old = OmegaConf.to_container(OmegaConf.load(config_path))
        if not isinstance(old, dict):
            raise ValueError(f"a {type(old).__name__}, not a mapping")
    except Exception as error:
        if not has_work:
            return "fresh"  # nothing to keep: the new config replaces it
        if cfg.run.overwrite:
            return "overwrite"
        raise UnreadableFile(config_path, f"not a readable config ({type(error).__name__})",
                             "pass run.overwrite=true to discard that run, or run.name=<new name>") from None
    differences = _differences(_comparable(OmegaConf.create(old)), _comparable(cfg))
    if differences and has_work:
        if not cfg.run.overwrite:
            raise ConfigError(
                f"run directory {run_dir} holds a run with a different config ({'; '.join(differences[:5])}). "
                f"Fix: pass run.name=<new name> for a new run, or run.overwrite=true to discard the old one.")
        return "overwrite"
    if differences:
        return "fresh"
    if (run_dir / "results.json").exists():
        return "complete"
    return "resume" if has_checkpoint(run_dir) else "fresh"


def read_results(run_dir: Path) -> dict:
    path = run_dir / "results.json"
    try:
        results = json.loads(path.read_text())
        if not isinstance(results, dict) or "target" not in results:
            raise ValueError("not a results object")
        return results
    except (ValueError, UnicodeDecodeError) as error:
        raise UnreadableFile(path, f"not a readable results.json ({type(error).__name__}: {str(error)[:80]})",
                             "delete it and rerun the same command (the final checkpoint replays the training "
                             "without retraining), or pass run.overwrite=true") from None


def start(cfg: DictConfig, run_dir: Path, status: str) -> None:
    """Write config.yaml (after discarding another config's work for status 'overwrite')."""
    if status == "overwrite":
        log.warning("run.overwrite=true: discarding the previous run in %s", run_dir)
        for name in RUN_FILES:
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    from rigsa.cache import write_text_atomically

    write_text_atomically(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


@contextmanager
def claimed(run_dir: Path):
    """Hold the run folder's exclusive lock (creating the folder) for the body's duration."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = os.pread(handle, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(handle)
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise RunFolderBusy(f"run directory {run_dir} is in use by another rigsa-run (PID {holder}). Fix: wait for "
                            "it to finish, or pass run.name=<another name>") from None
    try:
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(handle)  # releases the lock


def contents(run_dir: Path) -> set[str]:
    return set(os.listdir(run_dir)) if run_dir.is_dir() else set()


@contextmanager
def kept_until_first_checkpoint(run_dir: Path, before: set[str]):
    """On a failure before any checkpoint exists, remove what was added to the folder since it held
    `before` (the folder too, when it held nothing): nothing was trained, and a corrected rerun must
    not be refused. Used inside `claimed`, so no other run is writing."""
    try:
        yield
    except BaseException:
        if not has_checkpoint(run_dir):
            for name in contents(run_dir) - before - {LOCK_FILE}:
                target = run_dir / name
                shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink(missing_ok=True)
            if not before and contents(run_dir) <= {LOCK_FILE}:
                shutil.rmtree(run_dir, ignore_errors=True)
        raise


def check_writable(root: Path) -> None:
    """run.root can take files: created when missing, a small probe file written and removed. A full disk, a
    read-only or forbidden folder raises EnvironmentFault naming it (before any model loads)."""
    probe = Path(root) / f".rigsa-write-probe-{os.getpid()}"
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as error:
        with suppress(OSError):
            probe.unlink(missing_ok=True)
        fault = environment_fault(error, str(root))
        if fault is None:
            raise
        raise fault from None
