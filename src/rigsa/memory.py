"""Memory accounting, counted from tensors: the bytes of the base weights, the adapter, the gradients and the
optimizer state (SpaRTA's Table 1 compares methods by these), reported in results.json beside peak memory.

- base weights: every frozen parameter outside the adapter's own layers (a 4-bit weight counts its packed
  bytes and its quantization state);
- adapter: the trainable parameters (the classification head included) and the adapter layers' own tensors
  (a sparse layer's indices, stored base values and gate; RIGSA's masks);
- gradients and optimizer state: a gradient per trainable tensor, at its size, and every tensor in the
  optimizer's state after the last step of a training phase (the largest over the phases: RIGSA's dense
  phase).
"""
from __future__ import annotations

import torch
from torch import nn

from rigsa.adapter_layer import adapter_layers


def tensor_bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def quantization_state_bytes(parameter: torch.Tensor) -> int:
    """The bytes of a bitsandbytes 4-bit weight's quantization state (absmax per block, ...); 0 for others."""
    state = getattr(parameter, "quant_state", None)
    if state is None:
        return 0
    return sum(tensor_bytes(value) for value in state.as_dict(packed=True).values() if isinstance(value, torch.Tensor))


def model_bytes(model: nn.Module, extra_trainable: list[nn.Parameter]) -> dict[str, int]:
    """{base_weight_bytes, adapter_bytes} of the adapted model (tensors shared by several names counted once)."""
    adapter_tensors: dict[int, torch.Tensor] = {id(p): p for p in extra_trainable}
    for layer in adapter_layers(model).values():
        adapter_tensors.update({id(tensor): tensor for tensor in layer.own_tensors().values()})
    base_tensors: dict[int, torch.Tensor] = {}
    for parameter in model.parameters():
        if parameter.requires_grad:
            adapter_tensors[id(parameter)] = parameter
        elif id(parameter) not in adapter_tensors:
            base_tensors[id(parameter)] = parameter
    return {"base_weight_bytes": sum(tensor_bytes(t) + quantization_state_bytes(t) for t in base_tensors.values()),
            "adapter_bytes": sum(tensor_bytes(t) for t in adapter_tensors.values())}


def training_bytes(parameters, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """{gradient_bytes, optimizer_state_bytes} held during training. A gradient is counted at its parameter's
    size (the engine's values get exactly that, never a dense weight gradient), so a phase replayed from its
    checkpoint, which takes no step, reports what the uninterrupted run did."""
    state = [value for per_parameter in optimizer.state.values() for value in per_parameter.values()
             if isinstance(value, torch.Tensor)]
    return {"gradient_bytes": sum(tensor_bytes(p) for p in parameters),
            "optimizer_state_bytes": sum(tensor_bytes(value) for value in state)}


# ---------------------------------------------------------------- peak memory, per job
# A sweep runs many jobs in one process, where the process's running maximum (ru_maxrss) would report the
# largest job so far for every later job. So each job resets the high-water mark when it starts: CUDA's
# peak-allocation counter, or on Linux the kernel's peak resident set (writing 5 to /proc/self/clear_refs
# resets VmHWM to the current RSS). Where neither can be reset the scope says "process".
CLEAR_REFS, STATUS = "/proc/self/clear_refs", "/proc/self/status"


def reset_peak_memory(device: torch.device) -> str:
    """Start counting this job's peak memory; returns its scope: 'job' or 'process'."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "job"
    try:
        with open(CLEAR_REFS, "w") as handle:
            handle.write("5")
        return "job"
    except OSError:
        return "process"


def resident_peak_bytes() -> int:
    """The process's peak resident set since the last reset (VmHWM), else its running maximum (ru_maxrss)."""
    try:
        with open(STATUS) as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resident_peak_bytes()
