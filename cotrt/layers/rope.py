"""HF's ``apply_rotary_pos_emb`` as one kernel, during cotrt's own forwards only.

HF's attention modules call ``apply_rotary_pos_emb`` by its name in their modeling module
(``transformers.models.llama.modeling_llama`` and each architecture's copy): ~10 small
kernels a layer for q and k. ``RopePatch`` points that name at a function running
``cotrt.ops.rope`` (one kernel for q and k) while a cotrt forward runs — and so while a
decode step is captured — and puts the original back right after. Only modeling modules
whose function is checked to compute the rotate-half form are patched (on random inputs
in fp32 and bf16, bit for bit); a call it does not handle (CPU tensors, partial rotary
dims, other argument forms) goes to the original function.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from ..ops._triton import HAS_TRITON
from ..ops.rope import _rope_torch, rope

_NAME = "apply_rotary_pos_emb"


def _is_rotate_half(fn, head_dim: int) -> bool:
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(2, 3, 5, head_dim, generator=g).to(dtype)
        k = torch.randn(2, 1, 5, head_dim, generator=g).to(dtype)
        ang = torch.rand(2, 5, head_dim // 2, generator=g) * 6
        cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
        got, want = fn(q, k, cos, sin), _rope_torch(q, k, cos, sin)
        if not all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, want)):
            return False
    return True


def _fused(original, impl: str = "auto"):
    """``original``'s replacement: the rope op where it applies (CUDA tensors; any device
    with ``impl="triton"``, the tests' interpreter route), ``original`` elsewhere."""
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = args[0] if len(args) == 1 and not kwargs else kwargs.get("unsqueeze_dim", 1)
        if ((q.is_cuda or impl != "auto") and len(args) + len(kwargs) <= 1 and (not kwargs or "unsqueeze_dim" in kwargs)
                and unsqueeze_dim in (1, 2) and cos.shape[-1] == q.shape[-1] and q.dim() == 4
                and q.dtype == k.dtype == cos.dtype == sin.dtype and cos.dim() == 3):
            return rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, impl=impl)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.original = original
    return apply_rotary_pos_emb


class RopePatch:
    """``with patch:`` runs the model with the fused rotary function in its modeling
    modules. ``modules`` lists the patched module names (empty: nothing to do)."""

    def __init__(self, model: nn.Module, head_dim: int, impl: str = "auto"):
        self._targets = []
        seen = set()
        if HAS_TRITON and head_dim % 2 == 0:
            for mod in model.modules():
                name = type(mod).__module__
                if name in seen or not name.startswith("transformers.models."):
                    continue
                seen.add(name)
                pymod = sys.modules.get(name)
                fn = getattr(pymod, _NAME, None)
                if callable(fn) and _is_rotate_half(fn, head_dim):
                    self._targets.append((pymod, fn, _fused(fn, impl)))
        self.modules = [m.__name__ for m, _, _ in self._targets]

    def __enter__(self):
        for pymod, _, fused in self._targets:
            setattr(pymod, _NAME, fused)
        return self

    def __exit__(self, *exc):
        for pymod, original, _ in self._targets:
            setattr(pymod, _NAME, original)
        return False
