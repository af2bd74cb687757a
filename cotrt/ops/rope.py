"""rope: HF's ``apply_rotary_pos_emb`` (rotate-half form) in one kernel for q and k.

    q_out = q · cos + rotate_half(q) · sin,   k_out likewise,   rotate_half(x) = cat(-x2, x1)

with cos/sin ``[B, T, D]`` broadcast over the heads (``unsqueeze_dim=1``: q ``[B, H, T, D]``;
``2``: q ``[B, T, H, D]``), as HF's rotary embedding returns them.

- :func:`rope` — the launcher: the Triton kernel on CUDA tensors (``kernels/rope.py``;
  rounds like PyTorch's eager ops, so it equals HF's function bit for bit), HF's formula
  on CPU. ``impl="triton"`` on CPU tensors runs the interpreter (tests).
- :func:`rope_ref` — the fp32 reference (no intermediate rounding).
"""
from __future__ import annotations

import torch

from ._triton import FLOAT_DTYPES, HAS_TRITON, interpreted_for, launch, load_kernel, next_pow2

MAX_HEAD_DIM = 512


def _layout(x, unsqueeze_dim):
    """(B, heads, T) and the strides (b, head, t) of a q/k tensor."""
    if unsqueeze_dim == 1:
        B, Hx, T, _ = x.shape
        return (B, Hx, T), (x.stride(0), x.stride(1), x.stride(2))
    B, T, Hx, _ = x.shape
    return (B, Hx, T), (x.stride(0), x.stride(2), x.stride(1))


def check_args(q, k, cos, sin, unsqueeze_dim):
    """Validate (metadata only); returns (B, H, KVH, T, D)."""
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"rope: unsqueeze_dim must be 1 ([B, H, T, D]) or 2 ([B, T, H, D]), got {unsqueeze_dim!r}")
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"rope: {name} must be a 4-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"rope: q dtype must be fp16/bf16/fp32, got {q.dtype}")
    (B, H, T), _ = _layout(q, unsqueeze_dim)
    (Bk, KVH, Tk), _ = _layout(k, unsqueeze_dim)
    D = q.shape[-1]
    if (Bk, Tk, k.shape[-1]) != (B, T, D):
        raise ValueError(f"rope: k {tuple(k.shape)} does not match q {tuple(q.shape)} (batch, tokens, head dim)")
    if D % 2:
        raise ValueError(f"rope: head dim must be even, got {D}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, T, D):
            raise ValueError(f"rope: {name} must be [B={B}, T={T}, D={D}], got {getattr(t, 'shape', None)}")
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.dtype != q.dtype:
            raise ValueError(f"rope: {name} dtype {t.dtype} differs from q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"rope: {name} is on {t.device}, q is on {q.device}")
    return B, H, KVH, T, D


def rope(q, k, cos, sin, *, unsqueeze_dim=1, impl="auto"):
    """Rotary embeddings of ``q`` and ``k``; returns new ``(q_out, k_out)`` laid out like
    the inputs."""
    B, H, KVH, T, D = check_args(q, k, cos, sin, unsqueeze_dim)
    if impl == "auto":
        impl = "triton" if q.is_cuda and HAS_TRITON else "torch"
    if impl == "torch":
        return _rope_torch(q, k, cos, sin, unsqueeze_dim)
    if impl != "triton":
        raise ValueError(f"rope: impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"rope: the Triton kernel supports head dim <= {MAX_HEAD_DIM}, got {D}")
    interpreted = interpreted_for("rope", q)
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if t.stride(-1) != 1:
            raise ValueError(f"rope: {name} must have a unit-stride last dim")
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    if B * T == 0:
        return qo, ko
    _, sq = _layout(q, unsqueeze_dim)
    _, sk = _layout(k, unsqueeze_dim)
    _, sqo = _layout(qo, unsqueeze_dim)
    _, sko = _layout(ko, unsqueeze_dim)
    half = D // 2
    args = dict(q_ptr=q, k_ptr=k, cos_ptr=cos, sin_ptr=sin, qo_ptr=qo, ko_ptr=ko, T=T, H=H,
                stride_qb=sq[0], stride_qh=sq[1], stride_qt=sq[2], stride_kb=sk[0], stride_kh=sk[1], stride_kt=sk[2],
                stride_qob=sqo[0], stride_qoh=sqo[1], stride_qot=sqo[2],
                stride_kob=sko[0], stride_koh=sko[1], stride_kot=sko[2],
                stride_cb=cos.stride(0), stride_ct=cos.stride(1), stride_sb=sin.stride(0), stride_st=sin.stride(1),
                HALF=half, BLOCK=max(16, next_pow2(half)))
    kernel = load_kernel("rope", "_rope_kernel", interpreted)
    grid = (B * T, H + KVH)
    # No FMA contraction: each product is rounded as PyTorch's separate kernels round it.
    launch(kernel, grid, args, interpreted, num_warps=1, enable_fp_fusion=False)
    return qo, ko


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rope_torch(q, k, cos, sin, unsqueeze_dim=1):
    """HF's formula, op for op (the CPU path)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


def rope_ref(q, k, cos, sin, *, unsqueeze_dim=1):
    """fp32 reference, no intermediate rounding. Returns fp32 ``(q_out, k_out)``."""
    check_args(q, k, cos, sin, unsqueeze_dim)
    c, s = cos.double().unsqueeze(unsqueeze_dim), sin.double().unsqueeze(unsqueeze_dim)
    out = []
    for x in (q.double(), k.double()):
        out.append((x * c + _rotate_half(x) * s).float())
    return tuple(out)
