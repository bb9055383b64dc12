"""Environment faults (#26): a read-only run.root and a disk that fills up mid-run end with exit code 4 and one
line naming the path and the fix, never a traceback; what was written before stays. Uses small tmpfs mounts,
which need root and a kernel that lets this process mount (skipped, with the reason, elsewhere)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY


def rigsa_run(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from rigsa.cli import run_main; run_main()", *arguments],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, read_only) -> a fresh tmpfs folder, unmounted after the test."""
    mounted = []

    def mount(size: str, read_only: bool = False) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        folder = tmp_path / f"mnt{len(mounted)}"
        folder.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"this machine does not let the tests mount a tmpfs ({done.stderr.strip()[:120]})")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], capture_output=True)


def last_line(result: subprocess.CompletedProcess) -> str:
    """The one error line (a progress bar's last refresh may follow it)."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("rigsa-run: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize("sweep", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["run", "sweep"])
def test_a_read_only_run_root_is_refused_with_exit_4_before_any_work(tmpfs, sweep):
    root = tmpfs("64k", read_only=True) / "runs"
    arguments = ["--multirun", *TINY, "seed=0,1"] if sweep else list(TINY)
    result = rigsa_run(*arguments, f"run.root={root}")
    assert result.returncode == 4, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert last_line(result) == (f"rigsa-run: error: could not write {root}: the file system is read-only. Fix: free "
                                 "space on that disk or pass run.root=<a writable folder with space>; rerun the same "
                                 "command: a run resumes from its last checkpoint, a sweep from its finished jobs")


def test_a_disk_that_fills_mid_run_ends_with_exit_4_and_leaves_the_folder_as_it_was(tmpfs):
    root = tmpfs("160k")
    # the tiny model's full fine-tuning checkpoint (~40 MB with AdamW's state) cannot fit in 160 KB
    result = rigsa_run(*TINY, "method=full", f"run.root={root}", "run.name=full")
    assert result.returncode == 4, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = last_line(result)
    assert line.startswith(f"rigsa-run: error: could not write {root / 'full'}") and "Fix: free space" in line
    # it failed at its first checkpoint: the folder is as it was before the run (nothing half-written is left)
    assert not (root / "full").exists() or not any((root / "full").iterdir())
