"""The sparse-delta engine: a frozen linear layer plus m trainable values at m flat positions.

On a float32 weight the delta lives merged in it, W[idx] = base[idx] + gate * values, rewritten from
the m stored base values before every forward (O(m), and exact: base + delta is recomputed from
the untouched base values, never added and subtracted). The forward is then the frozen layer's
own matmul. A custom autograd function returns the input gradient (grad_out @ W, as the frozen
model needs anyway) and the gradient of the values only at their indices,

    d values[k] = gate * sum_t grad_out[t, row_k] * x[t, col_k],

computed by a small C++ kernel (kernels.cpp, compiled once at first use by torch's extension
loader) that reads grad_out and x row-major, tile by tile, with O(threads * (m + tile * (out + in)))
extra memory, freed on return. Where no compiler is available it falls back to torch ops over token
chunks, whose extra memory is bounded too: gathering the needed columns when m is small, and
torch.sparse.sampled_addmm over a CSR pattern of the indices otherwise (about 4x slower for a
512x1408 layer at 0.5%: 3.7 ms against 0.9 ms with 2,048 tokens, measured here).
From DENSE_FROM_DENSITY on (RIGSA's first pruned phases hold 50%, 25% and 12.5% of a layer) a
transient product grad_out^T @ x, gathered at the indices and freed at once, is cheaper than the
compiled kernel in bf16 (measured here with 800 tokens, 576x1536: 2.0 ms against 9.0 at 12.5%;
at 6.25% 3.6 against 4.8, at 3.125% 3.4 against 2.6), though not in float32 with 2,048 tokens
(19 against 13 ms at 12.5%); 12.5% is the default run's (bf16) choice (kernel times of the baseline x86-64 build;
the AVX-512 build's 1.3-1.5x changes neither comparison). No dense weight gradient is kept, no full-size
trainable tensor exists, and nothing full-size lives between steps.

On a weight stored in lower precision (bfloat16) merging rounds away a delta below one ulp of its weight: such
a layer stays unmerged, y = base(x) + gate * S x (unmerged.py), chosen at construction by its dtype (`merged`).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F

from rigsa.quantize import dequantized_weight, is_quantized, linear4bit
from rigsa.sparse import products
from rigsa.sparse.products import csr_rows, index_dtype, kernel, values_and_gate_gradients
from rigsa.sparse.unmerged import CsrLayout, unmerged_forward

# From this density on, a transient dense product then a gather beats the sampled matmul, per device type.
# cpu: measured (module docstring). cuda: reasoned, not measured (no GPU was lent to this project): the dense
# product grad_out^T x is one bf16 GEMM on the tensor cores, while the sampled route (sampled_addmm over a CSR
# pattern, which needs float32 there) and column gathers are irregular, memory-bound kernels, so the GEMM's
# 100x more multiply-adds at 1% density cost about what the sampled route's do; 2% leaves a margin for its
# transient [out, in] tensor (32 MB in bf16 for a 2048 x 8192 layer), freed at once. Replace by a measurement.
DENSE_FROM_DENSITY = {"cpu": 0.125, "cuda": 0.02}


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
            raw = layer.value_gradient(grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1]))
            grad_values, grad_gate = values_and_gate_gradients(raw, layer.values.detach(), gate,
                                                               ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        ctx.weight = None
        return grad_x, grad_values, grad_gate, None, None, None


class SparseDeltaLinear(nn.Module):
    """A frozen nn.Linear with a sparse trainable delta: flat `indices` into the weight and `values`.

    `gate` (optional, RIGSA) scales the delta: W = W0 + gate * delta. The base layer's weight
    tensor is reused (merged in place when `merged`), so the module adds only O(m) memory. `merged`
    defaults to exactness: True on a float32 weight, False (y = base(x) + gate * S x) on any other. A 4-bit
    base (a bitsandbytes Linear4bit, given or made by `quantize_base`) is kept as `base_layer`, never merged,
    and `weight` is then None."""

    def __init__(self, base: nn.Linear, indices: torch.Tensor, values: torch.Tensor | None = None,
                 gate: float | torch.Tensor | nn.Parameter | None = None, train_gate: bool = False,
                 init_values: torch.Tensor | None = None, merged: bool | None = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight_numel = self.in_features * self.out_features
        device = base.weight.device
        self.base_layer = base if is_quantized(base) else None
        if self.base_layer is not None and merged:
            raise ValueError("a delta cannot be merged into a 4-bit weight: leave merged=None")
        self.merged = self.base_layer is None and (base.weight.dtype == torch.float32 if merged is None else bool(merged))
        self.weight = None if self.base_layer is not None else base.weight
        self.bias = None if self.base_layer is not None else base.bias
        for tensor in (self.weight, self.bias):
            if tensor is not None:
                tensor.requires_grad_(False)
        indices, order = torch.sort(indices.to(torch.int64).reshape(-1).to(device))
        if indices.numel() and (indices[0] < 0 or indices[-1] >= self.weight_numel
                                or (indices[1:] == indices[:-1]).any()):
            raise ValueError(f"indices must be unique flat positions in [0, {self.weight_numel})")
        self.register_buffer("indices", indices.to(index_dtype(self.weight_numel)))
        # the weight as given holds no delta: read it unmerged
        self.register_buffer("base_values", self.base_weight(merged=False).reshape(-1)[indices].clone())
        if values is None:
            values = torch.zeros(indices.numel(), dtype=torch.float32)
        if values.numel() != indices.numel():
            raise ValueError(f"{values.numel()} values for {indices.numel()} indices")
        values = values.detach().reshape(-1).to(device)[order]  # follow the sorted indices
        self.values = nn.Parameter(values.to(torch.float32, copy=True))
        if isinstance(gate, nn.Parameter):  # shared with other layers (RIGSA's global gate)
            self.gate = gate
        else:
            gate_tensor = torch.as_tensor(1.0 if gate is None else gate, dtype=torch.float32).reshape(())
            self.gate = nn.Parameter(gate_tensor.clone().to(device), requires_grad=train_gate)
        # RIGSA keeps the values' initial state for its sign constraint and rewinding.
        self.register_buffer("init_values", None if init_values is None
                             else init_values.detach().float().reshape(-1).to(device)[order].clone())
        self._build_pattern()

    def _build_pattern(self) -> None:
        """The value gradient's path. The kernel needs nothing but the indices; the torch-ops route's
        per-value rows, columns and CSR pattern are built on its first use only (`_torch_route`)."""
        threshold = DENSE_FROM_DENSITY.get(self.indices.device.type, DENSE_FROM_DENSITY["cpu"])
        self.dense_gradient = self.indices.numel() >= threshold * self.weight_numel
        self._route = self._layout = None

    def layout(self):
        """S's CSR pattern for the unmerged path, built on first use."""
        if self._layout is None:
            self._layout = CsrLayout(self.flat, self.out_features, self.in_features)
        return self._layout

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        self._build_pattern()  # the torch-ops route's rows, cols and CSR pattern follow the indices' device
        return result

    @property
    def flat(self) -> torch.Tensor:
        """The flat indices as int64."""
        return self.indices.to(torch.int64)

    def gradient_path(self) -> str:
        """How the value gradient is computed: dense (a transient product, from DENSE_FROM_DENSITY on),
        kernel (the compiled kernel, on CPU when it builds), else torch ops: gather or sampled."""
        if self.dense_gradient:
            return "dense"
        if self.indices.device.type == "cpu" and kernel() is not None:
            return "kernel"
        return "gather" if self.indices.numel() <= products.GATHER_MAX_VALUES else "sampled"

    def _torch_route(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(rows, cols, CSR pattern or None) for the torch-ops route, built once."""
        if self._route is None:
            flat = self.flat
            rows, cols = flat // self.in_features, flat % self.in_features
            pattern = None
            if self.gradient_path() == "sampled":
                crow = csr_rows(rows, self.out_features)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                    pattern = torch.sparse_csr_tensor(crow, cols, torch.ones(flat.numel(), device=flat.device),
                                                      size=(self.out_features, self.in_features))
            self._route = (rows, cols, pattern)
        return self._route

    def value_gradient(self, grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """d values (before the gate) for grad_out [T, out] and x [T, in], in float32."""
        path = self.gradient_path()
        if path == "dense":  # in grad_out's precision, as autocast computes any weight gradient
            return (grad_out.t() @ x.to(grad_out.dtype)).reshape(-1)[self.indices].float()
        if path == "kernel":
            supported = (torch.float32, torch.bfloat16)
            g = grad_out if grad_out.dtype in supported else grad_out.float()
            v = x if x.dtype in supported else x.float()
            return kernel().sampled_dot(g.contiguous(), v.contiguous(), self.indices, torch.get_num_threads())
        rows, cols, pattern = self._torch_route()
        return products.value_gradient(grad_out, x, rows, cols, pattern)

    def base_weight(self, merged: bool | None = None) -> torch.Tensor:
        """The dense base weight, without the delta (a 4-bit base dequantized: a transient copy). `merged`:
        whether the weight tensor holds the delta now (default: the layer's mode)."""
        if self.base_layer is not None:
            return dequantized_weight(self.base_layer)
        if not (self.merged if merged is None else merged):
            return self.weight.detach()
        weight = self.weight.detach().clone()
        weight.view(-1)[self.indices] = self.base_values
        return weight

    @torch.no_grad()
    def quantize_base(self, quant_type: str, compute_dtype: torch.dtype) -> None:
        """Replace the base weight by a 4-bit copy (bitsandbytes); the delta stays apart from then on."""
        if self.base_layer is not None:
            return
        self.unmerge()
        self.base_layer = linear4bit(self.weight, self.bias, quant_type, compute_dtype)
        self.weight = self.bias = None
        self.merged = False

    def delta(self) -> torch.Tensor:
        return (self.gate.detach() * self.values.detach()).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W[idx] = base[idx] + gate * values (exact: recomputed from the stored base values); unmerged: nothing."""
        if not self.merged:
            return
        self.weight.view(-1)[self.indices] = self.base_values + self.delta()

    @torch.no_grad()
    def unmerge(self) -> None:
        """W[idx] = base[idx]: the base weights, bit for bit (unmerged: they never changed)."""
        if not self.merged:
            return
        self.weight.view(-1)[self.indices] = self.base_values

    @torch.no_grad()
    def reindex(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Move the delta to new flat positions (same count m, same `values` Parameter object).

        Values at positions kept from before carry over; new positions start at zero. Returns
        (source, found): new entry k took old entry source[k] where found[k], so a caller can remap
        per-value optimizer state the same way."""
        indices = torch.sort(indices.to(torch.int64).reshape(-1).to(self.indices.device)).values
        if indices.numel() != self.values.numel():
            raise ValueError(f"reindex keeps the count: {indices.numel()} positions for {self.values.numel()} values")
        self.unmerge()
        old = self.flat
        source = torch.searchsorted(old, indices).clamp(max=max(old.numel() - 1, 0))
        found = old[source] == indices if old.numel() else torch.zeros_like(indices, dtype=torch.bool)
        self.values.data = torch.where(found, self.values.data[source], torch.zeros_like(self.values.data))
        self.indices = indices.to(self.indices.dtype)
        self.base_values = self.base_weight(merged=False).reshape(-1)[indices].clone()  # unmerged above
        self._build_pattern()
        return source, found

    # ---- the AdapterLayer protocol (rigsa.adapter_layer)
    def own_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"indices": self.indices, "base_values": self.base_values, "values": self.values, "gate": self.gate}
        return {**tensors, **({"init_values": self.init_values} if self.init_values is not None else {})}

    def positions(self) -> torch.Tensor:
        return self.indices

    def move_to(self, positions: torch.Tensor) -> None:
        if not torch.equal(positions.to(self.indices.device), self.indices):
            self.reindex(positions)

    @torch.no_grad()
    def float_weight(self) -> torch.Tensor:
        weight = self.base_weight().float().reshape(-1)
        weight[self.flat] += self.gate.detach().float() * self.values.detach().float()
        return weight.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.merged:
            return unmerged_forward(self, x)
        self.merge()
        if not (self.values.requires_grad or self.gate.requires_grad) or not torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        return _SparseDeltaLinear.apply(x, self.values, self.gate, self.weight, self.bias, self)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, m={self.indices.numel()}, "
                f"density={self.indices.numel() / self.weight_numel:.4%}, merged={self.merged}"
                + (", base=4-bit" if self.base_layer is not None else ""))


def frozen_base(layer: nn.Module) -> nn.Module:
    """What a new engine layer over `layer` (an adapter layer being replaced) should wrap: its 4-bit base layer
    when it has one, else the layer itself (its `weight` and `bias`)."""
    return layer.base_layer if getattr(layer, "base_layer", None) is not None else layer


def sparse_layers(model: nn.Module) -> dict[str, SparseDeltaLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, SparseDeltaLinear)}


def unmerge_all(model: nn.Module) -> None:
    for layer in sparse_layers(model).values():
        layer.unmerge()


def merge_all(model: nn.Module) -> None:
    for layer in sparse_layers(model).values():
        layer.merge()
