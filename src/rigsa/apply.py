"""Load a saved adapter onto its base model (merged or not); the `rigsa-apply` command's logic.

Sparse adapters (adapter.json + adapter.safetensors, format rigsa-sparse-v1) are checked against the
base weights' fingerprint and refused on another base model. Dense adapters (format rigsa-dense-v1:
full, head, RIGSA before its first prune or with pruned_value=init) are written into the weights.
PEFT adapters (adapter_config.json) go through PeftModel, onto a 4-bit base when they were trained on one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from rigsa.assets import AssetError
from rigsa.cache import UnreadableFile
from rigsa.methods import load_head
from rigsa.quantize import quantize_as
from rigsa.sparse import adapter as sparse_adapter


def apply_adapter(model: nn.Module, directory: str | Path, merge: bool = True) -> nn.Module:
    """Return `model` with the adapter in `directory` applied (merged into the weights by default).

    merge=False keeps sparse adapters as trainable engine layers and PEFT adapters as a PeftModel;
    a dense adapter is always written into the weights. A run with task.readout=classifier_head also saved
    its classification head: it comes back as `model.classifier_head` (an nn.Linear from the final hidden
    state at the answer position to the classes; `rigsa.readout.ClassifierHead` scores with it)."""
    from rigsa.readout import load_classifier_head

    directory = Path(directory)
    adapted = _apply(model, directory, merge)
    head = load_classifier_head(directory)
    if head is not None:
        adapted.classifier_head = head.to(next(adapted.parameters()).device)
    return adapted


def _apply(model: nn.Module, directory: Path, merge: bool) -> nn.Module:
    if (directory / "adapter.json").exists():
        meta = read_json(directory / "adapter.json")
        tensors = read_tensors(directory / "adapter.safetensors")
        quantize_as(model, meta.get("quantize"))  # trained over a 4-bit base: rebuild that base first
        if meta.get("format") == "rigsa-sparse-v1":
            return sparse_adapter.load(model, meta, tensors, merge=merge)
        return load_dense(model, tensors)
    if (directory / "adapter_config.json").exists():
        from peft import PeftModel

        from rigsa.methods.lora import BASE_FILE
        from rigsa.models import fingerprint

        read_json(directory / "adapter_config.json")
        read_tensors(directory / "adapter_model.safetensors")
        base = read_json(directory / BASE_FILE) if (directory / BASE_FILE).exists() else {}
        # Written before method=qlora became model.quantize=nf4: `load_in_4bit`, and the fingerprint of the weights as
        # loaded. Since then: `quantize`, and the fingerprint of the base as trained on (4-bit: quantized first).
        older = "load_in_4bit" in base
        if older:
            quantize = ({"quant_type": base["quant_type"], "compute_dtype": base.get("compute_dtype", "float32")}
                        if base["load_in_4bit"] else None)
        else:
            quantize = base.get("quantize")
            quantize_as(model, quantize)
        found = fingerprint(model) if base.get("base_fingerprint") else None
        if found and found != base["base_fingerprint"]:
            raise sparse_adapter.AdapterMismatch(
                f"this adapter was trained on a different base model ({base.get('base_model')!r}, fingerprint "
                f"{base['base_fingerprint'][:12]}…; this model hashes to {found[:12]}…): load the base model it was "
                "trained on")
        if older:
            quantize_as(model, quantize)
        peft_model = PeftModel.from_pretrained(model, str(directory))
        return peft_model.merge_and_unload() if merge else peft_model
    raise FileNotFoundError(f"{directory} holds no adapter (expected adapter.json or adapter_config.json): "
                            "point at <run dir>/adapter")


REBUILD = ("delete the adapter folder and results.json of its run, and rerun the run's command: the final "
           "checkpoint rebuilds the adapter without training")


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


@torch.no_grad()
def load_dense(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Write a dense adapter state into `model`: `<layer>.dense_delta` is added to the layer's weight,
    `lm_head.weight` becomes an untied head, any other name replaces that parameter's values."""
    from rigsa.quantize import dequantized_weight, is_quantized

    for name, tensor in tensors.items():
        if name.endswith(".dense_delta"):
            layer_name = name.removesuffix(".dense_delta")
            layer = model.get_submodule(layer_name)
            if is_quantized(layer):  # RIGSA's dense phase over a 4-bit base: its float32 sum, as a float32 layer
                from rigsa.methods import replace_module

                replace_module(model, layer_name, float_linear(dequantized_weight(layer).float() + tensor.float(),
                                                               layer.bias))
            else:
                layer.weight.add_(tensor.to(layer.weight.dtype))
        elif name == "lm_head.weight":
            load_head(model, tensor)
        else:
            parameter = model.get_parameter(name)
            parameter.copy_(tensor.to(parameter.dtype))
    return model


@torch.no_grad()
def float_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A frozen float32 nn.Linear holding `weight` and `bias`."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
    layer.weight.copy_(weight.float())
    if bias is not None:
        layer.bias.copy_(bias.float())
    return layer.requires_grad_(False)


def trained_over_4bit(directory: Path) -> bool:
    """Whether the adapter in `directory` was trained over a 4-bit base (its `quantize` record; older QLoRA adapters:
    `load_in_4bit`)."""
    from rigsa.methods.lora import BASE_FILE

    for name in ("adapter.json", BASE_FILE):
        if (directory / name).exists():
            meta = read_json(directory / name)
            return bool(meta.get("quantize") or meta.get("load_in_4bit"))
    return False


@torch.no_grad()
def in_float_weights(model: nn.Module) -> nn.Module:
    """The model an adapter trained over a 4-bit base computes, as plain float32 layers to export: each 4-bit weight
    dequantized (what the trained model multiplied with), a sparse delta added to it, a PEFT adapter merged into it.
    Merging into the 4-bit weights instead would re-quantize them and lose most of a small delta."""
    from rigsa.methods import replace_module
    from rigsa.quantize import dequantized_weight, is_quantized
    from rigsa.sparse.engine import SparseDeltaLinear

    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if any(name.startswith(parent + ".") for parent in replaced):
            continue  # inside a layer already replaced (a sparse layer's 4-bit base)
        if isinstance(module, SparseDeltaLinear) and module.base_layer is not None:
            weight = module.base_weight().float().reshape(-1)
            weight[module.flat] += module.gate.detach().float() * module.values.detach().float()
            layer = float_linear(weight.reshape(module.out_features, module.in_features), module.base_layer.bias)
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


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from rigsa.config import compose
    from rigsa.models import load_model

    parser = argparse.ArgumentParser(prog="rigsa-apply", description="Apply a saved adapter to its base model and "
                                     "save the merged model, or export a sparse adapter to PEFT's SHiRA format.")
    parser.add_argument("adapter", help="the adapter folder: <run dir>/adapter")
    parser.add_argument("--model", default="smollm2_135m", help="base model: a `model` config option (default smollm2_135m)")
    parser.add_argument("--model-path", help="or a local Hugging Face model folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the `tiny` model, when --model tiny")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--shira", action="store_true", help="write a PEFT SHiRA adapter instead of a merged model")
    args = parser.parse_args(argv)
    overrides = [f"model={args.model}", f"seed={args.seed}"] + ([f"model.path={args.model_path}"] if args.model_path else [])
    try:
        cfg = compose(overrides)
        model, tokenizer = load_model(cfg.model, args.seed)
        if args.shira:
            print(f"SHiRA adapter: {sparse_adapter.export_shira(model, args.adapter, args.out)}")
            return 0
        over_4bit = trained_over_4bit(Path(args.adapter))
        merged = apply_adapter(model, args.adapter, merge=not over_4bit)
        if over_4bit:
            merged = in_float_weights(merged)
        head = merged._modules.pop("classifier_head", None)  # not part of the causal LM: saved beside it
        merged.save_pretrained(args.out)
        if head is not None:
            from rigsa.readout import HEAD_FILE, HEAD_META

            for name in (HEAD_FILE, HEAD_META):
                shutil.copyfile(Path(args.adapter) / name, Path(args.out) / name)
        tokenizer.save_pretrained(args.out)
        print(f"merged model: {args.out}")
        return 0
    except (ValueError, FileNotFoundError, UnreadableFile, AssetError) as error:
        print(f"rigsa-apply: error: {error}", file=sys.stderr)
        return 2
