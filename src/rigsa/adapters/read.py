"""Read an adapter folder into an `Adapter` (rigsa.adapters), checking each file: a damaged one gives one line
naming it, the fault and the fix. Nothing here touches a model."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from rigsa.adapters import (DENSE_FORMAT, HEAD_FILE, HEAD_META_FILE, HEAD_NAME, META_FILE, OUTPUT_HEAD,
                            PEFT_BASE_FILE, PEFT_CONFIG_FILE, PEFT_FORMAT, PEFT_TENSOR_FILE, SPARSE_FORMAT, TENSOR_FILE,
                            Adapter, ClassificationHead, DenseDelta, LowRankDelta, SparseDelta)
from rigsa.cache import UnreadableFile

REBUILD = ("delete the adapter folder and results.json of its run, and rerun the run's command: the final "
           "checkpoint rebuilds the adapter without training")
SPARSE_SUFFIXES = ("indices", "values", "gate")
DENSE_SUFFIX = ".dense_delta"


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
        if not isinstance(value, dict):
            raise ValueError("not an object")
        return value
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise UnreadableFile(path, f"not a readable JSON object ({type(error).__name__})", REBUILD) from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own SafetensorError for truncated or garbage files
        raise UnreadableFile(path, f"not a readable safetensors file ({type(error).__name__}: "
                                   f"{str(error).strip()[:100]})", REBUILD) from None


def read_head(directory: Path) -> ClassificationHead | None:
    """The classification head saved in an adapter folder, or None when it holds none."""
    if not (directory / HEAD_FILE).exists():
        return None
    meta = read_json(directory / HEAD_META_FILE)
    return ClassificationHead(read_tensors(directory / HEAD_FILE)[HEAD_NAME], meta.get("label_words"))


def read_adapter(directory: str | Path) -> Adapter:
    """The adapter in `directory` (a run's `adapter/` folder), whatever method wrote it."""
    directory = Path(directory)
    if (directory / META_FILE).exists():
        meta = read_json(directory / META_FILE)
        tensors = read_tensors(directory / TENSOR_FILE)
        reader = sparse_adapter if meta.get("format") == SPARSE_FORMAT else dense_adapter
        return reader(directory, meta, tensors)
    if (directory / PEFT_CONFIG_FILE).exists():
        return peft_adapter(directory)
    raise FileNotFoundError(f"{directory} holds no adapter (expected {META_FILE} or {PEFT_CONFIG_FILE}): "
                            "point at <run dir>/adapter")


RECORD_FIELDS = ("format", "method", "quantize", "base_model", "base_fingerprint")  # adapter.json keys Adapter holds


def from_record(directory: Path, format_name: str, meta: dict, layers: dict, replaced: dict) -> Adapter:
    """An Adapter in one of rigsa's own formats: its deltas and replaced tensors, and adapter.json's record."""
    return Adapter(directory, format_name, meta.get("method"), layers, replaced, read_head(directory),
                   meta.get("quantize"), meta.get("base_model"), meta.get("base_fingerprint"),
                   meta={key: value for key, value in meta.items() if key not in RECORD_FIELDS})


def sparse_adapter(directory: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> Adapter:
    layers = {}
    for name in meta.get("layers", []):
        missing = [f"{name}.{suffix}" for suffix in SPARSE_SUFFIXES if f"{name}.{suffix}" not in tensors]
        if missing:
            raise UnreadableFile(directory / TENSOR_FILE, f"it lacks {missing[0]}, which {META_FILE} lists", REBUILD)
        layers[name] = SparseDelta(*(tensors[f"{name}.{suffix}"] for suffix in SPARSE_SUFFIXES))
    replaced = {OUTPUT_HEAD: tensors[OUTPUT_HEAD]} if OUTPUT_HEAD in tensors else {}
    return from_record(directory, SPARSE_FORMAT, meta, layers, replaced)


def dense_adapter(directory: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> Adapter:
    layers = {name.removesuffix(DENSE_SUFFIX): DenseDelta(tensor) for name, tensor in tensors.items()
              if name.endswith(DENSE_SUFFIX)}
    replaced = {name: tensor for name, tensor in tensors.items() if not name.endswith(DENSE_SUFFIX)}
    return from_record(directory, DENSE_FORMAT, meta, layers, replaced)


PEFT_KEY = re.compile(r"^base_model\.model\.(?P<layer>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|"
                      r"lora_magnitude_vector(?:\.weight)?)$")


def peft_adapter(directory: Path) -> Adapter:
    """A PEFT LoRA / DoRA adapter as low-rank factors with their scale (lora_alpha / r, or / sqrt(r) with rsLoRA,
    per layer where rank_pattern / alpha_pattern name it)."""
    config = read_json(directory / PEFT_CONFIG_FILE)
    tensors = read_tensors(directory / PEFT_TENSOR_FILE)
    base = read_json(directory / PEFT_BASE_FILE) if (directory / PEFT_BASE_FILE).exists() else {}
    older = "load_in_4bit" in base  # written when QLoRA was method.load_in_4bit
    if older:
        quantize = ({"quant_type": base["quant_type"], "compute_dtype": base.get("compute_dtype", "float32")}
                    if base["load_in_4bit"] else None)
    else:
        quantize = base.get("quantize")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        found = PEFT_KEY.match(key)
        if found:
            parts.setdefault(found["layer"], {})[found["part"].split(".")[0]] = tensor
    layers = {}
    for name, factors in sorted(parts.items()):
        if "lora_A" not in factors or "lora_B" not in factors:
            raise UnreadableFile(directory / PEFT_TENSOR_FILE, f"layer {name} lacks one of its two LoRA factors", REBUILD)
        rank = pattern_value(config.get("rank_pattern") or {}, name, config["r"])
        alpha = pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        layers[name] = LowRankDelta(factors["lora_A"], factors["lora_B"], float(scale), factors.get("lora_magnitude_vector"))
    return Adapter(directory, PEFT_FORMAT, base.get("method"), layers, {}, read_head(directory), quantize,
                   base.get("base_model"), base.get("base_fingerprint"), fingerprint_before_quantize=older,
                   meta={"peft_config": config})


def pattern_value(pattern: dict, layer: str, default):
    """PEFT's rank_pattern / alpha_pattern: the value of the first key the layer's name ends with, else default."""
    for key, value in pattern.items():
        if layer == key or layer.endswith("." + key):
            return value
    return default
