"""HF RMSNorm modules swapped for one-kernel ones (``cotrt.ops.rms_norm``).

A captured decode step still runs every kernel of the eager step; what it removes is the
launch cost, not the count. HF's RMSNorm is ~8 kernels in bf16 (two casts, pow, mean,
add, rsqrt, two multiplies) and a layer has two (four with Qwen3's q/k norms): about a
third of the small kernels of a SmolLM2 layer. ``fuse_rms_norms`` replaces each norm
module by :class:`FusedRMSNorm` holding the same weight Parameter (state dict and memory
unchanged) — only for module classes whose output it has checked to be the op's, in fp32
and bf16, on a copy with random weights (Llama form or Gemma form); other classes are left
alone.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from ..ops.rms_norm import _rms_norm_torch, rms_norm


class FusedRMSNorm(nn.Module):
    """RMSNorm through ``cotrt.ops.rms_norm``; ``weight`` is the wrapped module's Parameter."""

    def __init__(self, base: nn.Module, eps: float, gemma: bool):
        super().__init__()
        self.weight = base.weight
        self.eps = float(eps)
        self.gemma = gemma
        self.base_class = type(base).__name__
        object.__setattr__(self, "_original", base)  # not a submodule: no duplicate state-dict keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, gemma=self.gemma)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, form={'gemma' if self.gemma else 'llama'}, " \
               f"replaces={self.base_class}"


def _eps(module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        v = getattr(module, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def _form(module, eps: float) -> bool | None:
    """The form (gemma=True/False) whose torch path reproduces ``module`` bit for bit on
    random inputs and weights in fp32 and bf16, or None."""
    probe = copy.deepcopy(module).to("cpu", torch.float32)
    N = probe.weight.shape[0]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        probe.weight.copy_(torch.randn(N, generator=g))
        cases = []
        for dtype in (torch.float32, torch.bfloat16):
            m = copy.deepcopy(probe).to(dtype)  # .to is in place
            x = (torch.randn(3, N, generator=g) * 3).to(dtype)
            cases.append((m, x, m(x)))
        for gemma in (False, True):
            if all(torch.equal(_rms_norm_torch(x, m.weight, eps, gemma), y) for m, x, y in cases):
                return gemma
    return None


def fuse_rms_norms(model: nn.Module) -> dict:
    """Swap every checked RMSNorm module of ``model`` in place.
    Returns ``{class name: number swapped, or the reason it was not}``."""
    report, forms = {}, {}
    targets = []
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        if not cls.endswith("RMSNorm") or isinstance(mod, FusedRMSNorm):
            continue
        w = getattr(mod, "weight", None)
        eps = _eps(mod)
        if not isinstance(w, nn.Parameter) or w.dim() != 1 or eps is None:
            report[cls] = "no 1-D weight and eps"
            continue
        if cls not in forms:
            try:
                forms[cls] = _form(mod, eps)
            except Exception as e:  # noqa: BLE001 - an unknown module is left alone
                forms[cls] = None
                report[cls] = f"check failed: {type(e).__name__}"
        if forms[cls] is None:
            report.setdefault(cls, "output differs from both forms")
            continue
        targets.append((name, mod, eps, forms[cls]))
    for name, mod, eps, gemma in targets:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, FusedRMSNorm(mod, eps, gemma))
        cls = type(mod).__name__
        report[cls] = report.get(cls, 0) + 1
    return report


@contextlib.contextmanager
def original_norms(model: nn.Module):
    """Run ``model`` with its own RMSNorm modules for the duration (benchmark baselines:
    HF's eager step as HF ships it); the fused ones come back after."""
    fused = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, FusedRMSNorm)]

    def put(name, module):
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, module)

    for name, mod in fused:
        put(name, mod._original)
    try:
        yield
    finally:
        for name, mod in fused:
            put(name, mod)
