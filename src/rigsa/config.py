"""Config schema (registered in Hydra's ConfigStore) and the value checks run before any heavy work.

Each YAML in `conf/<group>/` extends one schema here (`/schema/<group>/<name>@_here_`), so an
unknown key or a wrong type fails when Hydra composes the config. `validate` then checks values
(ranges, choices, paths) before a model is loaded, so a bad run fails in a second, not an hour.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A config value is wrong; the message names the key, the value, and the fix."""


# The schema gives names and types only: `declare` makes every field MISSING, so no value can be written
# here. The YAML files in conf/ give every value and its help text (one place each; tests/test_config.py
# checks that they agree). The one exception is ForgettingTaskConfig's optional fields: a suite entry
# written in a command-line override has no YAML to inherit from, so None (= lm-eval's default) is here.
def declare(class_name: str, base: type | None = None, /, **types: Any) -> type:
    """A structured-config dataclass (extending `base`) whose fields have these types and no value."""
    fields = [(field_name, kind, field(default=MISSING)) for field_name, kind in types.items()]
    return make_dataclass(class_name, fields, bases=(base,) if base else ())


OptionalText = Optional[str]
Names = List[str]

# ---------------------------------------------------------------- model
ModelConfig = declare("ModelConfig", name=str, source=str, hub_id=OptionalText, revision=OptionalText,
                      path=OptionalText, base_dtype=str, quantize=OptionalText)
TinyModelConfig = declare("TinyModelConfig", ModelConfig,  # source=tiny: the random-init Llama's shape
                          hidden_size=int, num_layers=int, num_heads=int, num_kv_heads=int, intermediate_size=int)

# ---------------------------------------------------------------- methods
# A method's constructor takes exactly its schema's fields but _target_ (tests/test_config.py checks it).
MethodConfig = declare("MethodConfig", _target_=str, name=str)
FullMethodConfig = declare("FullMethodConfig", MethodConfig, train_embeddings=bool)
HeadMethodConfig = declare("HeadMethodConfig", MethodConfig)
LoraMethodConfig = declare("LoraMethodConfig", MethodConfig, r=int, alpha=float, dropout=float, target_modules=Names,
                           use_dora=bool)
BudgetConfig = declare("BudgetConfig", density=Optional[float], params=Optional[int], match=OptionalText, r=int,
                       target_modules=Names, from_run=OptionalText)
SparseMaskMethodConfig = declare("SparseMaskMethodConfig", MethodConfig, selection=str, target_modules=Names,
                                 budget=BudgetConfig, scope=str, block_size=int, calib_batches=int, eps=float,
                                 train_head=bool, reselect_every=int, seed=int)
RigsaMethodConfig = declare("RigsaMethodConfig", MethodConfig, target_modules=Names, init=str, init_scale=float,
                            gate_init=float, gate=str, weight_decay=float, seed=int)

# ---------------------------------------------------------------- task / pruning / eval / logger
TaskConfig = declare("TaskConfig", family=str, name=str, tag=str, readout=str, head_init=str, chat_template=bool,
                     split_seed=int)
TextualMnistConfig = declare("TextualMnistConfig", TaskConfig, image_size=int, train_size=int, val_size=int,
                             test_size=int)
SplitRecipeConfig = declare("SplitRecipeConfig", train=str, dev=OptionalText, dev_size=Optional[int], dev_pick=str,
                            test=Names, fractions=Dict[str, float], column=OptionalText)
ClassificationConfig = declare("ClassificationConfig", TaskConfig, path=OptionalText, hub_id=OptionalText,
                               hub_config=OptionalText, revision=OptionalText, data_files=Any,
                               text_column=str, text_pair_column=OptionalText, label_column=str,
                               labels=Optional[List[Any]], label_words=Names, instruction=str, text_label=str,
                               text_pair_label=str,
                               splits=SplitRecipeConfig, max_train_size=int, max_prompt_tokens=int, metric=str)
PruningConfig = declare("PruningConfig", name=str)
ImpPruningConfig = declare("ImpPruningConfig", PruningConfig, iterations=int, keep_fraction=float,
                           epochs_per_iteration=float, steps_per_iteration=int, sign_constraint=bool,
                           pruned_value=str, rewind=bool, final_retrain_epochs=float, final_retrain_steps=int)


@dataclass
class ForgettingTaskConfig:
    task: str = MISSING
    num_fewshot: Optional[int] = None
    limit: Optional[float] = None
    data_files: Optional[Dict[str, str]] = None


EvalConfig = declare("EvalConfig", name=str, target=bool, batch_size=int, iteration_test_size=int,
                     iteration_forgetting=bool, forgetting=List[ForgettingTaskConfig], include_path=Names, limit=Optional[float],
                     lm_eval_batch_size=int, apply_chat_template=bool)
LoggerConfig = declare("LoggerConfig", name=str, mode=str, project=str, entity=OptionalText, log_adapter=bool)

# ---------------------------------------------------------------- top level
TrainConfig = declare("TrainConfig", epochs=float, max_steps=int, batch_size=int, grad_accum=int, lr=float,
                      weight_decay=float, warmup_steps=int, lr_schedule=str, max_grad_norm=float, on_nonfinite=str,
                      eval_every=int, checkpoint_every=int, max_seq_len=int, threads=int)
RunDirConfig = declare("RunDirConfig", root=str, name=str, overwrite=bool)
ReportConfig = declare("ReportConfig", name=OptionalText, title=OptionalText, source=OptionalText, columns=Names,
                       rows=List[Any])
ObjectiveConfig = declare("ObjectiveConfig", metric=str, forgetting_weight=float)
RigsaConfig = declare("RigsaConfig", model=Any, method=Any, task=Any, pruning=Any, eval=Any, logger=Any, seed=int,
                      variant=OptionalText, device=str, dtype=str, train=TrainConfig, run=RunDirConfig, report=ReportConfig,
                      objective=ObjectiveConfig)


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
    cs.store(group="schema/task", name="classification", node=ClassificationConfig)
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


def compose(overrides: list[str] | None = None, with_hydra: bool = False) -> DictConfig:
    """Compose the run config outside the CLI (tests, notebooks), exactly as `rigsa-run` does (with Hydra's own
    node when `with_hydra`: a sweep's hydra.sweeper.params)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []), return_hydra_config=with_hydra)


# ---------------------------------------------------------------- value checks
def fail(key: str, value: Any, expected: str, fix: str) -> None:
    """Raise the one kind of config error: the key, the bad value, what was expected and the fix."""
    raise ConfigError(f"{key}={value!r} is invalid: expected {expected}. Fix: {fix}")


def unknown_key_message(full_key: str, schema: type) -> str:
    """`full_key` is declared by no schema: name it, the closest valid key and every valid key of its node."""
    parent, _, leaf = full_key.rpartition(".")
    node = parent or "the run config"
    valid = sorted(item.name for item in fields(schema) if not item.name.startswith("_"))
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f"did you mean {parent + '.' if parent else ''}{close[0]}? " if close else ""
    return f"{full_key} is not a setting. Fix: {hint}The valid keys of {node} are: {', '.join(valid)}"


def check_declared(node: DictConfig, prefix: str = "") -> None:
    """Refuse keys no schema declares, e.g. `+train.lrr=1e-3` (a `+` override bypasses Hydra's own check)."""
    schema = node._metadata.object_type
    for key in node.keys():
        if is_dataclass(schema) and key not in {item.name for item in fields(schema)}:
            raise ConfigError(unknown_key_message(f"{prefix}{key}", schema))
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            check_declared(child, f"{prefix}{key}.")
        elif isinstance(child, ListConfig) and not child._is_none():  # a null list (task.labels) holds nothing
            for number, item in enumerate(child):
                if isinstance(item, DictConfig):
                    check_declared(item, f"{prefix}{key}[{number}].")


def check_run_name(cfg: DictConfig) -> None:
    """The run folder run.root/run.name must lie inside run.root."""
    root = os.path.abspath(os.path.expanduser(cfg.run.root))
    folder = os.path.abspath(os.path.join(root, str(cfg.run.name)))
    if not cfg.run.name or os.path.isabs(str(cfg.run.name)) or os.path.dirname(folder) != root:
        fail("run.name", cfg.run.name, f"a folder name inside run.root ({cfg.run.root}): no '/', '..' or empty name",
             "pass run.name=<name> (use run.root=<folder> to put runs elsewhere)")


def check_device(device: str) -> None:
    """The device must exist on this machine (checked before the run folder is written)."""
    import torch

    if not (device in ("auto", "cpu", "mps") or str(device).startswith("cuda")):
        fail("device", device, "auto, cpu, cuda, cuda:N or mps", "pass device=auto")
    if str(device).startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        number = str(device).partition(":")[2]
        if count == 0 or (number and (not number.isdigit() or int(number) >= count)):
            fail("device", device, f"a CUDA device this machine has ({count} visible)", "pass device=auto or device=cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        fail("device", device, "an available Apple MPS device", "pass device=auto or device=cpu")


def check_positive(cfg: DictConfig, key: str, allow_zero: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None or value < 0 or (value == 0 and not allow_zero):
        expected = "a number >= 0" if allow_zero else "a number > 0"
        fail(key, value, expected, f"pass e.g. {key}={1 if not allow_zero else 0}")


# Stored precisions of the frozen base weights (model.base_dtype); compute precision is `dtype`.
BASE_DTYPES = ("float32", "bfloat16")
# A method whose `bases` lists this trains over a model.quantize base (bitsandbytes 4-bit, rigsa.quantize).
QUANTIZED_BASE = "4bit"
QUANT_TYPES = ("nf4", "fp4")


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
    from rigsa.models import check_source

    check_source(model)

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
    if cfg.train.on_nonfinite not in ("stop", "skip_step"):
        fail("train.on_nonfinite", cfg.train.on_nonfinite, "stop or skip_step", "pass train.on_nonfinite=stop")
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        fail("dtype", cfg.dtype, "one of ['float32', 'bfloat16', 'float16']", "pass dtype=bfloat16")
    check_device(cfg.device)

    from rigsa.readout import HEAD_INITS, READOUTS
    from rigsa.tasks import family

    if cfg.task.readout not in READOUTS:
        fail("task.readout", cfg.task.readout, f"one of {list(READOUTS)}", "pass task.readout=answer_token")
    if cfg.task.head_init not in HEAD_INITS:
        fail("task.head_init", cfg.task.head_init, f"one of {list(HEAD_INITS)}", "pass task.head_init=auto")
    family(cfg.task).check_config(cfg.task, fail)

    from rigsa.methods import build_method

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
    from rigsa.forgetting import check_suite

    check_suite(cfg.eval, fail)
    return method
