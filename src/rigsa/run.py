"""run(cfg) -> results: one experiment, from config to results.json, as one readable function."""
from __future__ import annotations

import json
import logging
import resource
import shutil
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rigsa import models
from rigsa.config import ConfigError, validate
from rigsa.evaluate import cached, target_accuracy
from rigsa.methods import trainable_named
from rigsa.tasks import build_task
from rigsa.tracking import Tracker
from rigsa.train import train

log = logging.getLogger(__name__)
# Keys that may change between a run and its resumption without changing what is computed.
RESUMABLE_KEYS = ("logger", "train.threads", "eval.batch_size", "run.overwrite")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _comparable(cfg: DictConfig) -> dict:
    tree = OmegaConf.to_container(cfg, resolve=True)
    for key in RESUMABLE_KEYS:
        *parents, leaf = key.split(".")
        node = tree
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    return tree


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    found = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return found


def prepare_run_dir(cfg: DictConfig, run_dir: Path) -> str:
    """Create or reuse the run directory; return 'fresh', 'resume' or 'complete'.

    A directory holding a different config is never silently reused: the error lists the keys
    that differ and says how to proceed."""
    config_path = run_dir / "config.yaml"
    if config_path.exists():
        old = _comparable(OmegaConf.load(config_path))
        differences = _differences(old, _comparable(cfg))
        if differences and not cfg.run.overwrite:
            raise ConfigError(
                f"run directory {run_dir} holds a run with a different config ({'; '.join(differences[:5])}). "
                f"Fix: pass run.name=<new name> for a new run, or run.overwrite=true to discard the old one.")
        if differences:
            log.warning("run.overwrite=true: discarding the previous run in %s", run_dir)
            for name in ("checkpoint", "adapter", "metrics.jsonl", "results.json", "wandb_id.txt"):
                target = run_dir / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        elif (run_dir / "results.json").exists():
            return "complete"
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, config_path, resolve=True)
    return "resume" if (run_dir / "checkpoint" / "state.pt").exists() else "fresh"


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    validate(cfg)  # before anything heavy: a bad value costs a second, not a model load
    run_dir = Path(run_dir)
    state = prepare_run_dir(cfg, run_dir)
    if state == "complete":
        results = json.loads((run_dir / "results.json").read_text())
        print(f"{run_dir} is complete; results.json:\n{json.dumps(results, indent=2)}")
        return results
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    checkpoint = run_dir / "checkpoint" / "state.pt"
    resume_step = torch.load(checkpoint, map_location="cpu", weights_only=False)["step"] if state == "resume" else 0
    tracker = Tracker(cfg, run_dir, resume_step)

    model, tokenizer = models.load_model(cfg.model, cfg.seed)
    data = build_task(cfg.task, tokenizer, cfg.train.max_seq_len)
    model.to(device)
    total_params = sum(p.numel() for p in model.parameters())
    base_fingerprint = models.fingerprint(model)

    base = None
    if cfg.eval.target:
        started = time.perf_counter()
        base, hit = cached("base_target", {"model": base_fingerprint, "task": data.test_key, "dtype": cfg.dtype},
                           lambda: target_accuracy(model, data.test, data.answer_token_ids, cfg.eval.batch_size,
                                                   device, cfg.dtype))
        print(f"base model: test accuracy {base['accuracy']:.4f} on {base['n']} digits "
              f"({'cached' if hit else f'{time.perf_counter() - started:.0f} s'})")

    method = instantiate(cfg.method, _convert_="all")
    torch.manual_seed(cfg.seed)  # adapter initialisation depends on the seed only
    model = method.attach(model, calib=None).to(device)
    parameters = trainable_named(model)
    trainable_params = sum(p.numel() for p in parameters.values())
    print(f"{method.name}: {trainable_params:,} trainable of {total_params:,} parameters")

    result = train(model, parameters, data, cfg.train, seed=cfg.seed, device=device, dtype=cfg.dtype,
                   checkpoint_path=checkpoint, log_metrics=tracker.log, eval_batch_size=cfg.eval.batch_size)

    adapted = None
    if cfg.eval.target:
        adapted = target_accuracy(model, data.test, data.answer_token_ids, cfg.eval.batch_size, device, cfg.dtype)

    adapter_dir = run_dir / "adapter"
    method.save(adapter_dir)
    results = {
        "method": method.name, "model": cfg.model.name, "task": cfg.task.name, "seed": cfg.seed,
        "trainable_params": trainable_params, "total_params": total_params,
        "target": {"base_accuracy": base and base["accuracy"], "accuracy": adapted and adapted["accuracy"],
                   "test_size": len(data.test), "base_answer_counts": base and base["answer_counts"],
                   "answer_counts": adapted and adapted["answer_counts"]},
        "train": {"steps": result.steps, "seconds": result.seconds, "tokens": result.tokens,
                  "tokens_per_second": result.tokens_per_second, "final_loss": result.final_loss,
                  "resumed_from_step": result.resumed_from},
        "peak_memory_bytes": peak_memory_bytes(device),
        "base_fingerprint": base_fingerprint,
        "run_dir": str(run_dir),
    }
    tracker.finish(results, adapter_dir, cfg.logger.log_adapter)
    if adapted is not None:
        print(f"{method.name} on {cfg.task.name}: test accuracy {base['accuracy']:.4f} (base) -> "
              f"{adapted['accuracy']:.4f} (adapted) on {len(data.test)} digits; trained {result.steps} steps "
              f"in {result.seconds / 60:.1f} min ({result.tokens_per_second:.0f} tokens/s)")
    print(f"results: {run_dir / 'results.json'}")
    return results
