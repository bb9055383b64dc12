"""Model + tokenizer from a hub id, a local directory, the embedded SmolLM2-135M, or `tiny`.

Weights are always loaded in float32 (the master copy); lower precision is applied as autocast
during training and evaluation (see `dtype` in the config).
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


def load_model(model_cfg: DictConfig, seed: int = 0):
    """Return (model in eval mode, float32, on CPU; tokenizer with left padding)."""
    source = model_cfg.source
    if model_cfg.get("path"):
        source, location = "local", model_cfg.path
    elif source == "embedded":
        location = str(assets.locate(model_cfg.name))
    elif source == "hub":
        location = model_cfg.hub_id
    elif source == "tiny":
        tokenizer = _finish_tokenizer(AutoTokenizer.from_pretrained(str(assets.locate("smollm2_135m"))))
        return build_tiny(model_cfg, len(tokenizer), seed).eval(), tokenizer
    else:
        raise ValueError(f"model.source={source!r}: expected embedded, hub, tiny or local")
    revision = model_cfg.get("revision") if source == "hub" else None
    tokenizer = _finish_tokenizer(AutoTokenizer.from_pretrained(location, revision=revision))
    model = AutoModelForCausalLM.from_pretrained(location, revision=revision, dtype=torch.float32)
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
