"""The on-disk cache of base-model scores, and the one way rigsa writes a file that others may read.

The cache ($RIGSA_CACHE/<kind>/<sha256 of the key>.json) serves the base model's target scores
(run.py) and its forgetting-suite scores (forgetting.py): each is computed once per key, then read.
Every write (cache entries, results.json, checkpoints) goes to a temporary file with a unique name
in the destination's folder and is then renamed over the destination: a reader sees the old file
or the new one, never a partial one, and two jobs of a sweep writing the same key never share a
temporary file.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from rigsa.assets import cache_root

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # bump when the way a cached score is computed changes
UMASK = os.umask(0o022)  # read once (the only way to read it is to set it), and restored at once
os.umask(UMASK)


class UnreadableFile(RuntimeError):
    """A file rigsa reads back is damaged or not what it should be: one line naming it, the fault and the fix."""

    def __init__(self, path: Path, fault: str, fix: str):
        super().__init__(f"{path}: {fault}. Fix: {fix}")
        self.path = path


def scores_root() -> Path:
    """Where cached scores live (tests point it at a temporary folder)."""
    return cache_root()


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(temporary path) in path's folder, then rename the temporary file over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(handle, 0o666 & ~UMASK)  # mkstemp makes 0600; the file gets the permissions open() would give it
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomically(path: Path, text: str) -> None:
    replace_atomically(path, lambda temporary: temporary.write_text(text))


def cached(kind: str, key_parts: dict, compute: Callable[[], dict],
           check: Callable[[dict], str | None] = lambda result: None) -> tuple[dict, bool]:
    """Return (result, was_cached): `compute()` once per key, then read from the cache folder `kind`.

    An entry that does not parse, or that `check(result)` finds wrong (it returns what is wrong), is
    moved aside with a warning and recomputed; a cache folder that cannot be written warns and the
    result is simply not kept."""
    key = hashlib.sha256(json.dumps({**key_parts, "cache_version": CACHE_VERSION}, sort_keys=True).encode()).hexdigest()
    path = scores_root() / kind / f"{key}.json"
    found = read_entry(path, kind, check)
    if found is not None:
        return found, True
    with key_locked(path):  # concurrent jobs of a sweep: one computes, the others wait and read its entry
        found = read_entry(path, kind, check)
        if found is not None:
            return found, True
        return compute_and_keep(path, key_parts, compute), False


@contextmanager
def key_locked(path: Path):
    """Hold an exclusive lock on `<entry>.lock` (released by the OS if the process dies); without a writable
    cache folder, no lock (the result is not kept either)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o666 & ~UMASK)
    except OSError:
        yield
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


def read_entry(path: Path, kind: str, check: Callable[[dict], str | None]) -> dict | None:
    """The cached result at `path`, or None (missing; or wrong: then moved aside with a warning)."""
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())["result"]
        problem = check(result)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        problem = f"unreadable ({type(error).__name__})"
    if problem is None:
        log.info("base %s: cache hit (%s)", kind, path)
        return result
    aside = path.with_name(f"{path.stem}.bad-{os.getpid()}.json")
    try:
        os.replace(path, aside)
        warnings.warn(f"rigsa: cache entry {path} is {problem}: moved to {aside.name} and recomputed", stacklevel=3)
    except OSError:
        warnings.warn(f"rigsa: cache entry {path} is {problem} and cannot be moved: recomputed, not kept",
                      stacklevel=3)
    return None


def compute_and_keep(path: Path, key_parts: dict, compute: Callable[[], dict]) -> dict:
    result = compute()
    try:
        write_text_atomically(path, json.dumps({"key": key_parts, "result": result}, indent=2))
    except OSError as error:
        warnings.warn(f"rigsa: cannot write the cache folder {path.parent} ({error.strerror or error}): this result "
                      "is not cached. Fix: make it writable, or point RIGSA_CACHE elsewhere", stacklevel=3)
    return result
