"""The sparse-delta engine against a float64 dense reference; exact merge/unmerge; O(m) state."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from rigsa.sparse import engine, products
from rigsa.sparse.engine import SparseDeltaLinear


def reference(base_weight, bias, indices, values, gate, x, upstream):
    """Dense float64 W_eff = W + scatter(gate * values); returns out, d values, d x, d gate."""
    weight = base_weight.double().clone().reshape(-1)
    values64 = values.detach().double().clone().requires_grad_(True)
    gate64 = torch.tensor(float(gate), dtype=torch.float64, requires_grad=True)
    delta = torch.zeros_like(weight).index_put((indices.long(),), gate64 * values64)
    x64 = x.detach().double().clone().requires_grad_(True)
    bias = None if bias is None else bias.detach().double()
    out = nn.functional.linear(x64, (weight + delta).reshape(base_weight.shape), bias)
    (out * upstream.double()).sum().backward()
    return out, values64.grad, x64.grad, gate64.grad


def assert_matches_reference(layer, base_weight, bias, batch, tolerance=1e-5):
    """Run `layer` (gate 0.7) forward and backward on a random batch; its output and the gradients of x, the
    values and the gate match the float64 dense reference over `base_weight` to a relative error < tolerance."""
    x = torch.randn(*batch, layer.in_features, requires_grad=True)
    upstream = torch.randn(*batch, layer.out_features)
    out = layer(x)
    (out * upstream).sum().backward()
    ref_out, ref_values, ref_x, ref_gate = reference(base_weight, bias, layer.indices, layer.values, 0.7, x, upstream)
    for name, found, expected in [("output", out, ref_out), ("x grad", x.grad, ref_x),
                                  ("values grad", layer.values.grad, ref_values), ("gate grad", layer.gate.grad, ref_gate)]:
        assert relative_error(found, expected) < tolerance, name
    return out


def require_kernel():
    """The compiled kernel must build wherever a C++ compiler exists; without one the test is skipped."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the engine uses its torch-ops route")
    assert products.kernel() is not None, "the sparse engine's C++ kernel did not build (see the warning)"


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


CASES = [  # (in, out, density, bias, batch shape, value-gradient path)
    (32, 48, 0.05, True, (3, 7), "kernel"),  # 21 tokens: one partial tile
    (96, 80, 0.3, False, (5, 37), "kernel"),  # 185 tokens: several tiles, split between threads
    (64, 16, 1.0, True, (2, 40), "kernel"),
    (128, 64, 0.002, False, (4, 9), "kernel"),  # 16 values: most rows and columns unused
    (37, 53, 0.08, False, (7, 41), "kernel"),  # 287 tokens, widths no multiple of 16: the transposes' remainders
    (40, 24, 0.02, False, (3, 30), "kernel"),  # 19 values: fewer than half the rows and columns in use
    (32, 48, 0.05, True, (3, 7), "gather"),
    (64, 16, 0.5, False, (5,), "gather"),
    (96, 80, 0.9, True, (2, 4, 3), "sampled"),
    (128, 64, 0.02, False, (4, 9), "sampled"),
    (40, 24, 1.0, True, (6,), "dense"),
    (72, 56, 0.3, False, (3, 5), "dense"),
]


@pytest.mark.parametrize("in_f,out_f,density,bias,batch,path", CASES)
def test_gradients_match_a_float64_dense_reference(in_f, out_f, density, bias, batch, path, monkeypatch):
    if path == "kernel":
        require_kernel()
    else:
        monkeypatch.setitem(products._KERNEL, "module", None)  # the torch-ops route
    monkeypatch.setattr(products, "GATHER_MAX_VALUES", 10**9 if path == "gather" else 0)
    monkeypatch.setitem(engine.DENSE_FROM_DENSITY, "cpu", 0.0 if path == "dense" else 2.0)
    monkeypatch.setattr(products, "CHUNK_ELEMENTS", 64)  # several token chunks even for these small shapes
    torch.manual_seed(in_f + out_f)
    base = nn.Linear(in_f, out_f, bias=bias)
    base_weight = base.weight.detach().clone()  # the layer merges its delta into this tensor in place
    m = max(1, int(density * in_f * out_f))
    indices = torch.randperm(in_f * out_f)[:m]
    values = torch.randn(m) * 0.1
    layer = SparseDeltaLinear(base, indices, values, gate=0.7, train_gate=True)
    assert layer.gradient_path() == path
    assert_matches_reference(layer, base_weight, base.bias, batch)
    assert layer.weight.grad is None  # no dense weight gradient exists


def test_unsorted_indices_keep_their_values():
    base = nn.Linear(4, 3, bias=False)
    layer = SparseDeltaLinear(base, torch.tensor([7, 2, 5]), torch.tensor([70.0, 20.0, 50.0]))
    assert layer.indices.tolist() == [2, 5, 7] and layer.values.tolist() == [20.0, 50.0, 70.0]
    with pytest.raises(ValueError, match="unique flat positions"):
        SparseDeltaLinear(nn.Linear(4, 3), torch.tensor([1, 1]))


def test_merge_then_unmerge_restores_the_weights_bit_for_bit():
    torch.manual_seed(0)
    base = nn.Linear(257, 129)
    original = base.weight.detach().clone()
    layer = SparseDeltaLinear(base, torch.randperm(257 * 129)[:3000])
    optimizer = torch.optim.AdamW([layer.values], lr=1e-2)
    for _ in range(20):  # merged forward + optimizer steps, as in training
        layer(torch.randn(8, 257)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    layer.merge()
    assert not torch.equal(layer.weight, original)
    outside = torch.ones(original.numel(), dtype=torch.bool)
    outside[layer.indices.long()] = False
    assert torch.equal(layer.weight.reshape(-1)[outside], original.reshape(-1)[outside])
    layer.unmerge()
    assert torch.equal(layer.weight, original)


def test_state_is_order_m_and_int32_indices():
    base = nn.Linear(512, 512, bias=False)
    layer = SparseDeltaLinear(base, torch.randperm(512 * 512)[:1311])
    trainable = [p for p in layer.parameters() if p.requires_grad]
    assert [p.numel() for p in trainable] == [1311]
    assert layer.indices.dtype == torch.int32
    buffers = {name: b.numel() for name, b in layer.named_buffers()}
    assert buffers == {"indices": 1311, "base_values": 1311}
    # adapter (4 B index + 4 B value) + gradient (4 B) + AdamW moments (8 B) = 20 B per value (+ base copy 4 B)
    per_value = (layer.indices.element_size() + layer.values.element_size() * 4 + layer.base_values.element_size())
    assert per_value <= 24
    require_kernel()  # on the kernel path a training step adds no per-value tensor to the layer
    layer(torch.randn(4, 512)).sum().backward()
    extra = {k: v.numel() for k, v in vars(layer).items() if torch.is_tensor(v)}
    assert layer.gradient_path() == "kernel" and layer._route is None and extra == {}


@pytest.mark.parametrize("path", ["kernel", "sampled"])
def test_bf16_autocast_gradients_stay_close_to_float32(path, monkeypatch):
    if path == "kernel":
        require_kernel()
    else:
        monkeypatch.setitem(products._KERNEL, "module", None)
        monkeypatch.setattr(products, "GATHER_MAX_VALUES", 0)
    torch.manual_seed(1)
    base = nn.Linear(64, 32)
    layer = SparseDeltaLinear(base, torch.randperm(64 * 32)[:200], torch.randn(200) * 0.1)
    x = torch.randn(16, 64)
    layer(x).pow(2).sum().backward()
    exact = layer.values.grad.clone()
    layer.values.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16 and layer.gradient_path() == path
    out.float().pow(2).sum().backward()
    assert relative_error(layer.values.grad, exact) < 3e-2


def test_reindex_carries_kept_values_and_restores_the_rest_of_the_base():
    base = nn.Linear(8, 4, bias=False)
    original = base.weight.detach().clone()
    layer = SparseDeltaLinear(base, torch.tensor([1, 5, 9, 20]), torch.tensor([1.0, 5.0, 9.0, 20.0]))
    values = layer.values
    layer.merge()
    source, found = layer.reindex(torch.tensor([30, 9, 2, 5]))
    assert layer.values is values  # the optimizer's Parameter object is kept
    assert layer.indices.tolist() == [2, 5, 9, 30] and layer.values.tolist() == [0.0, 5.0, 9.0, 0.0]
    assert found.tolist() == [False, True, True, False] and source[found].tolist() == [1, 2]
    assert torch.equal(layer.weight, original)  # unmerged: the old positions hold the base again
    layer.merge()
    expected = original.clone().reshape(-1)
    expected[[5, 9]] += torch.tensor([5.0, 9.0])
    assert torch.equal(layer.weight.reshape(-1), expected)


def test_a_kernel_cache_built_for_another_cpus_vector_extensions_is_not_loaded(tmp_path, monkeypatch):
    """The kernel is built with the vector extensions torch reads off this CPU (AVX-512, AVX2, or none), never
    -march=native; the cache folder is keyed by those flags, so a cache copied from a CPU with more of them is not
    loaded (it would die on an illegal instruction): the kernel is compiled for this CPU's flags instead."""
    from torch.utils import cpp_extension

    from rigsa import assets

    require_kernel()
    built = Path(products.kernel().__file__).parent
    shutil.copytree(built, tmp_path / "cache" / "kernels" / built.name)
    monkeypatch.setattr(assets, "cache_root", lambda: tmp_path / "cache")
    monkeypatch.setattr(products, "_KERNEL", {})
    compiled = []
    monkeypatch.setattr(cpp_extension, "load", lambda *args, **kwargs: compiled.append(kwargs["extra_cflags"]))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert "-march=native" not in products.kernel_flags() and products.kernel_flags() == ["-O3", "-fopenmp-simd"]
    products.kernel()
    assert compiled == [["-O3", "-fopenmp-simd"]]  # not the copied AVX-512 build
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert products.kernel_flags() == ["-O3", "-fopenmp-simd", "-mavx2", "-mfma"]


def test_a_copied_kernel_cache_loads_without_compiling(tmp_path, monkeypatch):
    """The kernel cache is keyed by content: a copy (new file times) is used as it is."""
    from torch.utils import cpp_extension

    from rigsa import assets

    require_kernel()
    built = Path(products.kernel().__file__).parent
    copy = tmp_path / "cache" / "kernels" / built.name
    shutil.copytree(built, copy)  # copytree gives the files new modification times
    monkeypatch.setattr(assets, "cache_root", lambda: tmp_path / "cache")
    monkeypatch.setattr(products, "_KERNEL", {})
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: pytest.fail("the kernel was compiled again"))
    module = products.kernel()
    assert module is not None and Path(module.__spec__.origin).parent == copy
    g, x, indices = torch.randn(5, 4), torch.randn(5, 3), torch.tensor([0, 5, 11], dtype=torch.int32)
    assert torch.allclose(module.sampled_dot(g, x, indices, 1), (g.t() @ x).reshape(-1)[indices.long()], atol=1e-6)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "no checksum"])
def test_a_damaged_cached_kernel_is_moved_aside_and_rebuilt_instead_of_loaded(tmp_path, monkeypatch, damage):
    """A truncated compiled kernel would kill the process when loaded (SIGBUS, no message): a cached library whose
    SHA-256 is not the one recorded at its build is never loaded; its folder is moved aside, with a warning, and
    the kernel is compiled again in a fresh one."""
    from torch.utils import cpp_extension

    from rigsa import assets

    require_kernel()
    built = Path(products.kernel().__file__).parent
    copy = tmp_path / "cache" / "kernels" / built.name
    shutil.copytree(built, copy)
    library = copy / f"{products.KERNEL_NAME}.so"
    if damage == "truncated":
        library.write_bytes(library.read_bytes()[:4096])
    elif damage == "garbage":
        library.write_bytes(b"\x7fELF" + b"\0" * 1000)
    else:
        library.with_name(library.name + ".sha256").unlink()
    monkeypatch.setattr(assets, "cache_root", lambda: tmp_path / "cache")
    monkeypatch.setattr(products, "_KERNEL", {})
    compiled = []
    monkeypatch.setattr(cpp_extension, "load", lambda *args, **kwargs: compiled.append(kwargs["build_directory"]))
    with pytest.warns(UserWarning, match="does not match the checksum recorded when it was built; it is moved to"):
        products.kernel()
    assert compiled == [str(copy)] and not any(copy.iterdir())  # compiled again, in a fresh folder
    aside = [path for path in copy.parent.iterdir() if path.name.startswith(f"{built.name}.damaged-")]
    assert len(aside) == 1 and (aside[0] / library.name).exists()  # the damaged one kept aside, not deleted
