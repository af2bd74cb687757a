"""Triton kernel for the rms_norm op: one program normalises one row.

    r = 1 / sqrt(mean(x²) + eps)                      (fp32, over the row)
    Llama form:  y = w · cast(x · r)                  (cast to x's dtype first, as HF)
    Gemma form:  y = cast((x · r) · (1 + w))          (all in fp32, cast last)

Launched by :func:`cotrt.ops.rms_norm.rms_norm`. Two passes over the row in ``BLOCK_N``
chunks (the sum of squares, then the scaled write), so any width works; a decode row of a
small model (H ≤ 4096) is one chunk read twice from L1/L2. What it replaces is HF's
RMSNorm as eager ops: ~8 kernels a norm in bf16 (two casts, pow, mean, add, rsqrt, two
multiplies), two to four norms a layer.
"""
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    # pointers
    x_ptr,  # [M, N]
    w_ptr,  # [N]
    y_ptr,  # [M, N]
    # scalars
    eps,
    # sizes
    N,
    # strides, in elements (the last dim is unit-stride)
    stride_x, stride_y,
    # meta-parameters
    GEMMA: tl.constexpr,  # (x·r)·(1 + w) in fp32, cast last; else w · cast(x·r)
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    y_row = y_ptr + row * stride_y
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        x = tl.load(x_row + offs, mask=offs < N, other=0.0).to(tl.float32)
        acc += x * x
    r = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
    for start in range(0, N, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        mask = offs < N
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GEMMA:
            y = (x * r) * (1.0 + w)
        else:
            y = w * (x * r).to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_row + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
