"""The CPU fast path for a decode step's linears (``wrap(..., cpu_kernels=True)``).

``swap_cpu_linears(model)`` turns the model's ``nn.Linear`` modules (decoder projections
and the LM head) into :class:`CpuLinear` in place: the same objects, weights, hooks and
state dict, only the class changes. A CpuLinear runs ``cotrt.ops.cpu_linear``'s kernel
while cotrt's own forwards are running (``CpuKernels``, entered by ModelRunner) and for at
most ``MAX_ROWS`` rows; anything else (prefill, HF ``generate`` on the same model, autograd)
is plain ``F.linear``, so wrapping changes nothing outside cotrt's decode steps.

The kernel streams W in its stored row-major [N, K] layout (each thread a contiguous range
of rows), so nn.Linear's contiguous weight is already packed: no copy is made. Weights that
are not contiguous fp32/bf16 CPU tensors are left alone.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.cpu_linear import HAS_CPU_KERNEL, MAX_ROWS, _launch

_DTYPES = (torch.float32, torch.bfloat16)
_tls = threading.local()  # .on: inside a cotrt forward that asked for the kernels


def active() -> bool:
    return getattr(_tls, "on", False)


class CpuKernels:
    """Context manager: the kernels run for CpuLinear / ValveLinear calls inside it (this
    thread only)."""

    def __enter__(self):
        # One instance may be entered again inside itself (a forward inside another
        # forward's context): the states to restore are a per-thread stack, not an attribute.
        stack = _tls.__dict__.setdefault("stack", [])
        stack.append(getattr(_tls, "on", False))
        _tls.on = True

    def __exit__(self, *exc):
        _tls.on = _tls.stack.pop()


def packable(weight: torch.Tensor) -> bool:
    # Plain tensors only: a tensor subclass (a DTensor shard under tensor parallelism, a
    # quantized weight) has no raw buffer the kernel may read.
    return (type(weight.data) is torch.Tensor and weight.device.type == "cpu" and weight.dtype in _DTYPES
            and weight.dim() == 2 and weight.is_contiguous())


def decode_linear(x, weight, bias, lora_a=None, lora_b=None, alpha=None, adapter=None):
    """The kernel's result for ``x [..., K]``, or None where it does not apply (too many
    rows, another dtype, not inside CpuKernels): the caller then runs its usual path."""
    K = weight.shape[1]
    if not active() or x.dtype != weight.dtype or x.numel() > MAX_ROWS * K or x.device.type != "cpu" \
            or weight.dtype not in _DTYPES or not weight.is_contiguous() \
            or (bias is not None and (bias.dtype != weight.dtype or not bias.is_contiguous())):
        return None  # (the model may have been moved or cast since the swap)
    x2 = x.reshape(-1, K)
    if lora_a is not None and not lora_b.permute(1, 0, 2).is_contiguous():
        return None
    y = _launch(x2, weight, bias, lora_a, lora_b, alpha, adapter, None, torch.get_num_threads())
    return y.view(*x.shape[:-1], weight.shape[0])


class CpuLinear(nn.Linear):
    """nn.Linear whose decode-sized calls inside cotrt's forwards run the CPU kernel.
    Made only by :func:`swap_cpu_linears` (a class change in place, no new module)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = decode_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias) if y is None else y


def swap_cpu_linears(model: nn.Module) -> list[str]:
    """Make every plain ``nn.Linear`` of ``model`` with a packable weight (and bias) a
    CpuLinear; returns the names of its CpuLinear modules, including those an earlier wrap
    of the same model swapped (a second runtime on one model runs the kernel too). A no-op
    (empty list) when ``cotrt._cpu`` is not built."""
    if not HAS_CPU_KERNEL:
        return []
    names = []
    for name, m in model.named_modules():
        if type(m) is nn.Linear and packable(m.weight) and (
                m.bias is None or (m.bias.dtype == m.weight.dtype and m.bias.is_contiguous())):
            m.__class__ = CpuLinear
        if type(m) is CpuLinear:
            names.append(name)
    return names


def unswap_cpu_linears(model: nn.Module) -> None:
    """Undo :func:`swap_cpu_linears`."""
    for m in model.modules():
        if type(m) is CpuLinear:
            m.__class__ = nn.Linear
