"""Sparse adapters on disk: save, load onto a base model (merged or not), export to PEFT's SHiRA.

Files: `adapter.safetensors` holds `<layer>.indices`, `<layer>.values`, `<layer>.gate` (and
`lm_head.weight` when the head was trained); `adapter.json` holds the method, its stats, the base
model's name and a SHA-256 fingerprint of the targeted base weights, so an adapter is never
applied to a different base model by mistake.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rigsa.sparse.engine import SparseDeltaLinear, sparse_layers

SUFFIXES = ("indices", "values", "gate")


class AdapterMismatch(ValueError):
    """The adapter does not belong to this base model."""


def sparse_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, layer in sparse_layers(model).items():
        state[f"{name}.indices"] = layer.indices
        state[f"{name}.values"] = layer.values
        state[f"{name}.gate"] = layer.gate
    return state


def target_fingerprint(model: nn.Module, layer_names: list[str]) -> str:
    """SHA-256 of the named layers' base weights (sparse layers are read unmerged, exactly)."""
    from rigsa.models import hash_tensors

    def base_weight(module: nn.Module) -> torch.Tensor:
        from rigsa.quantize import dequantized_weight, is_quantized

        if isinstance(module, SparseDeltaLinear):
            return module.base_weight()
        return dequantized_weight(module) if is_quantized(module) else module.weight.detach()

    return hash_tensors((name, base_weight(model.get_submodule(name))) for name in layer_names)


def save(model: nn.Module, state: dict[str, torch.Tensor], directory: Path, metadata: dict) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    layers = sorted(sparse_layers(model))
    from rigsa.quantize import quantization

    meta = {**metadata, "format": "rigsa-sparse-v1", "layers": layers, "quantize": quantization(model),
            "base_model": getattr(getattr(model, "config", None), "_name_or_path", None),
            "base_fingerprint": target_fingerprint(model, layers)}
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    save_file(tensors, directory / "adapter.safetensors", metadata={"format": "rigsa-sparse-v1"})
    (directory / "adapter.json").write_text(json.dumps(meta, indent=2, default=str))
    return [directory / "adapter.safetensors", directory / "adapter.json"]


def load(model: nn.Module, meta: dict, tensors: dict[str, torch.Tensor], merge: bool = True) -> nn.Module:
    """Apply a saved sparse adapter (adapter.json's `meta`, adapter.safetensors' `tensors`; read by
    rigsa.apply.apply_adapter) to `model` in place and return it.

    merge=True writes base + delta into float32 weights and leaves plain nn.Linear layers (ready for
    export or evaluation); merge=False, and any layer whose weight is stored in lower precision (where
    merging would round the delta away), gets a SparseDeltaLinear layer (trainable, unmergeable).
    Raises AdapterMismatch when the targeted base weights differ from the ones trained on."""
    layers = meta["layers"]
    for name in layers:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise AdapterMismatch(f"adapter layer {name!r} does not exist in this model: it was trained on "
                                  f"{meta.get('base_model')!r}") from None
        if not isinstance(module, nn.Linear):
            raise AdapterMismatch(f"{name} is a {type(module).__name__}, expected nn.Linear")
    found = target_fingerprint(model, layers)
    if found != meta["base_fingerprint"]:
        raise AdapterMismatch(f"this adapter was trained on a different base model ({meta.get('base_model')!r}, "
                              f"fingerprint {meta['base_fingerprint'][:12]}…; this model's targeted weights hash to "
                              f"{found[:12]}…): load the base model it was trained on")
    from rigsa.methods import load_head, replace_module

    for name in layers:
        base = model.get_submodule(name)
        layer = SparseDeltaLinear(base, tensors[f"{name}.indices"], tensors[f"{name}.values"], tensors[f"{name}.gate"])
        if merge and layer.merged:
            layer.merge()
        else:
            replace_module(model, name, layer)
    if "lm_head.weight" in tensors:
        load_head(model, tensors["lm_head.weight"])
    return model


def export_shira(model: nn.Module, directory: str | Path, output: str | Path) -> Path:
    """Write the adapter as a PEFT SHiRA adapter (PeftModel.from_pretrained loads it).

    SHiRA needs every layer to hold exactly r * (in + out) values for one common r, as a budget
    matched to LoRA per layer gives (method.budget.match=lora); other adapters are refused."""
    from peft import ShiraConfig, get_peft_model

    directory, output = Path(directory), Path(output)
    meta = json.loads((directory / "adapter.json").read_text())
    tensors = load_file(str(directory / "adapter.safetensors"))
    if "lm_head.weight" in tensors:
        raise ValueError("SHiRA cannot carry a trained output head: export an adapter trained with train_head=false")
    ranks = {}
    for name in meta["layers"]:
        layer = model.get_submodule(name)
        count = tensors[f"{name}.indices"].numel()
        ranks[name] = count / (layer.in_features + layer.out_features)
    if len({r for r in ranks.values()}) != 1 or not float(next(iter(ranks.values()))).is_integer():
        raise ValueError(f"SHiRA needs r * (in + out) values in every layer for one integer r; this adapter has "
                         f"r = {sorted(set(ranks.values()))[:4]}: train with method.budget.match=lora to export it")
    rank = int(next(iter(ranks.values())))
    masks = {}
    for name in meta["layers"]:
        weight = model.get_submodule(name).weight
        mask = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
        mask[tensors[f"{name}.indices"].long()] = 1
        masks[id(weight)] = mask.reshape(weight.shape)
    config = ShiraConfig(r=rank, target_modules=list(meta["layers"]), mask_type="random", init_weights=True)
    config.mask_fn = lambda base_layer, r, **kwargs: masks[id(base_layer.weight)]
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name in meta["layers"]:
            shira = peft_model.base_model.model.get_submodule(name)
            shira.shira_weight["default"].copy_(tensors[f"{name}.values"] * tensors[f"{name}.gate"])
    peft_model.save_pretrained(str(output))
    peft_model.unload()
    return output
