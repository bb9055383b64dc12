"""The sparse products under the engine's layers: the value gradient (a sampled product per stored value), the
compiled C++ kernel that computes it and the unmerged path's two products (kernels.cpp), and their torch-ops route
where the kernel is not built. Below both layer modules (engine.py, unmerged.py): it knows no layer."""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

from rigsa import assets

# Extra memory allowed for one chunk of the value gradient, in elements (~64 MB of float32).
CHUNK_ELEMENTS = 1 << 24
# Up to this many values, gathering columns beats a sampled matmul (measured here: 2 ms for 442
# values, 43 ms for 4,423, where sampled_addmm takes 3 ms).
GATHER_MAX_VALUES = 1024
def csr_rows(sorted_rows: torch.Tensor, count: int) -> torch.Tensor:
    """CSR row pointers (int64 [count + 1]) for values whose rows, in order, are `sorted_rows`."""
    crow = torch.zeros(count + 1, dtype=torch.int64, device=sorted_rows.device)
    crow[1:] = torch.cumsum(torch.bincount(sorted_rows, minlength=count), 0)
    return crow


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def value_gradient(grad_out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                   pattern: torch.Tensor | None) -> torch.Tensor:
    """sum_t grad_out[t, rows[k]] * x[t, cols[k]] for every k, in float32, with torch ops over token chunks.

    grad_out: [T, out], x: [T, in]; `pattern` is a CSR tensor [out, in] of the (sorted) indices,
    used by the sampled-matmul path (else columns are gathered)."""
    tokens, m = x.shape[0], rows.numel()
    result = torch.zeros(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return result
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


_KERNEL: dict[str, object] = {}


def kernel():
    """The compiled value-gradient kernel, or None when it cannot be built here (no C++ compiler;
    or RIGSA_NO_KERNEL=1, which forces the torch-ops route). Built once per source, flags, torch and
    Python version and cached under $RIGSA_CACHE/kernels/<content hash>; the first build takes about 25 s."""
    if "module" not in _KERNEL:
        _KERNEL["module"] = None if os.environ.get("RIGSA_NO_KERNEL", "") not in ("", "0") else _build_kernel()
    return _KERNEL["module"]


KERNEL_NAME = "rigsa_sparse_kernels"
# The vector extensions the kernel is built for follow torch's own reading of this CPU (never -march=native: the
# build cache is keyed by the flags, so a cache copied to a CPU without them builds its own). Measured here with
# AVX-512 (in one process, 1,000 tokens, LoRA r=8's count, 4 layer shapes of SmolLM2-135M): spmm_add 1.5-1.9x,
# spmm_t 1.15-1.4x and sampled_dot (with its 128-token tiles) 1.3-1.5x faster than the baseline x86-64 build.
CPU_FLAGS = {"AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
             "AVX2": ["-mavx2", "-mfma"]}


def kernel_flags() -> list[str]:
    return ["-O3", "-fopenmp-simd", *CPU_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])]


def _build_kernel():
    """Load the compiled kernel from a cache folder named by the SHA-256 of its source, flags, torch and
    Python versions; compile it there first when the folder holds none. Keyed by content, not file
    times: a copied cache loads without recompiling, a changed source compiles into a new folder."""
    try:
        import importlib.util

        from torch.utils import cpp_extension

        source, flags = Path(__file__).with_name("kernels.cpp"), kernel_flags()
        key = hashlib.sha256(source.read_bytes() + " ".join(flags).encode()
                             + f"{torch.__version__} {sys.version_info[:2]}".encode()).hexdigest()[:16]
        build = assets.cache_root() / "kernels" / key
        library = build / f"{KERNEL_NAME}.so"
        recorded = library.with_name(library.name + ".sha256")  # written after a build that loaded
        if library.exists():
            # a truncated library would crash the process (SIGBUS) when loaded: its bytes are checked first
            if recorded.exists() and recorded.read_text().strip() == assets.sha256_file(library):
                spec = importlib.util.spec_from_file_location(KERNEL_NAME, library)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                return module
            aside = build.with_name(f"{key}.damaged-{os.getpid()}")
            warnings.warn(f"rigsa: the cached sparse kernel {library} does not match the checksum recorded when it "
                          f"was built; it is moved to {aside} and rebuilt (about 25 s)", stacklevel=3)
            os.replace(build, aside)
        venv_bin = str(Path(sys.executable).parent)  # the `ninja` wheel's binary, when PATH lacks the venv
        if shutil.which("ninja") is None and shutil.which("ninja", path=venv_bin):
            os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
        build.mkdir(parents=True, exist_ok=True)
        module = cpp_extension.load(KERNEL_NAME, [str(source)], extra_cflags=flags, build_directory=str(build))
        if library.exists():
            recorded.write_text(assets.sha256_file(library))
        return module
    except Exception as error:  # no compiler or no ninja: the torch-ops route still gives exact gradients
        warnings.warn(f"rigsa: the sparse engine's C++ kernel could not be built ({type(error).__name__}: "
                      f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''}); using torch ops, "
                      "which are slower. Install g++ (Debian: apt install g++) to build it.", stacklevel=3)
        return None


def values_and_gate_gradients(raw, values, gate, for_values: bool, for_gate: bool):
    """From `raw` (d values before the gate, float32): (gate * raw, sum(raw * values)), None where not asked for."""
    return (raw * gate.float() if for_values else None,
            (raw * values.float()).sum().reshape(gate.shape) if for_gate else None)
