"""A run folder is identified by its config's meaning, not by how its path was spelled (#26): runs/x and ./runs/x
are one folder, a folder moved elsewhere is still its run, and nothing is ever written into a finished run."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY

from rigsa.run import run


def files(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_one_folder_through_two_spellings_and_after_a_move_is_the_same_finished_run(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = run(tiny_cfg("run.root=runs/x", "run.name=one"), Path("runs/x/one"))
    written = files(tmp_path / "runs" / "x" / "one")
    again = run(tiny_cfg("run.root=./runs/x", "run.name=one"), Path("./runs/x/one"))  # no refusal, nothing redone
    assert again == first and files(tmp_path / "runs" / "x" / "one") == written
    shutil.move(str(tmp_path / "runs"), str(tmp_path / "moved"))  # another disk, another path
    moved = run(tiny_cfg(f"run.root={tmp_path / 'moved' / 'x'}", "run.name=one"), tmp_path / "moved" / "x" / "one")
    assert moved == first and files(tmp_path / "moved" / "x" / "one") == written


@pytest.mark.slow  # several rigsa-run processes or an lm-eval run (10-25 s): make test-slow
def test_a_sweep_job_refused_at_a_finished_folder_writes_nothing_into_it(tmp_path):
    arguments = [*TINY, f"run.root={tmp_path}", "run.name=done"]
    code = "from rigsa.cli import run_main; run_main()"
    single = subprocess.run([sys.executable, "-c", code, *arguments], capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    written = files(tmp_path / "done")
    # a sweep whose job lands in that folder with another config: refused, reported, the folder untouched
    swept = subprocess.run([sys.executable, "-c", code, "--multirun", *arguments, "train.lr=0.5"], capture_output=True,
                           text=True, timeout=600)
    assert swept.returncode == 1
    assert "holds a run with a different config" in swept.stdout + swept.stderr
    assert f"{tmp_path / 'done'} holds a finished run; its error is not written there" in swept.stderr
    assert files(tmp_path / "done") == written and not (tmp_path / "done" / "error.json").exists()
    assert json.loads((tmp_path / "done" / "results.json").read_text())["train"]["steps"] == 4


def test_paths_in_a_config_compare_by_what_they_name_not_how_they_are_written(tmp_path, monkeypatch):
    from rigsa.run_folder import same_spelling

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "reviews.csv").write_text("review,label\n")
    (tmp_path / "linked.csv").symlink_to(tmp_path / "data" / "reviews.csv")
    real = str((tmp_path / "data" / "reviews.csv").resolve())
    for spelling in ("data/reviews.csv", "./data//reviews.csv", real, str(tmp_path / "linked.csv")):
        assert same_spelling({"task": {"path": spelling}}) == {"task": {"path": real}}, spelling
    assert same_spelling({"hub_id": "nyu-mll/glue", "lr": 0.001, "missing": "gone//x/./y"}) == {
        "hub_id": "nyu-mll/glue", "lr": 0.001, "missing": "gone/x/y"}  # not on disk: only normalized
    assert same_spelling("https://example.org/a//b") == "https://example.org/a//b"  # a URL is left as written
