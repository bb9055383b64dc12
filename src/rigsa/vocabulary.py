"""The vocabulary every module may import: the config error, `fail`, environment faults, and the names of base
precisions.

This module sits at the bottom of the import graph (it imports nothing of rigsa): a task, a method, a model loader
or a sparse layer raises the same ConfigError, with the same message shape, as the top-level validator
(`rigsa.validate`), without importing it.
"""
from __future__ import annotations

import errno
from typing import Any


class ConfigError(ValueError):
    """A config value is wrong; the message names the key, the value, and the fix."""


def fail(key: str, value: Any, expected: str, fix: str) -> None:
    """Raise the one kind of config error: the key, the bad value, what was expected and the fix."""
    raise ConfigError(f"{key}={value!r} is invalid: expected {expected}. Fix: {fix}")


class EnvironmentFault(OSError):
    """The machine, not the input, stopped the run: a full disk, a read-only or forbidden folder (exit code 4).
    The message names the path and the fix; what was written before stays."""


# errno values that are the machine's doing: no space or quota, a read-only file system, no permission
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
# how torch.save reports the same faults from its C++ writer (a RuntimeError without an errno)
WRITER_FAILURES = ("file write failed", "iostream error", "No space left on device")


def environment_fault(error: BaseException, where: str = "") -> EnvironmentFault | None:
    """The EnvironmentFault an error is, or was raised while handling (torch.save's writer fails twice: the write,
    then closing the archive), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, EnvironmentFault):
            return error
        path = getattr(error, "filename", None) or where
        if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS:
            cause = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                     errno.EROFS: "the file system is read-only"}.get(error.errno, "permission is denied")
            break
        if isinstance(error, RuntimeError) and any(text in str(error) for text in WRITER_FAILURES):
            cause = "a file could not be written (a full disk?)"
            break
        error = error.__cause__ or error.__context__
    else:
        return None
    return EnvironmentFault(f"could not write {path}: {cause}. Fix: free space on that disk or pass run.root=<a "
                            "writable folder with space>; rerun the same command: a run resumes from its last "
                            "checkpoint, a sweep from its finished jobs")


# Stored precisions of the frozen base weights (model.base_dtype); compute precision is `dtype`.
BASE_DTYPES = ("float32", "bfloat16")
# A method whose `bases` lists this trains over a model.quantize base (bitsandbytes 4-bit, rigsa.quantize).
QUANTIZED_BASE = "4bit"
QUANT_TYPES = ("nf4", "fp4")
