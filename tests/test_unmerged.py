"""The engine's unmerged path (y = base(x) + gate * S x) against a float64 reference, on float32 and
bfloat16-stored base weights, by the compiled kernels and by torch's CSR route."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rigsa.sparse import products
from rigsa.sparse.engine import SparseDeltaLinear
from test_sparse_engine import assert_matches_reference, reference, relative_error, require_kernel

CASES = [  # (in, out, density, bias, batch shape, product route)
    (32, 48, 0.05, True, (3, 7), "kernel"),
    (96, 80, 0.3, False, (5, 37), "kernel"),  # 185 tokens, split between threads
    (96, 80, 0.05, False, (5, 37), "kernel"),  # 185 tokens on the kernel's value path: 2 sampled tiles, the last partial
    (128, 64, 0.002, False, (4, 9), "kernel"),  # most rows of S empty
    (37, 53, 0.08, False, (7, 41), "kernel"),  # 287 tokens, widths no multiple of 16: the transposes' remainders
    (64, 16, 1.0, True, (2, 40), "kernel"),
    (32, 48, 0.05, True, (3, 7), "torch"),
    (96, 80, 0.3, False, (5, 37), "torch"),
]


def route(name, monkeypatch):
    if name == "kernel":
        require_kernel()
    else:
        monkeypatch.setitem(products._KERNEL, "module", None)


def build(in_f, out_f, density, bias, dtype, seed=0):
    torch.manual_seed(seed + in_f + out_f)
    base = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    m = max(1, int(density * in_f * out_f))
    indices = torch.randperm(in_f * out_f)[:m]
    layer = SparseDeltaLinear(base, indices, torch.randn(m) * 0.1, gate=0.7, train_gate=True)
    return base, layer


@pytest.mark.parametrize("in_f,out_f,density,bias,batch,path", CASES)
def test_unmerged_float32_base_matches_float64(in_f, out_f, density, bias, batch, path, monkeypatch):
    route(path, monkeypatch)
    base, layer = build(in_f, out_f, density, bias, torch.float32)
    layer.merged = False
    weight_before = base.weight.detach().clone()
    out = assert_matches_reference(layer, weight_before, base.bias, batch)
    assert out.dtype == torch.float32
    assert torch.equal(base.weight, weight_before) and layer.weight.grad is None


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_bf16_stored_base_is_unmerged_and_matches_its_own_weights_in_float64(path, monkeypatch):
    """Against float64 over the bf16 weights as stored: the base output is bf16 (relative error below 2^-8
    of the output's norm), the sum float32; the value and gate gradients are summed in float32 from bf16 x."""
    route(path, monkeypatch)
    base, layer = build(96, 80, 0.05, True, torch.bfloat16)
    assert not layer.merged
    stored = base.weight.detach().clone()
    x = torch.randn(6, 33, 96).to(torch.bfloat16).requires_grad_(True)
    upstream = torch.randn(6, 33, 80)
    out = layer(x)
    assert out.dtype == torch.float32
    (out * upstream).sum().backward()
    ref_out, ref_values, ref_x, ref_gate = reference(stored, base.bias, layer.indices, layer.values, 0.7, x, upstream)
    assert relative_error(out, ref_out) < 2**-8
    assert relative_error(layer.values.grad, ref_values) < 2**-8  # upstream reaches the values as bf16
    assert relative_error(layer.gate.grad, ref_gate) < 2**-8
    assert relative_error(x.grad, ref_x) < 2**-7  # the base's own bf16 backward: grad_out W0 in bf16
    assert torch.equal(base.weight, stored)


def test_a_delta_below_one_bf16_ulp_still_moves_the_output():
    """Merged into a bf16 weight, a delta of 0.2 ulp at every position (0.4 of the smaller ulp below a power of two) is rounded away (the output does not
    move at all); unmerged, the output moves by S x: regression slope of the measured change on the true
    change within 1% of 1 over 4,096 tokens."""
    torch.manual_seed(0)
    base = nn.Linear(64, 16, bias=False).to(torch.bfloat16)
    weight = base.weight.detach().float()
    ulp = torch.ldexp(torch.ones_like(weight), torch.frexp(weight).exponent - 8)  # bf16: 8 significant bits
    indices = torch.arange(weight.numel())
    values = (0.2 * ulp * torch.sign(torch.randn_like(weight))).reshape(-1)
    x = torch.randn(4096, 64).to(torch.bfloat16)
    with torch.no_grad():
        before = base(x).float()
        true_change = x.double() @ values.double().reshape(16, 64).t()
        merged = SparseDeltaLinear(nn.Linear(64, 16, bias=False).to(torch.bfloat16), indices, values, merged=True)
        merged.weight.copy_(base.weight)
        merged.base_values.copy_(base.weight.reshape(-1))
        assert torch.equal(merged(x).float(), before)  # rounded away entirely
        unmerged = SparseDeltaLinear(base, indices, values)
        change = unmerged(x).double() - before.double()
    slope = (change * true_change).sum() / (true_change * true_change).sum()
    assert 0.99 < slope.item() < 1.01


def test_unmerged_path_under_bf16_autocast_stays_close_to_float32(monkeypatch):
    route("kernel", monkeypatch)
    base, layer = build(96, 80, 0.05, False, torch.float32)
    layer.merged = False
    x = torch.randn(4, 50, 96)
    upstream = torch.randn(4, 50, 80)
    grads = []
    for autocast in (False, True):
        layer.values.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(x)
        (out.float() * upstream).sum().backward()
        grads.append(layer.values.grad.clone())
    assert relative_error(grads[1], grads[0]) < 2**-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (none here)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerged_path_on_cuda_matches_float64(dtype):
    """The CUDA route: torch's CSR sparse.mm for S x and S^T g, the torch-ops value gradient; never the CPU kernel."""
    base, layer = build(96, 80, 0.05, True, dtype)
    layer = layer.cuda()
    layer.merged = False
    stored = base.weight.detach().clone()
    x = torch.randn(6, 33, 96, device="cuda").to(dtype).requires_grad_(True)
    upstream = torch.randn(6, 33, 80, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = layer(x)
    (out.float() * upstream).sum().backward()
    ref_out, ref_values, ref_x, ref_gate = reference(stored.cpu(), None if base.bias is None else base.bias.cpu(),
                                                     layer.indices.cpu(), layer.values.cpu(), 0.7, x.cpu(),
                                                     upstream.cpu())
    tolerance = 1e-5 if dtype == torch.float32 else 2**-7
    assert relative_error(out.cpu(), ref_out) < tolerance
    assert relative_error(layer.values.grad.cpu(), ref_values) < tolerance
    assert relative_error(x.grad.cpu(), ref_x) < tolerance
