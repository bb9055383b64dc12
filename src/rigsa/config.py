"""Config schema (registered in Hydra's ConfigStore) and the value checks run before any heavy work.

Each YAML in `conf/<group>/` extends one schema here (`/schema/<group>/<name>@_here_`), so an
unknown key or a wrong type fails when Hydra composes the config. `validate` then checks values
(ranges, choices, paths) before a model is loaded, so a bad run fails in a second, not an hour.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value is wrong; the message names the key, the value, and the fix."""


# ---------------------------------------------------------------- model
@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = "embedded"  # embedded | hub | tiny | local
    hub_id: Optional[str] = None
    revision: Optional[str] = None
    path: Optional[str] = None
    # Only for source=tiny: the random-init Llama's shape.
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128


# ---------------------------------------------------------------- methods
@dataclass
class MethodConfig:
    _target_: str = MISSING
    name: str = MISSING


@dataclass
class FullMethodConfig(MethodConfig):
    train_embeddings: bool = True


@dataclass
class HeadMethodConfig(MethodConfig):
    pass


@dataclass
class LoraMethodConfig(MethodConfig):
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    use_dora: bool = False
    load_in_4bit: bool = False
    quant_type: str = "nf4"


@dataclass
class BudgetConfig:
    density: Optional[float] = None
    params: Optional[int] = None
    match: Optional[str] = None
    r: int = 8
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    from_run: Optional[str] = None


@dataclass
class SparseMaskMethodConfig(MethodConfig):
    selection: str = "random"
    target_modules: List[str] = field(default_factory=lambda: ["sparta"])
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    scope: str = "per_tensor"
    block_size: int = 0
    calib_batches: int = 4
    eps: float = 1e-8
    train_head: bool = False
    reselect_every: int = 0
    seed: int = 0


@dataclass
class RigsaMethodConfig(MethodConfig):
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    init: str = "normal"
    init_scale: float = 0.1
    gate_init: float = 1e-6
    gate: str = "layer"
    weight_decay: float = 1.0
    seed: int = 0


# ---------------------------------------------------------------- task / pruning / eval / logger
@dataclass
class TextualMnistConfig:
    name: str = "textual_mnist"
    image_size: int = 14
    train_size: int = 3000
    val_size: int = 200
    test_size: int = 1000
    split_seed: int = 0
    chat_template: bool = True


@dataclass
class PruningConfig:
    name: str = "none"


@dataclass
class ImpPruningConfig(PruningConfig):
    iterations: int = 5
    keep_fraction: float = 0.5
    epochs_per_iteration: float = 1.0
    steps_per_iteration: int = 0
    sign_constraint: bool = False
    pruned_value: str = "zero"
    rewind: bool = False
    final_retrain_epochs: float = 1.0
    final_retrain_steps: int = 0


@dataclass
class ForgettingTaskConfig:
    task: str = MISSING
    num_fewshot: Optional[int] = None
    limit: Optional[float] = None
    data_files: Optional[Dict[str, str]] = None


@dataclass
class EvalConfig:
    name: str = MISSING
    target: bool = True
    batch_size: int = 16
    iteration_test_size: int = 0  # digits for the accuracy after each pruning iteration (0 = task.test_size)
    forgetting: List[ForgettingTaskConfig] = field(default_factory=list)
    lm_eval_batch_size: int = 8
    apply_chat_template: bool = False


@dataclass
class LoggerConfig:
    name: str = MISSING
    mode: str = "auto"  # auto | online | offline | disabled
    project: str = "rigsa"
    entity: Optional[str] = None
    log_adapter: bool = True


# ---------------------------------------------------------------- top level
@dataclass
class TrainConfig:
    epochs: float = 1.0
    max_steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "cosine"
    max_grad_norm: float = 1.0
    eval_every: int = 0
    checkpoint_every: int = 50
    max_seq_len: int = 1024
    threads: int = 0


@dataclass
class RunDirConfig:
    root: str = "runs"
    name: str = MISSING
    overwrite: bool = False


@dataclass
class RigsaConfig:
    model: Any = MISSING
    method: Any = MISSING
    task: Any = MISSING
    pruning: Any = MISSING
    eval: Any = MISSING
    logger: Any = MISSING
    seed: int = 0
    device: str = "auto"
    dtype: str = "bfloat16"
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunDirConfig = field(default_factory=RunDirConfig)


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="rigsa_schema", node=RigsaConfig)
    cs.store(group="schema/model", name="model", node=ModelConfig)
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
def check_budget(budget: DictConfig) -> str:
    """Exactly one budget, its value in range; return which one. (The count needs the model: sparse.targets.)"""
    chosen = [key for key in ("density", "params", "match", "from_run") if budget.get(key) not in (None, "", 0)]
    if len(chosen) != 1:
        _fail("method.budget", chosen, "exactly one of density, params, match, from_run",
              "set the others to null, e.g. method.budget.density=null method.budget.params=100000")
    key = chosen[0]
    if key == "density" and not 0 < budget.density <= 1:
        _fail("method.budget.density", budget.density, "0 < density <= 1", "pass method.budget.density=0.005")
    if key == "params" and budget.params < 1:
        _fail("method.budget.params", budget.params, "a count >= 1", "pass method.budget.params=100000")
    if key == "match" and budget.match != "lora":
        _fail("method.budget.match", budget.match, "lora", "pass method.budget.match=lora method.budget.r=8")
    if key == "from_run" and not os.path.exists(os.path.join(os.path.expanduser(budget.from_run), "results.json")):
        _fail("method.budget.from_run", budget.from_run, "a finished run directory (with results.json)",
              "point it at runs/<name> of a finished run")
    return key


def _fail(key: str, value: Any, expected: str, fix: str) -> None:
    raise ConfigError(f"{key}={value!r} is invalid: expected {expected}. Fix: {fix}")


def _positive(cfg: DictConfig, key: str, allow_zero: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None or value < 0 or (value == 0 and not allow_zero):
        expected = "a number >= 0" if allow_zero else "a number > 0"
        _fail(key, value, expected, f"pass e.g. {key}={1 if not allow_zero else 0}")


def validate(cfg: DictConfig) -> None:
    """Check every value a run depends on; raise ConfigError naming the first bad one."""
    for group in ("model", "method", "task", "pruning", "eval", "logger"):
        if OmegaConf.select(cfg, f"{group}.name") is None:
            _fail(group, None, f"one of {options(group)}", f"pass {group}=<option>")

    model = cfg.model
    sources = ("embedded", "hub", "tiny", "local")
    if model.source not in sources:
        _fail("model.source", model.source, f"one of {list(sources)}", "use model=<option> with a shipped option")
    if model.source == "local" or model.path:
        if not model.path:
            _fail("model.path", model.path, "a local Hugging Face causal-LM directory",
                  "pass model.path=/path/to/model_dir (a folder with config.json and weights)")
        if not os.path.isdir(os.path.expanduser(model.path)):
            _fail("model.path", model.path, "an existing directory",
                  "point model.path at a folder with config.json and *.safetensors")
    if model.source == "hub" and not model.hub_id:
        _fail("model.hub_id", model.hub_id, "a Hugging Face hub id", "pass model.hub_id=org/name")

    for key in ("train.lr", "train.batch_size", "train.grad_accum", "train.max_seq_len"):
        _positive(cfg, key)
    for key in ("train.weight_decay", "train.warmup_steps", "train.max_steps", "train.epochs",
                "train.eval_every", "train.checkpoint_every", "train.threads", "train.max_grad_norm",
                "eval.iteration_test_size"):
        _positive(cfg, key, allow_zero=True)
    if cfg.train.max_steps == 0 and cfg.train.epochs == 0:
        _fail("train.epochs", 0, "train.epochs > 0 or train.max_steps > 0", "pass train.max_steps=100")
    if cfg.train.lr_schedule not in ("cosine", "linear", "constant"):
        _fail("train.lr_schedule", cfg.train.lr_schedule, "one of ['cosine', 'linear', 'constant']",
              "pass train.lr_schedule=cosine")
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        _fail("dtype", cfg.dtype, "one of ['float32', 'bfloat16', 'float16']", "pass dtype=bfloat16")
    if not (cfg.device in ("auto", "cpu", "mps") or str(cfg.device).startswith("cuda")):
        _fail("device", cfg.device, "auto, cpu, cuda, cuda:N or mps", "pass device=auto")

    task = cfg.task
    if task.name == "textual_mnist":
        from rigsa.tasks.textual_mnist import check_config

        check_config(task, _fail)

    method = cfg.method
    if "r" in method:
        _positive(cfg, "method.r")
        if not 0 <= method.dropout < 1:
            _fail("method.dropout", method.dropout, "0 <= dropout < 1", "pass method.dropout=0.0")
        if method.load_in_4bit and method.quant_type not in ("nf4", "fp4"):
            _fail("method.quant_type", method.quant_type, "nf4 or fp4", "pass method.quant_type=nf4")

    if "budget" in method:
        from rigsa.sparse.selection import RULES

        check_budget(method.budget)
        if method.selection not in RULES:
            _fail("method.selection", method.selection, f"one of {list(RULES)}", "pass method.selection=random")
        if method.block_size < 0 or method.scope not in ("per_tensor", "global"):
            _fail("method.scope", method.scope, "per_tensor or global (block_size >= 0)", "pass method.scope=per_tensor")
    if cfg.pruning.name == "imp":
        if "gate_init" not in method:
            _fail("pruning", "imp", "a method that prunes (method=rigsa)", "pass pruning=none or method=rigsa")
        if not 0 < cfg.pruning.keep_fraction <= 1:
            _fail("pruning.keep_fraction", cfg.pruning.keep_fraction, "0 < keep_fraction <= 1", "pass pruning.keep_fraction=0.5")
        if cfg.pruning.pruned_value not in ("zero", "init"):
            _fail("pruning.pruned_value", cfg.pruning.pruned_value, "zero or init", "pass pruning.pruned_value=zero")
        _positive(cfg, "pruning.iterations")
    if "gate" in method and method.gate not in ("layer", "global"):
        _fail("method.gate", method.gate, "layer or global", "pass method.gate=layer")

    if cfg.logger.mode not in ("auto", "online", "offline", "disabled"):
        _fail("logger.mode", cfg.logger.mode, "one of ['auto', 'online', 'offline', 'disabled']",
              "pass logger.mode=offline")
    _positive(cfg, "eval.batch_size")
    _positive(cfg, "eval.lm_eval_batch_size")
    for number, task in enumerate(cfg.eval.forgetting):
        if task.limit is not None and task.limit <= 0:
            _fail(f"eval.forgetting[{number}].limit", task.limit, "null (all) or > 0", "pass a positive limit")
        for split, path in (task.data_files or {}).items():
            if not os.path.exists(os.path.expanduser(path)):
                _fail(f"eval.forgetting[{number}].data_files.{split}", path, "an existing JSON/JSONL file",
                      "point data_files at local files with the task's fields")
