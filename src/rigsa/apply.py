"""Load a saved adapter onto its base model (merged or not); the `rigsa-apply` command's logic.

Sparse adapters (adapter.json + adapter.safetensors, format rigsa-sparse-v1) are checked against the
base weights' fingerprint and refused on another base model. Dense adapters (format rigsa-dense-v1:
full, head, RIGSA before its first prune or with pruned_value=init) are written into the weights.
PEFT adapters (adapter_config.json) go through PeftModel, onto a 4-bit base when they were trained on one.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from rigsa.methods import load_head
from rigsa.sparse import adapter as sparse_adapter


def apply_adapter(model: nn.Module, directory: str | Path, merge: bool = True) -> nn.Module:
    """Return `model` with the adapter in `directory` applied (merged into the weights by default).

    merge=False keeps sparse adapters as trainable engine layers and PEFT adapters as a PeftModel;
    a dense adapter is always written into the weights."""
    directory = Path(directory)
    if (directory / "adapter.json").exists():
        meta = json.loads((directory / "adapter.json").read_text())
        if meta.get("format") == "rigsa-sparse-v1":
            return sparse_adapter.load(model, directory, merge=merge)
        return load_dense(model, load_file(str(directory / "adapter.safetensors")))
    if (directory / "adapter_config.json").exists():
        from peft import PeftModel

        from rigsa.methods.lora import BASE_FILE, quantize_linear_layers

        base = json.loads((directory / BASE_FILE).read_text()) if (directory / BASE_FILE).exists() else {}
        if base.get("load_in_4bit"):
            quantize_linear_layers(model, base["quant_type"])
        peft_model = PeftModel.from_pretrained(model, str(directory))
        return peft_model.merge_and_unload() if merge else peft_model
    raise FileNotFoundError(f"{directory} holds no adapter (expected adapter.json or adapter_config.json): "
                            "point at <run dir>/adapter")


@torch.no_grad()
def load_dense(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Write a dense adapter state into `model`: `<layer>.dense_delta` is added to the layer's weight,
    `lm_head.weight` becomes an untied head, any other name replaces that parameter's values."""
    for name, tensor in tensors.items():
        if name.endswith(".dense_delta"):
            weight = model.get_submodule(name.removesuffix(".dense_delta")).weight
            weight.add_(tensor.to(weight.dtype))
        elif name == "lm_head.weight":
            load_head(model, tensor)
        else:
            parameter = model.get_parameter(name)
            parameter.copy_(tensor.to(parameter.dtype))
    return model


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
        merged = apply_adapter(model, args.adapter, merge=True)
        merged.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
        print(f"merged model: {args.out}")
        return 0
    except (ValueError, FileNotFoundError) as error:
        print(f"rigsa-apply: error: {error}", file=sys.stderr)
        return 2
