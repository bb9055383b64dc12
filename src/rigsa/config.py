"""Config schema (registered in Hydra's ConfigStore) and the value checks run before any heavy work.

Each YAML in `conf/<group>/` extends one schema here (`/schema/<group>/<name>@_here_`), so an
unknown key or a wrong type fails when Hydra composes the config. `validate` then checks values
(ranges, choices, paths) before a model is loaded, so a bad run fails in a second, not an hour.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value is wrong; the message names the key, the value, and the fix."""


# Every field is MISSING here: the schema gives names and types, the YAML files in conf/ give every
# value and its help text (one place each; tests/test_config.py checks that they agree). The one
# exception is ForgettingTaskConfig's optional fields: a suite entry written in a command-line
# override has no YAML to inherit from, so None (= lm-eval's own default) is declared here.

# ---------------------------------------------------------------- model
@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = MISSING
    hub_id: Optional[str] = MISSING
    revision: Optional[str] = MISSING
    path: Optional[str] = MISSING


@dataclass
class TinyModelConfig(ModelConfig):
    """source=tiny: the random-init Llama's shape."""
    hidden_size: int = MISSING
    num_layers: int = MISSING
    num_heads: int = MISSING
    num_kv_heads: int = MISSING
    intermediate_size: int = MISSING


# ---------------------------------------------------------------- methods
# A method's constructor takes exactly its schema's fields (tests/test_config.py checks it).
@dataclass
class MethodConfig:
    _target_: str = MISSING
    name: str = MISSING


@dataclass
class FullMethodConfig(MethodConfig):
    train_embeddings: bool = MISSING


@dataclass
class HeadMethodConfig(MethodConfig):
    pass


@dataclass
class LoraMethodConfig(MethodConfig):
    r: int = MISSING
    alpha: float = MISSING
    dropout: float = MISSING
    target_modules: List[str] = MISSING
    use_dora: bool = MISSING
    load_in_4bit: bool = MISSING
    quant_type: str = MISSING


@dataclass
class BudgetConfig:
    density: Optional[float] = MISSING
    params: Optional[int] = MISSING
    match: Optional[str] = MISSING
    r: int = MISSING
    target_modules: List[str] = MISSING
    from_run: Optional[str] = MISSING


@dataclass
class SparseMaskMethodConfig(MethodConfig):
    selection: str = MISSING
    target_modules: List[str] = MISSING
    budget: BudgetConfig = MISSING
    scope: str = MISSING
    block_size: int = MISSING
    calib_batches: int = MISSING
    eps: float = MISSING
    train_head: bool = MISSING
    reselect_every: int = MISSING
    seed: int = MISSING


@dataclass
class RigsaMethodConfig(MethodConfig):
    target_modules: List[str] = MISSING
    init: str = MISSING
    init_scale: float = MISSING
    gate_init: float = MISSING
    gate: str = MISSING
    weight_decay: float = MISSING
    seed: int = MISSING


# ---------------------------------------------------------------- task / pruning / eval / logger
@dataclass
class TextualMnistConfig:
    name: str = MISSING
    image_size: int = MISSING
    train_size: int = MISSING
    val_size: int = MISSING
    test_size: int = MISSING
    split_seed: int = MISSING
    chat_template: bool = MISSING


@dataclass
class PruningConfig:
    name: str = MISSING


@dataclass
class ImpPruningConfig(PruningConfig):
    iterations: int = MISSING
    keep_fraction: float = MISSING
    epochs_per_iteration: float = MISSING
    steps_per_iteration: int = MISSING
    sign_constraint: bool = MISSING
    pruned_value: str = MISSING
    rewind: bool = MISSING
    final_retrain_epochs: float = MISSING
    final_retrain_steps: int = MISSING


@dataclass
class ForgettingTaskConfig:
    task: str = MISSING
    num_fewshot: Optional[int] = None
    limit: Optional[float] = None
    data_files: Optional[Dict[str, str]] = None


@dataclass
class EvalConfig:
    name: str = MISSING
    target: bool = MISSING
    batch_size: int = MISSING
    iteration_test_size: int = MISSING
    forgetting: List[ForgettingTaskConfig] = MISSING
    lm_eval_batch_size: int = MISSING
    apply_chat_template: bool = MISSING


@dataclass
class LoggerConfig:
    name: str = MISSING
    mode: str = MISSING
    project: str = MISSING
    entity: Optional[str] = MISSING
    log_adapter: bool = MISSING


# ---------------------------------------------------------------- top level
@dataclass
class TrainConfig:
    epochs: float = MISSING
    max_steps: int = MISSING
    batch_size: int = MISSING
    grad_accum: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    warmup_steps: int = MISSING
    lr_schedule: str = MISSING
    max_grad_norm: float = MISSING
    eval_every: int = MISSING
    checkpoint_every: int = MISSING
    max_seq_len: int = MISSING
    threads: int = MISSING


@dataclass
class RunDirConfig:
    root: str = MISSING
    name: str = MISSING
    overwrite: bool = MISSING


@dataclass
class RigsaConfig:
    model: Any = MISSING
    method: Any = MISSING
    task: Any = MISSING
    pruning: Any = MISSING
    eval: Any = MISSING
    logger: Any = MISSING
    seed: int = MISSING
    device: str = MISSING
    dtype: str = MISSING
    train: TrainConfig = MISSING
    run: RunDirConfig = MISSING


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="rigsa_schema", node=RigsaConfig)
    cs.store(group="schema/model", name="model", node=ModelConfig)
    cs.store(group="schema/model", name="tiny", node=TinyModelConfig)
    cs.store(group="schema/method", name="full", node=FullMethodConfig)
    cs.store(group="schema/method", name="head", node=HeadMethodConfig)
    cs.store(group="schema/method", name="lora", node=LoraMethodConfig)
    cs.store(group="schema/method", name="sparse_mask", node=SparseMaskMethodConfig)
    cs.store(group="schema/method", name="rigsa", node=RigsaMethodConfig)
    cs.store(group="schema/task", name="textual_mnist", node=TextualMnistConfig)
    cs.store(group="schema/pruning", name="none", node=PruningConfig)
    cs.store(group="schema/pruning", name="imp", node=ImpPruningConfig)
    cs.store(group="schema/eval", name="eval", node=EvalConfig)
    cs.store(group="schema/logger", name="logger", node=LoggerConfig)


register_schemas()

CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")


def options(group: str) -> list[str]:
    """The options of a config group, from the YAML files shipped in `conf/<group>/`."""
    folder = os.path.join(CONF_DIR, group)
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose the run config outside the CLI (tests, notebooks), exactly as `rigsa-run` does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []), return_hydra_config=False)


# ---------------------------------------------------------------- value checks
def fail(key: str, value: Any, expected: str, fix: str) -> None:
    """Raise the one kind of config error: the key, the bad value, what was expected and the fix."""
    raise ConfigError(f"{key}={value!r} is invalid: expected {expected}. Fix: {fix}")


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

    model = cfg.model
    sources = ("embedded", "hub", "tiny", "local")
    if model.source not in sources:
        fail("model.source", model.source, f"one of {list(sources)}", "use model=<option> with a shipped option")
    if model.source == "local" or model.path:
        if not model.path:
            fail("model.path", model.path, "a local Hugging Face causal-LM directory",
                 "pass model.path=/path/to/model_dir (a folder with config.json and weights)")
        if not os.path.isdir(os.path.expanduser(model.path)):
            fail("model.path", model.path, "an existing directory",
                 "point model.path at a folder with config.json and *.safetensors")
    if model.source == "hub" and not model.hub_id:
        fail("model.hub_id", model.hub_id, "a Hugging Face hub id", "pass model.hub_id=org/name")

    for key in ("train.lr", "train.batch_size", "train.grad_accum", "train.max_seq_len"):
        check_positive(cfg, key)
    for key in ("train.weight_decay", "train.warmup_steps", "train.max_steps", "train.epochs",
                "train.eval_every", "train.checkpoint_every", "train.threads", "train.max_grad_norm",
                "eval.iteration_test_size"):
        check_positive(cfg, key, allow_zero=True)
    if cfg.train.max_steps == 0 and cfg.train.epochs == 0:
        fail("train.epochs", 0, "train.epochs > 0 or train.max_steps > 0", "pass train.max_steps=100")
    if cfg.train.lr_schedule not in ("cosine", "linear", "constant"):
        fail("train.lr_schedule", cfg.train.lr_schedule, "one of ['cosine', 'linear', 'constant']",
             "pass train.lr_schedule=cosine")
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        fail("dtype", cfg.dtype, "one of ['float32', 'bfloat16', 'float16']", "pass dtype=bfloat16")
    if not (cfg.device in ("auto", "cpu", "mps") or str(cfg.device).startswith("cuda")):
        fail("device", cfg.device, "auto, cpu, cuda, cuda:N or mps", "pass device=auto")

    task = cfg.task
    if task.name == "textual_mnist":
        from rigsa.tasks.textual_mnist import check_config

        check_config(task, fail)

    from rigsa.methods import build_method

    method = build_method(cfg.method)
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
    for number, task in enumerate(cfg.eval.forgetting):
        if task.limit is not None and task.limit <= 0:
            fail(f"eval.forgetting[{number}].limit", task.limit, "null (all) or > 0", "pass a positive limit")
        for split, path in (task.data_files or {}).items():
            if not os.path.exists(os.path.expanduser(path)):
                fail(f"eval.forgetting[{number}].data_files.{split}", path, "an existing JSON/JSONL file",
                     "point data_files at local files with the task's fields")
    return method
