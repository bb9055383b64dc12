"""run(cfg) -> results: one experiment, from config to results.json, as one readable function."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from rigsa import checkpoints, forgetting, models, run_folder
from rigsa.cache import cached
from rigsa.evaluate import accuracy_problem, target_accuracy
from rigsa.memory import model_bytes, peak_memory_bytes, reset_peak_memory
from rigsa.methods import Calibration, Method
from rigsa.quantize import quantize_linear_layers
from rigsa.readout import Readout, build_readout
from rigsa.sparse.engine import merge_all, unmerge_all
from rigsa.sparse.schedule import phases
from rigsa.sparse.targets import check_targets
from rigsa.tasks import build_task, test_set_key
from rigsa.tracking import Tracker
from rigsa.train import micro_batch_indices, train
from rigsa.tuning import trial_reporter
from rigsa.validate import validate
from rigsa.vocabulary import fail

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def attached(model: torch.nn.Module, method: Method, cfg: DictConfig, calibration: Calibration,
             device: torch.device) -> torch.nn.Module:
    """The model to train, on `device`: `method` attached, over a 4-bit base when model.quantize is set: quantized
    before attach where the method says so (`quantize_first`: PEFT wraps the 4-bit layers; done where the model is,
    the CPU for a staged model), else after (selection rules score the weights as loaded, not their 4-bit copies)."""
    quantize = cfg.model.quantize
    if quantize and method.quantize_first:
        quantize_linear_layers(model, quantize, getattr(torch, cfg.dtype))
    model = method.attach(model, calibration).to(device)
    if quantize and not method.quantize_first:
        quantize_linear_layers(model, quantize, getattr(torch, cfg.dtype))
    return model


def staged_on(model: torch.nn.Module, device: torch.device):
    """For a model kept on the CPU until it is quantized: a wrapper that runs a measurement with the model on
    `device`, then moves it back to the CPU (and frees the device's cache)."""
    def on_device(measure):
        model.to(device)
        try:
            return measure()
        finally:
            model.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return on_device


# The 4-bit base's own forgetting, measured before the first step: kept in the run folder so a resumed run reads it.
QUANTIZED_BASE_FILE = "quantized_base.json"


def measured_once(path: Path, measure) -> dict:
    """A run's measurement kept in its folder: read back when a resumed run finds it readable, else measured and
    written (atomically)."""
    from rigsa.cache import write_text_atomically

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or damaged: measure (again)
        result = measure()
        write_text_atomically(path, json.dumps(result))
        return result


def measure_here(measure):
    """For a model already on its device: run the measurement as it is."""
    return measure()


def count_trainable(method: Method, readout: Readout) -> int:
    """The values trained: the method's and the readout's classification head (when task.readout has one)."""
    return sum(p.numel() for p in [*method.trainable_parameters(), *readout.trainable_parameters()])


def calibration_batches(data, cfg: DictConfig, device: torch.device):
    """The first training micro-batches (same order as training), for selection rules that score gradients."""
    for micro_step in range(len(data.train)):
        indices = micro_batch_indices(len(data.train), cfg.train.batch_size, cfg.seed, micro_step)
        yield {key: value.to(device) for key, value in data.train.batch(indices).items()}


def target_split(data, cfg: DictConfig):
    """The split the target score is measured on (eval.split): the test split, or for a tuned search's trials the
    validation split, the test split then never read."""
    return data.val if cfg.eval.split == "validation" else data.test


def target_score(model, data, readout: Readout, cfg: DictConfig, device: torch.device, limit: int = 0) -> dict:
    """The target score on eval.split (the test split unless a search measures on validation), and on the validation
    split also the mean loss there: the search's default objective."""
    return target_accuracy(model, target_split(data, cfg), readout, cfg.eval.batch_size, device, cfg.dtype, limit,
                           with_loss=cfg.eval.split == "validation")


def summarize(suite: dict) -> str:
    return ", ".join(f"{task} {metric}={value:.4f}" for task, scores in suite.items()
                     for metric, value in scores["metrics"].items()
                     if metric.split(",")[0] in forgetting.PRIMARY_METRICS)


def timed(describe, compute) -> tuple[dict, bool]:
    """Run a cached computation; print describe(result) with how long it took, or that it was cached."""
    started = time.perf_counter()
    result, hit = compute()
    print(f"{describe(result)} ({'cached' if hit else f'{time.perf_counter() - started:.0f} s'})")
    return result, hit


def iteration_table(rows: list[dict], base: dict | None) -> str:
    lines = [f"{'phase':<16}{'density':>10}{'trainable':>14}{'accuracy':>10}{'examples':>10}{'forgetting':>12}"]
    if base is not None:
        lines.append(f"{'base model':<16}{'':>10}{0:>14}{base['accuracy']:>10.4f}{base['n']:>10}")
    for row in rows:
        density = f"{row['density']:.4%}" if "density" in row else ""
        accuracy = f"{row['accuracy']:.4f}" if "accuracy" in row else ""
        forgetting = f"{row['mean_forgetting']:+.4f}" if row.get("mean_forgetting") is not None else ""
        lines.append(f"{row['phase']:<16}{density:>10}{row['trainable_params']:>14,}{accuracy:>10}"
                     f"{row.get('test_size', ''):>10}{forgetting:>12}")
    return "\n".join(lines)


@dataclass
class Training:
    """What the phases of a run produced."""
    steps: int
    seconds: float
    tokens: int
    final_loss: float | None  # None when no step was trained (method=none)
    resumed_from_step: dict[str, int]  # each phase's step its checkpoint resumed it from (0 = trained from scratch)
    skipped_steps: int  # updates dropped for a non-finite loss or gradient (train.on_nonfinite=skip_step)
    iterations: list[dict]  # one row per phase when the schedule has several: the RIGSA paper's Figure 2
    adapted: dict | None  # the final model's accuracy on the whole test set (None with eval.target=false)
    memory: dict  # the largest gradient_bytes and optimizer_state_bytes of any phase
    early_stopping: dict | None = None  # the best step and its validation loss, where it stopped (train.early_stopping)


def train_phases(model, method: Method, readout: Readout, data, cfg: DictConfig, device: torch.device,
                 run_dir: Path, tracker: Tracker, forgetting_now=None) -> Training:
    """Train each phase of the pruning schedule and apply its prune; with several phases, measure the
    test accuracy after each (on eval.iteration_test_size digits, the last phase on all) and, given
    `forgetting_now` (eval.iteration_forgetting), the forgetting suite after each phase but the last (whose
    forgetting is the run's own); and measure the final model on the whole test set (reusing the last
    phase's measurement when no prune followed it)."""
    schedule = phases(cfg.pruning, cfg.train, len(data.train))
    report_validation = trial_reporter(cfg.run.root, cfg.optuna_trial)
    iterations, resumed, offset, seconds, tokens, adapted, skipped, memory = [], {}, 0, 0.0, 0, None, 0, {}
    for number, phase in enumerate(schedule):
        last = number + 1 == len(schedule)
        result = train(model, method, data, cfg.train, readout=readout, seed=cfg.seed, device=device,
                       dtype=cfg.dtype, log_metrics=tracker.log, eval_batch_size=cfg.eval.batch_size,
                       checkpoint_path=checkpoints.phase_path(run_dir, phase.name), steps=phase.steps,
                       step_offset=offset, desc=phase.name, on_validation=report_validation)
        offset, seconds, tokens = offset + phase.steps, seconds + result.seconds, tokens + result.tokens
        resumed[phase.name], skipped = result.resumed_from, skipped + result.skipped_steps
        memory = {key: max(value, memory.get(key, 0)) for key, value in result.memory.items()}
        if len(schedule) > 1:
            row = {"phase": phase.name, "trainable_params": count_trainable(method, readout), **method.stats()}
            if cfg.eval.target:
                limit = 0 if last else cfg.eval.iteration_test_size
                adapted = target_score(model, data, readout, cfg, device, limit)
                row["accuracy"], row["test_size"] = adapted["accuracy"], adapted["n"]
            if forgetting_now is not None and not last:
                block = forgetting_now()
                row["mean_forgetting"], row["mean_forget_ratio"] = block["mean_forgetting"], block["mean_forget_ratio"]
            iterations.append(row)
            tracker.log({f"imp/{key}": value for key, value in row.items() if key != "phase"}, offset, once=True)
        if phase.prune is not None:
            log.info("pruned (iteration %d): %s", phase.prune.iteration, method.prune(phase.prune))
            adapted = None  # measured before this prune
    if cfg.eval.target and adapted is None:
        adapted = target_score(model, data, readout, cfg, device)
    if result.early_stopping is not None:  # a single phase (early stopping refuses a pruning schedule)
        offset = result.steps
    return Training(offset, seconds, tokens, result.final_loss, resumed, skipped, iterations, adapted, memory,
                    result.early_stopping)


def adapted_forgetting(model, tokenizer, cfg: DictConfig, device: torch.device, base_suite: dict,
                       label: str = "adapted model") -> dict:
    """The forgetting suite on the adapted model (sparse deltas merged for lm-eval, unmerged exactly after)."""
    started = time.perf_counter()
    merge_all(model)
    adapted_suite = forgetting.evaluate_suite(model, tokenizer, cfg.eval, device, cfg.dtype, cfg.seed)
    unmerge_all(model)
    block = {**forgetting.forgetting_block(base_suite, adapted_suite), "seconds": time.perf_counter() - started}
    print(f"{label}, eval={cfg.eval.name}: {summarize(adapted_suite)}; mean forgetting "
          f"{block['mean_forgetting']:+.4f}, collapsed {block['collapsed']}")
    return block


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """One experiment. Everything checkable without the model is checked before the run folder is touched;
    a refused or finished rerun writes nothing; a failure before the first checkpoint leaves the folder as it was."""
    method = validate(cfg)  # every value checked, the method built: a bad value costs a second, not a model load
    forgetting.check_hub(cfg.eval)  # eval=paper without the hub stops here, not after training
    run_dir = Path(run_dir)
    if run_folder.inspect(cfg, run_dir) == "complete":
        results = run_folder.read_results(run_dir)
        print(f"{run_dir} is complete; results.json:\n{json.dumps(results, indent=2)}")
        return results
    # The task's data is read and checked (columns, labels, empty splits) before the folder or the model is touched
    tokenizer = models.load_tokenizer(cfg.model)
    data = build_task(cfg.task, tokenizer, cfg.train.max_seq_len)
    for key, value, needs in (("train.early_stopping", cfg.train.early_stopping, cfg.train.early_stopping > 0),
                              ("eval.split", cfg.eval.split, cfg.eval.split == "validation")):
        if needs and not len(data.val):
            fail(key, value, f"a task with a validation split (task={cfg.task.name} has none here)",
                 "give the task a validation split (e.g. task.val_size=200, or task.splits.dev)")
    if data.dropped_train:
        log.warning("dropped %d training examples longer than task.max_prompt_tokens=%d", data.dropped_train,
                    cfg.task.max_prompt_tokens)
    before = run_folder.contents(run_dir)
    with run_folder.claimed(run_dir), run_folder.kept_until_first_checkpoint(run_dir, before):
        status = run_folder.inspect(cfg, run_dir)  # again, holding the lock: another run may have finished
        if status == "complete":
            return run_folder.read_results(run_dir)
        run_folder.start(cfg, run_dir, status)
        return experiment(cfg, method, tokenizer, data, run_dir)


@dataclass
class Base:
    """The loaded base model, ready to measure and adapt."""
    model: torch.nn.Module
    tokenizer: object
    readout: Readout
    fingerprint: str
    total_params: int
    on_device: object  # runs a measurement with the model on the run's device (rigsa.run.staged_on / measure_here)


@dataclass
class BaseScores:
    """The base model's scores, cached on disk: the target task's (eval.target) and the forgetting suite's."""
    target: dict | None
    suite: dict | None


def load_base(cfg: DictConfig, method: Method, tokenizer, data, device: torch.device) -> Base:
    """Load the base model and build the task's readout for it. A base quantized before attach (QLoRA) is kept on
    the CPU, quantized there and only then moved: the device never holds the full-precision model for training.
    It goes there only to measure the base when its scores are not cached."""
    model, tokenizer = models.load_model(cfg.model, cfg.seed, tokenizer)
    check_targets(cfg.method, model)  # needs the model; before any evaluation or training
    if cfg.model.quantize and method.quantize_first:
        on_device = staged_on(model, device)
    else:
        model.to(device)
        on_device = measure_here
    total_params = sum(p.numel() for p in model.parameters())
    readout = build_readout(cfg.task, data, model, tokenizer, cfg.seed, device)
    return Base(model, tokenizer, readout, models.fingerprint(model), total_params, on_device)


def measure_base(cfg: DictConfig, base: Base, data, device: torch.device) -> BaseScores:
    """The base model's target score and forgetting suite, each computed once per key and cached."""
    target = suite = None
    readout = base.readout
    if cfg.eval.target:
        split = target_split(data, cfg)
        task_key = data.test_key if split is data.test else {"validation": test_set_key(split, data.label_words)}
        key = {"model": base.fingerprint, "task": task_key, "dtype": cfg.dtype, "readout": readout.kind,
               "head": models.hash_tensors((str(n), p) for n, p in enumerate(readout.trainable_parameters()))}
        target, _ = timed(lambda r: f"base model: {cfg.eval.split} {data.metric} {r['metrics'][data.metric]:.4f} on "
                                    f"{r['n']} examples ({readout.kind} readout)",
                          lambda: cached("base_target", key,
                                         lambda: base.on_device(lambda: target_score(base.model, data, readout, cfg,
                                                                                         device)),
                                         check=lambda r: accuracy_problem(r, len(split), readout.num_classes)))
    if cfg.eval.forgetting:
        suite, _ = timed(lambda r: f"base model, eval={cfg.eval.name}: {summarize(r)}",
                         lambda: forgetting.base_scores(base.model, base.tokenizer, cfg.eval, device, cfg.dtype,
                                                        cfg.seed, base.fingerprint, base.on_device))
    return BaseScores(target, suite)


@dataclass
class Adapted:
    """What attaching and training produced."""
    model: torch.nn.Module
    initial_trainable: int
    head_params: int
    training: Training
    quantized_base: dict | None  # the 4-bit base's own forgetting before the first step (model.quantize)


def attach_and_train(cfg: DictConfig, method: Method, base: Base, scores: BaseScores, data, device: torch.device,
                     run_dir: Path, tracker: Tracker) -> Adapted:
    """Attach the method to the base model and train each phase of the pruning schedule. A run with nothing to
    train (method=none: no adapter and no classification head) trains no step: the adapted model is the base (or its
    4-bit copy, with model.quantize)."""
    readout = base.readout
    torch.manual_seed(cfg.seed)  # adapter initialisation depends on the seed only
    model = attached(base.model, method, cfg, Calibration(calibration_batches(data, cfg, device), readout.loss,
                                                          readout.kind), device)
    initial_trainable = count_trainable(method, readout)
    head_params = sum(parameter.numel() for parameter in readout.trainable_parameters())
    print(f"{method.name}: {initial_trainable:,} trainable of {base.total_params:,} parameters"
          + (f" (with the {head_params:,}-value classification head)" if head_params else ""))

    quantized_base = None
    if scores.suite and cfg.model.quantize:
        # Before any step the adapter adds nothing (LoRA's B = 0, sparse values 0, RIGSA's gate 1e-6): this is the
        # 4-bit base's own share of the forgetting measured at the end (the base scores are the unquantized model's).
        quantized_base = measured_once(run_dir / QUANTIZED_BASE_FILE, lambda: adapted_forgetting(
            model, base.tokenizer, cfg, device, scores.suite, "4-bit base before training"))
    if initial_trainable == 0:  # the base as loaded, measured already; a 4-bit copy of it is measured here
        final = (target_score(model, data, readout, cfg, device) if cfg.eval.target and cfg.model.quantize
                 else scores.target)
        training = Training(0, 0.0, 0, None, {}, 0, [], final, {})
    else:
        forgetting_now = None
        if scores.suite and cfg.eval.iteration_forgetting:
            forgetting_now = lambda: adapted_forgetting(model, base.tokenizer, cfg, device, scores.suite)  # noqa: E731
        training = train_phases(model, method, readout, data, cfg, device, run_dir, tracker, forgetting_now)
    return Adapted(model, initial_trainable, head_params, training, quantized_base)


def measure_adapted(cfg: DictConfig, base: Base, scores: BaseScores, adapted: Adapted, device: torch.device) -> dict | None:
    """The forgetting suite on the adapted model against the base's (None without a suite); the last phase's row
    takes the run's own forgetting."""
    if not scores.suite:
        return None
    training = adapted.training
    if adapted.initial_trainable == 0 and not cfg.model.quantize:  # nothing trained: the base, measured already
        results = {**forgetting.forgetting_block(scores.suite, scores.suite), "seconds": 0.0}
    else:
        results = adapted_forgetting(adapted.model, base.tokenizer, cfg, device, scores.suite)
    if adapted.quantized_base is not None:
        results["quantized_base"] = {key: adapted.quantized_base[key] for key in
                                     ("tasks", "mean_forgetting", "mean_forget_ratio", "seconds")}
    if cfg.eval.iteration_forgetting and training.iterations:
        last = training.iterations[-1]
        last["mean_forgetting"] = results["mean_forgetting"]
        last["mean_forget_ratio"] = results["mean_forget_ratio"]
    return results


def record(cfg: DictConfig, method: Method, base: Base, scores: BaseScores, adapted: Adapted,
           forgetting_results: dict | None, data, device: torch.device, run_dir: Path, tracker: Tracker,
           peak_memory_scope: str) -> dict:
    """Save the adapter and write results.json (the same keys for every method), log them and print the summary."""
    training, readout, target = adapted.training, base.readout, scores.target
    if training.iterations:
        print(iteration_table(training.iterations, target))
    adapter_dir = run_dir / "adapter"
    method.save(adapter_dir)
    readout.save(adapter_dir)
    final = training.adapted
    results = {
        "method": method.name, "model": cfg.model.name, "task": cfg.task.name, "seed": cfg.seed,
        "trainable_params": count_trainable(method, readout), "initial_trainable_params": adapted.initial_trainable,
        "total_params": base.total_params,
        "target": {"base_accuracy": target and target["accuracy"], "accuracy": final and final["accuracy"],
                   "metric": data.metric, "base_metrics": target and target["metrics"],
                   "metrics": final and final["metrics"], "readout": readout.kind,
                   "head_params": adapted.head_params, "label_words": data.label_words,
                   "split": cfg.eval.split, "loss": final and final.get("loss"),
                   "test_size": len(target_split(data, cfg)), "train_size": len(data.train),
                   "dropped_train": data.dropped_train,
                   "base_answer_counts": target and target["answer_counts"],
                   "answer_counts": final and final["answer_counts"]},
        "train": {"steps": training.steps, "seconds": training.seconds, "tokens": training.tokens,
                  "tokens_per_second": training.tokens / training.seconds if training.seconds else 0.0,
                  "final_loss": training.final_loss, "resumed_from_step": training.resumed_from_step,
                  "skipped_steps": training.skipped_steps, "early_stopping": training.early_stopping},
        "pruning": cfg.pruning.name, "sparse": method.stats() or None, "iterations": training.iterations,
        "forgetting": forgetting_results,
        "peak_memory_bytes": peak_memory_bytes(device), "peak_memory_scope": peak_memory_scope,
        "memory": {**model_bytes(adapted.model, readout.trainable_parameters()), **training.memory},
        "base_fingerprint": base.fingerprint,
        "run_dir": str(run_dir),
    }
    tracker.finish(results, adapter_dir, cfg.logger.log_adapter)
    if final is not None:
        print(f"{method.name} on {cfg.task.name}: {cfg.eval.split} {data.metric} {target['metrics'][data.metric]:.4f} "
              f"(base) -> {final['metrics'][data.metric]:.4f} (adapted) on {len(target_split(data, cfg))} examples; "
              f"trained {training.steps} steps in {training.seconds / 60:.1f} min "
              f"({results['train']['tokens_per_second']:.0f} tokens/s)")
    print(f"results: {run_dir / 'results.json'}")
    return results


def experiment(cfg: DictConfig, method: Method, tokenizer, data, run_dir: Path) -> dict:
    """In the claimed folder: measure the base, attach and train, measure the adapted model, record."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    peak_memory_scope = reset_peak_memory(device)  # this job's peak, not the sweep process's running maximum
    tracker = Tracker(cfg, run_dir, checkpoints.resume_step(run_dir))
    base = load_base(cfg, method, tokenizer, data, device)
    scores = measure_base(cfg, base, data, device)
    adapted = attach_and_train(cfg, method, base, scores, data, device, run_dir, tracker)
    forgetting_results = measure_adapted(cfg, base, scores, adapted, device)
    return record(cfg, method, base, scores, adapted, forgetting_results, data, device, run_dir, tracker,
                  peak_memory_scope)
