"""Triton kernels for decode attention over a paged KV cache: one new query per row.

    out[b, h] = softmax_k(cap(scale · q[b, h] · K[k, h // G])) · V[k, h // G],
    K[k] = k_cache[block_tables[b, k // PS], k % PS],
    k in [max(0, L - window), L),  L = clamp(lengths[b], 0, NP · PS),  G = H // KVH

with the cache stored as P pages of PS positions (``[P, PS, KVH, D]``, flash-attn's paged
layout) and row b's block table ``[NP]`` listing its pages in logical order. A slot cache
``[S, T, KVH, D]`` with ``slots [B]`` is the case NP = 1, PS = T.

Launched by :func:`cotrt.ops.decode_attention.decode_attention`, which validates the
arguments and picks the split and block sizes. Flash-decoding, in two launches whose grids
depend only on shapes (B, H, KVH and the row capacity NP · PS), never on lengths or table
values, so a decode step that calls them can be captured in a CUDA graph and replayed with
new ``block_tables`` / ``lengths``:

1. ``_decode_attention_split_kernel``, grid ``(B, KVH, n_splits)``: the program for
   ``(b, h, split)`` covers logical keys ``[split · CHUNK, (split + 1) · CHUNK)`` of row b,
   cut to ``[L - window, L)`` (the launcher makes CHUNK a multiple of PS when PS is at most
   its default chunk, so a split reads whole pages; a larger page, e.g. a slot, is split
   inside). It loads the G query heads sharing kv head h as one ``[BLOCK_G, BLOCK_D]``
   tile (rows past G masked; BLOCK_G >= 16 so ``tl.dot`` applies), so every K/V row is
   read once for the whole group, and runs the online softmax over ``BLOCK_N`` keys at a
   time (tiles aligned to BLOCK_N from the split's start): fp32 running max m, sum l and
   unnormalised accumulator. Each tile looks up the page of its keys in the block table:
   one entry per key, or one per tile when ``PAGE_PER_TILE`` (BLOCK_N divides both PS and
   CHUNK, so a tile never straddles pages). It writes ``(acc, m, l)`` to fp32 workspaces.
   A split with no key in range (past the row's length, before its window) writes only
   ``m = -inf, l = 0``: its ``acc`` slot is left unwritten and never read, so short rows in
   a long table cost ~nothing per empty split, and table entries outside the live range
   are never loaded.
2. ``_decode_attention_reduce_kernel``, grid ``(B, H)``: the log-sum-exp merge of the
   splits, ``out = Σ e^(m_s - M) acc_s / Σ e^(m_s - M) l_s`` with ``M = max m_s``, written
   in the output dtype. A row with no key at all (L = 0) writes zeros.

Per-row values (table entries, lengths) are loaded from device tensors; scale, softcap and
window are runtime scalars. Bad values cannot read out of bounds (checking them would cost
a device sync): L is clamped to ``[0, NP · PS]``, and a live key whose page id is outside
``[0, P)`` is not loaded; its split writes ``m = -inf, l = -1``, and the reduce writes a
zero row for a row with any such split (as for a bad slot). Cache offsets are 64-bit:
``page · stride_page`` passes 2**31 elements for a cache of a few GB. Soft-capping (Gemma2)
is ``softcap · tanh(s / softcap)`` with tanh written via exp (the interpreter has no
portable tanh).
"""
import triton
import triton.language as tl


@triton.jit
def _decode_attention_split_kernel(
    # pointers
    q_ptr,  # [B, H, D]
    k_ptr,  # [P, PS, KVH, D]
    v_ptr,  # [P, PS, KVH, D]
    block_tables_ptr,  # [B, NP] int32/int64, page ids
    lengths_ptr,  # [B] int32/int64
    acc_ptr,  # [B, H, N_SPLITS, D] fp32, unnormalised (written for non-empty splits only)
    m_ptr,  # [B, H, N_SPLITS] fp32 running max of the scores (-inf: empty or bad split)
    l_ptr,  # [B, H, N_SPLITS] fp32 sum of e^(s - m) (-1: a live key's page id is out of range)
    # scalars
    scale, softcap, window,
    # sizes
    P, PS, NP, G, D, CHUNK,
    # strides, in elements (the last dim of q, k, v is unit-stride; workspaces contiguous)
    stride_qb, stride_qh,
    stride_kp, stride_kt, stride_kh,
    stride_vp, stride_vt, stride_vh,
    stride_btb, stride_btn,
    stride_lengths,
    stride_ab, stride_ah, stride_as,
    stride_mb, stride_mh,
    # meta-parameters
    HAS_SOFTCAP: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    PAGE_PER_TILE: tl.constexpr,  # BLOCK_N divides PS and CHUNK: one table entry per tile
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (match torch's fp32 matmul)
    BLOCK_G: tl.constexpr,  # next power of two >= max(G, 16): tl.dot needs dims >= 16
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)

    L = tl.load(lengths_ptr + b * stride_lengths).to(tl.int32)
    L = tl.minimum(tl.maximum(L, 0), NP * PS)
    base = split * CHUNK
    lo = base
    hi = tl.minimum(base + CHUNK, L)
    if HAS_WINDOW:
        lo = tl.maximum(lo, L - window)
    # Tiles start BLOCK_N-aligned from the split's start (so page-aligned with PAGE_PER_TILE),
    # the first at or before lo: each tile of the loop holds a key of [lo, hi), so it has a
    # finite score per row (unless the key's page is bad). No tile when the range is empty.
    first = tl.where(hi > lo, base + (lo - base) // BLOCK_N * BLOCK_N, hi)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < G
    mask_d = offs_d < D
    heads = kvh * G + offs_g  # [BLOCK_G] query heads of this kv head (int64)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    table = block_tables_ptr + b * stride_btb
    k_head = k_ptr + kvh * stride_kh
    v_head = v_ptr + kvh * stride_vh

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    bad = tl.zeros((BLOCK_N,), dtype=tl.int32)  # live keys seen with a page id outside [0, P)
    for start in range(first, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = (offs_n >= lo) & (offs_n < hi)
        if PAGE_PER_TILE:
            page = tl.load(table + (start // PS) * stride_btn).to(tl.int64)  # the tile's page
        else:
            page = tl.load(table + (offs_n // PS) * stride_btn, mask=mask_n, other=0).to(tl.int64)  # [BLOCK_N]
        page_ok = (page >= 0) & (page < P)
        # tl.where, not &: the interpreter mistypes an int1 vector & an int1 scalar
        bad |= tl.where(page_ok, 0, mask_n.to(tl.int32))
        mask_n = tl.where(page_ok, mask_n, False)
        pos = (offs_n % PS).to(tl.int64)  # [BLOCK_N] position within the page
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_head + (page * stride_kp + pos * stride_kt)[:, None] + offs_d[None, :], mask=kv_mask,
                    other=0.0)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [BLOCK_G, BLOCK_N] fp32
        if HAS_SOFTCAP:
            # tanh(x) = 1 - 2 / (e^(2x) + 1): e^(2x) = inf gives 1, e^(2x) = 0 gives -1.
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * (s / softcap)) + 1.0))
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # -inf only while every key so far was on a bad page (the split is discarded): no NaN
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_new)  # 0 on the first tile (m_i = -inf)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_head + (page * stride_vp + pos * stride_vt)[:, None] + offs_d[None, :], mask=kv_mask,
                    other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    is_bad = tl.max(bad, axis=0) > 0
    m_i = tl.where(is_bad, float("-inf"), m_i)
    l_i = tl.where(is_bad, -1.0, l_i)
    ws = b * stride_mb + heads * stride_mh + split  # [BLOCK_G]
    tl.store(m_ptr + ws, m_i, mask=mask_g)
    tl.store(l_ptr + ws, l_i, mask=mask_g)
    d_live = tl.where((hi > lo) & ~is_bad, D, 0)  # an empty or bad split leaves its acc slot unwritten
    a_ptrs = acc_ptr + b * stride_ab + heads[:, None] * stride_ah + split * stride_as + offs_d[None, :]
    tl.store(a_ptrs, acc, mask=mask_g[:, None] & (offs_d[None, :] < d_live))


@triton.jit
def _decode_attention_reduce_kernel(
    # pointers
    acc_ptr,  # [B, H, N_SPLITS, D] fp32
    m_ptr,  # [B, H, N_SPLITS] fp32
    l_ptr,  # [B, H, N_SPLITS] fp32
    out_ptr,  # [B, H, D]
    # sizes
    N_SPLITS, D,
    # strides, in elements
    stride_ab, stride_ah, stride_as,
    stride_mb, stride_mh,
    stride_ob, stride_oh,
    # meta-parameters
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    m_row = m_ptr + b * stride_mb + h * stride_mh
    l_row = l_ptr + b * stride_mb + h * stride_mh
    a_row = acc_ptr + b * stride_ab + h * stride_ah

    # pass 1: the max over splits, and whether a split met a bad page id (l = -1)
    # (2 · N_SPLITS floats, from L2)
    m_vec = tl.full((BLOCK_S,), float("-inf"), dtype=tl.float32)
    l_min = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for s0 in range(0, N_SPLITS, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        m_vec = tl.maximum(m_vec, tl.load(m_row + offs_s, mask=offs_s < N_SPLITS, other=float("-inf")))
        l_min = tl.minimum(l_min, tl.load(l_row + offs_s, mask=offs_s < N_SPLITS, other=0.0))
    m_max = tl.max(m_vec, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # no key at all: every weight is 0
    bad = tl.min(l_min, axis=0) < 0.0

    # pass 2: weights e^(m_s - M), 0 for empty and bad splits, whose acc is never loaded
    l_vec = tl.zeros((BLOCK_S,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    for s0 in range(0, N_SPLITS, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        m = tl.load(m_row + offs_s, mask=offs_s < N_SPLITS, other=float("-inf"))
        live = m > float("-inf")
        w = tl.where(live, tl.exp(m - m_max), 0.0)
        l_vec += w * tl.load(l_row + offs_s, mask=live, other=0.0)
        a = tl.load(a_row + offs_s[:, None] * stride_as + offs_d[None, :], mask=live[:, None] & mask_d[None, :],
                    other=0.0)  # [BLOCK_S, BLOCK_D]
        acc += w[:, None] * a
    l_sum = tl.sum(l_vec, axis=0)  # >= 1 when any key was attended (its max term is e^0)
    o = tl.sum(acc, axis=0) / tl.where(l_sum > 0.0, l_sum, 1.0)  # L = 0: 0 / 1
    o = tl.where(bad, 0.0, o)  # a live key on a page outside [0, P): a zero row
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty), mask=mask_d)
