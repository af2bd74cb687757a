"""decode_attention: one new query per row against that row's pages of a paged KV cache.

    out[b, h] = softmax(cap(scale · q[b, h] · Kᵀ)) · V,   K, V = rows lo .. L - 1 of K_b, V_b
    K_b[n] = k_cache[block_tables[b, n // PS], n % PS, h // G]   (V_b alike)

with the cache stored as P pages of PS positions (``[P, PS, KVH, D]``, flash-attn's and
vLLM's paged layout), row b's block table listing its pages in logical order,
``L = lengths[b]``, ``lo = max(0, L - window)`` (HF's sliding window: key k is visible from
the query at position L - 1 iff k > L - 1 - window), ``G = H // KVH`` query heads per kv
head (GQA) and ``cap(s) = softcap · tanh(s / softcap)`` when softcap is given (Gemma2).
The caller has already written the new token's key/value at position L - 1. Rows may share
pages (a common prefix). A 1-D ``block_tables`` [B] is the slot form: one page per row, so
``k_cache`` is a slot cache [S, T, KVH, D] and the entries are slots.

- :func:`decode_attention` — the launcher: validates (metadata only), then runs the Triton
  flash-decoding kernels on CUDA tensors (``kernels/decode_attention.py``) and plain torch
  ops on CPU. ``impl="triton"`` forces the kernels, which on CPU tensors run in Triton's
  interpreter (tests only: slow; needs ``TRITON_INTERPRET=1`` set before triton is first
  imported).
- :func:`decode_attention_ref` — the fp32 reference, a loop over rows written for clarity:
  the test oracle.

Both launcher paths are free of device syncs and data-dependent shapes: their work and
allocations depend on (B, H, KVH, D, NP, PS, chunk) only, so a decode step calling them can
be captured in a CUDA graph and replayed after refilling ``block_tables`` / ``lengths`` in
place. The price is that the torch path gathers all NP pages of each row whatever its
length; the kernel skips the empty splits.

Values are not checked (that would sync). A length outside [0, NP · PS] is the caller's bug
and is clamped to it. Only the table entries of pages holding a live key (positions
lo .. L - 1) are used: the others, past the length or before the window, may be anything
(-1 for unallocated). A page id outside [0, P) where a live key needs it reads nothing
and gives a zero row, as a bad slot does in the slot form (clamping L at the first bad
page instead would need a scan of the table by every split). Positions at or past a row's length, or
before its window, are never used: they may hold anything, NaN included.
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


def _check_args(q, k_cache, v_cache, block_tables, lengths, scale, softcap, window, out, chunk):
    """Validate shapes, dtypes, devices and strides (metadata only: no device sync).
    Returns (B, H, D, P, PS, KVH, table), ``table`` the [B, NP] view of block_tables."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"decode_attention: q must be a 3-D tensor [B, H, D], got {shape_of(q)}")
    B, H, D = q.shape
    dtype, device = q.dtype, q.device
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"decode_attention: q dtype must be fp16/bf16/fp32, got {dtype}")
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4 or k_cache.shape[3] != D:
        raise ValueError(f"decode_attention: k_cache must be a 4-D tensor [P, PS, KVH, D={D}], "
                         f"got {shape_of(k_cache)}")
    P, PS, KVH, _ = k_cache.shape
    if not isinstance(v_cache, torch.Tensor) or v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: v_cache must have k_cache's shape {tuple(k_cache.shape)}, "
                         f"got {shape_of(v_cache)}")
    if KVH == 0 or H % KVH != 0:
        raise ValueError(f"decode_attention: q's H={H} heads must be a multiple of k_cache's KVH={KVH} heads")
    if not isinstance(block_tables, torch.Tensor) or block_tables.dim() not in (1, 2) \
            or block_tables.shape[0] != B:
        raise ValueError(f"decode_attention: block_tables must be a [B={B}, NP] tensor (or [B={B}]: one page "
                         f"per row, the slot form), got {shape_of(block_tables)}")
    if not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != (B,):
        raise ValueError(f"decode_attention: lengths must be a [B={B}] tensor, got {shape_of(lengths)}")
    for name, t in (("block_tables", block_tables), ("lengths", lengths)):
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
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                    ("lengths", lengths), ("out", out)):
        if t is not None and t.device != device:
            raise ValueError(f"decode_attention: {name} is on {t.device}, q is on {device}")
    # Other strides are free (q may be a [B, 1, H, D] transpose view, the cache a slice of a
    # bigger one, the table a slice of a wider one); the head dim must be contiguous for the
    # kernel's vectorised row loads.
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if t is not None and D > 1 and t.stride(-1) != 1:
            raise ValueError(f"decode_attention: {name} must have unit stride along its last dim, got strides "
                             f"{tuple(t.stride())} (call .contiguous())")
    table = block_tables[:, None] if block_tables.dim() == 1 else block_tables
    return B, H, D, P, PS, KVH, table


def decode_attention(q, k_cache, v_cache, block_tables, lengths, *, scale=None, softcap=None, window=None,
                     out=None, chunk=None, impl="auto"):
    """Attention of one new query per row over its pages of the KV cache.

    Args:
        q: [B, H, D] fp16/bf16/fp32, the new token's queries (last dim unit-stride).
        k_cache, v_cache: [P, PS, KVH, D] of q's dtype (other strides free);
            ``k_cache[p, t, h]`` is the key at position t of page p, kv head h. H % KVH == 0.
        block_tables: [B, NP] int32/int64, any strides: row b's logical position n lives at
            ``k_cache[block_tables[b, n // PS], n % PS]``. Rows may share pages. Only the
            entries of pages holding a live key are used (the rest may be -1). A 1-D [B]
            tensor is the slot form, [B, 1]: one page (slot) of PS = T positions per row.
        lengths: [B] int32/int64, row b attends its logical keys 0 .. lengths[b] - 1.
            Not checked against NP · PS (a sync): values outside [0, NP · PS] are clamped.
        scale: the score scale, default D ** -0.5.
        softcap: None or > 0: scores become softcap · tanh(scores / softcap).
        window: None or int >= 1: attend only keys k >= lengths[b] - window.
        out: [B, H, D] of q's dtype to write into (last dim unit-stride), or None.
        chunk: keys per split of the Triton path (default: 256, larger past 32K keys a row
            so that there are at most 128 splits, rounded down to whole pages when PS is
            smaller). Ignored by the torch path.
        impl: "auto" (Triton on CUDA when triton is installed, torch ops otherwise),
            "triton" or "torch".

    Returns:
        [B, H, D] of q's dtype (``out`` when given); a row with no key (length 0) is zeros,
        and so is a row with a live key on a page id outside [0, P) (not checked: a sync).
        Scores, softmax and the weighted sum are fp32 on both paths (the kernel rounds the
        probabilities to the cache dtype for the P·V product, as flash attention does).
    """
    B, H, D, P, PS, KVH, table = _check_args(q, k_cache, v_cache, block_tables, lengths, scale, softcap, window,
                                             out, chunk)
    scale = D ** -0.5 if scale is None else float(scale)
    if impl == "auto":
        impl = "triton" if q.is_cuda and HAS_TRITON else "torch"
    if impl not in ("triton", "torch"):
        raise ValueError(f"decode_attention: impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    y = torch.empty((B, H, D), dtype=q.dtype, device=q.device) if out is None else out
    if B == 0 or H == 0 or D == 0:
        return y
    if P == 0 or PS == 0 or table.shape[1] == 0:  # no key anywhere
        return y.zero_()
    if impl == "torch":
        return y.copy_(_decode_attention_torch(q, k_cache, v_cache, table, lengths, scale, softcap, window))
    return _decode_attention_triton(q, k_cache, v_cache, table, lengths, scale, softcap, window, chunk, y,
                                    B, H, D, P, PS, KVH)


def decode_attention_ref(q, k_cache, v_cache, block_tables, lengths, *, scale=None, softcap=None, window=None):
    """The fp32 reference: each row's live keys gathered page by page, every head at once.
    Same arguments as :func:`decode_attention`; returns fp32 [B, H, D]. Unlike the launcher
    it reads the tables and lengths on the host and raises on a length outside
    [0, NP · PS] or a page id outside [0, P) where a live key needs it."""
    B, H, D, P, PS, KVH, table = _check_args(q, k_cache, v_cache, block_tables, lengths, scale, softcap, window,
                                             None, None)
    scale = D ** -0.5 if scale is None else scale
    G = H // KVH
    NP = table.shape[1]
    out = torch.zeros(B, H, D, dtype=torch.float32, device=q.device)
    for b, (pages, L) in enumerate(zip(table.tolist(), lengths.tolist())):
        if not 0 <= L <= NP * PS:
            raise ValueError(f"decode_attention_ref: row {b} has length {L}, outside [0, NP·PS={NP * PS}]")
        lo = max(0, L - window) if window is not None else 0
        if L == lo:
            continue  # no key: zeros
        for j in range(lo // PS, (L - 1) // PS + 1):  # the pages holding the live keys
            if not 0 <= pages[j] < P:
                raise ValueError(f"decode_attention_ref: row {b} needs block_tables entry {j} = {pages[j]}, "
                                 f"outside [0, P={P})")
        n = torch.arange(lo, L, device=q.device)  # the live logical positions
        page = torch.tensor(pages, device=q.device)[n // PS]
        k = k_cache[page, n % PS].float().repeat_interleave(G, dim=1)  # (n, H, D): kv head h // G for head h
        v = v_cache[page, n % PS].float().repeat_interleave(G, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale  # (H, n)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        p = torch.softmax(scores, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", p, v)
    return out


# ---------------------------------------------------------------------------------- torch


def _decode_attention_torch(q, k_cache, v_cache, table, lengths, scale, softcap, window):
    """Static-shape, sync-free torch path: gather each row's NP pages whole (page ids
    clamped into range) into [B, NP · PS, KVH, D], mask by length and window.
    Returns fp32 [B, H, D]."""
    B, H, D = q.shape
    P, PS, KVH, _ = k_cache.shape
    NP = table.shape[1]
    N = NP * PS
    G = H // KVH
    L = lengths.clamp(0, N)  # (B,)
    lo = (L - window).clamp_min(0) if window is not None else torch.zeros_like(L)
    # A page id out of range where a live key needs it gives a zero row instead of an error,
    # as in the kernel (no sync to check); the entries of dead pages are never looked at.
    j = torch.arange(NP, device=q.device)
    live_page = (j[None, :] * PS < L[:, None]) & ((j[None, :] + 1) * PS > lo[:, None])  # (B, NP)
    bad_page = (table < 0) | (table >= P)
    L = torch.where((live_page & bad_page).any(dim=1), 0, L)
    t = torch.arange(N, device=q.device)
    valid = (t[None, :] < L[:, None]) & (t[None, :] >= lo[:, None])  # (B, N)
    pages = table.clamp(0, P - 1).reshape(-1)  # (B · NP,)
    k = k_cache.index_select(0, pages).float().view(B, N, KVH, D)  # a fresh tensor
    v = v_cache.index_select(0, pages).float().view(B, N, KVH, D)
    # Dead positions may hold NaN/inf: scores are masked below, values zeroed here
    # (0 · NaN in P·V would leak otherwise).
    v.masked_fill_(~valid[:, :, None, None], 0.0)
    qg = q.reshape(B, KVH, G, D).float()  # fold each kv head's query group: K/V read once per group
    s = torch.matmul(qg, k.permute(0, 2, 3, 1)) * scale  # (B, KVH, G, N)
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


def _chunk(NP: int, PS: int, chunk) -> int:
    """Keys per split. 256 keeps a split's fixed cost small next to its K/V traffic (its
    fp32 partial, G · D · 4 bytes written and read back by the reduce, is 5% of the
    2 · 256 · D · 2 bytes of fp16 K/V it reads at G = 7), while a 1K-token row still
    spreads over 4 programs per kv head. Past 128 splits (over 32K keys a row) the chunk
    grows instead, bounding the reduce. Pages of PS <= that chunk are not cut: the chunk
    rounds down to whole pages (more than half of it, so at most 256 splits); a larger page
    (a slot) is split inside. Shapes only, never lengths or table values (graph capture)."""
    if chunk is not None:
        return chunk
    c = max(DEFAULT_CHUNK, next_pow2(cdiv(NP * PS, MAX_SPLITS)))
    return c if PS > c else c // PS * PS


@functools.lru_cache(maxsize=64)
def _blocks(G, D, PS, chunk, n_splits, interpreted):
    """(BLOCK_G, BLOCK_D, BLOCK_N, BLOCK_S, PAGE_PER_TILE, num_warps, num_stages). Not yet
    tuned on a GPU. BLOCK_N = 64 keys a step keeps a 64 x 128 fp16 K tile (16 KB) plus V
    under 64 KB of shared memory at two stages; 32 at D = 256. PAGE_PER_TILE (one table
    entry a tile instead of one a key) when BLOCK_N divides PS and the chunk, so a tile
    never straddles two pages."""
    bg, bd = max(16, next_pow2(G)), max(16, next_pow2(D))
    bs = min(max(16, next_pow2(n_splits)), 64)
    if interpreted:  # numpy cost is per tile step: a whole chunk a step
        bn, num_stages = max(16, min(next_pow2(chunk), 512)), 1
    else:
        bn, num_stages = max(16, min(next_pow2(chunk), 64 if bd <= 128 else 32)), 2
    return bg, bd, bn, bs, PS % bn == 0 and chunk % bn == 0, 4, num_stages


def _decode_attention_triton(q, k_cache, v_cache, table, lengths, scale, softcap, window, chunk, y,
                             B, H, D, P, PS, KVH):
    if D > MAX_HEAD_DIM:
        raise ValueError(f"decode_attention: the Triton kernel supports D <= {MAX_HEAD_DIM}, q has D={D}")
    interpreted = interpreted_for("decode_attention", q)
    G = H // KVH
    NP = table.shape[1]
    chunk = _chunk(NP, PS, chunk)
    n_splits = cdiv(NP * PS, chunk)
    bg, bd, bn, bs, page_per_tile, num_warps, num_stages = _blocks(G, D, PS, chunk, n_splits, interpreted)
    # Allocated per call: under graph capture they come from the graph's private pool.
    acc = torch.empty((B, H, n_splits, D), dtype=torch.float32, device=q.device)
    m = torch.empty((B, H, n_splits), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    split_kernel, reduce_kernel = _kernels(interpreted)
    split_args = dict(
        q_ptr=q, k_ptr=k_cache, v_ptr=v_cache, block_tables_ptr=table, lengths_ptr=lengths, acc_ptr=acc, m_ptr=m,
        l_ptr=l,
        scale=scale, softcap=1.0 if softcap is None else float(softcap), window=0 if window is None else window,
        P=P, PS=PS, NP=NP, G=G, D=D, CHUNK=chunk,
        stride_qb=q.stride(0), stride_qh=q.stride(1),
        stride_kp=k_cache.stride(0), stride_kt=k_cache.stride(1), stride_kh=k_cache.stride(2),
        stride_vp=v_cache.stride(0), stride_vt=v_cache.stride(1), stride_vh=v_cache.stride(2),
        stride_btb=table.stride(0), stride_btn=table.stride(1),
        stride_lengths=lengths.stride(0),
        stride_ab=acc.stride(0), stride_ah=acc.stride(1), stride_as=acc.stride(2),
        stride_mb=m.stride(0), stride_mh=m.stride(1),
        HAS_SOFTCAP=softcap is not None, HAS_WINDOW=window is not None, PAGE_PER_TILE=page_per_tile,
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
