"""What the launchers in cotrt/ops share: finding a Triton kernel (compiled or
interpreted), launching it, and the small helpers of their checks and block sizes."""
from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

# Not imported here: importing triton fixes interpreter vs compiler (TRITON_INTERPRET).
HAS_TRITON = importlib.util.find_spec("triton") is not None  # an optional extra

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # activations and weights
INDEX_DTYPES = (torch.int32, torch.int64)  # slots, lengths, tokens, adapter indices


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints: the number of blocks of ``b`` covering ``a``."""
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): Triton block sizes are powers of two."""
    return 1 << max(0, n - 1).bit_length()


def shape_of(t):
    """An argument's shape for an error message (its type name when it is no tensor)."""
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


@functools.lru_cache(maxsize=None)
def load_kernel(op: str, name: str, interpreted: bool):
    """The @triton.jit function ``name`` of ``kernels/<op>.py``.

    kernels/ installs as ``cotrt.kernels``; a source checkout imports it as ``kernels``.
    With ``interpreted`` (CPU tensors), the kernel runs in Triton's interpreter, which needs
    TRITON_INTERPRET=1 in the environment before triton is first imported: triton.jit
    picks compiler or interpreter when a function is decorated, and triton.language's own
    helpers (tl.zeros, tl.max) are decorated at import.
    """
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: impl='triton' needs the triton package (pip install cotrt[triton])")
    try:
        module = importlib.import_module(f"cotrt.kernels.{op}")
    except ModuleNotFoundError as e:
        if e.name not in ("cotrt.kernels", f"cotrt.kernels.{op}"):
            raise
        module = importlib.import_module(f"kernels.{op}")  # source checkout
    kernel = getattr(module, name)
    if not interpreted:
        return kernel
    import triton.language.standard as tl_standard
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl_standard.zeros, InterpretedFunction):
        raise RuntimeError(
            f"{op}: CPU tensors with impl='triton' run in Triton's interpreter, which needs "
            "TRITON_INTERPRET=1 in the environment before triton is first imported")
    # Our kernel may still have been decorated before the variable was set: interpret its source.
    return kernel if isinstance(kernel, InterpretedFunction) else InterpretedFunction(kernel.fn)


def launch(kernel, grid, args: dict, interpreted: bool, **options) -> None:
    """``kernel[grid](**args, **options)``; interpreted (CPU tensors): in the interpreter's
    runtime scope, where compile options (num_warps, ...) mean nothing and are dropped."""
    if interpreted:
        from triton import knobs

        with knobs.runtime.scope():
            knobs.runtime.interpret = True
            kernel[grid](**args)
    else:
        kernel[grid](**args, **options)


def interpreted_for(op: str, *tensors) -> bool:
    """Whether ``op``'s kernel runs interpreted (its tensors are on the CPU); the
    interpreter has no bfloat16, which is refused here with a message naming the op."""
    interpreted = not tensors[0].is_cuda
    if interpreted and any(t is not None and t.dtype == torch.bfloat16 for t in tensors):
        raise ValueError(f"{op}: the Triton interpreter (CPU tensors) has no bfloat16; use fp16/fp32")
    return interpreted
