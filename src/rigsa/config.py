"""Config schema (registered in Hydra's ConfigStore) and the value checks run before any heavy work.

Each YAML in `conf/<group>/` extends one schema here (`/schema/<group>/<name>@_here_`), so an
unknown key or a wrong type fails when Hydra composes the config. `rigsa.validate` then checks values
(ranges, choices, paths) before a model is loaded, so a bad run fails in a second, not an hour. This module
knows only the schema: it imports no method, task or model (they import it, and rigsa.validate imports them).
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from rigsa.vocabulary import ConfigError


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
NoAdapterMethodConfig = declare("NoAdapterMethodConfig", MethodConfig)
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
ClassificationConfig = declare("ClassificationConfig", TaskConfig, path=OptionalText, encoding=str,
                               hub_id=OptionalText, hub_config=OptionalText, revision=OptionalText, data_files=Any,
                               text_column=str, text_pair_column=OptionalText, label_column=str,
                               labels=Optional[List[Any]], label_words=Names, instruction=str, text_label=str,
                               text_pair_label=str,
                               splits=SplitRecipeConfig, max_train_size=int, max_test_size=int, max_prompt_tokens=int,
                               metric=str)
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
                     lm_eval_batch_size=int, apply_chat_template=bool, split=str)
LoggerConfig = declare("LoggerConfig", name=str, mode=str, project=str, entity=OptionalText, log_adapter=bool)

# ---------------------------------------------------------------- top level
TrainConfig = declare("TrainConfig", epochs=float, max_steps=int, batch_size=int, grad_accum=int, lr=float,
                      weight_decay=float, warmup_steps=int, lr_schedule=str, max_grad_norm=float, on_nonfinite=str,
                      eval_every=int, early_stopping=int, checkpoint_every=int, max_seq_len=int, threads=int)
RunDirConfig = declare("RunDirConfig", root=str, name=str, overwrite=bool)
ReportConfig = declare("ReportConfig", name=OptionalText, title=OptionalText, source=OptionalText, columns=Names,
                       rows=List[Any])
ObjectiveConfig = declare("ObjectiveConfig", metric=str, forgetting_weight=float)
RigsaConfig = declare("RigsaConfig", model=Any, method=Any, task=Any, pruning=Any, eval=Any, logger=Any, seed=int,
                      variant=OptionalText, device=str, dtype=str, train=TrainConfig, run=RunDirConfig, report=ReportConfig,
                      objective=ObjectiveConfig, optuna_trial=Optional[int])
# rigsa-merge's config (conf/merge.yaml): the adapters by run folder, the method and its parameters
MergeConfig = declare("MergeConfig", adapters=Names, weights=Optional[List[float]], merge_method=str, density=Any,
                      scale=float, majority_sign=str, seed=int, mergekit=OptionalText, name=str, device=str,
                      threads=int, eval=Any, run=RunDirConfig, report=ReportConfig, objective=ObjectiveConfig)


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="rigsa_schema", node=RigsaConfig)
    cs.store(name="rigsa_merge_schema", node=MergeConfig)
    cs.store(group="schema/model", name="model", node=ModelConfig)
    cs.store(group="schema/model", name="tiny", node=TinyModelConfig)
    cs.store(group="schema/method", name="full", node=FullMethodConfig)
    cs.store(group="schema/method", name="head", node=HeadMethodConfig)
    cs.store(group="schema/method", name="none", node=NoAdapterMethodConfig)
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


def folder_name(path: str | None, default: str) -> str:
    """The last part of a folder path (`model=local`'s name: runs of two local models get two folders)."""
    return os.path.basename(os.path.normpath(os.path.expanduser(path))) if path else default


# ${rigsa_asset:sentiment}/tweets.jsonl in conf/task/sentiment_*.yaml: the fetched asset's folder
if not OmegaConf.has_resolver("rigsa_asset"):
    from rigsa.assets import expected_path

    OmegaConf.register_new_resolver("rigsa_asset", expected_path)

# ${rigsa_folder_name:${.path},local} in conf/model/local.yaml
if not OmegaConf.has_resolver("rigsa_folder_name"):
    OmegaConf.register_new_resolver("rigsa_folder_name", folder_name)

CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")


def options(group: str) -> list[str]:
    """The options of a config group, from the YAML files shipped in `conf/<group>/`."""
    folder = os.path.join(CONF_DIR, group)
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))


def compose(overrides: list[str] | None = None, with_hydra: bool = False, config_name: str = "config") -> DictConfig:
    """Compose the run config outside the CLI (tests, notebooks), exactly as `rigsa-run` does (with Hydra's own
    node when `with_hydra`: a sweep's hydra.sweeper.params); config_name="merge": `rigsa-merge`'s."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=with_hydra)


# ---------------------------------------------------------------- value checks
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
