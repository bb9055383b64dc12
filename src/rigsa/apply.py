"""Load a saved adapter onto its base model (merged or not); the `rigsa-apply` command's logic.

Sparse adapters (adapter.json + adapter.safetensors) are checked against the base weights' fingerprint
and refused on another base model; PEFT adapters (adapter_config.json) go through PeftModel.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from rigsa.sparse import adapter as sparse_adapter


def apply_adapter(model: nn.Module, directory: str | Path, merge: bool = True) -> nn.Module:
    """Return `model` with the adapter in `directory` applied (merged into the weights by default)."""
    directory = Path(directory)
    if (directory / "adapter.json").exists():
        import json

        meta = json.loads((directory / "adapter.json").read_text())
        if meta.get("format") != "rigsa-sparse-v1":
            raise ValueError(f"{directory} holds a {meta.get('method')!r} adapter saved as plain tensors "
                             "(dense or head-only); load adapter.safetensors with load_state_dict instead")
        return sparse_adapter.load(model, directory, merge=merge)
    if (directory / "adapter_config.json").exists():
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, str(directory))
        return peft_model.merge_and_unload() if merge else peft_model
    raise FileNotFoundError(f"{directory} holds no adapter (expected adapter.json or adapter_config.json): "
                            "point at <run dir>/adapter")


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
