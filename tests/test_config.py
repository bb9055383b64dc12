"""Every config option composes; bad input fails with a message naming the value, before any model loads."""
from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from rigsa import models
from rigsa.config import ConfigError, compose, options, validate
from rigsa.run import run

GROUPS = ("model", "method", "task", "pruning", "eval", "logger")


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option, tmp_path):
    extra = {("model", "local"): [f"model.path={tmp_path}"], ("pruning", "imp"): ["method=rigsa"], ("pruning", "imp_cpu"): ["method=rigsa"],
             ("pruning", "none"): ["method=lora"]}.get((group, option), [])
    if group == "method" and option != "rigsa":
        extra = ["pruning=none"]  # the default schedule prunes, which only rigsa does
    cfg = compose([f"{group}={option}", *extra])
    assert cfg[group].name == {"imp_cpu": "imp"}.get(option, option)  # imp_cpu is imp with a CPU budget
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
    (["model=local"], "model.path=None is invalid: expected a local Hugging Face causal-LM directory"),
    (["model=local", "model.path=/no/such/dir"], "model.path='/no/such/dir' is invalid: expected an existing directory"),
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
    assert ("method   block_sparse, dora, full, gallop, head, lora, qlora, random_mask, rigsa*, snip, sparta"
            in output)
    assert "model    local, smollm2_1.7b, smollm2_135m*, tiny" in output
    assert "pruning  imp, imp_cpu*, none" in output


def test_cli_bad_value_exits_with_one_clean_message(tmp_path):
    result = subprocess.run([sys.executable, "-c", "from rigsa.cli import run_main; run_main()",
                             "train.lr=-1", f"run.root={tmp_path}"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "rigsa-run: error: train.lr=-1.0 is invalid: expected a number > 0" in result.stderr
    assert "Traceback" not in result.stderr
