"""The value checks run before any heavy work: every method, task, readout, model source and forgetting suite
checks its own settings here. The top of the import graph, beside the CLI: it imports them, none imports it."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from rigsa.config import check_declared, options
from rigsa.forgetting import check_suite
from rigsa.methods import build_method
from rigsa.models import check_source
from rigsa.readout import HEAD_INITS, READOUTS
from rigsa.tasks import family
from rigsa.tuning import STUDY_FILE
from rigsa.vocabulary import BASE_DTYPES, QUANT_TYPES, QUANTIZED_BASE, fail


def check_run_name(cfg: DictConfig) -> None:
    """The run folder run.root/run.name must lie inside run.root."""
    root = os.path.abspath(os.path.expanduser(cfg.run.root))
    folder = os.path.abspath(os.path.join(root, str(cfg.run.name)))
    if not cfg.run.name or os.path.isabs(str(cfg.run.name)) or os.path.dirname(folder) != root:
        fail("run.name", cfg.run.name, f"a folder name inside run.root ({cfg.run.root}): no '/', '..' or empty name",
             "pass run.name=<name> (use run.root=<folder> to put runs elsewhere)")


def check_device(device: str) -> None:
    """The device must exist on this machine (checked before the run folder is written)."""
    if not (device in ("auto", "cpu", "mps") or str(device).startswith("cuda")):
        fail("device", device, "auto, cpu, cuda, cuda:N or mps", "pass device=auto")
    if str(device).startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        number = str(device).partition(":")[2]
        if count == 0 or (number and (not number.isdigit() or int(number) >= count)):
            fail("device", device, f"a CUDA device this machine has ({count} visible)", "pass device=auto or device=cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        fail("device", device, "an available Apple MPS device", "pass device=auto or device=cpu")


def check_objective(cfg: DictConfig) -> None:
    """The number a search optimises (hparams_search, a tuned comparison: checked by rigsa-run before the first trial)
    can be computed by this config: a forgetting weight needs a forgetting suite, a target metric needs the target
    measured (else every trial would end as a failed NaN)."""
    if cfg.objective.forgetting_weight and not cfg.eval.forgetting:
        fail("objective.forgetting_weight", cfg.objective.forgetting_weight, f"0 with eval={cfg.eval.name}, which "
             "measures no forgetting", "pass eval=offline, or objective.forgetting_weight=0")
    if str(cfg.objective.metric).startswith("target.") and not cfg.eval.target:
        fail("objective.metric", cfg.objective.metric, f"a key results.json holds with eval={cfg.eval.name} (it "
             "measures no target score)", "pass eval=target, or another objective.metric")


def check_positive(cfg: DictConfig, key: str, allow_zero: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None or value < 0 or (value == 0 and not allow_zero):
        expected = "a number >= 0" if allow_zero else "a number > 0"
        fail(key, value, expected, f"pass e.g. {key}={1 if not allow_zero else 0}")


def validate(cfg: DictConfig):
    """Check every value a run depends on; raise ConfigError naming the first bad one.

    Returns the method, built here because its constructor checks its own settings (a method
    states what it supports, e.g. `prunes`); building one loads nothing."""
    for group in ("model", "method", "task", "pruning", "eval", "logger"):
        if OmegaConf.select(cfg, f"{group}.name") is None:
            fail(group, None, f"one of {options(group)}", f"pass {group}=<option>")
    check_declared(cfg)
    check_run_name(cfg)

    model = cfg.model
    sources = ("embedded", "hub", "tiny", "local")
    if model.source not in sources:
        fail("model.source", model.source, f"one of {list(sources)}", "use model=<option> with a shipped option")
    if model.source == "hub" and not model.hub_id:
        fail("model.hub_id", model.hub_id, "a Hugging Face hub id", "pass model.hub_id=org/name")
    if model.base_dtype not in BASE_DTYPES:
        fail("model.base_dtype", model.base_dtype, f"one of {list(BASE_DTYPES)}", "pass model.base_dtype=float32")
    if model.base_dtype != "float32" and cfg.dtype == "float32":
        fail("dtype", cfg.dtype, f"bfloat16 or float16 compute over a model.base_dtype={model.base_dtype} base (float32 "
             "compute would meet bfloat16 weights in every frozen layer)", "pass dtype=bfloat16")
    if model.quantize is not None and model.quantize not in QUANT_TYPES:
        fail("model.quantize", model.quantize, f"null or one of {list(QUANT_TYPES)}", "pass model.quantize=nf4")
    check_source(model)

    for key in ("train.lr", "train.batch_size", "train.grad_accum", "train.max_seq_len"):
        check_positive(cfg, key)
    for key in ("train.weight_decay", "train.warmup_steps", "train.max_steps", "train.epochs",
                "train.eval_every", "train.checkpoint_every", "train.threads", "train.max_grad_norm",
                "eval.iteration_test_size"):
        check_positive(cfg, key, allow_zero=True)
    check_positive(cfg, "train.early_stopping", allow_zero=True)
    if cfg.train.early_stopping and not cfg.train.eval_every:
        fail("train.eval_every", 0, f"> 0 with train.early_stopping={cfg.train.early_stopping} (its patience counts "
             "validations, one every train.eval_every steps)", "pass train.eval_every=25")
    if cfg.train.early_stopping and cfg.pruning.name != "none":
        fail("train.early_stopping", cfg.train.early_stopping, f"0 with pruning={cfg.pruning.name}: each phase ends in "
             "a prune of what it trained, so a phase's best step would be undone by the prune after it",
             "pass train.early_stopping=0, or pruning=none")
    if cfg.eval.split not in ("test", "validation"):
        fail("eval.split", cfg.eval.split, "test or validation", "pass eval.split=test")
    if cfg.optuna_trial is not None and (cfg.optuna_trial < 0 or not (Path(cfg.run.root) / STUDY_FILE).exists()):
        fail("optuna_trial", cfg.optuna_trial, f"null, or a trial of the study in {Path(cfg.run.root) / STUDY_FILE} "
             "(hydra/sweeper=rigsa_tuned sets it)", "pass optuna_trial=null")
    # torch seeds up to 2**64, but numpy's (lm-eval's few-shot sampling) and the data order's take < 2**32
    if not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**32:
        fail("seed", cfg.seed, "an integer in [0, 2**32)", "pass seed=0")
    if cfg.train.max_steps == 0 and cfg.train.epochs == 0:
        fail("train.epochs", 0, "train.epochs > 0 or train.max_steps > 0", "pass train.max_steps=100")
    if cfg.train.lr_schedule not in ("cosine", "linear", "constant"):
        fail("train.lr_schedule", cfg.train.lr_schedule, "one of ['cosine', 'linear', 'constant']",
             "pass train.lr_schedule=cosine")
    if cfg.train.on_nonfinite not in ("stop", "skip_step"):
        fail("train.on_nonfinite", cfg.train.on_nonfinite, "stop or skip_step", "pass train.on_nonfinite=stop")
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        fail("dtype", cfg.dtype, "one of ['float32', 'bfloat16', 'float16']", "pass dtype=bfloat16")
    check_device(cfg.device)

    if cfg.task.readout not in READOUTS:
        fail("task.readout", cfg.task.readout, f"one of {list(READOUTS)}", "pass task.readout=answer_token")
    if cfg.task.head_init not in HEAD_INITS:
        fail("task.head_init", cfg.task.head_init, f"one of {list(HEAD_INITS)}", "pass task.head_init=auto")
    family(cfg.task).check_config(cfg.task, fail)

    method = build_method(cfg.method)
    if model.quantize is not None and QUANTIZED_BASE not in method.bases:
        fail("model.quantize", model.quantize, f"null for method={cfg.method.name}, which cannot train over a 4-bit base",
             "pass model.quantize=null")
    if cfg.method.name == "qlora" and model.quantize is None:
        fail("model.quantize", None, "nf4 or fp4 for method=qlora (LoRA over a 4-bit base)",
             "pass model.quantize=nf4, or method=lora for LoRA over the base as loaded")
    if model.quantize is not None and cfg.method.get("reselect_every"):
        fail("method.reselect_every", cfg.method.reselect_every, "0 over a 4-bit base (re-selection scores dense "
             "weight gradients, which a 4-bit weight has not)", "pass method.reselect_every=0")
    if model.base_dtype not in method.bases:
        fail("model.base_dtype", model.base_dtype, f"a base method={cfg.method.name} can train on: one of "
             f"{list(method.bases)} (it updates the base weights themselves, and an update below one ulp of a "
             f"{model.base_dtype} weight is rounded away)", "pass model.base_dtype=float32 (with dtype=bfloat16 autocast)")
    if cfg.pruning.name == "imp":
        if not method.prunes:
            fail("pruning", "imp", "a method that prunes (method=rigsa)", "pass pruning=none or method=rigsa")
        if not 0 < cfg.pruning.keep_fraction <= 1:
            fail("pruning.keep_fraction", cfg.pruning.keep_fraction, "0 < keep_fraction <= 1",
                 "pass pruning.keep_fraction=0.5")
        if cfg.pruning.pruned_value not in ("zero", "init"):
            fail("pruning.pruned_value", cfg.pruning.pruned_value, "zero or init", "pass pruning.pruned_value=zero")
        check_positive(cfg, "pruning.iterations")

    if cfg.logger.mode not in ("auto", "online", "offline", "disabled"):
        fail("logger.mode", cfg.logger.mode, "one of ['auto', 'online', 'offline', 'disabled']",
             "pass logger.mode=offline")
    check_positive(cfg, "eval.batch_size")
    check_positive(cfg, "eval.lm_eval_batch_size")
    check_suite(cfg.eval, fail)
    return method
