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


def slow_compute_in_process(cache_folder: str, calls_file: str, started) -> None:
    import time

    from rigsa import cache as cache_module

    cache_module.scores_root = lambda: Path(cache_folder)

    def compute():
        started.set()
        with open(calls_file, "a") as handle:
            handle.write("x")
        time.sleep(1.5)
        return {"accuracy": 0.5}

    cache_module.cached("base_target", {"model": "shared"}, compute)


def test_concurrent_jobs_compute_a_shared_base_score_once(private_cache, tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    started = context.Event()
    calls = tmp_path / "calls.txt"
    first = context.Process(target=slow_compute_in_process, args=(str(private_cache), str(calls), started))
    first.start()
    assert started.wait(60)  # the first job holds the key's lock and is computing
    result = cache.cached("base_target", {"model": "shared"}, lambda: {"accuracy": 0.99})
    first.join(60)
    assert result == ({"accuracy": 0.5}, True)  # waited for the first job's entry instead of recomputing
    assert calls.read_text() == "x" and first.exitcode == 0
