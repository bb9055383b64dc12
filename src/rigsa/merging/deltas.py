"""Adapters of every kind as per-parameter deltas, merged into one `Adapter`, and that adapter written to a folder
that `rigsa.adapters` reads, applies and exports like a trained one.

Every adapter becomes, per base parameter (`<layer>.weight` for a layer's delta), a delta in its own form: a sparse
one (positions and values, gate folded in), or a dense tensor — LoRA's B·A·scale exactly, DoRA's merged weight minus
the base weight, a replaced parameter (full fine-tuning, a trained output head) minus the base's value. The merged
adapter keeps the sparse form where every input to a layer is sparse (on the union of their positions, zeros
included, so a merge of sparse adapters stays sparse whatever the method); a layer with any dense or low-rank input
becomes a dense delta; a parameter any input replaced is replaced by base + merged delta. Low-rank inputs are not
kept as factors: a merge of LoRA adapters is exact as a dense delta, and no merge method here preserves the rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rigsa.adapters import (DENSE_FORMAT, OUTPUT_HEAD, SPARSE_FORMAT, Adapter, DenseDelta, LowRankDelta,
                            SparseDelta)
from rigsa.adapters.read import DENSE_SUFFIX, SPARSE_SUFFIXES
from rigsa.adapters.write import dense_fingerprint, target_fingerprint, write_files
from rigsa.merging.combine import MergeSettings, combine
from rigsa.quantize import dequantized_weight, is_quantized, quantize_as

WEIGHT = ".weight"


@dataclass
class BaseWeights:
    """The base model's parameters by name, as merging reads them: a 4-bit layer's weight dequantized (only when its
    values are needed: its shape comes from the layer), the output head by its adapter name `lm_head.weight` (SmolLM2
    ties it to the input embeddings)."""
    model: torch.nn.Module

    def quantized_layer(self, name: str) -> torch.nn.Module | None:
        if name != OUTPUT_HEAD and name.endswith(WEIGHT):
            module = self.model.get_submodule(name.removesuffix(WEIGHT))
            if is_quantized(module):
                return module
        return None

    def value(self, name: str) -> torch.Tensor:
        if name == OUTPUT_HEAD:
            return self.model.get_output_embeddings().weight.detach()
        layer = self.quantized_layer(name)
        return dequantized_weight(layer) if layer is not None else self.model.get_parameter(name).detach()

    def shape(self, name: str) -> tuple[int, ...]:
        if name == OUTPUT_HEAD:
            return tuple(self.model.get_output_embeddings().weight.shape)
        layer = self.quantized_layer(name)
        return (layer.out_features, layer.in_features) if layer is not None else tuple(
            self.model.get_parameter(name).shape)


def parameter_deltas(adapter: Adapter, base: BaseWeights) -> tuple[dict, set[str]]:
    """The adapter's delta per base parameter (a SparseDelta or a float32 tensor of the parameter's shape), and the
    names of the parameters it replaces rather than adds to."""
    deltas: dict[str, SparseDelta | torch.Tensor] = {}
    for layer, delta in adapter.layers.items():
        key = layer + WEIGHT
        if isinstance(delta, SparseDelta):
            deltas[key] = delta
        elif isinstance(delta, LowRankDelta):  # DoRA's delta depends on the base weight
            deltas[key] = delta.dense(base.shape(key), base.value(key) if delta.magnitude is not None else None)
        else:
            deltas[key] = delta.dense(base.shape(key))
    for name, value in adapter.replaced.items():
        deltas[name] = value.float() - base.value(name).float()
    return deltas, set(adapter.replaced)


def sparse_values(delta: SparseDelta) -> torch.Tensor:
    return delta.gate.float().reshape(()) * delta.values.float()


def merge_parameter(key: str, inputs: list, settings: MergeSettings, shape: tuple[int, ...]):
    """One parameter's merged delta: a SparseDelta when every adapter's input is sparse (or absent), else a tensor."""
    present = [delta for delta in inputs if delta is not None]
    if all(isinstance(delta, SparseDelta) for delta in present):
        positions = torch.unique(torch.cat([delta.indices.long().reshape(-1) for delta in present]))
        stacked = torch.zeros(len(inputs), positions.numel())
        own = torch.zeros(len(inputs), positions.numel(), dtype=torch.bool)
        for row, delta in enumerate(inputs):
            if delta is not None:
                where = torch.searchsorted(positions, delta.indices.long().reshape(-1))
                stacked[row, where], own[row, where] = sparse_values(delta), True
        index_dtype = present[0].indices.dtype
        return SparseDelta(positions.to(index_dtype), combine(stacked, own, settings, key), torch.ones(1))
    stacked = torch.zeros(len(inputs), math.prod(shape))
    own = torch.zeros(stacked.shape, dtype=torch.bool)
    for row, delta in enumerate(inputs):
        if isinstance(delta, SparseDelta):
            stacked[row, delta.indices.long().reshape(-1)] = sparse_values(delta)
            own[row, delta.indices.long().reshape(-1)] = True
        elif delta is not None:
            stacked[row], own[row] = delta.reshape(-1), True
    return combine(stacked, own, settings, key).reshape(shape)


def merge_adapters(adapters: list[Adapter], settings: MergeSettings, model: torch.nn.Module) -> Adapter:
    """One adapter merging `adapters` (checked to share their base: `rigsa.merging.sources`) over `model`, their base
    (quantized here, in place, when they were trained over a 4-bit one). It records the base's fingerprint as a
    trained adapter does, so it applies (`rigsa.adapters.load.apply_adapter`) and is refused on another base. Its
    `head` is None: the source adapters' classification heads are kept apart (`rigsa.merging.heads`)."""
    quantize_as(model, adapters[0].quantize)
    base = BaseWeights(model)
    per_adapter = [parameter_deltas(adapter, base) for adapter in adapters]
    replaced_keys = set().union(*(replaced for _, replaced in per_adapter))
    layers: dict[str, SparseDelta | DenseDelta] = {}
    replaced: dict[str, torch.Tensor] = {}
    for key in sorted(set().union(*(deltas for deltas, _ in per_adapter))):
        merged = merge_parameter(key, [deltas.get(key) for deltas, _ in per_adapter], settings, base.shape(key))
        if key in replaced_keys:
            dense = merged.dense(base.shape(key)) if isinstance(merged, SparseDelta) else merged
            replaced[key] = base.value(key).float() + dense
        else:
            layers[key.removesuffix(WEIGHT)] = merged if isinstance(merged, SparseDelta) else DenseDelta(merged)
    sparse = (bool(layers) and all(isinstance(delta, SparseDelta) for delta in layers.values())
              and set(replaced) <= {OUTPUT_HEAD})
    if sparse:
        fingerprint = target_fingerprint(model, sorted(layers))
    else:
        layers = {name: DenseDelta(delta.dense(base.shape(name + WEIGHT)))
                  if isinstance(delta, SparseDelta) else delta for name, delta in layers.items()}
        fingerprint = dense_fingerprint(model, sorted(layers), sorted(replaced))
    first = adapters[0]
    return Adapter(Path(), SPARSE_FORMAT if sparse else DENSE_FORMAT, "merged", layers, replaced, None,
                   first.quantize, first.base_model, fingerprint,
                   meta={"merge": {"method": settings.method, "weights": list(settings.weights),
                                   "densities": list(settings.densities), "lambda": settings.scale,
                                   "majority_sign": settings.majority_sign, "seed": settings.seed},
                         "sources": [str(adapter.directory) for adapter in adapters]})


def write_merged(adapter: Adapter, directory: Path) -> list[Path]:
    """Write a merged adapter in its format (`rigsa.adapters`), read back by `read_adapter` like a trained one."""
    record = {**adapter.meta, "method": adapter.method, "quantize": adapter.quantize, "base_model": adapter.base_model,
              "base_fingerprint": adapter.base_fingerprint}
    if adapter.format == SPARSE_FORMAT:
        layers = sorted(adapter.layers)
        tensors = {f"{name}.{part}": getattr(adapter.layers[name], part) for name in layers
                   for part in SPARSE_SUFFIXES}
        meta = {**record, "format": SPARSE_FORMAT, "layers": layers}
    else:
        tensors = {name + DENSE_SUFFIX: delta.delta for name, delta in adapter.layers.items()}
        meta = {**record, "format": DENSE_FORMAT}
    return write_files(directory, {**tensors, **adapter.replaced}, meta)
