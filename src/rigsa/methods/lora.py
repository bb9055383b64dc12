"""LoRA, DoRA and QLoRA through peft. QLoRA is LoRA with model.quantize=nf4: run.py turns the loaded base into
bitsandbytes 4-bit layers before `attach` (`quantize_first`), and PEFT wraps those."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from rigsa.adapters import PEFT_BASE_FILE, PEFT_CONFIG_FILE
from rigsa.methods import Calibration, no_pruning, no_sparse_stats, nothing_after_step, one_param_group
from rigsa.model_edits import freeze, trainable_named
from rigsa.models import fingerprint
from rigsa.quantize import quantization
from rigsa.vocabulary import BASE_DTYPES, QUANTIZED_BASE, fail


class PeftLora:
    prunes = False
    bases = (*BASE_DTYPES, QUANTIZED_BASE)
    quantize_first = True
    param_groups = one_param_group
    after_step = nothing_after_step
    prune = no_pruning
    stats = no_sparse_stats

    def __init__(self, *, name: str, r: int, alpha: float, dropout: float, target_modules: list[str], use_dora: bool):
        if r < 1:
            fail("method.r", r, "a rank >= 1", "pass method.r=8")
        if not 0 <= dropout < 1:
            fail("method.dropout", dropout, "0 <= dropout < 1", "pass method.dropout=0.0")
        self.name = name
        self.r, self.alpha, self.dropout = int(r), float(alpha), float(dropout)
        self.target_modules = list(target_modules)
        self.use_dora = bool(use_dora)
        self.model: nn.Module | None = None
        self.base_fingerprint = self.base_model = None

    def peft_config(self):
        from peft import LoraConfig

        targets = "all-linear" if self.target_modules == ["all-linear"] else self.target_modules
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                          use_dora=self.use_dora, task_type="CAUSAL_LM", bias="none")

    def attach(self, model: nn.Module, calibration: Calibration) -> nn.Module:
        from peft import get_peft_model

        freeze(model)
        # of the base as trained on (a 4-bit one: its packed weights and quantization state, which rigsa.apply
        # rebuilds from the weights as loaded before it compares): apply_adapter refuses another base
        self.base_fingerprint = fingerprint(model)
        self.base_model = getattr(getattr(model, "config", None), "_name_or_path", None)
        self.model = get_peft_model(model, self.peft_config())
        return self.model

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(trainable_named(self.model).values())

    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model)

    def save(self, directory: Path) -> list[Path]:
        """PEFT's own format: adapter_config.json + adapter_model.safetensors (PeftModel.from_pretrained loads it)."""
        self.model.save_pretrained(str(directory))
        config_path = directory / PEFT_CONFIG_FILE  # PEFT lists target_modules from a set: in hash order
        config = json.loads(config_path.read_text())
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
        base = {"method": self.name, "quantize": quantization(self.model), "base_model": self.base_model,
                "base_fingerprint": self.base_fingerprint}
        (directory / PEFT_BASE_FILE).write_text(json.dumps(base, indent=2))
        return sorted(path for path in directory.iterdir() if path.is_file())
