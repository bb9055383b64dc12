"""rigsa: an experiment runner for sparse fine-tuning research on language models."""
import logging
import warnings

# Warnings a user can do nothing about, silenced where they start (each names its source):
# - bitsandbytes, imported by peft, warns at import on CPUs with AVX512-BF16 that the hub kernel of that
#   path is missing; rigsa switches that path off (methods/lora.py: it breaks gradients), so nothing uses it.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage())
# - peft calls transformers' deprecated `is_gradient_checkpointing` when it wraps a model (peft's call, not ours).
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
# - lm-eval warns, each time it wraps a model in memory, that an in-memory model is not a hub name; rigsa
#   passes its model in memory on purpose (forgetting.py) and runs lm-eval in one process.
logging.getLogger("lm_eval.models.huggingface").addFilter(
    lambda record: not record.getMessage().startswith(("`pretrained` model kwarg is not of type", "Passed an already")))
