"""rms_norm: HF's RMSNorm in one kernel.

    r = rsqrt(mean(x², -1) + eps)            in fp32
    gemma=False (Llama, Qwen2/3, Mistral, Phi-3, ...):  y = w · (x · r).to(x.dtype)
    gemma=True  (Gemma, Gemma2):                          y = ((x · r) · (1 + w)).to(x.dtype)

The Llama form's output dtype is what ``w * t`` promotes to (bf16 weights and inputs:
bf16; fp32 weights on bf16 inputs: fp32), as in HF.

- :func:`rms_norm` — the launcher: validates, then the Triton kernel on CUDA tensors
  (``kernels/rms_norm.py``) and HF's own op sequence on CPU (``impl="torch"``: bit-identical
  to the module it replaces). ``impl="triton"`` on CPU tensors runs the interpreter (tests).
- :func:`rms_norm_ref` — the fp32 reference.
"""
from __future__ import annotations

import torch

from ._triton import FLOAT_DTYPES, HAS_TRITON, interpreted_for, launch, load_kernel, next_pow2



def _check_args(x, weight, eps, out, gemma):
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"rms_norm: x must be a tensor [..., N], got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"rms_norm: x dtype must be fp16/bf16/fp32, got {x.dtype}")
    N = x.shape[-1]
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (N,):
        raise ValueError(f"rms_norm: weight must be [N={N}], got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"rms_norm: weight dtype must be fp16/bf16/fp32, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight is on {weight.device}, x is on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"rms_norm: eps must be a number >= 0, got {eps!r}")
    dtype = x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)
    if out is not None and (not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != dtype
                            or out.device != x.device):
        raise ValueError(f"rms_norm: out must be {tuple(x.shape)} of dtype {dtype} on {x.device}")
    return N, dtype


def rms_norm(x, weight, eps, *, gemma=False, out=None, impl="auto"):
    """RMSNorm of ``x [..., N]`` with ``weight [N]`` (see the module docstring for the two
    forms). Returns a tensor shaped like ``x`` (``out`` when given)."""
    N, dtype = _check_args(x, weight, eps, out, gemma)
    if impl == "auto":
        impl = "triton" if x.is_cuda and HAS_TRITON else "torch"
    if impl == "torch":
        y = _rms_norm_torch(x, weight, eps, gemma)
        return y if out is None else out.copy_(y)
    if impl != "triton":
        raise ValueError(f"rms_norm: impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    interpreted = interpreted_for("rms_norm", x, weight)
    x2 = x.reshape(-1, N)
    if x2.shape[0] and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = out if out is not None else torch.empty(x.shape, dtype=dtype, device=x.device)
    y2 = y.view(-1, N) if y.is_contiguous() else torch.empty(x2.shape, dtype=dtype, device=x.device)
    M = x2.shape[0]
    if M and N:
        kernel = load_kernel("rms_norm", "_rms_norm_kernel", interpreted)
        block = min(max(16, next_pow2(N)), 4096)
        args = dict(x_ptr=x2, w_ptr=weight, y_ptr=y2, eps=float(eps), N=N,
                    stride_x=x2.stride(0), stride_y=y2.stride(0), GEMMA=gemma, BLOCK_N=block)
        launch(kernel, (M,), args, interpreted, num_warps=4 if block <= 1024 else 8)
    if y2.data_ptr() != y.data_ptr() or not y.is_contiguous():
        y.copy_(y2.view(x.shape))
    return y


def _rms_norm_torch(x, weight, eps, gemma):
    """HF's op sequence (LlamaRMSNorm / Gemma2RMSNorm.forward), so CPU results are the
    module's own, bit for bit."""
    if gemma:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return (h * (1.0 + weight.float())).type_as(x)
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm_ref(x, weight, eps, *, gemma=False):
    """fp32 reference: the same math with no intermediate rounding except the Llama form's
    cast to x's dtype (part of the definition). Returns fp32."""
    _check_args(x, weight, eps, None, gemma)
    h = x.double()
    h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (h * (1.0 + weight.double())).float()
    return (weight.double() * h.to(x.dtype).double()).float()
