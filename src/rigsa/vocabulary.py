"""The vocabulary every module may import: the config error, `fail`, and the names of base precisions.

This module sits at the bottom of the import graph (it imports nothing of rigsa): a task, a method, a model loader
or a sparse layer raises the same ConfigError, with the same message shape, as the top-level validator
(`rigsa.validate`), without importing it.
"""
from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value is wrong; the message names the key, the value, and the fix."""


def fail(key: str, value: Any, expected: str, fix: str) -> None:
    """Raise the one kind of config error: the key, the bad value, what was expected and the fix."""
    raise ConfigError(f"{key}={value!r} is invalid: expected {expected}. Fix: {fix}")


# Stored precisions of the frozen base weights (model.base_dtype); compute precision is `dtype`.
BASE_DTYPES = ("float32", "bfloat16")
# A method whose `bases` lists this trains over a model.quantize base (bitsandbytes 4-bit, rigsa.quantize).
QUANTIZED_BASE = "4bit"
QUANT_TYPES = ("nf4", "fp4")
