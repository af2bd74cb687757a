"""cpu_linear: the decode step's linears on CPU, at the memory-bandwidth limit.

    y[m] = x[m] Wᵀ + bias (+ alpha[m] · (x[m] A[a_m]ᵀ) B[a_m]ᵀ when a valve bank is given)

A decode step multiplies a few rows (M <= 8) by every weight once, so it is bound by
reading W. PyTorch's fp32 GEMV at M=1 used one core at 11-12 GB/s on the 2-core EPYC of
bench/RESULTS.md, where a 2-thread read of the same tensor streams 31-36 GB/s. The C++
kernel (csrc/cpu_linear.cpp, module ``cotrt._cpu``) cuts W's rows into chunks that the
calling thread and the pool's workers claim (csrc/work_pool.h: no barrier, so a thread the
OS deschedules delays only its own chunk), streams each 4-row block once, and accumulates
in fp32 (fp32 or bf16 weights). The valve rides the same pass: the LoRA shrink
``alpha · x Aᵀ`` ([M, r]) runs as the job's first chunks, through the same kernel with the
adapter's A as a small weight (so no thread computes it alone before the others start),
and each output adds its expand before its one horizontal sum, once the shrink is done.

- :func:`cpu_linear` — the launcher (validates, then calls the kernel).
- :func:`cpu_linear_ref` — the fp32 reference (the test oracle).
- ``HAS_CPU_KERNEL`` — whether ``cotrt._cpu`` is built here.
"""
from __future__ import annotations

import torch

from ._triton import shape_of

try:
    from cotrt import _cpu
except ImportError:  # pragma: no cover - built by setup.py; absent in a source tree never built
    _cpu = None

HAS_CPU_KERNEL = _cpu is not None
# Rows up to which the kernel beats the BLAS GEMM (each W block is re-read from L1 per
# pair of rows: at M=16 the FMAs, not the memory, bound it). See bench/bench_cpu_linear.py.
MAX_ROWS = 8
_W_DTYPES = (torch.float32, torch.bfloat16)


def _check(x, weight, bias, lora_a, lora_b, alpha, adapter_idx, out):
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"cpu_linear: x must be a 2-D tensor [M, K], got {shape_of(x)}")
    M, K = x.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"cpu_linear: weight must be [N, K={K}], got {shape_of(weight)}")
    N = weight.shape[0]
    if weight.dtype not in _W_DTYPES:
        raise ValueError(f"cpu_linear: weight dtype must be float32 or bfloat16, got {weight.dtype}")
    if not weight.is_contiguous():
        raise ValueError("cpu_linear: weight must be contiguous (pack it once, outside the decode loop)")
    if x.dtype != weight.dtype:
        raise ValueError(f"cpu_linear: x dtype {x.dtype} differs from weight dtype {weight.dtype}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,)
                             or bias.dtype != weight.dtype or not bias.is_contiguous()):
        raise ValueError(f"cpu_linear: bias must be a contiguous [N={N}] tensor of {weight.dtype} or None, "
                         f"got {shape_of(bias)}")
    if (lora_a is None) != (lora_b is None) or (lora_a is None) != (alpha is None):
        raise ValueError("cpu_linear: lora_a, lora_b and alpha come together (all or none)")
    if lora_a is None and adapter_idx is not None:
        raise ValueError("cpu_linear: adapter_idx without lora_a")
    if lora_a is not None:
        if not isinstance(lora_a, torch.Tensor) or lora_a.dim() != 3 or lora_a.shape[2] != K \
                or min(lora_a.shape[:2]) < 1:
            raise ValueError(f"cpu_linear: lora_a must be [n_adapters >= 1, r >= 1, K={K}], got {shape_of(lora_a)}")
        n, r = lora_a.shape[:2]
        if not isinstance(lora_b, torch.Tensor) or tuple(lora_b.shape) != (n, N, r):
            raise ValueError(f"cpu_linear: lora_b must be [n_adapters={n}, N={N}, r={r}], got {shape_of(lora_b)}")
        for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
            if t.dtype != weight.dtype:
                raise ValueError(f"cpu_linear: {name} dtype {t.dtype} differs from weight dtype {weight.dtype}")
        if not lora_a.is_contiguous() or not lora_b.permute(1, 0, 2).is_contiguous():
            raise ValueError("cpu_linear: lora_a must be contiguous and lora_b N-major "
                             "(lora_b.permute(1, 0, 2) contiguous, the layout ValveLinear keeps)")
        if not isinstance(alpha, torch.Tensor) or alpha.dim() != 1 or alpha.shape[0] != M \
                or alpha.dtype != torch.float32:
            raise ValueError(f"cpu_linear: alpha must be a float32 [M={M}] tensor, got {shape_of(alpha)}")
        if adapter_idx is not None and (not isinstance(adapter_idx, torch.Tensor) or adapter_idx.dim() != 1
                                        or adapter_idx.shape[0] != M
                                        or adapter_idx.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"cpu_linear: adapter_idx must be an int32/int64 [M={M}] tensor or None, "
                             f"got {shape_of(adapter_idx)}")
    if out is not None and (not isinstance(out, torch.Tensor) or tuple(out.shape) != (M, N)
                            or out.dtype != x.dtype or out.stride(1) != 1):
        raise ValueError(f"cpu_linear: out must be [M={M}, N={N}] of {x.dtype} with unit column stride, "
                         f"got {shape_of(out)}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b),
                    ("alpha", alpha), ("adapter_idx", adapter_idx), ("out", out)):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"cpu_linear: {name} is on {t.device}; the kernel is CPU-only")
    return M, N, K


def cpu_linear(x, weight, bias=None, lora_a=None, lora_b=None, alpha=None, adapter_idx=None, *,
               out=None, threads: int = 0):
    """Linear layer (plus an optional per-row valve) for a few rows, on CPU.

    Args:
        x: [M, K] of weight's dtype, any strides.
        weight: [N, K] float32 or bfloat16, contiguous (nn.Linear's layout).
        bias: [N] of weight's dtype, or None.
        lora_a: [n_adapters, r, K], contiguous, or None (no valve).
        lora_b: [n_adapters, N, r] stored N-major (``lora_b.permute(1, 0, 2)`` contiguous),
            the LoRA scale folded in.
        alpha: [M] float32, the per-row valve scale (any stride, 0 broadcasts one value).
        adapter_idx: [M] int32/int64 or None (adapter 0). Rows with alpha == 0 or an index
            outside [0, n_adapters) are base-only: they get no LoRA term at all.
        out: [M, N] of x's dtype (unit column stride) to write into, or None.
        threads: threads, the caller's included; <= 0 for torch's ``get_num_threads()``.

    Returns:
        y: [M, N] of x's dtype; fp32 accumulation, rounded once to bf16 for bf16 inputs.
    """
    if _cpu is None:
        raise RuntimeError("cpu_linear: cotrt._cpu is not built (run `pip install -e .` or "
                           "`python setup.py build_ext --inplace`)")
    M, N, K = _check(x, weight, bias, lora_a, lora_b, alpha, adapter_idx, out)
    return _launch(x, weight, bias, lora_a, lora_b, alpha, adapter_idx, out, threads)


def _launch(x, weight, bias, lora_a, lora_b, alpha, adapter_idx, out, threads):
    """The call without validation (callers that checked their fixed tensors once)."""
    y, _xf, args = _kernel_args(x, weight, bias, lora_a, lora_b, alpha, adapter_idx, out, threads)
    _cpu.linear(*args)  # _xf: the fp32 x the pointers point into, alive until here
    return y


def _kernel_args(x, weight, bias, lora_a, lora_b, alpha, adapter_idx, out, threads):
    """(y, xf, the argument tuple of ``_cpu.linear``) for unchecked tensors. xf is the fp32
    x the tuple points into (x itself, or a copy made here): keep it alive while the tuple
    is used."""
    threads = threads if threads > 0 else torch.get_num_threads()
    xf = x if x.dtype == torch.float32 and x.stride(1) == 1 else x.float().contiguous()
    M, K = xf.shape
    N = weight.shape[0]
    bf16 = weight.dtype == torch.bfloat16
    y = torch.empty((M, N), dtype=x.dtype) if out is None else out
    if lora_a is None:
        return y, xf, (xf.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                       0, 0, 0, 0, y.data_ptr(), M, N, K, 0, 0, xf.stride(0), y.stride(0), 0, 0,
                       bf16, False, bf16, threads)
    n, r = lora_a.shape[:2]
    return y, xf, (xf.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                   lora_a.data_ptr(), lora_b.data_ptr(), alpha.data_ptr(),
                   0 if adapter_idx is None else adapter_idx.data_ptr(), y.data_ptr(),
                   M, N, K, n, r, xf.stride(0), y.stride(0), alpha.stride(0),
                   0 if adapter_idx is None else adapter_idx.stride(0),
                   bf16, adapter_idx is not None and adapter_idx.dtype == torch.int64, bf16, threads)


def cpu_linear_ref(x, weight, bias=None, lora_a=None, lora_b=None, alpha=None, adapter_idx=None):
    """The fp32 reference: same arguments as :func:`cpu_linear`, returns fp32 [M, N]."""
    _check(x, weight, bias, lora_a, lora_b, alpha, adapter_idx, None)
    if lora_a is not None:
        from .valve_lora import valve_lora_ref

        return valve_lora_ref(x, weight, lora_a, lora_b, alpha, adapter_idx, bias)
    y = x.float() @ weight.float().t()
    return y if bias is None else y + bias.float()
