"""ValveLinear: a linear carrying a bank of LoRA valves, scaled per token row by alpha.

The module of the valve_lora op (``cotrt.ops.valve_lora``). :class:`ValveState` holds the
per-forward inputs (per-token alpha and adapter index, refilled in place) shared by every
:class:`ValveLinear` of a model; each ValveLinear computes

    y = x Wᵀ + bias + alpha[t] · (x A[a_t]ᵀ) B[a_t]ᵀ

through the op (or, for decode rows on CPU inside cotrt's forwards, the cpu_linear
kernel). Loading adapters into the banks is :class:`cotrt.valve.ValveSet`'s job.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.valve_lora import valve_lora
from . import cpu_linear

try:  # GPT-2 style layers: weight stored [in, out] (PEFT's fan_in_fan_out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a base dependency
    Conv1D = ()


class ValveState:
    """Per-forward valve inputs shared by all ValveLinear modules of one model.

    Attributes read by ValveLinear (T = rows of ``x.reshape(-1, K)``, row-major over
    (batch, seq)):
        alpha: fp32 [T], or [1] broadcast to any T, or None: no valve in this forward,
            every ValveLinear is exactly ``F.linear``.
        adapter: int32 [T] or [1] (broadcast), or None for adapter 0. A negative index
            makes the row base-only.

    The setters refill preallocated device buffers in place (reallocating only to grow),
    so the tensors ValveLinear reads keep their addresses from step to step. Forwards of
    at most ``reserve_static(n)`` rows use a separate fixed buffer that never moves, even
    when a long prefill grows the other one: a captured decode graph reads its alphas
    from there.
    """

    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.alpha: torch.Tensor | None = None
        self.adapter: torch.Tensor | None = None
        self._rows_alpha = torch.empty(0, dtype=torch.float32, device=self.device)
        self._rows_adapter = torch.empty(0, dtype=torch.int32, device=self.device)
        self._one_alpha = torch.zeros(1, dtype=torch.float32, device=self.device)
        self._one_adapter = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._static_alpha = self._rows_alpha
        self._static_adapter = self._rows_adapter

    def reserve_static(self, n_tokens: int) -> None:
        """Fix the buffers of forwards with at most ``n_tokens`` rows (decode steps): their
        addresses never change afterwards unless a larger reservation replaces them."""
        if n_tokens > self._static_alpha.numel():
            self._static_alpha = torch.zeros(n_tokens, dtype=torch.float32, device=self.device)
            self._static_adapter = torch.zeros(n_tokens, dtype=torch.int32, device=self.device)

    def reserve(self, n_tokens: int) -> None:
        """Preallocate per-token buffers for up to ``n_tokens`` rows (before graph capture)."""
        if n_tokens > self._rows_alpha.numel():
            self._rows_alpha = torch.zeros(n_tokens, dtype=torch.float32, device=self.device)
            self._rows_adapter = torch.zeros(n_tokens, dtype=torch.int32, device=self.device)

    def set_rows(self, alpha, adapter=None, tokens_per_row: int = 1) -> None:
        """Per-sequence values expanded to per-token ones.

        Args:
            alpha: [B] per sequence (tensor or sequence of floats).
            adapter: [B] adapter index per sequence, or None for adapter 0.
            tokens_per_row: tokens of each sequence in this forward (S of a padded [B, S]
                batch; 1 for a decode step). Fills ``alpha``/``adapter`` with B*S rows.
        """
        if not isinstance(tokens_per_row, int) or tokens_per_row < 1:
            raise ValueError(f"ValveState.set_rows: tokens_per_row must be an int >= 1, got {tokens_per_row!r}")
        alpha = _as_1d(alpha, torch.float32, "alpha")
        B = alpha.shape[0]
        if adapter is not None:
            adapter = _as_1d(adapter, torch.int32, "adapter")
            if adapter.shape[0] != B:
                raise ValueError(f"ValveState.set_rows: adapter has {adapter.shape[0]} rows, alpha has {B}")
        n = B * tokens_per_row
        if n <= self._static_alpha.numel():
            alpha_buf, adapter_buf = self._static_alpha, self._static_adapter
        else:
            self.reserve(n)
            alpha_buf, adapter_buf = self._rows_alpha, self._rows_adapter
        self.alpha = alpha_buf[:n]
        self.alpha.view(B, tokens_per_row).copy_(alpha.unsqueeze(1).expand(B, tokens_per_row))
        if adapter is None:
            self.adapter = None
        else:
            self.adapter = adapter_buf[:n]
            self.adapter.view(B, tokens_per_row).copy_(adapter.unsqueeze(1).expand(B, tokens_per_row))

    def set_uniform(self, alpha: float, adapter: int = 0) -> None:
        """One alpha and adapter for every row of every forward until changed (works while
        the number of rows varies, e.g. prefill then decode inside ``model.generate``)."""
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"ValveState.set_uniform: alpha must be a finite number, got {alpha!r}")
        if not isinstance(adapter, int):
            raise ValueError(f"ValveState.set_uniform: adapter must be an int, got {adapter!r}")
        self._one_alpha.fill_(float(alpha))
        self._one_adapter.fill_(adapter)
        self.alpha, self.adapter = self._one_alpha, self._one_adapter

    def clear(self) -> None:
        """No valve: every ValveLinear computes plain ``F.linear``."""
        self.alpha = self.adapter = None


def _as_1d(v, dtype, name):
    if isinstance(v, torch.Tensor):
        if v.dim() != 1:
            raise ValueError(f"ValveState.set_rows: {name} must be 1-D [B], got shape {tuple(v.shape)}")
        if v.dtype.is_floating_point != dtype.is_floating_point:
            raise ValueError(f"ValveState.set_rows: {name} has dtype {v.dtype}")
        host = v.device.type == "cpu"
    else:
        v = torch.as_tensor(list(v), dtype=dtype)
        host = True
    # Host values are checked here; device tensors are the engine's, checked at admission
    # (a check here would sync every step).
    if host and dtype.is_floating_point and not torch.isfinite(v).all():
        raise ValueError(f"ValveState.set_rows: {name} has non-finite values: {v.tolist()}")
    return v


class ValveLinear(nn.Module):
    """A linear with a bank of LoRA valves, scaled per token row from a shared ValveState.

    Wraps an existing ``nn.Linear`` (weight [N, K]) or transformers ``Conv1D`` (weight
    [K, N]): ``weight`` and ``bias`` are the very same Parameter objects, so the model's
    state dict and memory are unchanged. Buffers (not saved in the state dict):
    ``lora_a [n_adapters, r_max, K]``, ``lora_b [n_adapters, N, r_max]`` with the LoRA scale
    folded in; adapters this module is not part of are zero or past the bank's end
    (both base-only).

    forward: x [..., K] -> [..., N].
    """

    def __init__(self, base: nn.Module, state: ValveState):
        super().__init__()
        self.transposed = isinstance(base, Conv1D)  # isinstance(x, ()) is False
        self.weight = base.weight
        self.bias = base.bias
        K, N = (self.weight.shape[0], self.weight.shape[1]) if self.transposed else \
            (self.weight.shape[1], self.weight.shape[0])
        self.in_features, self.out_features = K, N
        self.state = state
        dev, dt = self.weight.device, self.weight.dtype
        self.register_buffer("lora_a", torch.zeros(0, 1, K, dtype=dt, device=dev), persistent=False)
        self.register_buffer("lora_b", torch.zeros(N, 0, 1, dtype=dt, device=dev).permute(1, 0, 2), persistent=False)

    def set_adapter(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Write adapter ``slot``: a [r, K], b [N, r] (scale already folded), or None to zero
        it. Grows the bank (zero-padding slots and rank) when needed."""
        n, r = self.lora_a.shape[0], self.lora_a.shape[1]
        K, N = self.lora_a.shape[2], self.lora_b.shape[1]  # the bank's (a tensor-parallel shard's: local)
        new_n = max(n, slot + 1)
        new_r = max(r, a.shape[0] if a is not None else 1)
        if (new_n, new_r) != (n, r):
            la = self.lora_a.new_zeros(new_n, new_r, K)
            # lora_b is [n, N, r] stored N-major ([N, n, r] in memory): on CPU the expand for
            # all adapters is then one GEMM against a free [N, n·r] view.
            lb = self.lora_b.new_zeros(N, new_n, new_r).permute(1, 0, 2)
            la[:n, :r] = self.lora_a
            lb[:n, :, :r] = self.lora_b
            self.lora_a, self.lora_b = la, lb
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if a is not None:
            self.lora_a[slot, : a.shape[0]] = a.to(self.lora_a)
            self.lora_b[slot, :, : b.shape[1]] = b.to(self.lora_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.weight.t() if self.transposed else self.weight, self.bias)

    def linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x [..., K] -> [..., N]`` against ``w [N, K]`` (a view) and the banks (also
        what a tensor-parallel shard runs on its local ``w``: cotrt.parallel.shard)."""
        alpha = self.state.alpha
        fast = not self.transposed and cpu_linear.active()  # decode rows on CPU: one pass over W
        if alpha is None:
            y = cpu_linear.decode_linear(x, w, bias) if fast else None
            return F.linear(x, w, bias) if y is None else y
        x2 = x.reshape(-1, w.shape[1])  # (T, K), row-major over (batch, seq)
        T = x2.shape[0]
        alpha = _rows(alpha, T, "alpha")
        adapter = self.state.adapter
        if adapter is not None:
            adapter = _rows(adapter, T, "adapter")
        y = cpu_linear.decode_linear(x2, w, bias, self.lora_a, self.lora_b, alpha, adapter) if fast else None
        if y is None:
            y = valve_lora(x2, w, self.lora_a, self.lora_b, alpha, adapter, bias)
        return y.view(*x.shape[:-1], w.shape[0])

    def extra_repr(self) -> str:
        n, r = self.lora_a.shape[0], self.lora_a.shape[1]
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, n_adapters={n}, r_max={r}")


def _rows(t: torch.Tensor, T: int, name: str) -> torch.Tensor:
    if t.shape[0] == T:
        return t
    if t.shape[0] == 1:
        return t.expand(T)  # stride 0: no copy, both paths read it as a broadcast
    raise ValueError(
        f"ValveState.{name} has {t.shape[0]} rows but this forward has {T} token rows "
        "(x.reshape(-1, K)); set it per token with set_rows(..., tokens_per_row) or use set_uniform")
