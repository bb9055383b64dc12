"""Every config option composes; bad input fails with a message naming the value, before any model loads."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from rigsa import assets, models
from rigsa.config import compose, options
from rigsa.run import run
from rigsa.validate import validate
from rigsa.vocabulary import ConfigError

GROUPS = ("model", "method", "task", "pruning", "eval", "logger")
OWN_DATA = Path(__file__).parent / "fixtures" / "hub" / "glue" / "sst2" / "train.jsonl"  # task=classification's file


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option, saved_tiny_model, monkeypatch):
    monkeypatch.setattr(assets, "hub_unreachable_reason", lambda timeout=5.0: None)  # as on a machine with the hub
    extra = {("model", "local"): [f"model.path={saved_tiny_model}"], ("pruning", "imp"): ["method=rigsa"], ("pruning", "imp_cpu"): ["method=rigsa"],
             ("pruning", "none"): ["method=lora"], ("task", "classification"): [f"task.path={OWN_DATA}"]}.get((group, option), [])
    if group == "method" and option != "rigsa":
        extra = ["pruning=none"]  # the default schedule prunes, which only rigsa does
    cfg = compose([f"{group}={option}", *extra])
    # imp_cpu is imp with a CPU budget; a local model is named after its folder
    assert cfg[group].name == {"imp_cpu": "imp", "local": saved_tiny_model.name}.get(option, option)
    validate(cfg)


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(MissingConfigException) as error:
        compose(["method=lorra"])
    message = str(error.value)
    assert "lorra" in message
    for option in ("dora", "full", "head", "lora", "qlora"):
        assert option in message


def test_unknown_key_is_refused_at_compose_time():
    with pytest.raises(ConfigCompositionException) as error:
        compose(["method.rank=4"])
    assert "rank" in str(error.value)


def test_wrong_type_is_refused_at_compose_time():
    with pytest.raises(ConfigCompositionException) as error:
        compose(["train.lr=fast"])
    assert "fast" in str(error.value) and "lr" in str(error.value)


BAD = [
    (["train.lr=-0.001"], "train.lr=-0.001 is invalid: expected a number > 0"),
    (["task.image_size=20"], "task.image_size=20 is invalid: expected one of [28, 14, 7]"),
    (["model=local"], "model.path=None is invalid: expected an existing local Hugging Face causal-LM directory"),
    (["model=local", "model.path=/no/such/dir"], "model.path='/no/such/dir' is invalid: expected an existing local"),
    (["train.batch_size=0"], "train.batch_size=0 is invalid"),
    (["task.train_size=3900", "task.val_size=200"], "lower task.train_size to 3800"),
    (["task.test_size=1001"], "task.test_size=1001 is invalid"),
    (["method=lora", "pruning=none", "method.dropout=1.5"], "method.dropout=1.5 is invalid"),
    (["dtype=float8"], "dtype='float8' is invalid"),
    (["method=lora", "pruning=imp"], "pruning='imp' is invalid: expected a method that prunes (method=rigsa)"),
    (["method=sparta", "method.budget.params=1000"], "method.budget=['density', 'params'] is invalid: expected exactly one"),
    (["method=rigsa", "pruning=imp", "pruning.keep_fraction=1.5"], "pruning.keep_fraction=1.5 is invalid"),
    (["method=gallop", "method.selection=best"], "method.selection='best' is invalid"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_values_fail_before_any_model_loads(overrides, message, tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr(models, "load_model", no_load)
    cfg = compose([*overrides, f"run.root={tmp_path}"])
    with pytest.raises(ConfigError) as error:
        run(cfg, tmp_path / "run")
    assert message in str(error.value)
    assert "Fix:" in str(error.value)
    assert not (tmp_path / "run").exists()


def test_cli_help_lists_groups_and_options():
    output = subprocess.run([sys.executable, "-c", "import sys; sys.argv=['rigsa-run','--help'];"
                             "from rigsa.cli import run_main; run_main()"], capture_output=True, text=True, check=True).stdout
    assert ("method         block_sparse, dora, full, gallop, head, lora, none, qlora, random_mask, rigsa*, snip, sparta"
            in output)
    assert "model          gemma_2b, local, smollm2_1.7b, smollm2_135m*, tiny" in output
    assert "pruning        imp, imp_cpu*, none" in output
    assert "hparams_search lora_lr" in output


def test_cli_bad_value_exits_with_one_clean_message(tmp_path):
    result = subprocess.run([sys.executable, "-c", "from rigsa.cli import run_main; run_main()",
                             "train.lr=-1", f"run.root={tmp_path}"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "rigsa-run: error: train.lr=-1.0 is invalid: expected a number > 0" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- each setting declared once
def schema_classes():
    import dataclasses

    from rigsa import config

    found = {name: obj for name, obj in vars(config).items()
             if isinstance(obj, type) and dataclasses.is_dataclass(obj) and name.endswith("Config")}
    assert {"RigsaConfig", "TrainConfig", "ModelConfig", "TinyModelConfig", "SparseMaskMethodConfig", "BudgetConfig",
            "EvalConfig", "ForgettingTaskConfig"} <= set(found)  # the walk sees the schema (not an empty list)
    return list(found.values())


def test_the_schema_declares_names_and_types_but_no_values():
    """Values live in conf/ only. The one exception: a suite entry's optional fields (an entry written in an
    override has no YAML to inherit from)."""
    import dataclasses

    from omegaconf import MISSING

    allowed = {("ForgettingTaskConfig", name) for name in ("num_fewshot", "limit", "data_files")}
    written = []
    for schema in schema_classes():
        for field in dataclasses.fields(schema):
            has_value = field.default is not MISSING or field.default_factory is not dataclasses.MISSING
            if has_value and (schema.__name__, field.name) not in allowed:
                written.append(f"{schema.__name__}.{field.name}")
    assert written == []


def compose_option(group: str, option: str, tmp_path):
    extra = {("model", "local"): [f"model.path={tmp_path}"]}.get((group, option), [])
    if group == "method" and option != "rigsa":
        extra = ["pruning=none"]
    return compose([f"{group}={option}", *extra])


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_sets_every_field_its_schema_declares(group, option, tmp_path):
    from omegaconf import OmegaConf

    cfg = compose_option(group, option, tmp_path)
    assert OmegaConf.missing_keys(cfg) == set()


@pytest.mark.parametrize("option", options("method"))
def test_method_constructors_take_exactly_their_schema_fields_without_defaults(option):
    import inspect

    from hydra.utils import get_class

    cfg = compose([f"method={option}", "pruning=none"])
    method_class = get_class(cfg.method._target_)
    parameters = inspect.signature(method_class).parameters.values()
    assert {p.name for p in parameters} == set(cfg.method) - {"_target_"}
    assert all(p.default is inspect.Parameter.empty and p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters)


def protocol_members():
    import inspect

    from rigsa.methods import Method

    return {name: member for name, member in vars(Method).items()
            if inspect.isfunction(member) and not name.startswith("_")}


@pytest.mark.parametrize("option", options("method"))
def test_every_method_implements_the_whole_protocol(option):
    import inspect

    from rigsa.methods import build_method

    method = build_method(compose([f"method={option}", "pruning=none"]).method)
    assert isinstance(method.name, str) and isinstance(method.prunes, bool)
    assert set(protocol_members()) == {"attach", "trainable_parameters", "param_groups", "after_step", "prune",
                                       "stats", "adapter_state", "save"}
    for name, declared in protocol_members().items():
        bound = getattr(method, name)
        expected = list(inspect.signature(declared).parameters)[1:]  # without self
        assert list(inspect.signature(bound).parameters) == expected, f"{option}.{name}"


def test_pruning_asks_the_method_whether_it_prunes():
    from rigsa.methods import build_method

    prunes = {option: build_method(compose([f"method={option}", "pruning=none"]).method).prunes
              for option in options("method")}
    assert [option for option, value in prunes.items() if value] == ["rigsa"]


BASES = {"method": ("sparta", "lora"), "eval": ("target",), "logger": ("wandb",), "model": ("smollm2_135m",),
         "pruning": ("imp",), "task": ("classification",)}
# Options that share no family (every one of their fields is their own). A new option either starts from a
# family base above or is listed here.
STANDALONE = {("method", "rigsa"), ("method", "full"), ("method", "head"), ("method", "none"), ("task", "textual_mnist"),
              ("pruning", "none")}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_a_variant_writes_only_what_differs_from_its_family_base(group, option, tmp_path):
    """A YAML whose defaults start from another option of its group sets no key to the base's own value."""
    from omegaconf import OmegaConf

    from rigsa.config import CONF_DIR

    path = f"{CONF_DIR}/{group}/{option}.yaml"
    raw, global_package = OmegaConf.load(path), open(path).read().startswith("# @package _global_")
    # A preset that also sets another group's keys (method=qlora: model.quantize) is a global-package file that
    # places its base at `<base>@<group>` and its own keys under `<group>:`.
    entries = [entry.partition("@") for entry in raw.get("defaults", []) if isinstance(entry, str)]
    bases = [name for name, _, package in entries if name in BASES.get(group, ()) and package in ("", group)]
    if not bases:
        assert option in BASES.get(group, ()) or (group, option) in STANDALONE
        return
    base = compose_option(group, bases[0], tmp_path)[group]
    own = raw[group] if global_package else raw
    own = OmegaConf.to_container(own, resolve=False)  # an interpolation (model=local's name) stays as written
    repeated = [key for key, value in own.items() if key != "defaults" and key in base and base[key] == value]
    assert repeated == [], f"{group}/{option}.yaml repeats {repeated} from {bases[0]}.yaml"
