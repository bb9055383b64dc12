"""Write adapters in the formats `rigsa.adapters` describes, and export a sparse adapter to PEFT's SHiRA."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from rigsa.adapters import (DENSE_FORMAT, HEAD_FILE, HEAD_META_FILE, HEAD_NAME, META_FILE, OUTPUT_HEAD, SPARSE_FORMAT,
                            TENSOR_FILE)
from rigsa.adapters.read import DENSE_SUFFIX, read_adapter
from rigsa.models import hash_tensors
from rigsa.quantize import dequantized_weight, is_quantized, quantization
from rigsa.sparse.engine import SparseDeltaLinear, sparse_layers


def sparse_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """`<layer>.indices`, `<layer>.values`, `<layer>.gate` of every engine layer in `model`."""
    state = {}
    for name, layer in sparse_layers(model).items():
        state[f"{name}.indices"] = layer.indices
        state[f"{name}.values"] = layer.values
        state[f"{name}.gate"] = layer.gate
    return state


def target_fingerprint(model: nn.Module, layer_names: list[str]) -> str:
    """SHA-256 of the named layers' base weights (engine layers read unmerged, exactly; 4-bit ones dequantized)."""
    def base_weight(module: nn.Module) -> torch.Tensor:
        if isinstance(module, SparseDeltaLinear):
            return module.base_weight()
        base = getattr(module, "base_layer", None)  # RIGSA's dense layer over a 4-bit base keeps it there
        if base is not None and is_quantized(base):
            return dequantized_weight(base)
        return dequantized_weight(module) if is_quantized(module) else module.weight.detach()

    return hash_tensors((name, base_weight(model.get_submodule(name))) for name in layer_names)


def write_files(directory: Path, tensors: dict[str, torch.Tensor], meta: dict) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    save_file(tensors, directory / TENSOR_FILE, metadata={"format": meta["format"]})
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return [directory / TENSOR_FILE, directory / META_FILE]


def write_sparse(model: nn.Module, state: dict[str, torch.Tensor], directory: Path, metadata: dict) -> list[Path]:
    """A sparse adapter: `state` (sparse_state, and `lm_head.weight` when the head trained) and its record, with the
    fingerprint of the targeted base weights, so it is never applied to another base by mistake."""
    layers = sorted(sparse_layers(model))
    meta = {**metadata, "format": SPARSE_FORMAT, "layers": layers, "quantize": quantization(model),
            "base_model": getattr(getattr(model, "config", None), "_name_or_path", None),
            "base_fingerprint": target_fingerprint(model, layers)}
    return write_files(directory, state, meta)


def untouched_fingerprint(model: nn.Module, replaced: list[str]) -> str:
    """SHA-256 of every base parameter an adapter that replaces `replaced` leaves as it is (full fine-tuning: the
    frozen ones; the head alone: all but the head), read before they could change: they are frozen. Each tensor
    counts once, under its first name (named_parameters: SmolLM2's tied output head is its input embeddings, and
    the head method's untied copy is replaced), so the base as loaded and the trained model name the same set."""
    return hash_tensors((name, parameter.detach()) for name, parameter in model.named_parameters()
                        if name not in set(replaced))


def dense_fingerprint(model: nn.Module, layers: list[str], replaced: list[str]) -> str:
    """The base fingerprint a dense adapter records and is checked against: the targeted layers' base weights when
    it adds to layers (RIGSA's dense phase), else the parameters it leaves as they are (full, the head alone)."""
    return target_fingerprint(model, layers) if layers else untouched_fingerprint(model, replaced)


def write_dense(state: dict[str, torch.Tensor], directory: Path, metadata: dict, model: nn.Module) -> list[Path]:
    """A dense adapter: tensors named like the model's parameters replace them (full, head), `<layer>.dense_delta`
    tensors are added to a layer's weight (RIGSA before its first prune, or with pruned_value=init). Its record
    holds the base's fingerprint (of the targeted layers' base weights when it adds to layers, else of the
    parameters it leaves as they are), so it is refused on another base like every adapter."""
    layers = sorted({name.rsplit(".", 1)[0] for name in state if name.endswith(DENSE_SUFFIX)})
    replaced = [name for name in state if not name.endswith(DENSE_SUFFIX)]
    # an empty adapter (method=none) changes nothing: no base to hold it to
    found = dense_fingerprint(model, layers, replaced) if state else None
    base_model = getattr(getattr(model, "config", None), "_name_or_path", None)
    return write_files(directory, state, {**metadata, "format": DENSE_FORMAT, "base_fingerprint": found,
                                          "base_model": base_model})


def write_head(weight: torch.Tensor, label_words: list[str], directory: Path) -> list[Path]:
    """A classification head ([classes, hidden]) and its label words, beside the adapter."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({HEAD_NAME: weight.detach().cpu().contiguous()}, directory / HEAD_FILE)
    (directory / HEAD_META_FILE).write_text(json.dumps({"label_words": list(label_words),
                                                        "hidden_size": weight.shape[1]}, indent=2))
    return [directory / HEAD_FILE, directory / HEAD_META_FILE]


def export_shira(model: nn.Module, directory: str | Path, output: str | Path) -> Path:
    """Write the sparse adapter in `directory` as a PEFT SHiRA adapter (PeftModel.from_pretrained loads it).

    SHiRA needs every layer to hold exactly r * (in + out) values for one common r, as a budget
    matched to LoRA per layer gives (method.budget.match=lora); other adapters are refused."""
    from peft import ShiraConfig, get_peft_model

    adapter = read_adapter(directory)
    if adapter.format != SPARSE_FORMAT:
        raise ValueError(f"SHiRA export takes a sparse adapter; {directory} holds a {adapter.format} one")
    if OUTPUT_HEAD in adapter.replaced:
        raise ValueError("SHiRA cannot carry a trained output head: export an adapter trained with train_head=false")
    ranks = {}
    for name, delta in adapter.layers.items():
        layer = model.get_submodule(name)
        ranks[name] = delta.indices.numel() / (layer.in_features + layer.out_features)
    if len(set(ranks.values())) != 1 or not float(next(iter(ranks.values()))).is_integer():
        raise ValueError(f"SHiRA needs r * (in + out) values in every layer for one integer r; this adapter has "
                         f"r = {sorted(set(ranks.values()))[:4]}: train with method.budget.match=lora to export it")
    rank = int(next(iter(ranks.values())))
    masks = {}
    for name, delta in adapter.layers.items():
        weight = model.get_submodule(name).weight
        mask = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
        mask[delta.indices.long()] = 1
        masks[id(weight)] = mask.reshape(weight.shape)
    config = ShiraConfig(r=rank, target_modules=list(adapter.layers), mask_type="random", init_weights=True)
    config.mask_fn = lambda base_layer, r, **kwargs: masks[id(base_layer.weight)]
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, delta in adapter.layers.items():
            shira = peft_model.base_model.model.get_submodule(name)
            shira.shira_weight["default"].copy_(delta.values * delta.gate)
    peft_model.save_pretrained(str(output))
    peft_model.unload()
    return Path(output)
