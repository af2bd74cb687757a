"""Triton kernel for the rope op: rotary embeddings of one head of one token per program.

    out[:h]  = x[:h] · cos[:h] + (-x[h:]) · sin[:h]
    out[h:]  = x[h:] · cos[h:] +   x[:h]  · sin[h:]          (h = D / 2)

which is HF's ``(x * cos) + (rotate_half(x) * sin)``. Each product and the sum are rounded
to the tensors' dtype as PyTorch's three eager kernels round them (and launched without FP
contraction), so on CUDA the result equals HF's bit for bit; what it saves is the ~10
kernels (two multiplies, a negation, a concatenation and an add, for q and for k) that
HF launches per layer.

Grid ``(B * T, H + KVH)``: heads below H are query heads, the rest key heads; cos/sin rows
are read per program (D elements, from L1/L2).
"""
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    # pointers
    q_ptr, k_ptr,  # [B, H|KVH, T, D] (any strides; D unit-stride), as laid out by the caller
    cos_ptr, sin_ptr,  # [B, T, D]
    qo_ptr, ko_ptr,  # outputs, same shapes as q and k
    # sizes
    T, H,
    # strides, in elements
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_qob, stride_qoh, stride_qot,
    stride_kob, stride_koh, stride_kot,
    stride_cb, stride_ct, stride_sb, stride_st,
    # meta-parameters
    HALF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    bt = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    b = bt // T
    t = bt % T
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    c_row = cos_ptr + b * stride_cb + t * stride_ct
    s_row = sin_ptr + b * stride_sb + t * stride_st
    c1 = tl.load(c_row + offs, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(c_row + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s_row + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    if head < H:
        h = head.to(tl.int64)
        src = q_ptr + b * stride_qb + h * stride_qh + t * stride_qt
        dst = qo_ptr + b * stride_qob + h * stride_qoh + t * stride_qot
    else:
        h = (head - H).to(tl.int64)
        src = k_ptr + b * stride_kb + h * stride_kh + t * stride_kt
        dst = ko_ptr + b * stride_kob + h * stride_koh + t * stride_kot
    dt = qo_ptr.dtype.element_ty
    x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    o1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
    o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    tl.store(dst + offs, o1.to(dt), mask=mask)
    tl.store(dst + HALF + offs, o2.to(dt), mask=mask)
