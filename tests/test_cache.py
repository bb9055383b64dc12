"""The score cache and atomic writes: computed once per key, unique temporary files, nothing left behind."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from rigsa import cache


def test_a_score_is_computed_once_per_key_then_read(private_cache):
    calls = []
    compute = lambda: calls.append(1) or {"accuracy": 0.25}  # noqa: E731
    assert cache.cached("base_target", {"model": "a"}, compute) == ({"accuracy": 0.25}, False)
    assert cache.cached("base_target", {"model": "a"}, compute) == ({"accuracy": 0.25}, True)
    assert cache.cached("base_target", {"model": "b"}, compute) == ({"accuracy": 0.25}, False)
    assert len(calls) == 2 and len(list((private_cache / "base_target").glob("*.json"))) == 2


def test_two_writers_of_one_key_use_different_temporary_files_in_its_folder(tmp_path, monkeypatch):
    renamed = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda source, target: renamed.append(Path(source)) or real(source, target))
    target = tmp_path / "scores" / "key.json"
    cache.write_text_atomically(target, "first")
    cache.write_text_atomically(target, "second")
    assert target.read_text() == "second"
    assert len(set(renamed)) == 2 and all(path.parent == target.parent for path in renamed)
    assert sorted(p.name for p in target.parent.iterdir()) == ["key.json"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "results.json"
    cache.write_text_atomically(target, "old")

    def crash(temporary: Path) -> None:
        temporary.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.replace_atomically(target, crash)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
