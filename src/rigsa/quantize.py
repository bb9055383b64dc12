"""4-bit base weights through bitsandbytes: plain linear layers become `Linear4bit`, and adapter layers that
keep their delta apart (the sparse engine, RIGSA's dense phase) quantize the base they wrap.

CPU trap (bitsandbytes on a CPU with AVX512-BF16): a no-grad forward repacks the 4-bit weights and every
later gradient through the layer is silently zero. Every layer made here keeps the plain path
(`support_avx512bf16_for_cpu = False`); tests run train -> eval -> train and compare gradients.
"""
from __future__ import annotations

import torch
from torch import nn


def linear4bit(weight: torch.Tensor, bias: torch.Tensor | None, quant_type: str, compute_dtype: torch.dtype) -> nn.Module:
    """A frozen bitsandbytes 4-bit linear layer holding `weight` (quantized on its device) and `bias`."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                              quant_type=quant_type, device="meta")
    layer.weight = bnb.nn.Params4bit(weight.data.contiguous(), requires_grad=False, quant_type=quant_type)
    if bias is not None:
        layer.bias = nn.Parameter(bias.data, requires_grad=False)
    layer = layer.to(weight.device)  # moving a Params4bit quantizes it
    layer.support_avx512bf16_for_cpu = False  # the CPU trap above
    return layer


def is_quantized(layer: nn.Module) -> bool:
    return type(layer.weight).__name__ == "Params4bit" if hasattr(layer, "weight") else False


def quantization(model: nn.Module) -> dict | None:
    """How the model's 4-bit layers were made ({"quant_type", "compute_dtype"}, read from the first), or None
    when it has none: what `rigsa.apply` needs to rebuild the base an adapter was trained on."""
    for module in model.modules():
        if is_quantized(module) and hasattr(module, "compute_dtype"):  # a 4-bit layer itself, not a wrapper of one
            return {"quant_type": module.weight.quant_type,
                    "compute_dtype": str(module.compute_dtype).removeprefix("torch.")}
    return None


def quantize_as(model: nn.Module, record: dict | None) -> None:
    """Rebuild the 4-bit base a `quantization` record describes (quantization is deterministic); None: nothing."""
    if record:
        quantize_linear_layers(model, record["quant_type"], getattr(torch, record["compute_dtype"]))


def quantize_linear_layers(model: nn.Module, quant_type: str = "nf4", compute_dtype: torch.dtype = torch.float32,
                           skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every plain nn.Linear (but the head) by a 4-bit layer whose matmul runs in compute_dtype, and
    quantize the base of every adapter layer that has `quantize_base`, in place; return the count."""
    replaced = 0
    for module in list(model.modules()):
        if hasattr(module, "quantize_base"):
            module.quantize_base(quant_type, compute_dtype)
            replaced += 1
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child_name not in skip:
                setattr(module, child_name, linear4bit(child.weight, child.bias, quant_type, compute_dtype))
                replaced += 1
    return replaced


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a 4-bit layer computes with, dense (in the quantization state's dtype)."""
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
