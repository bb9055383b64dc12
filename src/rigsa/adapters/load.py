"""Put an adapter read from disk (`rigsa.adapters.read`) onto its base model, merged into the weights or as
trainable layers; refuse it on a base whose weights differ from the ones it was trained on.

Sparse adapters are checked against the fingerprint of their targeted base weights; dense adapters are written
into the weights; PEFT adapters go through PeftModel, onto a 4-bit base when they were trained on one.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rigsa.adapter_layer import AdapterLayer
from rigsa.adapters import (OUTPUT_HEAD, PEFT_CONFIG_FILE, PEFT_FORMAT, PEFT_TENSOR_FILE, SPARSE_FORMAT, TENSOR_FILE,
                            Adapter, AdapterMismatch, ClassificationHead, DenseDelta, LowRankDelta, SparseDelta)
from rigsa.adapters.read import REBUILD, read_adapter
from rigsa.adapters.write import dense_fingerprint, target_fingerprint
from rigsa.cache import UnreadableFile
from rigsa.model_edits import load_head, replace_module
from rigsa.models import fingerprint
from rigsa.quantize import dequantized_weight, is_quantized, quantize_as
from rigsa.sparse.engine import SparseDeltaLinear


def apply_adapter(model: nn.Module, directory: str | Path | Adapter, merge: bool = True) -> nn.Module:
    """Return `model` with the adapter in `directory` (or already read) applied (merged into the weights by default).

    merge=False keeps sparse adapters as trainable engine layers and PEFT adapters as a PeftModel;
    a dense adapter is always written into the weights. A run with task.readout=classifier_head also saved
    its classification head: it comes back as `model.classifier_head` (an nn.Linear from the final hidden
    state at the answer position to the classes; `rigsa.readout.ClassifierHead` scores with it)."""
    adapter = directory if isinstance(directory, Adapter) else read_adapter(directory)
    check_fits(model, adapter)  # before any weight is touched
    if adapter.format == PEFT_FORMAT:
        adapted = load_peft(model, adapter, merge)
    else:
        quantize_as(model, adapter.quantize)  # trained over a 4-bit base: rebuild that base first
        adapted = load_sparse(model, adapter, merge) if adapter.format == SPARSE_FORMAT else load_dense(model, adapter)
    if adapter.head is not None:
        adapted.classifier_head = head_module(adapter.head).to(next(adapted.parameters()).device)
    return adapted


# A LoRA scale (lora_alpha / r) above this is no trained adapter's: PEFT's defaults give 1-2, rsLoRA's up to ~16.
MAX_LOW_RANK_SCALE = 1e3


def check_fits(model: nn.Module, adapter: Adapter) -> None:
    """Refuse an adapter whose tensors cannot be this model's, before it touches a weight: every layer it names
    exists and is linear, every tensor has the shape its layer needs and finite values, sparse positions are unique
    and inside the weight, a LoRA scale is plausible. One line naming the file, the tensor and the fix."""
    path = adapter.directory / (PEFT_TENSOR_FILE if adapter.format == PEFT_FORMAT else TENSOR_FILE)

    def refuse(fault: str, where: Path = path) -> None:
        raise UnreadableFile(where, fault, REBUILD)

    def finite(name: str, tensor: torch.Tensor) -> None:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            refuse(f"{name} holds NaN or infinite values")

    for name, delta in adapter.layers.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise AdapterMismatch(f"adapter layer {name!r} does not exist in this model: it was trained on "
                                  f"{adapter.base_model!r}") from None
        if not hasattr(layer, "in_features"):
            raise AdapterMismatch(f"{name} is a {type(layer).__name__}, expected a linear layer")
        shape = (layer.out_features, layer.in_features)
        if isinstance(delta, SparseDelta):
            indices = delta.indices.long().reshape(-1)
            if delta.values.numel() != indices.numel() or delta.gate.numel() != 1:
                refuse(f"{name} has {indices.numel()} positions, {delta.values.numel()} values and "
                       f"{delta.gate.numel()} gate values (expected as many values as positions and one gate)")
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= shape[0] * shape[1]
                                    or indices.unique().numel() != indices.numel()):
                refuse(f"{name}.indices are not unique positions inside its {shape[0]}x{shape[1]} weight")
            finite(f"{name}.values", delta.values)
            finite(f"{name}.gate", delta.gate)
        elif isinstance(delta, LowRankDelta):
            rank = delta.down.shape[0]
            if tuple(delta.down.shape) != (rank, shape[1]) or tuple(delta.up.shape) != (shape[0], rank):
                refuse(f"{name}'s LoRA factors are {tuple(delta.up.shape)} x {tuple(delta.down.shape)}, which do not "
                       f"make its {shape[0]}x{shape[1]} weight")
            if not abs(delta.scale) <= MAX_LOW_RANK_SCALE:
                refuse(f"{name}'s LoRA scale (lora_alpha / r) is {delta.scale:g}, above {MAX_LOW_RANK_SCALE:g}",
                       adapter.directory / PEFT_CONFIG_FILE)
            for part, tensor in (("lora_A", delta.down), ("lora_B", delta.up), ("magnitude", delta.magnitude)):
                if tensor is not None:
                    finite(f"{name}.{part}", tensor)
        elif isinstance(delta, DenseDelta):
            if tuple(delta.delta.shape) != shape:
                refuse(f"{name}'s delta is {tuple(delta.delta.shape)}, not its weight's {shape}")
            finite(f"{name}'s delta", delta.delta)
    for name, tensor in adapter.replaced.items():
        try:
            parameter = model.get_output_embeddings().weight if name == OUTPUT_HEAD else model.get_parameter(name)
        except AttributeError:
            raise AdapterMismatch(f"adapter tensor {name!r} names no parameter of this model: it was trained on "
                                  f"{adapter.base_model!r}") from None
        if tensor.shape != parameter.shape:
            refuse(f"{name} is {tuple(tensor.shape)}, not the model's {tuple(parameter.shape)}")
        finite(name, tensor)
    if adapter.head is not None:
        finite("the classification head", adapter.head.weight)


def head_module(head: ClassificationHead) -> nn.Linear:
    """A frozen nn.Linear holding a saved classification head (with its `label_words`)."""
    module = nn.Linear(head.weight.shape[1], head.weight.shape[0], bias=False)
    module.weight = nn.Parameter(head.weight, requires_grad=False)
    module.label_words = head.label_words
    return module


def refuse_other_base(adapter: Adapter, found: str, what: str) -> None:
    if found != adapter.base_fingerprint:
        raise AdapterMismatch(f"this adapter was trained on a different base model ({adapter.base_model!r}, "
                              f"fingerprint {adapter.base_fingerprint[:12]}…; this model{what} hash to {found[:12]}…): "
                              "load the base model it was trained on")


def load_sparse(model: nn.Module, adapter: Adapter, merge: bool = True) -> nn.Module:
    """Apply a sparse adapter to `model` in place and return it.

    merge=True writes base + delta into float32 weights and leaves plain nn.Linear layers (ready for
    export or evaluation); merge=False, and any layer whose weight is stored in lower precision (where
    merging would round the delta away), gets a SparseDeltaLinear layer (trainable, unmergeable).
    Raises AdapterMismatch when the targeted base weights differ from the ones trained on (its layers exist and fit:
    `check_fits`)."""
    refuse_other_base(adapter, target_fingerprint(model, list(adapter.layers)), "'s targeted weights")
    for name, delta in adapter.layers.items():
        layer = SparseDeltaLinear(model.get_submodule(name), delta.indices, delta.values, delta.gate)
        if merge and layer.merged:
            layer.merge()
        else:
            replace_module(model, name, layer)
    if OUTPUT_HEAD in adapter.replaced:
        load_head(model, adapter.replaced[OUTPUT_HEAD])
    return model


@torch.no_grad()
def load_dense(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Write a dense adapter into `model`: each layer's delta is added to its weight (over a 4-bit base the layer
    becomes a float32 one holding the dequantized weight plus the delta: the float32 sum RIGSA's dense phase
    trained), `lm_head.weight` becomes an untied head, any other tensor replaces that parameter's values. Refused
    (AdapterMismatch) on a base other than the one trained on, when the adapter records its fingerprint."""
    if adapter.base_fingerprint:  # written since dense adapters record one
        refuse_other_base(adapter, dense_fingerprint(model, list(adapter.layers), list(adapter.replaced)),
                          "'s targeted weights" if adapter.layers else "'s untouched weights")
    for layer_name, delta in adapter.layers.items():
        layer = model.get_submodule(layer_name)
        if is_quantized(layer):
            replace_module(model, layer_name, float_linear(dequantized_weight(layer).float() + delta.delta.float(),
                                                           layer.bias))
        else:
            layer.weight.add_(delta.delta.to(layer.weight.dtype))
    for name, tensor in adapter.replaced.items():
        if name == OUTPUT_HEAD:
            load_head(model, tensor)
        else:
            parameter = model.get_parameter(name)
            parameter.copy_(tensor.to(parameter.dtype))
    return model


def load_peft(model: nn.Module, adapter: Adapter, merge: bool = True) -> nn.Module:
    """A PEFT adapter through PeftModel, onto the base it was trained on (refused on another)."""
    from peft import PeftModel

    if not adapter.fingerprint_before_quantize:
        quantize_as(model, adapter.quantize)
    if adapter.base_fingerprint:
        refuse_other_base(adapter, fingerprint(model), "'s weights")
    if adapter.fingerprint_before_quantize:
        quantize_as(model, adapter.quantize)
    peft_model = PeftModel.from_pretrained(model, str(adapter.directory))
    return peft_model.merge_and_unload() if merge else peft_model


@torch.no_grad()
def float_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A frozen float32 nn.Linear holding `weight` and `bias`."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
    layer.weight.copy_(weight.float())
    if bias is not None:
        layer.bias.copy_(bias.float())
    return layer.requires_grad_(False)


@torch.no_grad()
def in_float_weights(model: nn.Module) -> nn.Module:
    """The model an adapter trained over a 4-bit base computes, as plain float32 layers to export: each 4-bit weight
    dequantized (what the trained model multiplied with), an adapter layer's delta added to it, a PEFT adapter merged
    into it. Merging into the 4-bit weights instead would re-quantize them and lose most of a small delta."""
    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if any(name.startswith(parent + ".") for parent in replaced):
            continue  # inside a layer already replaced (an adapter layer's 4-bit base)
        if isinstance(module, AdapterLayer) and module.base_layer is not None:
            layer = float_linear(module.float_weight(), module.base_layer.bias)
        elif is_quantized(module) and hasattr(module, "compute_dtype"):  # a 4-bit layer itself, not a PEFT wrapper
            layer = float_linear(dequantized_weight(module), module.bias)
        else:
            continue
        replace_module(model, name, layer)
        replaced.append(name)
    if not hasattr(model, "merge_and_unload"):
        return model
    head = model._modules.get("classifier_head")  # set on the PeftModel by apply_adapter: carried over
    merged = model.merge_and_unload()
    if head is not None:
        merged.classifier_head = head
    return merged
