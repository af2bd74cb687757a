"""valve_lora: a linear layer plus a per-row scaled LoRA delta, never merged into W.

    y[m] = x[m] Wᵀ + bias + alpha[m] · (x[m] A[a_m]ᵀ) B[a_m]ᵀ

The LoRA scale ``s`` (``lora_alpha / r`` or ``lora_alpha / sqrt(r)``) is folded into B at
load time, so the per-row scale is just ``alpha[m]``, a device tensor: changing it never
recompiles a kernel or invalidates a captured CUDA graph.

- :func:`valve_lora` — the launcher: validates, then runs the Triton kernel on CUDA tensors
  (``kernels/valve_lora.py``) and plain torch ops on CPU. ``impl="triton"`` forces the
  kernel, which on CPU tensors runs in Triton's interpreter (tests only: slow).
- :func:`valve_lora_ref` — the fp32 reference, written for clarity: the test oracle.

On CPU tensors ``impl="triton"`` needs ``TRITON_INTERPRET=1`` set before triton is first
imported. The variable alone does not route CPU tensors to the interpreter: every
ValveLinear of a model would then go through it (tens of ms a call); tests ask for the
kernel explicitly.
"""
from __future__ import annotations

import functools

import torch

from ._triton import (FLOAT_DTYPES, HAS_TRITON, INDEX_DTYPES, cdiv, interpreted_for, launch, load_kernel,
                      shape_of)

MAX_RANK = 128  # the kernel pads the rank to a power of two <= 128 (BLOCK_R)


def _check_args(x, weight, lora_a, lora_b, alpha, adapter_idx, bias, out):
    """Validate shapes, dtypes and devices (metadata only: no device sync).
    Returns (M, N, K, n_adapters, r)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"valve_lora: x must be a 2-D tensor [M, K], got {shape_of(x)}")
    M, K = x.shape
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"valve_lora: x dtype must be fp16/bf16/fp32, got {x.dtype}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"valve_lora: weight must be [N, K={K}], got {shape_of(weight)}")
    N = weight.shape[0]
    if not isinstance(lora_a, torch.Tensor) or lora_a.dim() != 3 or lora_a.shape[2] != K:
        raise ValueError(f"valve_lora: lora_a must be [n_adapters, r, K={K}], got {shape_of(lora_a)}")
    n_adapters, r = lora_a.shape[0], lora_a.shape[1]
    if n_adapters < 1 or r < 1:
        raise ValueError(f"valve_lora: lora_a must have n_adapters >= 1 and r >= 1, got {tuple(lora_a.shape)}")
    if not isinstance(lora_b, torch.Tensor) or tuple(lora_b.shape) != (n_adapters, N, r):
        raise ValueError(
            f"valve_lora: lora_b must be [n_adapters={n_adapters}, N={N}, r={r}], got {shape_of(lora_b)}")
    if not isinstance(alpha, torch.Tensor) or tuple(alpha.shape) != (M,):
        raise ValueError(f"valve_lora: alpha must be a [M={M}] tensor, got {shape_of(alpha)}")
    if alpha.dtype != torch.float32:
        raise ValueError(f"valve_lora: alpha must be float32, got {alpha.dtype}")
    if adapter_idx is not None:
        if not isinstance(adapter_idx, torch.Tensor) or tuple(adapter_idx.shape) != (M,):
            raise ValueError(f"valve_lora: adapter_idx must be a [M={M}] tensor or None, got {shape_of(adapter_idx)}")
        if adapter_idx.dtype not in INDEX_DTYPES:
            raise ValueError(f"valve_lora: adapter_idx must be int32 or int64, got {adapter_idx.dtype}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,)):
        raise ValueError(f"valve_lora: bias must be [N={N}] or None, got {shape_of(bias)}")
    for name, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"valve_lora: {name} dtype {t.dtype} differs from x dtype {x.dtype}")
    if out is not None:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (M, N) or out.dtype != x.dtype:
            raise ValueError(
                f"valve_lora: out must be [M={M}, N={N}] of dtype {x.dtype}, got {shape_of(out)}"
                f"{'' if not isinstance(out, torch.Tensor) else ' ' + str(out.dtype)}")
    for name, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("alpha", alpha),
                    ("adapter_idx", adapter_idx), ("bias", bias), ("out", out)):
        if t is not None and t.device != x.device:
            raise ValueError(f"valve_lora: {name} is on {t.device}, x is on {x.device}")
    return M, N, K, n_adapters, r


def valve_lora(x, weight, lora_a, lora_b, alpha, adapter_idx=None, bias=None, out=None, *, impl="auto"):
    """Linear layer plus a per-row scaled LoRA delta from a bank of adapters.

    Args:
        x: [M, K] fp16/bf16/fp32, any strides.
        weight: [N, K], the base weight (as stored by nn.Linear), any strides.
        lora_a: [n_adapters, r, K], the adapters' A matrices (rank padded with zeros).
        lora_b: [n_adapters, N, r], the B matrices with the LoRA scale s folded in.
        alpha: [M] float32, per-row valve scale (any real: 0 is base-only, > 1 extrapolates).
        adapter_idx: [M] int32/int64, the adapter of each row; None means adapter 0 for all.
            Rows with a negative index (or one >= n_adapters: not checked, to avoid a
            device sync) are base-only.
        bias: [N] or None.
        out: [M, N] of x's dtype to write into, or None.
        impl: "auto" (Triton on CUDA when triton is installed, torch ops otherwise),
            "triton" or "torch".

    Returns:
        y: [M, N] of x's dtype (``out`` when given). Rows with alpha == 0 or a negative
        adapter index equal the base result (``x Wᵀ + bias`` as this same path computes it)
        bit for bit.
    """
    M, N, K, n_adapters, r = _check_args(x, weight, lora_a, lora_b, alpha, adapter_idx, bias, out)
    if impl == "auto":
        impl = "triton" if x.is_cuda and HAS_TRITON else "torch"
    if impl == "torch":
        return _valve_lora_torch(x, weight, lora_a, lora_b, alpha, adapter_idx, bias, out)
    if impl == "triton":
        return _valve_lora_triton(x, weight, lora_a, lora_b, alpha, adapter_idx, bias, out,
                                  M, N, K, n_adapters, r)
    raise ValueError(f"valve_lora: impl must be 'auto', 'triton' or 'torch', got {impl!r}")


def valve_lora_ref(x, weight, lora_a, lora_b, alpha, adapter_idx=None, bias=None):
    """The fp32 reference (clarity over speed; materialises per-row A and B).
    Same arguments as :func:`valve_lora`; returns fp32 [M, N]."""
    M, N, K, n_adapters, r = _check_args(x, weight, lora_a, lora_b, alpha, adapter_idx, bias, None)
    xf = x.float()
    y = xf @ weight.float().t()  # (M, N)
    if bias is not None:
        y = y + bias.float()
    idx = torch.zeros(M, dtype=torch.long, device=x.device) if adapter_idx is None else adapter_idx.long()
    active = (alpha != 0) & (idx >= 0) & (idx < n_adapters)  # (M,)
    safe = idx.clamp(0, n_adapters - 1)
    a = lora_a.float()[safe]  # (M, r, K)
    b = lora_b.float()[safe]  # (M, N, r)
    t = torch.einsum("mk,mrk->mr", xf, a) * alpha[:, None]  # (M, r)
    delta = torch.einsum("mr,mnr->mn", t, b)  # (M, N)
    return torch.where(active[:, None], y + delta, y)


def _valve_lora_torch(x, weight, lora_a, lora_b, alpha, adapter_idx, bias, out):
    """CPU path: a few BLAS calls, no per-row gathers (a decode-sized delta costs about as
    much as the Python overhead of one extra op, so the op count is what matters)."""
    wt = weight.t()
    if bias is not None:
        y = torch.addmm(bias, x, wt) if out is None else torch.addmm(bias, x, wt, out=out)
    else:
        y = torch.mm(x, wt) if out is None else torch.mm(x, wt, out=out)
    n_adapters, r = lora_a.shape[0], lora_a.shape[1]
    if adapter_idx is None or n_adapters == 1:
        # One adapter in play: shrink against it alone.
        scale = alpha if adapter_idx is None else torch.where(adapter_idx == 0, alpha, 0.0)
        t = torch.mm(x, lora_a[0].t())  # (M, r)
        # Zero rows of t add exact zeros below, so base-only rows stay bit-identical
        # (for finite x Aᵀ).
        t.mul_(scale.unsqueeze(1))
        y.addmm_(t, lora_b[0].t())
        return y
    # Several adapters: one shrink against the whole bank (n_adapters·r columns; reading
    # all of A beats a per-row gather of [M, r, K]), zero the columns of other adapters,
    # then the expand: one GEMM when lora_b is stored N-major ([N, n, r] memory, the
    # layout ValveLinear keeps), else one small GEMM per adapter.
    M, N = x.shape[0], weight.shape[0]
    t = torch.mm(x, lora_a.reshape(n_adapters * r, -1).t())  # (M, n·r)
    mine = adapter_idx.unsqueeze(1) == torch.arange(n_adapters, device=x.device)  # (M, n)
    t.view(M, n_adapters, r).mul_(torch.where(mine, alpha.unsqueeze(1), 0.0).unsqueeze(2))
    b_nmajor = lora_b.permute(1, 0, 2)  # (N, n, r)
    if b_nmajor.is_contiguous():
        y.addmm_(t, b_nmajor.view(N, n_adapters * r).t())
    else:
        for a in range(n_adapters):
            y.addmm_(t[:, a * r:(a + 1) * r], lora_b[a].t())
    return y


# ---------------------------------------------------------------------------------- Triton


def _kernel(interpreted: bool):
    return load_kernel("valve_lora", "_valve_lora_kernel", interpreted)


# (BLOCK_N, BLOCK_K, num_warps, num_stages, ONE_PASS) forced by a tile sweep, else None.
_TUNING = None


@functools.lru_cache(maxsize=64)
def _blocks(M, N, r, dtype, interpreted, n_sm):
    """(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, num_warps, num_stages). Not yet tuned on a GPU:
    decode (M <= 64) is a GEMV bound by reading W, so BLOCK_N shrinks until the grid has
    about one program per SM; the LoRA shrink re-reads x and A from L2 in every program,
    (BLOCK_M + BLOCK_R) / BLOCK_N of the W bytes, which is why BLOCK_N is not smaller."""
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_r = max(16, 1 << (r - 1).bit_length())
    if interpreted:  # numpy cost is per tile step: big tiles, few steps
        return block_m, 64, 128, block_r, 4, 1
    block_n = 64 if cdiv(N, 64) * cdiv(M, block_m) >= n_sm else 32
    block_k = 64 if dtype == torch.float32 else 128
    num_stages = 2 if block_r >= 64 or block_m >= 64 else 3
    return block_m, block_n, block_k, block_r, 4, num_stages


@functools.lru_cache(maxsize=None)
def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def _valve_lora_triton(x, weight, lora_a, lora_b, alpha, adapter_idx, bias, out, M, N, K, n_adapters, r):
    if r > MAX_RANK:
        raise ValueError(f"valve_lora: the Triton kernel supports r <= {MAX_RANK}, lora_a has r={r}")
    interpreted = interpreted_for("valve_lora", x)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    if M == 0 or N == 0:
        return y
    n_sm = 0 if interpreted else _sm_count(x.device)
    bm, bn, bk, br, num_warps, num_stages = _blocks(M, N, r, x.dtype, interpreted, n_sm)
    one_pass = n_adapters == 1
    if _TUNING is not None:  # a sweep (bench/gpu_suite.py) trying other tiles
        bn, bk, num_warps, num_stages, one_pass = _TUNING
        one_pass = one_pass and n_adapters == 1
    grid = (cdiv(N, bn), cdiv(M, bm))
    kernel = _kernel(interpreted)
    # Dummy pointers for absent optional tensors (never dereferenced: HAS_* is False).
    idx = adapter_idx if adapter_idx is not None else alpha
    b0 = bias if bias is not None else alpha
    args = dict(
        x_ptr=x, w_ptr=weight, a_ptr=lora_a, b_ptr=lora_b, alpha_ptr=alpha, idx_ptr=idx,
        bias_ptr=b0, y_ptr=y,
        M=M, N=N, K=K, R=r, N_ADAPTERS=n_adapters,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_aa=lora_a.stride(0), stride_ar=lora_a.stride(1), stride_ak=lora_a.stride(2),
        stride_ba=lora_b.stride(0), stride_bn=lora_b.stride(1), stride_br=lora_b.stride(2),
        stride_alpha=alpha.stride(0), stride_idx=idx.stride(0), stride_bias=b0.stride(0),
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        HAS_IDX=adapter_idx is not None, HAS_BIAS=bias is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, ONE_PASS=one_pass,
    )
    launch(kernel, grid, args, interpreted, num_warps=num_warps, num_stages=num_stages)
    return y
