"""Triton kernels for decode attention over a slot KV cache: one new query per row.

    out[b, h] = softmax_k(cap(scale · q[b, h] · K[s, k, h // G])) · V[s, k, h // G],
    s = slots[b],  k in [max(0, L - window), L),  L = lengths[b],  G = H // KVH

Launched by :func:`cotrt.ops.decode_attention.decode_attention`, which validates the
arguments and picks the block sizes. Flash-decoding, in two launches whose grids depend
only on shapes (B, H, KVH and the cache length T), never on lengths, so a decode step that
calls them can be captured in a CUDA graph and replayed with new ``slots`` / ``lengths``:

1. ``_decode_attention_split_kernel``, grid ``(B, KVH, n_splits)``: the program for
   ``(b, h, split)`` covers keys ``[split · CHUNK, (split + 1) · CHUNK)`` of row b's slot,
   cut to ``[L - window, L)``. It loads the G query heads sharing kv head h as one
   ``[BLOCK_G, BLOCK_D]`` tile (rows past G masked; BLOCK_G >= 16 so ``tl.dot`` applies),
   so every K/V row is read once for the whole group, and runs the online softmax over
   ``BLOCK_N`` keys at a time: fp32 running max m, sum l and unnormalised accumulator.
   It writes ``(acc, m, l)`` to fp32 workspaces. A split with no key in range (past the
   row's length, before its window) writes only ``m = -inf, l = 0``: its ``acc`` slot is
   left unwritten and never read, so short rows in a long cache cost ~nothing per empty
   split.
2. ``_decode_attention_reduce_kernel``, grid ``(B, H)``: the log-sum-exp merge of the
   splits, ``out = Σ e^(m_s - M) acc_s / Σ e^(m_s - M) l_s`` with ``M = max m_s``, written
   in the output dtype. A row with no key at all (L = 0) writes zeros.

Per-row values (slots, lengths) are loaded from device tensors; scale, softcap and window
are runtime scalars. L is clamped to ``[0, T]`` and a slot outside ``[0, S)`` counts as
L = 0, so bad values cannot read out of bounds (checking them would cost a device sync).
Cache offsets are 64-bit: ``slot · stride_slot`` passes 2**31 elements for a cache of a
few GB. Soft-capping (Gemma2) is ``softcap · tanh(s / softcap)`` with tanh written via exp
(the interpreter has no portable tanh).
"""
import triton
import triton.language as tl


@triton.jit
def _decode_attention_split_kernel(
    # pointers
    q_ptr,  # [B, H, D]
    k_ptr,  # [S, T, KVH, D]
    v_ptr,  # [S, T, KVH, D]
    slots_ptr,  # [B] int32/int64
    lengths_ptr,  # [B] int32/int64
    acc_ptr,  # [B, H, N_SPLITS, D] fp32, unnormalised (written for non-empty splits only)
    m_ptr,  # [B, H, N_SPLITS] fp32 running max of the scores (-inf: empty split)
    l_ptr,  # [B, H, N_SPLITS] fp32 sum of e^(s - m)
    # scalars
    scale, softcap, window,
    # sizes
    S, T, G, D, CHUNK,
    # strides, in elements (the last dim of q, k, v is unit-stride; workspaces contiguous)
    stride_qb, stride_qh,
    stride_ks, stride_kt, stride_kh,
    stride_vs, stride_vt, stride_vh,
    stride_slots, stride_lengths,
    stride_ab, stride_ah, stride_as,
    stride_mb, stride_mh,
    # meta-parameters
    HAS_SOFTCAP: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (match torch's fp32 matmul)
    BLOCK_G: tl.constexpr,  # next power of two >= max(G, 16): tl.dot needs dims >= 16
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)

    slot = tl.load(slots_ptr + b * stride_slots).to(tl.int64)
    L = tl.load(lengths_ptr + b * stride_lengths).to(tl.int32)
    L = tl.minimum(tl.maximum(L, 0), T)
    ok = (slot >= 0) & (slot < S)
    L = tl.where(ok, L, 0)
    slot = tl.where(ok, slot, 0)

    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, L)
    if HAS_WINDOW:
        lo = tl.maximum(lo, L - window)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < G
    mask_d = offs_d < D
    heads = kvh * G + offs_g  # [BLOCK_G] query heads of this kv head (int64)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    k_base = k_ptr + slot * stride_ks + kvh * stride_kh
    v_base = v_ptr + slot * stride_vs + kvh * stride_vh

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    # Every block starts at a key in [lo, hi), so each has a finite score per row and
    # m_i is finite after the first block (no -inf - -inf).
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        offs_n64 = offs_n.to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + offs_n64[:, None] * stride_kt + offs_d[None, :], mask=kv_mask,
                    other=0.0)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [BLOCK_G, BLOCK_N] fp32
        if HAS_SOFTCAP:
            # tanh(x) = 1 - 2 / (e^(2x) + 1): e^(2x) = inf gives 1, e^(2x) = 0 gives -1.
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * (s / softcap)) + 1.0))
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)  # 0 on the first block (m_i = -inf)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n64[:, None] * stride_vt + offs_d[None, :], mask=kv_mask,
                    other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    ws = b * stride_mb + heads * stride_mh + split  # [BLOCK_G]
    tl.store(m_ptr + ws, m_i, mask=mask_g)
    tl.store(l_ptr + ws, l_i, mask=mask_g)
    d_live = tl.where(hi > lo, D, 0)  # an empty split leaves its acc slot unwritten
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

    # pass 1: the max over splits (N_SPLITS floats, from L2)
    m_vec = tl.full((BLOCK_S,), float("-inf"), dtype=tl.float32)
    for s0 in range(0, N_SPLITS, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        m_vec = tl.maximum(m_vec, tl.load(m_row + offs_s, mask=offs_s < N_SPLITS, other=float("-inf")))
    m_max = tl.max(m_vec, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # no key at all: every weight is 0

    # pass 2: weights e^(m_s - M), 0 for empty splits, whose acc is never loaded
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
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty), mask=mask_d)
