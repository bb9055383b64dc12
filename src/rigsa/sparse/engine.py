"""The sparse-delta engine: a frozen linear layer plus m trainable values at m flat positions.

The delta lives merged in the layer's weight, W[idx] = base[idx] + gate * values, rewritten from
the m stored base values before every forward (O(m), and exact: base + delta is recomputed from
the untouched base values, never added and subtracted). The forward is then the frozen layer's
own matmul. A custom autograd function returns the input gradient (grad_out @ W, as the frozen
model needs anyway) and the gradient of the values only at their indices,

    d values[k] = gate * sum_t grad_out[t, row_k] * x[t, col_k],

computed over token chunks so its extra memory stays bounded: by gathering the needed columns
when m is small, and with torch.sparse.sampled_addmm over a CSR pattern of the indices otherwise.
From DENSE_FROM_DENSITY on (RIGSA's first pruned phases hold 50%, 25% and 12.5% of a layer) a
transient product grad_out^T @ x, gathered at the indices and freed at once, is cheaper than the
sampled kernel (measured here with 800 tokens: 3.3 ms against 6.0 ms for a 1536x576 layer at 12.5%,
3.2 against 4.5 at 6.25%, where a 576x1536 layer is already the other way round). No dense weight
gradient is kept, no full-size trainable tensor exists, and nothing full-size lives between steps.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# Extra memory allowed for one chunk of the value gradient, in elements (~64 MB of float32).
CHUNK_ELEMENTS = 1 << 24
# Up to this many values, gathering columns beats a sampled matmul (measured here: 2 ms for 442
# values, 43 ms for 4,423, where sampled_addmm takes 3 ms).
GATHER_MAX_VALUES = 1024
# From this density on, a transient dense product then a gather beats the sampled matmul.
DENSE_FROM_DENSITY = 0.125


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def value_gradient(grad_out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                   pattern: torch.Tensor | None, flat: torch.Tensor | None = None) -> torch.Tensor:
    """sum_t grad_out[t, rows[k]] * x[t, cols[k]] for every k, in float32, over token chunks.

    grad_out: [T, out], x: [T, in]; `pattern` is a CSR tensor [out, in] of the (sorted) indices,
    used by the sampled-matmul path; `flat` (the flat indices) selects the dense-product path."""
    tokens, m = x.shape[0], rows.numel()
    result = torch.zeros(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return result
    if flat is not None:  # in grad_out's precision, as autocast computes any weight gradient
        return (grad_out.t() @ x.to(grad_out.dtype)).reshape(-1)[flat].float()
    if pattern is None or m <= GATHER_MAX_VALUES:
        chunk = max(1, CHUNK_ELEMENTS // (2 * m))
        for start in range(0, tokens, chunk):
            g = grad_out[start:start + chunk].float().index_select(1, rows)
            v = x[start:start + chunk].float().index_select(1, cols)
            result += (g * v).sum(0)
        return result
    # The sampled kernel takes dot products along the tokens, so it wants both operands token-contiguous
    # ([out, t] and [in, t]); each is made so in one copy that also casts to float32 (the kernel has no
    # bfloat16), instead of a cast followed by the kernel's own transposing copy.
    chunk = max(1, CHUNK_ELEMENTS // (grad_out.shape[1] + x.shape[1]))
    for start in range(0, tokens, chunk):
        g_t, x_t = _transposed_float(grad_out[start:start + chunk]), _transposed_float(x[start:start + chunk])
        result += torch.sparse.sampled_addmm(pattern, g_t, x_t.t(), beta=0.0).values()
    return result


def _transposed_float(a: torch.Tensor) -> torch.Tensor:
    """a.t() as a contiguous float32 tensor, transposed and cast in one copy."""
    return torch.empty(a.shape[1], a.shape[0], dtype=torch.float32, device=a.device).copy_(a.t())


class _SparseDeltaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, gate, weight, bias, layer):
        ctx.layer = layer
        ctx.save_for_backward(x, gate)
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            ctx.weight = weight.to(dtype)
            out = F.linear(x.to(dtype), ctx.weight, None if bias is None else bias.to(dtype))
        else:
            ctx.weight = weight
            out = F.linear(x, weight, bias)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, gate = ctx.saved_tensors
        layer = ctx.layer
        grad_x = grad_values = grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out.to(ctx.weight.dtype) @ ctx.weight).to(ctx.x_dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
            flat_x = x.reshape(-1, x.shape[-1])  # each path of value_gradient casts as it needs
            raw = value_gradient(flat_grad, flat_x, layer.rows, layer.cols, layer.pattern,
                                 layer.flat if layer.dense_gradient else None)
            if ctx.needs_input_grad[1]:
                grad_values = raw * gate.float()
            if ctx.needs_input_grad[2]:
                grad_gate = (raw * layer.values.detach().float()).sum().reshape(gate.shape)
        ctx.weight = None
        return grad_x, grad_values, grad_gate, None, None, None


class SparseDeltaLinear(nn.Module):
    """A frozen nn.Linear with a sparse trainable delta: flat `indices` into the weight and `values`.

    `gate` (optional, RIGSA) scales the delta: W = W0 + gate * delta. The base layer's weight
    tensor is reused (merged in place), so the module adds only O(m) memory."""

    def __init__(self, base: nn.Linear, indices: torch.Tensor, values: torch.Tensor | None = None,
                 gate: float | torch.Tensor | nn.Parameter | None = None, train_gate: bool = False,
                 init_values: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        indices, order = torch.sort(indices.to(torch.int64).reshape(-1).to(self.weight.device))
        if indices.numel() and (indices[0] < 0 or indices[-1] >= self.weight.numel()
                                or (indices[1:] == indices[:-1]).any()):
            raise ValueError(f"indices must be unique flat positions in [0, {self.weight.numel()})")
        self.register_buffer("indices", indices.to(index_dtype(self.weight.numel())))
        self.register_buffer("base_values", self.weight.detach().reshape(-1)[indices].clone())
        if values is None:
            values = torch.zeros(indices.numel(), dtype=torch.float32)
        if values.numel() != indices.numel():
            raise ValueError(f"{values.numel()} values for {indices.numel()} indices")
        values = values.detach().reshape(-1).to(self.weight.device)[order]  # follow the sorted indices
        self.values = nn.Parameter(values.to(torch.float32, copy=True))
        if isinstance(gate, nn.Parameter):  # shared with other layers (RIGSA's global gate)
            self.gate = gate
        else:
            gate_tensor = torch.as_tensor(1.0 if gate is None else gate, dtype=torch.float32).reshape(())
            self.gate = nn.Parameter(gate_tensor.clone().to(self.weight.device), requires_grad=train_gate)
        # RIGSA keeps the values' initial state for its sign constraint and rewinding.
        self.register_buffer("init_values", None if init_values is None
                             else init_values.detach().float().reshape(-1).to(self.weight.device)[order].clone())
        self._build_pattern()

    def _build_pattern(self) -> None:
        flat = self.indices.to(torch.int64)
        self.flat = flat
        self.rows, self.cols = flat // self.in_features, flat % self.in_features
        self.pattern = None
        self.dense_gradient = flat.numel() >= DENSE_FROM_DENSITY * self.weight.numel()
        if GATHER_MAX_VALUES < flat.numel() and not self.dense_gradient:
            counts = torch.bincount(self.rows, minlength=self.out_features)
            crow = torch.zeros(self.out_features + 1, dtype=torch.int64, device=flat.device)
            crow[1:] = torch.cumsum(counts, 0)
            self.pattern = torch.sparse_csr_tensor(crow, self.cols, torch.ones(flat.numel(), device=flat.device),
                                                   size=(self.out_features, self.in_features))

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        self._build_pattern()  # rows, cols, flat and the CSR pattern follow the indices to the new device
        return result

    def delta(self) -> torch.Tensor:
        return (self.gate.detach() * self.values.detach()).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W[idx] = base[idx] + gate * values (exact: recomputed from the stored base values)."""
        self.weight.view(-1)[self.flat] = self.base_values + self.delta()

    @torch.no_grad()
    def unmerge(self) -> None:
        """W[idx] = base[idx]: the base weights, bit for bit."""
        self.weight.view(-1)[self.flat] = self.base_values

    @torch.no_grad()
    def reindex(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Move the delta to new flat positions (same count m, same `values` Parameter object).

        Values at positions kept from before carry over; new positions start at zero. Returns
        (source, found): new entry k took old entry source[k] where found[k], so a caller can remap
        per-value optimizer state the same way."""
        indices = torch.sort(indices.to(torch.int64).reshape(-1).to(self.weight.device)).values
        if indices.numel() != self.values.numel():
            raise ValueError(f"reindex keeps the count: {indices.numel()} positions for {self.values.numel()} values")
        self.unmerge()
        old = self.flat
        source = torch.searchsorted(old, indices).clamp(max=max(old.numel() - 1, 0))
        found = old[source] == indices if old.numel() else torch.zeros_like(indices, dtype=torch.bool)
        self.values.data = torch.where(found, self.values.data[source], torch.zeros_like(self.values.data))
        self.indices = indices.to(self.indices.dtype)
        self.base_values = self.weight.detach().reshape(-1)[indices].clone()
        self._build_pattern()
        return source, found

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.merge()
        if not (self.values.requires_grad or self.gate.requires_grad) or not torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        return _SparseDeltaLinear.apply(x, self.values, self.gate, self.weight, self.bias, self)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, m={self.indices.numel()}, "
                f"density={self.indices.numel() / self.weight.numel():.4%}")


def sparse_layers(model: nn.Module) -> dict[str, SparseDeltaLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, SparseDeltaLinear)}


def unmerge_all(model: nn.Module) -> None:
    for layer in sparse_layers(model).values():
        layer.unmerge()


def merge_all(model: nn.Module) -> None:
    for layer in sparse_layers(model).values():
        layer.merge()
