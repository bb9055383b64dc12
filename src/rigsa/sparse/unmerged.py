"""The engine's unmerged path: y = base(x) + gate * S x, S the sparse [out, in] matrix of the values.

Used where merging is not exact: a base weight *stored* in bfloat16 rounds away any delta below one ulp
of its weight (under bf16 autocast a delta merged into a float32 weight survives, dithered by the weight's
float32 residual; measured on SmolLM2-135M), and a 4-bit base cannot hold a delta at all. The base layer's
own forward gives base(x) and, through autograd, the input gradient grad_out W0; this module adds S x in
float32 to the base output, returns that float32 sum, and gives S^T grad_out to the input and the sampled
value gradient to the values.

Routes for the two products: on CPU the compiled kernels `spmm_add` / `spmm_t` (kernels.cpp, by tiles of
tokens over row-major activations, float32 sums; S x is added straight into the float32 copy of the base
output, so the forward allocates nothing else); off the CPU, or without a compiler, torch.sparse.mm with a
CSR S (and a CSR S^T from a column-ordered copy of the pattern), which runs on CUDA too.
"""
from __future__ import annotations

import warnings

import torch
from torch.nn import functional as F

from rigsa.sparse.products import csr_rows, kernel, values_and_gate_gradients


class CsrLayout:
    """S's pattern for sorted flat `indices` into an [out, in] weight: CSR rows (crow, cols) and, for the
    transpose's torch route, the values' order by column with its CSR rows."""

    def __init__(self, flat: torch.Tensor, out_features: int, in_features: int):
        self.shape = (out_features, in_features)
        rows, cols = flat // in_features, flat % in_features
        self.crow = csr_rows(rows, out_features)
        self.cols = cols.to(torch.int32)
        self.by_column = torch.argsort(cols * out_features + rows)
        self.t_crow = csr_rows(cols[self.by_column], in_features)
        self.t_cols = rows[self.by_column].to(torch.int32)


def sparse_product(layout: CsrLayout, x: torch.Tensor, scaled: torch.Tensor, transpose: bool,
                   add_to: torch.Tensor | None = None) -> torch.Tensor:
    """S x (transpose=False: x [T, in] -> [T, out], added in place to `add_to`, float32 [T, out]) or S^T x
    (x [T, out] -> a new [T, in]) in float32, S holding `scaled` (float32 [m], in the pattern's row order)."""
    out_features, in_features = layout.shape
    if x.device.type == "cpu" and kernel() is not None:
        x = (x if x.dtype in (torch.float32, torch.bfloat16) else x.float()).contiguous()
        threads = torch.get_num_threads()
        if transpose:
            return kernel().spmm_t(x, layout.crow, layout.cols, scaled.contiguous(), out_features, in_features, threads)
        return kernel().spmm_add(add_to, x, layout.crow, layout.cols, scaled.contiguous(), out_features, in_features,
                                 threads)
    if transpose:
        crow, cols, values, size = layout.t_crow, layout.t_cols, scaled[layout.by_column], (in_features, out_features)
    else:
        crow, cols, values, size = layout.crow, layout.cols, scaled, layout.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        matrix = torch.sparse_csr_tensor(crow, cols.to(torch.int64), values, size=size)
        product = torch.sparse.mm(matrix, x.float().t()).t()
    return product if transpose else add_to.add_(product)


class SparseProduct(torch.autograd.Function):
    """base_out + gate * S x in float32, S = the layer's (indices, values), summed into one float32 copy of
    base_out; gradients for x, the values, the gate and base_out."""

    @staticmethod
    def forward(ctx, x, values, gate, base_out, layer):
        ctx.layer = layer
        ctx.base_dtype = base_out.dtype
        ctx.save_for_backward(x, values, gate)
        out = base_out.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        scaled = (gate.detach().float() * values.detach().float())
        sparse_product(layer.layout(), x.reshape(-1, x.shape[-1]), scaled, transpose=False,
                       add_to=out.view(-1, out.shape[-1]))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, values, gate = ctx.saved_tensors
        layer = ctx.layer
        flat_g, flat_x = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = grad_values = grad_gate = None
        if ctx.needs_input_grad[0]:
            scaled = gate.float() * values.float()
            grad_x = sparse_product(layer.layout(), flat_g, scaled, transpose=True).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_values, grad_gate = values_and_gate_gradients(layer.value_gradient(flat_g, flat_x), values, gate,
                                                               ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        grad_base = grad_out.to(ctx.base_dtype) if ctx.needs_input_grad[3] else None
        return grad_x, grad_values, grad_gate, grad_base, None


def unmerged_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """base(x) + gate * S x, summed and returned in float32.

    Not cast back to the base output's bfloat16: that output is already rounded to the bf16 grid, so a
    change below half an ulp of it would round straight back (no float32 residual left to dither it).
    The float32 sum goes on into the residual stream, as a float32-weight model's does under autocast,
    and the next matmul's autocast casts it. (CUDA's mm can return float32 from bf16 operands; CPU's
    cannot, measured with torch 2.13.)"""
    return SparseProduct.apply(x, layer.values, layer.gate, base_output(layer, x), layer)


def base_output(layer, x: torch.Tensor) -> torch.Tensor:
    """The frozen base's own output for a layer that keeps its delta apart (the engine's unmerged layers, RIGSA's
    dense layers over a bf16 or 4-bit base): its 4-bit `base_layer` (bitsandbytes' forward and backward to x), or
    F.linear on its stored weight (x cast to the weight's dtype when no autocast does it)."""
    if layer.base_layer is not None:
        return layer.base_layer(x)
    if torch.is_autocast_enabled(x.device.type):
        return F.linear(x, layer.weight, layer.bias)
    return F.linear(x.to(layer.weight.dtype), layer.weight, layer.bias)
