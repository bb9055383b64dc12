"""`rigsa-merge`: merge task adapters and measure the merged model, as one run folder.

merge_run(cfg, run_dir): the settings and the adapters' run folders checked (no model loaded), the folder claimed
(locked, config.yaml), the base loaded from the first adapter's run config and every adapter checked on it, the
merged adapter written to `adapter/` (with each task's head in `adapter/heads/`), each source task's test split
scored on the merged model with that task's own readout (kept in `scores/<task>.json`, so an interrupted merge
resumes without rescoring; a folder whose config changed starts its scores again), the forgetting suite against
the cached base scores, and results.json: per task the base, the individual adapter (both from the source run's
results.json, measured on the same test split) and the merged score; `target.accuracy` is the merged model's mean
over the tasks, the number a sweep's objective and `rigsa-report` read.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from rigsa import forgetting, models, run_folder
from rigsa.adapters.load import apply_adapter
from rigsa.evaluate import target_accuracy
from rigsa.merging.combine import MAJORITY_SIGN, MERGE_METHODS, MergeSettings
from rigsa.merging.deltas import merge_adapters, write_merged
from rigsa.merging.heads import task_readout, write_heads
from rigsa.merging.sources import Source, check_on_base, check_sources, read_source
from rigsa.run import adapted_forgetting, measured_once, resolve_device
from rigsa.tasks import build_task
from rigsa.vocabulary import fail

SCORES_FOLDER = "scores"


def densities(cfg: DictConfig, count: int) -> tuple[float, ...]:
    value = cfg.density
    return tuple(float(item) for item in value) if OmegaConf.is_list(value) else (float(value),) * count


def settings_of(cfg: DictConfig) -> MergeSettings:
    """The merge's settings, every value checked (one line naming it and the fix) before anything is read."""
    count = len(cfg.adapters)
    if count == 0:
        fail("adapters", "[]", "the run folders of the adapters to merge",
             "pass adapters='[runs/a,runs/b]' (or mergekit=<file.yaml>)")
    if cfg.merge_method not in MERGE_METHODS:
        fail("merge_method", cfg.merge_method, f"one of {', '.join(MERGE_METHODS)}", "pick one of them")
    weights = tuple(float(w) for w in cfg.weights) if cfg.weights is not None else (1.0,) * count
    if len(weights) != count or not all(math.isfinite(w) for w in weights):
        fail("weights", list(weights), f"{count} finite numbers, one per adapter", "give one weight per adapter")
    if cfg.merge_method == "mean" and sum(weights) == 0:
        fail("weights", list(weights), "weights whose sum is not 0 (mean divides by it)", "change the weights")
    found = densities(cfg, count)
    if len(found) != count or not all(0 < d <= 1 for d in found):
        fail("density", OmegaConf.to_container(cfg.density) if OmegaConf.is_list(cfg.density) else cfg.density,
             f"a fraction in (0, 1], or a list of {count} of them", "e.g. density=0.2")
    if not math.isfinite(cfg.scale):
        fail("scale", cfg.scale, "a finite number", "e.g. scale=1.0")
    if cfg.majority_sign not in MAJORITY_SIGN:
        fail("majority_sign", cfg.majority_sign, f"one of {', '.join(MAJORITY_SIGN)}", "pick one of them")
    if not 0 <= cfg.seed < 2**32:
        fail("seed", cfg.seed, "an integer in [0, 2**32)", "e.g. seed=0")
    return MergeSettings(cfg.merge_method, weights, found, float(cfg.scale), cfg.majority_sign, int(cfg.seed))


def merge_run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """One merge (module docstring). A refused or finished rerun writes nothing."""
    settings = settings_of(cfg)
    sources = [read_source(folder) for folder in cfg.adapters]
    check_sources(sources)
    forgetting.check_hub(cfg.eval)
    run_dir = Path(run_dir)
    if run_folder.inspect(cfg, run_dir) == "complete":
        return run_folder.read_results(run_dir)
    first = sources[0].cfg
    tokenizer = models.load_tokenizer(first.model)
    tasks = {source.task: build_task(source.cfg.task, tokenizer, source.cfg.train.max_seq_len) for source in sources}
    with run_folder.claimed(run_dir):
        status = run_folder.inspect(cfg, run_dir)
        if status == "complete":
            return run_folder.read_results(run_dir)
        if not run_folder.holds_config(cfg, run_dir):  # scores kept by an interrupted merge of another config
            shutil.rmtree(run_dir / SCORES_FOLDER, ignore_errors=True)
        run_folder.start(cfg, run_dir, status)
        return measured(cfg, settings, sources, tokenizer, tasks, run_dir)


def measured(cfg: DictConfig, settings: MergeSettings, sources: list[Source], tokenizer, tasks: dict,
             run_dir: Path) -> dict:
    """In the claimed folder: merge over the base, score each task and the forgetting suite, write results.json."""
    first = sources[0].cfg
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    model, tokenizer = models.load_model(first.model, first.seed, tokenizer)
    base_fingerprint = models.fingerprint(model)
    base_suite = None
    if cfg.eval.forgetting:  # the base's suite before the model is quantized or changed (cached by fingerprint)
        model.to(device)
        base_suite, _ = forgetting.base_scores(model, tokenizer, cfg.eval, device, first.dtype, first.seed,
                                               base_fingerprint)
        model.to("cpu")
    merged = merge_adapters([source.adapter for source in sources], settings, model)  # quantizes a 4-bit base
    for source in sources:
        check_on_base(model, source, base_fingerprint)
    write_merged(merged, run_dir / "adapter")
    write_heads({source.task: source.adapter.head for source in sources}, run_dir / "adapter")
    model = apply_adapter(model, merged, merge=not merged.quantize).to(device)
    per_task = {}
    for source in sources:
        data = tasks[source.task]
        readout = task_readout(source.adapter.head, data.label_token_ids, device)
        score = measured_once(run_dir / SCORES_FOLDER / f"{source.task}.json", lambda: target_accuracy(
            model, data.test, readout, cfg.eval.batch_size, device, first.dtype))
        target = source.results.get("target") or {}
        per_task[source.task] = {
            "metric": data.metric, "base": (target.get("base_metrics") or {}).get(data.metric),
            "individual": (target.get("metrics") or {}).get(data.metric), "merged": score["metrics"][data.metric],
            "merged_metrics": score["metrics"], "answer_counts": score["answer_counts"], "test_size": score["n"],
            "source_split": target.get("split", "test"), "readout": readout.kind, "run_dir": str(source.run_dir),
            "method": source.cfg.method.name}
        print(f"{source.task}: {data.metric} base {per_task[source.task]['base']}, individual "
              f"{per_task[source.task]['individual']}, merged {score['metrics'][data.metric]:.4f} on {score['n']}")
    forgetting_results = None
    if base_suite is not None:  # as rigsa-run measures an adapted model, in the sources' dtype and seed
        measured_as = OmegaConf.create({"eval": cfg.eval, "dtype": first.dtype, "seed": first.seed})
        forgetting_results = adapted_forgetting(model, tokenizer, measured_as, device, base_suite, "merged model")
    results = results_of(cfg, settings, sources, merged, per_task, forgetting_results, base_fingerprint,
                         time.perf_counter() - started, run_dir)
    from rigsa.cache import write_text_atomically

    write_text_atomically(run_dir / "results.json", json.dumps(results, indent=2))
    print(f"results: {run_dir / 'results.json'}")
    return results


def mean(values) -> float | None:
    values = [value for value in values if value is not None]
    return sum(values) / len(values) if values else None


def results_of(cfg, settings, sources, merged, per_task, forgetting_results, base_fingerprint, seconds,
               run_dir) -> dict:
    """results.json of a merge: the keys `rigsa-report` reads (target.accuracy = the mean over the tasks) and the
    per-task table."""
    trained = sum(int(delta.values.numel()) if hasattr(delta, "values") else int(delta.delta.numel())
                  for delta in merged.layers.values()) + sum(int(t.numel()) for t in merged.replaced.values())
    return {
        "kind": "merge", "method": f"merge:{settings.method}", "model": sources[0].cfg.model.name,
        "task": "+".join(per_task), "seed": settings.seed, "format": merged.format,
        "merge": merged.meta["merge"], "sources": [str(source.run_dir) for source in sources],
        "tasks": per_task,
        "target": {"accuracy": mean(row["merged"] for row in per_task.values()),
                   "base_accuracy": mean(row["base"] for row in per_task.values()),
                   "individual_accuracy": mean(row["individual"] for row in per_task.values()),
                   "metric": "mean over tasks", "split": "test"},
        "trainable_params": trained, "forgetting": forgetting_results, "train": {"seconds": seconds},
        "base_fingerprint": base_fingerprint, "run_dir": str(run_dir),
    }
