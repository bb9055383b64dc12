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

from rigsa import forgetting, models
from rigsa.config import ConfigError, validate
from rigsa.evaluate import cached, target_accuracy
from rigsa.methods import trainable_named
from rigsa.tasks import build_task
from rigsa.tracking import Tracker
from rigsa.sparse.engine import merge_all, unmerge_all
from rigsa.sparse.schedule import phases
from rigsa.train import micro_batch_indices, train

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
    return "resume" if any((run_dir / "checkpoint").glob("*.pt")) else "fresh"


def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in trainable_named(model).values())


def sparse_stats(method) -> dict:
    """{values, density, ...} for sparse methods (the exact trained count), {} for the others."""
    return method.stats() if hasattr(method, "stats") else {}


def calibration_batches(data, cfg: DictConfig, device: torch.device):
    """The first training micro-batches (same order as training), for selection rules that score gradients."""
    for micro_step in range(len(data.train)):
        indices = micro_batch_indices(len(data.train), cfg.train.batch_size, cfg.seed, micro_step)
        yield {key: value.to(device) for key, value in data.train.batch(indices).items()}


def summarize(suite: dict) -> str:
    return ", ".join(f"{task} {metric}={value:.4f}" for task, scores in suite.items()
                     for metric, value in scores["metrics"].items()
                     if metric.split(",")[0] in forgetting.PRIMARY_METRICS)


def iteration_table(rows: list[dict], base: dict | None) -> str:
    lines = [f"{'phase':<16}{'density':>10}{'trainable':>14}{'accuracy':>10}{'digits':>8}"]
    if base is not None:
        lines.append(f"{'base model':<16}{'':>10}{0:>14}{base['accuracy']:>10.4f}{base['n']:>8}")
    for row in rows:
        density = f"{row['density']:.4%}" if "density" in row else ""
        accuracy = f"{row['accuracy']:.4f}" if "accuracy" in row else ""
        lines.append(f"{row['phase']:<16}{density:>10}{row['trainable_params']:>14,}{accuracy:>10}"
                     f"{row.get('test_size', ''):>8}")
    return "\n".join(lines)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    validate(cfg)  # before anything heavy: a bad value costs a second, not a model load
    forgetting.check_hub(cfg.eval)  # eval=paper without the hub stops here, not after training
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
    resume_step = max((torch.load(path, map_location="cpu", weights_only=False)["global_step"]
                       for path in (run_dir / "checkpoint").glob("*.pt")), default=0)
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

    base_suite = None
    if cfg.eval.forgetting:
        started = time.perf_counter()
        base_suite, hit = forgetting.base_scores(model, tokenizer, cfg.eval, device, cfg.dtype, cfg.seed, base_fingerprint)
        print(f"base model, eval={cfg.eval.name}: {summarize(base_suite)} "
              f"({'cached' if hit else f'{time.perf_counter() - started:.0f} s'})")

    method = instantiate(cfg.method, _convert_="all")
    torch.manual_seed(cfg.seed)  # adapter initialisation depends on the seed only
    model = method.attach(model, calib=calibration_batches(data, cfg, device)).to(device)
    trainable_params = count_trainable(model)
    print(f"{method.name}: {trainable_params:,} trainable of {total_params:,} parameters")

    def test_accuracy(limit: int = 0) -> dict:
        return target_accuracy(model, data.test, data.answer_token_ids, cfg.eval.batch_size, device, cfg.dtype, limit)

    schedule = phases(cfg.pruning, cfg.train, len(data.train))
    iterations, offset, seconds, tokens, adapted = [], 0, 0.0, 0, None
    for number, phase in enumerate(schedule):
        groups = method.param_groups() if hasattr(method, "param_groups") else None
        result = train(model, trainable_named(model), data, cfg.train, seed=cfg.seed, device=device, dtype=cfg.dtype,
                       checkpoint_path=run_dir / "checkpoint" / f"{phase.name}.pt", log_metrics=tracker.log,
                       eval_batch_size=cfg.eval.batch_size, steps=phase.steps, step_offset=offset,
                       param_groups=groups, desc=phase.name, after_step=getattr(method, "after_step", None))
        offset, seconds, tokens = offset + phase.steps, seconds + result.seconds, tokens + result.tokens
        if len(schedule) > 1:  # per-iteration numbers: the RIGSA paper's Figure 2
            row = {"phase": phase.name, "trainable_params": count_trainable(model), **sparse_stats(method)}
            if cfg.eval.target:  # the last phase is measured on the whole test set, the others may take a prefix
                adapted = test_accuracy(0 if number + 1 == len(schedule) else cfg.eval.iteration_test_size)
                row["accuracy"], row["test_size"] = adapted["accuracy"], adapted["n"]
            iterations.append(row)
            if result.losses:  # a phase replayed whole from its checkpoint logged this row before
                tracker.log({f"imp/{key}": value for key, value in row.items() if key != "phase"}, offset)
        if phase.prune is not None:
            stats = method.prune(phase.prune)
            log.info("pruned (iteration %d): %s", phase.prune.iteration, stats)
            if number + 1 == len(schedule):
                adapted = None  # pruned after the last evaluation: evaluate again below
    final_trainable = count_trainable(model)
    if cfg.eval.target and adapted is None:
        adapted = test_accuracy()
    if iterations:
        print(iteration_table(iterations, base))
    forgetting_results = None
    if base_suite is not None:
        started = time.perf_counter()
        merge_all(model)  # sparse deltas merged into the weights for lm-eval, unmerged exactly after
        adapted_suite = forgetting.evaluate_suite(model, tokenizer, cfg.eval, device, cfg.dtype, cfg.seed)
        unmerge_all(model)
        forgetting_results = {**forgetting.forgetting_block(base_suite, adapted_suite),
                              "seconds": time.perf_counter() - started}
        print(f"adapted model, eval={cfg.eval.name}: {summarize(adapted_suite)}; mean forgetting "
              f"{forgetting_results['mean_forgetting']:+.4f}, collapsed {forgetting_results['collapsed']}")

    adapter_dir = run_dir / "adapter"
    method.save(adapter_dir)
    results = {
        "method": method.name, "model": cfg.model.name, "task": cfg.task.name, "seed": cfg.seed,
        "trainable_params": final_trainable, "initial_trainable_params": trainable_params, "total_params": total_params,
        "target": {"base_accuracy": base and base["accuracy"], "accuracy": adapted and adapted["accuracy"],
                   "test_size": len(data.test), "base_answer_counts": base and base["answer_counts"],
                   "answer_counts": adapted and adapted["answer_counts"]},
        "train": {"steps": offset, "seconds": seconds, "tokens": tokens,
                  "tokens_per_second": tokens / seconds if seconds else 0.0, "final_loss": result.final_loss,
                  "resumed_from_step": result.resumed_from},
        "pruning": cfg.pruning.name, "sparse": sparse_stats(method) or None, "iterations": iterations,
        "forgetting": forgetting_results,
        "peak_memory_bytes": peak_memory_bytes(device),
        "base_fingerprint": base_fingerprint,
        "run_dir": str(run_dir),
    }
    tracker.finish(results, adapter_dir, cfg.logger.log_adapter)
    if adapted is not None:
        print(f"{method.name} on {cfg.task.name}: test accuracy {base['accuracy']:.4f} (base) -> "
              f"{adapted['accuracy']:.4f} (adapted) on {len(data.test)} digits; trained {offset} steps "
              f"in {seconds / 60:.1f} min ({results['train']['tokens_per_second']:.0f} tokens/s)")
    print(f"results: {run_dir / 'results.json'}")
    return results
