"""`rigsa-apply`: apply a saved adapter to its base model and save the merged model, or export a sparse adapter to
PEFT's SHiRA format. The work is in rigsa.adapters (read, load onto a model, write, export)."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from rigsa.adapters import HEAD_FILE, HEAD_META_FILE
from rigsa.adapters.load import apply_adapter, in_float_weights
from rigsa.adapters.read import read_adapter
from rigsa.adapters.write import export_shira
from rigsa.assets import AssetError
from rigsa.cache import UnreadableFile
from rigsa.config import compose
from rigsa.models import load_model

__all__ = ["apply_adapter", "main"]  # apply_adapter: the library call, re-exported beside the command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rigsa-apply", description="Apply a saved adapter to its base model and "
                                     "save the merged model, or export a sparse adapter to PEFT's SHiRA format.")
    parser.add_argument("adapter", help="the adapter folder: <run dir>/adapter")
    parser.add_argument("--model", default="smollm2_135m", help="base model: a `model` config option (default smollm2_135m)")
    parser.add_argument("--model-path", help="or a local Hugging Face model folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the `tiny` model, when --model tiny")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--shira", action="store_true", help="write a PEFT SHiRA adapter instead of a merged model")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # nothing already there is overwritten
        print(f"rigsa-apply: error: --out {out} exists and is not an empty folder: pass a new folder", file=sys.stderr)
        return 2
    overrides = [f"model={args.model}", f"seed={args.seed}"] + ([f"model.path={args.model_path}"] if args.model_path else [])
    try:
        cfg = compose(overrides)
        model, tokenizer = load_model(cfg.model, args.seed)
        if args.shira:
            print(f"SHiRA adapter: {export_shira(model, args.adapter, args.out)}")
            return 0
        adapter = read_adapter(args.adapter)
        over_4bit = bool(adapter.quantize)
        merged = apply_adapter(model, adapter, merge=not over_4bit)
        if over_4bit:
            merged = in_float_weights(merged)
        head = merged._modules.pop("classifier_head", None)  # not part of the causal LM: saved beside it
        merged.save_pretrained(args.out)
        if head is not None:
            for name in (HEAD_FILE, HEAD_META_FILE):
                shutil.copyfile(Path(args.adapter) / name, Path(args.out) / name)
        tokenizer.save_pretrained(args.out)
        print(f"merged model: {args.out}")
        return 0
    except (ValueError, FileNotFoundError, UnreadableFile, AssetError) as error:
        print(f"rigsa-apply: error: {error}", file=sys.stderr)
        return 2
