"""The one tolerance helper for cotrt tests.

- ``tolerance(dtype) -> (rtol, atol)``: the table every comparison uses, for outputs of
  order 1 (scale inputs so that they are: e.g. weights ~ N(0, 1/K)).
- ``assert_close(actual, expected, dtype=...)``: allclose with that table; on failure it
  prints the max absolute / relative error and the first mismatching elements.
- ``assert_flash_rule(out, ref, baseline)``: flash-attention's rule for accumulating
  kernels in low precision: the kernel's max error against an fp32 reference is at most
  ``factor`` (2) times that of plain PyTorch run in the same low precision.
"""
from __future__ import annotations

import torch

# fp32: K-long fp32 dot products in a different order differ by ~sqrt(K)·eps (K=1536: ~3e-6).
# fp16/bf16: one rounding of the output (2**-11, 2**-8) plus accumulation-order noise.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for results computed in ``dtype``."""
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no tolerance for dtype {dtype}") from None


def _report(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor, limit: int) -> str:
    err = (actual - expected).abs()
    rel = err / expected.abs().clamp_min(1e-12)
    lines = [f"max abs err {err.max().item():.3e}, max rel err {rel.max().item():.3e}, "
             f"{int(bad.sum())} of {bad.numel()} elements out of tolerance; first:"]
    for idx in bad.nonzero()[:limit].tolist():
        i = tuple(idx)
        lines.append(f"  {i}: actual {actual[i].item():.7g}, expected {expected[i].item():.7g}")
    return "\n".join(lines)


def assert_close(actual, expected, *, dtype=None, rtol=None, atol=None, msg: str = "", limit: int = 5):
    """Assert ``|actual - expected| <= atol + rtol·|expected|`` elementwise (computed in fp64).

    ``dtype`` picks (rtol, atol) from the table (default: ``actual.dtype``); explicit
    ``rtol``/``atol`` override it. NaNs must match positions."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{msg}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    t_rtol, t_atol = tolerance(dtype or actual.dtype)
    rtol = t_rtol if rtol is None else rtol
    atol = t_atol if atol is None else atol
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    if bad.any():
        raise AssertionError(f"{msg} (rtol={rtol}, atol={atol})\n" + _report(a, e, bad, limit))


def assert_flash_rule(out, ref, baseline, *, factor: float = 2.0, floor: float = 1e-6, msg: str = ""):
    """max|out - ref| <= factor · max|baseline - ref| + floor, with ref in fp32 (or better) and
    baseline the same computation in plain low-precision PyTorch."""
    r = ref.detach().double()
    err = (out.detach().double() - r).abs().max().item()
    base_err = (baseline.detach().double() - r).abs().max().item()
    if not err <= factor * base_err + floor:
        raise AssertionError(
            f"{msg}: max error {err:.3e} vs fp32 reference exceeds {factor} x plain-PyTorch error "
            f"{base_err:.3e} (+{floor:g})")
