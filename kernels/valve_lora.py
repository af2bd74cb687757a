"""Triton kernel for the valve-LoRA linear: y = x Wᵀ + bias + (alpha[m] · (x A[a_m]ᵀ)) B[a_m]ᵀ.

Launched by :func:`cotrt.ops.valve_lora.valve_lora`, which validates the arguments and picks
the block sizes. One program computes a ``[BLOCK_M, BLOCK_N]`` tile of ``y``:

1. the base product over K (the W tile ``[BLOCK_N, K]`` is read once, from HBM);
2. for each adapter used by an active row of the tile (alpha != 0, index >= 0): the shrink
   ``t = x A[a]ᵀ`` ``[BLOCK_M, BLOCK_R]`` over K (x and A are small and shared by every
   program, so they come from L2), scaled per row, then the expand ``t B[a, n-tile]ᵀ``
   added to the same fp32 accumulator.

With ``ONE_PASS`` (one adapter in the bank) the shrink rides in the base loop instead: the
x tile is loaded once for both products and the A tiles stream beside the W tiles, so
their L2 reads overlap the HBM reads of W rather than following them (A is re-read by
every N-tile program: at K = N = 4096, r = 16 and 128 programs, 16 MB from L2 per call
next to W's 32 MB from HBM). Which variant is faster is measured by the GPU suite's tile
sweep. A tile whose rows are all base-only skips step 2 entirely. Rows that are not active get
``t = 0`` through ``tl.where`` (not a multiply, so an inf in x Aᵀ cannot leak a NaN), which
adds exact zeros: their output is bit-identical to the base-only result.
"""
import triton
import triton.language as tl


@triton.jit
def _valve_lora_kernel(
    # pointers
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    a_ptr,  # [n_adapters, R, K]
    b_ptr,  # [n_adapters, N, R]  (the LoRA scale s is already folded in)
    alpha_ptr,  # [M] fp32
    idx_ptr,  # [M] int32/int64 (unused unless HAS_IDX)
    bias_ptr,  # [N] (unused unless HAS_BIAS)
    y_ptr,  # [M, N]
    # sizes
    M, N, K, R, N_ADAPTERS,
    # strides, in elements
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_aa, stride_ar, stride_ak,
    stride_ba, stride_bn, stride_br,
    stride_alpha, stride_idx, stride_bias,
    stride_ym, stride_yn,
    # meta-parameters
    HAS_IDX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (match torch's fp32 matmul)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,  # next power of two >= max(R, 16): tl.dot needs dims >= 16
    ONE_PASS: tl.constexpr,  # N_ADAPTERS == 1: the shrink computed inside the base loop
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R
    # 64-bit offsets: row * stride passes 2**31 for a long prefill or a vocab-sized N * K.
    offs_m64 = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)
    offs_r64 = offs_r.to(tl.int64)
    x_rows = x_ptr + offs_m64[:, None] * stride_xm  # [BLOCK_M, 1]
    w_rows = w_ptr + offs_n64[:, None] * stride_wn  # [BLOCK_N, 1]

    alpha = tl.load(alpha_ptr + offs_m64 * stride_alpha, mask=mask_m, other=0.0)  # [BLOCK_M]
    if HAS_IDX:
        adapter = tl.load(idx_ptr + offs_m64 * stride_idx, mask=mask_m, other=-1).to(tl.int32)
    else:
        adapter = tl.zeros((BLOCK_M,), dtype=tl.int32)
    active = mask_m & (alpha != 0.0)

    # 1. base product (and, with ONE_PASS, the shrink of adapter 0 beside it)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    a0_rows = a_ptr + offs_r64[:, None] * stride_ar  # [BLOCK_R, 1], adapter 0
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        offs_k64 = offs_k.to(tl.int64)
        x = tl.load(x_rows + offs_k64[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        w = tl.load(w_rows + offs_k64[None, :] * stride_wk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if ONE_PASS:
            a = tl.load(a0_rows + offs_k64[None, :] * stride_ak,
                        mask=mask_r[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_R, BLOCK_K]
            t0 = tl.dot(x, tl.trans(a), t0, input_precision=DOT_PRECISION)

    # 2. LoRA delta, per adapter present among the tile's active rows
    if ONE_PASS:
        sel = active & (adapter == 0)
        if tl.max(sel.to(tl.int32), axis=0) > 0:
            t = tl.where(sel[:, None], t0 * alpha[:, None], 0.0)
            b = tl.load(b_ptr + offs_n64[:, None] * stride_bn + offs_r64[None, :] * stride_br,
                        mask=mask_n[:, None] & mask_r[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
            acc = tl.dot(t, tl.trans(b.to(tl.float32)), acc, input_precision=DOT_PRECISION)
    else:
        for ad in range(0, N_ADAPTERS):
            sel = active & (adapter == ad)  # [BLOCK_M]
            if tl.max(sel.to(tl.int32), axis=0) > 0:
                # int64: ad * stride_ba passes 2**31 for a few adapters on a vocab-sized N.
                ad64 = tl.cast(ad, tl.int64)
                a_rows = a_ptr + ad64 * stride_aa + offs_r64[:, None] * stride_ar  # [BLOCK_R, 1]
                t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    mask_k = offs_k < K
                    offs_k64 = offs_k.to(tl.int64)
                    x = tl.load(x_rows + offs_k64[None, :] * stride_xk,
                                mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                    a = tl.load(a_rows + offs_k64[None, :] * stride_ak,
                                mask=mask_r[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_R, BLOCK_K]
                    t = tl.dot(x, tl.trans(a), t, input_precision=DOT_PRECISION)
                t = tl.where(sel[:, None], t * alpha[:, None], 0.0)  # [BLOCK_M, BLOCK_R] fp32
                b = tl.load(b_ptr + ad64 * stride_ba + offs_n64[:, None] * stride_bn
                            + offs_r64[None, :] * stride_br,
                            mask=mask_n[:, None] & mask_r[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
                # The expand stays in fp32 (tf32 on tensor cores for 16-bit inputs): it is
                # BLOCK_M x BLOCK_R x BLOCK_N, negligible next to the base product, and keeps
                # alpha * t from being rounded to bf16 before it is added.
                acc = tl.dot(t, tl.trans(b.to(tl.float32)), acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n64 * stride_bias, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    y = y_ptr + offs_m64[:, None] * stride_ym + offs_n64[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
