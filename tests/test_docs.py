"""The README and docs/ stay true: every `rigsa-run` command they show composes (as `rigsa-run --cfg job` would)
with only declared keys, the README's tiny quick starts run, every entry point's and script's --help works, and
every page the README links exists."""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from rigsa.cli import first_value
from rigsa.config import check_declared, compose
from rigsa.run import run

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands() -> list[tuple[str, str]]:
    """(page, command) for every `rigsa-run` line of a code block and every `rigsa-run ...` code span."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for block in re.findall(r"```(?:bash)?\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if line.strip().startswith("rigsa-run") and not line.strip().startswith("rigsa-run:"):  # not output
                    found.append((page.name, line.strip()))
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        found += [(page.name, span) for span in re.findall(r"`(rigsa-run[^`]*)`", prose) if "..." not in span]
    return found


def overrides_of(command: str) -> tuple[list[str], bool]:
    """The command's overrides (a sweep's keys at their first value), and whether it is a sweep."""
    words = [word for word in shlex.split(command, comments=True)[1:] if word not in ("--cfg", "job", "--help")]
    sweep = any(word in ("-m", "--multirun") for word in words)
    parsed = OverridesParser.create().parse_overrides([word for word in words if word not in ("-m", "--multirun")])
    return [f"{'+' if item.is_add() else ''}{item.get_key_element()}={first_value(item)}" for item in parsed], sweep


def test_the_pages_show_the_commands_this_test_reads():
    shown = [command for _, command in commands()]
    assert len(shown) >= 15
    assert any("task=classification" in command for command in shown)  # a continued line, read whole
    assert any("--multirun" in command for command in shown)


@pytest.mark.parametrize("page,command", commands())
def test_every_documented_command_composes(page, command):
    overrides, sweep = overrides_of(command)
    hydra = [override for override in overrides if override.startswith("hydra")]
    if sweep or hydra:
        compose(overrides, with_hydra=True)  # Hydra's own groups (a launcher) and the sweep's settings compose too
    check_declared(compose([override for override in overrides if override not in hydra]))


def readme_command(fragment: str) -> str:
    (command,) = [command for page, command in commands() if page == "README.md" and fragment in command]
    return command


def test_the_readme_tiny_quick_start_runs(tmp_path, private_cache):
    overrides, _ = overrides_of(readme_command("model=tiny method=lora"))
    results = run(compose([*overrides, f"run.root={tmp_path}"]), tmp_path / "quick")
    assert results["method"] == "lora" and results["train"]["steps"] == 20 and results["target"]["accuracy"] is not None


def test_method_none_measures_the_base_without_training(tmp_path, private_cache):
    overrides, _ = overrides_of(readme_command("method=none"))
    results = run(compose([*overrides, "model=tiny", "task.image_size=7", "logger=none", f"run.root={tmp_path}"]),
                  tmp_path / "base")
    assert results["train"]["steps"] == 0 and results["trainable_params"] == 0
    assert results["target"]["accuracy"] == results["target"]["base_accuracy"]
    assert results["target"]["metrics"] == results["target"]["base_metrics"]
    assert not (tmp_path / "base" / "checkpoint").exists()


def test_every_linked_page_exists():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links {target}, which does not exist"


ENTRY_POINTS = {"rigsa-run": "rigsa.cli:run_main", "rigsa-assets": "rigsa.cli:assets_main",
                "rigsa-apply": "rigsa.apply:main", "rigsa-report": "rigsa.report:main",
                "rigsa-convert-gguf": "rigsa.cli:convert_gguf_main", "rigsa-merge": "rigsa.cli:merge_main"}


def test_the_entry_points_are_the_installed_commands():
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    scripts = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"', section, flags=re.M))  # tomllib is Python >= 3.11 only
    assert set(scripts) == set(ENTRY_POINTS)
    assert all((Path(sys.executable).parent / name).exists() for name in scripts)  # installed beside python


@pytest.mark.parametrize("program", [*ENTRY_POINTS, "scripts/bench_sparse.py"])
def test_every_entry_point_and_script_answers_help(program, monkeypatch, capsys):
    """In this process (a subprocess per command would cost seconds of imports each): argv as the shell gives it."""
    import importlib
    import runpy

    monkeypatch.setattr(sys, "argv", [program, "--help"])
    if program.endswith(".py"):
        run = lambda: runpy.run_path(str(ROOT / program), run_name="__main__")  # noqa: E731
    else:
        module, _, function = ENTRY_POINTS[program].partition(":")
        run = getattr(importlib.import_module(module), function)
    try:
        code = run()
    except SystemExit as exit:  # argparse's --help exits 0
        code = exit.code
    assert code in (0, None)
    assert "usage" in capsys.readouterr().out.lower()
