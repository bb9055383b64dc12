"""Adapters as data: every adapter the tool writes, read from its folder into plain objects before any model is
touched (`rigsa.adapters.read.read_adapter`); writing (`write`), applying to a base model (`load`) and exporting
are built on them, and merging can be.

The formats in an adapter folder (`<run dir>/adapter`):
- `rigsa-sparse-v1` (the sparse methods; RIGSA after its first prune): adapter.json (method, stats, layers, base model,
  the SHA-256 fingerprint of the targeted base weights, `quantize`) and adapter.safetensors (`<layer>.indices`,
  `<layer>.values`, `<layer>.gate`, and `lm_head.weight` when the output head was trained);
- `rigsa-dense-v1` (full, head; RIGSA before its first prune or with pruned_value=init): adapter.json and
  adapter.safetensors, where `<layer>.dense_delta` is added to a layer's weight and any other name replaces that
  parameter's values;
- PEFT's (lora, dora, qlora): adapter_config.json + adapter_model.safetensors, and rigsa_adapter.json beside them
  (method, `quantize`, base model and fingerprint);
- beside any of them, with task.readout=classifier_head: classifier_head.safetensors + classifier_head.json.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

SPARSE_FORMAT = "rigsa-sparse-v1"
DENSE_FORMAT = "rigsa-dense-v1"
PEFT_FORMAT = "peft"  # PEFT's own files; its `peft_type` is in the metadata
META_FILE, TENSOR_FILE = "adapter.json", "adapter.safetensors"
PEFT_CONFIG_FILE, PEFT_TENSOR_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_BASE_FILE = "rigsa_adapter.json"  # beside PEFT's files: what rebuilds the base the adapter was trained on
HEAD_FILE, HEAD_META_FILE = "classifier_head.safetensors", "classifier_head.json"
HEAD_NAME = "classifier_head.weight"  # its name in checkpoints and in the head file
OUTPUT_HEAD = "lm_head.weight"  # a trained output head (method=head, sparse methods with train_head) replaces it


class AdapterMismatch(ValueError):
    """The adapter does not belong to this base model."""


@dataclass
class SparseDelta:
    """m values at flat positions of a layer's weight, scaled by a gate: W = W0 + gate * values at `indices`."""
    indices: torch.Tensor
    values: torch.Tensor
    gate: torch.Tensor

    def dense(self, shape: tuple[int, int]) -> torch.Tensor:
        delta = torch.zeros(shape[0] * shape[1], dtype=torch.float32)
        delta[self.indices.long()] = self.gate.float() * self.values.float()
        return delta.reshape(shape)


@dataclass
class LowRankDelta:
    """LoRA's factors: W = W0 + scale * up @ down (up: [out, r], down: [r, in]). DoRA adds a magnitude per output
    row, so its delta depends on W0 too: `dense` needs the base weight then."""
    down: torch.Tensor
    up: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None

    def dense(self, shape: tuple[int, int], base_weight: torch.Tensor | None = None) -> torch.Tensor:
        low_rank = (self.up.float() @ self.down.float()) * self.scale
        if self.magnitude is None:
            return low_rank
        if base_weight is None:
            raise ValueError("a DoRA delta depends on the base weight: pass base_weight")
        # DoRA (Liu et al. 2024, eq. 5): W' = m * (W0 + BA s) / ||W0 + BA s||_row; the delta is W' - W0
        combined = base_weight.float() + low_rank
        return self.magnitude.float().reshape(-1, 1) * combined / combined.norm(dim=1, keepdim=True) - base_weight.float()


@dataclass
class DenseDelta:
    """A full-size delta added to a layer's weight (RIGSA's dense phase: gate * dW)."""
    delta: torch.Tensor

    def dense(self, shape: tuple[int, int]) -> torch.Tensor:
        return self.delta.float().reshape(shape)


@dataclass
class ClassificationHead:
    """A classification head trained beside the model (task.readout=classifier_head): [classes, hidden]."""
    weight: torch.Tensor
    label_words: list[str] | None


@dataclass
class Adapter:
    """One adapter folder, read: per layer a delta in its own form, parameters it replaces, its head, its record."""
    directory: Path
    format: str  # SPARSE_FORMAT, DENSE_FORMAT or PEFT_FORMAT
    method: str | None
    layers: dict[str, SparseDelta | LowRankDelta | DenseDelta]
    replaced: dict[str, torch.Tensor]  # parameters whose values it replaces (full fine-tuning; a trained output head)
    head: ClassificationHead | None
    quantize: dict | None  # the 4-bit base it was trained over ({quant_type, compute_dtype}), None for none
    base_model: str | None
    base_fingerprint: str | None  # None where the format records none (the dense one)
    # Written before method=qlora became model.quantize=nf4: the fingerprint is of the weights as loaded, taken
    # before quantizing; since then it is of the base as trained on (a 4-bit one: quantized first).
    fingerprint_before_quantize: bool = False
    meta: dict = field(default_factory=dict)  # everything else its record says (stats, PEFT's config)
