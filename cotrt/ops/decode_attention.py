"""decode_attention: one new query per row against that row's slot of a static KV cache.

    out[b, h] = softmax(cap(scale · q[b, h] · Kᵀ)) · V,   K, V = k/v_cache[slots[b], lo:L, h // G]

with ``L = lengths[b]``, ``lo = max(0, L - window)`` (HF's sliding window: key k is visible
from the query at position L - 1 iff k > L - 1 - window), ``G = H // KVH`` query heads per
kv head (GQA) and ``cap(s) = softcap · tanh(s / softcap)`` when softcap is given (Gemma2).
The caller has already written the new token's key/value at position L - 1.

- :func:`decode_attention` — the launcher: validates (metadata only), then runs the Triton
  flash-decoding kernels on CUDA tensors (``kernels/decode_attention.py``) and plain torch
  ops on CPU. ``impl="triton"`` forces the kernels, which on CPU tensors run in Triton's
  interpreter (tests only: slow; needs ``TRITON_INTERPRET=1`` set before triton is first
  imported).
- :func:`decode_attention_ref` — the fp32 reference, a loop over rows written for clarity:
  the test oracle.

Both launcher paths are free of device syncs and data-dependent shapes: their work and
allocations depend on (B, H, KVH, D, T, chunk) only, so a decode step calling them can be
captured in a CUDA graph and replayed after refilling ``slots`` / ``lengths`` in place.
The price is that the torch path gathers all T positions of each row's slot whatever its
length; the kernel skips the empty splits.

Values are not checked (that would sync): a length outside [0, T] is the caller's bug and
is clamped to [0, T]; a slot outside [0, S) reads nothing and gives a zero row. Positions
at or past a row's length, or before its window, are never used: they may hold anything,
NaN included.
"""
from __future__ import annotations

import functools
import math

import torch

from ._triton import (FLOAT_DTYPES, HAS_TRITON, INDEX_DTYPES, cdiv, interpreted_for, launch, load_kernel,
                      next_pow2, shape_of)

MAX_HEAD_DIM = 256  # the kernel holds a [BLOCK_N, BLOCK_D] K tile and a [BLOCK_G, BLOCK_D] accumulator
DEFAULT_CHUNK = 256
MAX_SPLITS = 128


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_args(q, k_cache, v_cache, slots, lengths, scale, softcap, window, out, chunk):
    """Validate shapes, dtypes, devices and strides (metadata only: no device sync).
    Returns (B, H, D, S, T, KVH)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"decode_attention: q must be a 3-D tensor [B, H, D], got {shape_of(q)}")
    B, H, D = q.shape
    dtype, device = q.dtype, q.device
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"decode_attention: q dtype must be fp16/bf16/fp32, got {dtype}")
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4 or k_cache.shape[3] != D:
        raise ValueError(f"decode_attention: k_cache must be a 4-D tensor [S, T, KVH, D={D}], got {shape_of(k_cache)}")
    S, T, KVH, _ = k_cache.shape
    if not isinstance(v_cache, torch.Tensor) or v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: v_cache must have k_cache's shape {tuple(k_cache.shape)}, "
                         f"got {shape_of(v_cache)}")
    if KVH == 0 or H % KVH != 0:
        raise ValueError(f"decode_attention: q's H={H} heads must be a multiple of k_cache's KVH={KVH} heads")
    for name, t in (("slots", slots), ("lengths", lengths)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B,):
            raise ValueError(f"decode_attention: {name} must be a [B={B}] tensor, got {shape_of(t)}")
        if t.dtype not in INDEX_DTYPES:
            raise ValueError(f"decode_attention: {name} must be int32 or int64, got {t.dtype}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"decode_attention: scale must be a finite number or None, got {scale!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not math.isfinite(softcap) or not softcap > 0):
        raise ValueError(f"decode_attention: softcap must be a finite number > 0 or None, got {softcap!r}")
    if window is not None and (not _is_int(window) or window < 1):
        raise ValueError(f"decode_attention: window must be an int >= 1 or None, got {window!r}")
    if chunk is not None and (not _is_int(chunk) or chunk < 1):
        raise ValueError(f"decode_attention: chunk must be an int >= 1 or None, got {chunk!r}")
    if out is not None and (not isinstance(out, torch.Tensor) or tuple(out.shape) != (B, H, D)
                            or out.dtype != dtype):
        raise ValueError(f"decode_attention: out must be [B={B}, H={H}, D={D}] of dtype {dtype}, got {shape_of(out)}"
                         f"{' ' + str(out.dtype) if isinstance(out, torch.Tensor) else ''}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != dtype:
            raise ValueError(f"decode_attention: {name} dtype {t.dtype} differs from q dtype {dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("slots", slots), ("lengths", lengths),
                    ("out", out)):
        if t is not None and t.device != device:
            raise ValueError(f"decode_attention: {name} is on {t.device}, q is on {device}")
    # Other strides are free (q may be a [B, 1, H, D] transpose view, the cache a slice of a
    # bigger one); the head dim must be contiguous for the kernel's vectorised row loads.
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if t is not None and D > 1 and t.stride(-1) != 1:
            raise ValueError(f"decode_attention: {name} must have unit stride along its last dim, got strides "
                             f"{tuple(t.stride())} (call .contiguous())")
    return B, H, D, S, T, KVH


def decode_attention(q, k_cache, v_cache, slots, lengths, *, scale=None, softcap=None, window=None, out=None,
                     chunk=None, impl="auto"):
    """Attention of one new query per row over its slot of the KV cache.

    Args:
        q: [B, H, D] fp16/bf16/fp32, the new token's queries (last dim unit-stride).
        k_cache, v_cache: [S, T, KVH, D] of q's dtype; ``k_cache[s, t, h]`` is the key of
            slot s, position t, kv head h. H % KVH == 0.
        slots: [B] int32/int64, the cache slot of each row (rows may share one, e.g.
            padding rows pointing at a scratch slot).
        lengths: [B] int32/int64, row b attends keys 0 .. lengths[b] - 1 of its slot.
            Not checked against T (a sync): values outside [0, T] are clamped.
        scale: the score scale, default D ** -0.5.
        softcap: None or > 0: scores become softcap · tanh(scores / softcap).
        window: None or int >= 1: attend only keys k >= lengths[b] - window.
        out: [B, H, D] of q's dtype to write into (last dim unit-stride), or None.
        chunk: keys per split of the Triton path (default: 256, larger for T > 32768 so
            that there are at most 128 splits). Ignored by the torch path.
        impl: "auto" (Triton on CUDA when triton is installed, torch ops otherwise),
            "triton" or "torch".

    Returns:
        [B, H, D] of q's dtype (``out`` when given); a row with no key (length 0) is zeros.
        Scores, softmax and the weighted sum are fp32 on both paths (the kernel rounds the
        probabilities to the cache dtype for the P·V product, as flash attention does).
    """
    B, H, D, S, T, KVH = _check_args(q, k_cache, v_cache, slots, lengths, scale, softcap, window, out, chunk)
    scale = D ** -0.5 if scale is None else float(scale)
    if impl == "auto":
        impl = "triton" if q.is_cuda and HAS_TRITON else "torch"
    if impl not in ("triton", "torch"):
        raise ValueError(f"decode_attention: impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    y = torch.empty((B, H, D), dtype=q.dtype, device=q.device) if out is None else out
    if B == 0 or H == 0 or D == 0:
        return y
    if S == 0 or T == 0:  # no key anywhere
        return y.zero_()
    if impl == "torch":
        return y.copy_(_decode_attention_torch(q, k_cache, v_cache, slots, lengths, scale, softcap, window))
    return _decode_attention_triton(q, k_cache, v_cache, slots, lengths, scale, softcap, window, chunk, y,
                                    B, H, D, S, T, KVH)


def decode_attention_ref(q, k_cache, v_cache, slots, lengths, *, scale=None, softcap=None, window=None):
    """The fp32 reference: each row's live keys sliced out by hand, every head at once.
    Same arguments as :func:`decode_attention`; returns fp32 [B, H, D]. Unlike the launcher
    it reads slots and lengths on the host and raises on values out of range."""
    B, H, D, S, T, KVH = _check_args(q, k_cache, v_cache, slots, lengths, scale, softcap, window, None, None)
    scale = D ** -0.5 if scale is None else scale
    G = H // KVH
    out = torch.zeros(B, H, D, dtype=torch.float32, device=q.device)
    for b, (s, L) in enumerate(zip(slots.tolist(), lengths.tolist())):
        if not 0 <= s < S or not 0 <= L <= T:
            raise ValueError(f"decode_attention_ref: row {b} has slot {s} (S={S}) and length {L} (T={T})")
        lo = max(0, L - window) if window is not None else 0
        if L == lo:
            continue  # no key: zeros
        k = k_cache[s, lo:L].float().repeat_interleave(G, dim=1)  # (n, H, D): kv head h // G for query head h
        v = v_cache[s, lo:L].float().repeat_interleave(G, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale  # (H, n)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        p = torch.softmax(scores, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", p, v)
    return out


# ---------------------------------------------------------------------------------- torch


def _decode_attention_torch(q, k_cache, v_cache, slots, lengths, scale, softcap, window):
    """Static-shape, sync-free torch path: gather the B slots whole, mask by length.
    Returns fp32 [B, H, D]."""
    B, H, D = q.shape
    S, T, KVH, _ = k_cache.shape
    G = H // KVH
    # Bad values give a zero row instead of an error, as in the kernel (no sync to check).
    ok = (slots >= 0) & (slots < S)
    idx = slots.clamp(0, S - 1)
    L = torch.where(ok, lengths.clamp(0, T), 0)  # (B,)
    t = torch.arange(T, device=q.device)
    valid = t[None, :] < L[:, None]  # (B, T)
    if window is not None:
        valid &= t[None, :] >= (L - window)[:, None]
    k = k_cache.index_select(0, idx).float()  # (B, T, KVH, D), a fresh tensor
    v = v_cache.index_select(0, idx).float()
    # Dead positions may hold NaN/inf: scores are masked below, values zeroed here
    # (0 · NaN in P·V would leak otherwise).
    v.masked_fill_(~valid[:, :, None, None], 0.0)
    qg = q.reshape(B, KVH, G, D).float()  # fold each kv head's query group: K/V read once per group
    s = torch.matmul(qg, k.permute(0, 2, 3, 1)) * scale  # (B, KVH, G, T)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)  # a row with no key: every p is e^-inf = 0
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)  # >= 1 when any key is live (the max term is e^0)
    o = torch.matmul(p, v.transpose(1, 2)) / l.clamp_min(1.0)  # (B, KVH, G, D); no key: 0 / 1
    return o.reshape(B, H, D)


# ---------------------------------------------------------------------------------- Triton


def _kernels(interpreted: bool):
    return (load_kernel("decode_attention", "_decode_attention_split_kernel", interpreted),
            load_kernel("decode_attention", "_decode_attention_reduce_kernel", interpreted))


def _chunk(T: int, chunk) -> int:
    """Keys per split. 256 keeps a split's fixed cost small next to its K/V traffic (its
    fp32 partial, G · D · 4 bytes written and read back by the reduce, is 5% of the
    2 · 256 · D · 2 bytes of fp16 K/V it reads at G = 7), while a 1K-token row still
    spreads over 4 programs per kv head. It depends on T only, never on lengths (graph
    capture); past 128 splits (T > 32K) the chunk grows instead, bounding the reduce."""
    if chunk is not None:
        return chunk
    return max(DEFAULT_CHUNK, next_pow2(cdiv(T, MAX_SPLITS)))


@functools.lru_cache(maxsize=64)
def _blocks(G, D, chunk, n_splits, interpreted):
    """(BLOCK_G, BLOCK_D, BLOCK_N, BLOCK_S, num_warps, num_stages). Not yet tuned on a GPU.
    BLOCK_N = 64 keys a step keeps a 64 x 128 fp16 K tile (16 KB) plus V under 64 KB of
    shared memory at two stages; 32 at D = 256."""
    bg, bd = max(16, next_pow2(G)), max(16, next_pow2(D))
    bs = min(max(16, next_pow2(n_splits)), 64)
    if interpreted:  # numpy cost is per tile step: a whole chunk a step
        return bg, bd, max(16, min(next_pow2(chunk), 512)), bs, 4, 1
    bn = max(16, min(next_pow2(chunk), 64 if bd <= 128 else 32))
    return bg, bd, bn, bs, 4, 2


def _decode_attention_triton(q, k_cache, v_cache, slots, lengths, scale, softcap, window, chunk, y,
                             B, H, D, S, T, KVH):
    if D > MAX_HEAD_DIM:
        raise ValueError(f"decode_attention: the Triton kernel supports D <= {MAX_HEAD_DIM}, q has D={D}")
    interpreted = interpreted_for("decode_attention", q)
    G = H // KVH
    chunk = _chunk(T, chunk)
    n_splits = cdiv(T, chunk)
    bg, bd, bn, bs, num_warps, num_stages = _blocks(G, D, chunk, n_splits, interpreted)
    # Allocated per call: under graph capture they come from the graph's private pool.
    acc = torch.empty((B, H, n_splits, D), dtype=torch.float32, device=q.device)
    m = torch.empty((B, H, n_splits), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    split_kernel, reduce_kernel = _kernels(interpreted)
    split_args = dict(
        q_ptr=q, k_ptr=k_cache, v_ptr=v_cache, slots_ptr=slots, lengths_ptr=lengths, acc_ptr=acc, m_ptr=m,
        l_ptr=l,
        scale=scale, softcap=1.0 if softcap is None else float(softcap), window=0 if window is None else window,
        S=S, T=T, G=G, D=D, CHUNK=chunk,
        stride_qb=q.stride(0), stride_qh=q.stride(1),
        stride_ks=k_cache.stride(0), stride_kt=k_cache.stride(1), stride_kh=k_cache.stride(2),
        stride_vs=v_cache.stride(0), stride_vt=v_cache.stride(1), stride_vh=v_cache.stride(2),
        stride_slots=slots.stride(0), stride_lengths=lengths.stride(0),
        stride_ab=acc.stride(0), stride_ah=acc.stride(1), stride_as=acc.stride(2),
        stride_mb=m.stride(0), stride_mh=m.stride(1),
        HAS_SOFTCAP=softcap is not None, HAS_WINDOW=window is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_G=bg, BLOCK_D=bd, BLOCK_N=bn,
    )
    reduce_args = dict(
        acc_ptr=acc, m_ptr=m, l_ptr=l, out_ptr=y,
        N_SPLITS=n_splits, D=D,
        stride_ab=acc.stride(0), stride_ah=acc.stride(1), stride_as=acc.stride(2),
        stride_mb=m.stride(0), stride_mh=m.stride(1),
        stride_ob=y.stride(0), stride_oh=y.stride(1),
        BLOCK_S=bs, BLOCK_D=bd,
    )
    split_grid, reduce_grid = (B, KVH, n_splits), (B, H)
    launch(split_kernel, split_grid, split_args, interpreted, num_warps=num_warps, num_stages=num_stages)
    launch(reduce_kernel, reduce_grid, reduce_args, interpreted, num_warps=4)
    return y

