"""Triton kernel for the contemplate op: the next input embedding of every row of a batch.

    out[b] = latent[b] ? scale_l · (proj(norm(hidden[b])))  :  scale_e · E[tokens[b]]

Launched by :func:`cotrt.ops.contemplate.contemplate`, which validates the arguments and
picks the block sizes. The grid is ``(B, cdiv(H, BLOCK_H))``: one program writes one
``BLOCK_H`` slice of one row. The row index is the fastest-varying grid axis so that the
programs running at the same time read the same ``[BLOCK_H, Hh]`` tile of the projection
(from L2, not once per row from HBM).

- token row: a gather of ``E[tok, h-block]`` (times ``embed_scale``); without a scale the
  row is bit-identical to ``nn.Embedding``. An id outside ``[0, V)`` writes zeros instead
  of reading out of bounds (checking it would cost a device sync).
- latent row: the RMS of ``hidden[b]`` (one pass over Hh, recomputed by each program of
  the row: Hh elements from L2, negligible next to the projection), then either the
  normalised slice itself (no projection, H == Hh) or a GEMV over Hh in ``BLOCK_K``
  chunks, all in fp32.

The row's kind is a runtime branch, so token rows never touch the projection and latent
rows never touch E: a mixed batch costs what its rows cost.
"""
import triton
import triton.language as tl


@triton.jit
def _contemplate_kernel(
    # pointers
    tok_ptr,  # [B] int32/int64
    mask_ptr,  # [B] uint8 (the bool mask, viewed)
    hid_ptr,  # [B, HH]
    emb_ptr,  # [V, H]
    norm_ptr,  # [HH] (unused unless HAS_NORM)
    proj_ptr,  # [H, HH] (unused unless HAS_PROJ)
    bias_ptr,  # [H] (unused unless HAS_BIAS)
    out_ptr,  # [B, H]
    # scalars
    norm_eps, embed_scale, latent_scale,
    # sizes
    V, H, HH,
    # strides, in elements (the last dim of every 2-D tensor is unit-stride)
    stride_tok, stride_mask, stride_hid, stride_emb, stride_norm, stride_proj, stride_bias, stride_out,
    # meta-parameters
    HAS_NORM: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_EMBED_SCALE: tl.constexpr,
    HAS_LATENT_SCALE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    out_row = out_ptr + row * stride_out
    is_latent = tl.load(mask_ptr + row * stride_mask) != 0

    if is_latent:
        hid_row = hid_ptr + row * stride_hid
        rstd = 1.0
        if HAS_NORM:
            sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(0, HH, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(hid_row + offs_k, mask=offs_k < HH, other=0.0).to(tl.float32)
                sq += x * x
            # sqrt_rn: correctly rounded, like torch's (tl.sqrt lowers to sqrt.approx on NVIDIA).
            rstd = 1.0 / tl.sqrt_rn(tl.sum(sq, axis=0) / HH + norm_eps)
        if HAS_PROJ:
            # 64-bit: H * HH passes 2**31 only for huge projections, but the cost is nil.
            w_rows = proj_ptr + offs_h.to(tl.int64)[:, None] * stride_proj  # [BLOCK_H, 1]
            acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
            for k0 in range(0, HH, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < HH
                x = tl.load(hid_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)  # [BLOCK_K]
                if HAS_NORM:
                    nw = tl.load(norm_ptr + offs_k * stride_norm, mask=mask_k, other=0.0).to(tl.float32)
                    x = x * rstd * nw
                w = tl.load(w_rows + offs_k[None, :], mask=mask_h[:, None] & mask_k[None, :],
                            other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_K]
                acc += tl.sum(w * x[None, :], axis=1)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_h * stride_bias, mask=mask_h, other=0.0).to(tl.float32)
        else:  # H == HH: the (normalised) state is the embedding
            acc = tl.load(hid_row + offs_h, mask=mask_h, other=0.0).to(tl.float32)
            if HAS_NORM:
                nw = tl.load(norm_ptr + offs_h * stride_norm, mask=mask_h, other=0.0).to(tl.float32)
                acc = acc * rstd * nw
        if HAS_LATENT_SCALE:
            acc = acc * latent_scale
        tl.store(out_row + offs_h, acc.to(out_ptr.dtype.element_ty), mask=mask_h)
    else:
        tok = tl.load(tok_ptr + row * stride_tok).to(tl.int64)
        # An invalid id loads nothing (limit 0) and its row is zeros.
        limit = tl.where((tok >= 0) & (tok < V), H, 0)
        e = tl.load(emb_ptr + tok * stride_emb + offs_h, mask=offs_h < limit, other=0.0)
        if HAS_EMBED_SCALE:
            e = (e.to(tl.float32) * embed_scale).to(out_ptr.dtype.element_ty)
        tl.store(out_row + offs_h, e.to(out_ptr.dtype.element_ty), mask=mask_h)
