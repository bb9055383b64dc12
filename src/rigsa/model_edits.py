"""Edits of a model's modules that methods, adapter loaders and exports share: freeze it, swap a layer, untie or
load the output head, list what trains. Low in the import graph: it knows torch modules, no method or format."""
from __future__ import annotations

import torch
from torch import nn


def freeze(model: nn.Module) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


def untie_head(model: nn.Module) -> nn.Parameter:
    """Give the output head its own trainable copy (SmolLM2 ties it to the frozen input embeddings)."""
    head = model.get_output_embeddings()
    # float32 even over a bfloat16 base: a trained weight needs updates below one bf16 ulp (autocast casts it)
    head.weight = nn.Parameter(head.weight.detach().to(torch.float32, copy=True), requires_grad=True)
    model.config.tie_word_embeddings = False  # a later tie_weights() must not re-tie the copy
    return head.weight


def load_head(model: nn.Module, weight: torch.Tensor) -> None:
    """Give the model a saved output head (frozen), untied from the input embeddings."""
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(weight.to(head.weight.dtype), requires_grad=False)
    model.config.tie_word_embeddings = False


def trainable_named(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
