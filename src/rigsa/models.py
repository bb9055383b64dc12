"""Model + tokenizer from a hub id, a local directory, the embedded SmolLM2-135M, or `tiny`.

Weights are loaded in `model.base_dtype`: float32 by default (the master copy; lower precision is
applied as autocast, see `dtype`), or bfloat16 (half the memory; the frozen weights stay bf16).
"""
from __future__ import annotations

import hashlib

import torch
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from rigsa import assets


def _finish_tokenizer(tokenizer):
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # prompts end at the same position: the answer is predicted at -1
    return tokenizer


def build_tiny(model_cfg: DictConfig, vocab_size: int, seed: int) -> LlamaForCausalLM:
    """A random-init Llama with SmolLM2's layout (GQA, tied embeddings, RoPE theta) at toy width."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=model_cfg.hidden_size, intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.num_layers, num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_kv_heads, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Embeddings (tied to the head) at std 0.25, not 0.02: with the default std 0.02 at width 64 the largest
    # logit a frozen head allows is ~1.3, so no adapter could lower the loss much below ln(vocab).
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 0.25)
    torch.random.set_rng_state(generator_state)
    return model


def check_source(model_cfg: DictConfig) -> None:
    """What can be checked before any weights load: a local folder holds a causal LM's config and
    weights; a hub model is in the local Hugging Face cache or the hub is reachable."""
    import json
    import os
    from pathlib import Path

    from rigsa.vocabulary import fail

    if model_cfg.source == "local" or model_cfg.get("path"):
        folder = Path(os.path.expanduser(model_cfg.path or ""))
        if not model_cfg.path or not folder.is_dir():
            fail("model.path", model_cfg.path, "an existing local Hugging Face causal-LM directory",
                 "pass model.path=/path/to/model_dir (a folder with config.json and *.safetensors)")
        try:
            architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
        except (OSError, ValueError) as error:
            fail("model.path", model_cfg.path, f"a folder with a readable config.json ({type(error).__name__})",
                 "point model.path at a folder saved by save_pretrained()")
        if not any(name.endswith("ForCausalLM") for name in architectures):
            fail("model.path", model_cfg.path, f"a causal language model (its config.json names {architectures})",
                 "point model.path at a *ForCausalLM model, e.g. one saved by AutoModelForCausalLM.save_pretrained()")
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            fail("model.path", model_cfg.path, "a folder with weights (*.safetensors or *.bin)",
                 "save the model into it with save_pretrained()")
    elif model_cfg.source in ("embedded", "tiny"):  # tiny borrows the embedded model's tokenizer
        assets.locate("smollm2_135m" if model_cfg.source == "tiny" else model_cfg.name)
    elif model_cfg.source == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached_config = try_to_load_from_cache(model_cfg.hub_id, "config.json", revision=model_cfg.get("revision"))
        reason = None if isinstance(cached_config, str) else assets.hub_unreachable_reason()
        if reason:
            fail("model.hub_id", model_cfg.hub_id, f"a model this machine can load (model={model_cfg.name} comes from "
                 f"the Hugging Face hub, but {reason})", "use model=smollm2_135m (embedded) or model=local "
                 "model.path=<a local folder>")


def _location(model_cfg: DictConfig) -> tuple[str, str, str | None]:
    """(source, where the weights are, revision) of a model config."""
    source = model_cfg.source
    if model_cfg.get("path"):
        return "local", model_cfg.path, None
    if source == "embedded":
        return source, str(assets.locate(model_cfg.name)), None
    if source == "hub":
        return source, model_cfg.hub_id, model_cfg.get("revision")
    if source == "tiny":  # tiny borrows the embedded model's tokenizer
        return source, str(assets.locate("smollm2_135m")), None
    raise ValueError(f"model.source={source!r}: expected embedded, hub, tiny or local")


def load_tokenizer(model_cfg: DictConfig):
    """The model's tokenizer, with left padding (seconds: the task is built with it before the weights load)."""
    _, location, revision = _location(model_cfg)
    return _finish_tokenizer(AutoTokenizer.from_pretrained(location, revision=revision))


def load_model(model_cfg: DictConfig, seed: int = 0, tokenizer=None):
    """Return (model in eval mode, in model.base_dtype, on CPU; tokenizer with left padding)."""
    source, location, revision = _location(model_cfg)
    tokenizer = tokenizer or load_tokenizer(model_cfg)
    dtype = getattr(torch, model_cfg.base_dtype)
    if source == "tiny":  # built in float32 then cast, so a bf16 tiny model holds the float32 one's values rounded
        return build_tiny(model_cfg, len(tokenizer), seed).to(dtype).eval(), tokenizer
    model = AutoModelForCausalLM.from_pretrained(location, revision=revision, dtype=dtype)
    return model.eval(), tokenizer


def hash_tensors(named) -> str:
    """SHA-256 over (name, tensor) pairs in name order: each name, shape and raw bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named, key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's name, shape and bytes: identifies the base weights exactly."""
    return hash_tensors(model.state_dict().items())
