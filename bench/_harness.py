"""What every benchmark script shares: warm-up, interleaved repeats, median and spread,
and a header that says what machine, threads, versions and model the numbers come from.

    from _harness import header, interleave, summary
    times = interleave({"hf": run_hf, "cotrt": run_cotrt}, repeats=5)   # seconds per call
    print(header(model=model))
    print(summary(times["cotrt"]))            # "12.3 ms [11.9, 12.8]"  median [p20, p80]

Interleaving (A B, B A, A B, ... after one warm-up call each) spreads load from other
processes over both sides: on a shared machine a burst then lands on both, not on one.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def model_name(model) -> str:
    """The model's name as its config records it (the checkpoint folder's name), its
    parameter count and dtype: read from the model, never typed into a script."""
    if model is None:
        return ""
    path = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    name = Path(str(path)).name or type(model).__name__
    p = next(model.parameters())
    n = sum(t.numel() for t in model.parameters())
    return f"{name} ({n / 1e6:.0f}M params, {str(p.dtype).replace('torch.', '')}, {p.device.type})"


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def header(model=None, note: str = "") -> str:
    """One line: device, CPU, torch threads, load average, versions, commit, model."""
    import transformers

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    try:
        load = "load avg %.1f (%d CPUs)" % (os.getloadavg()[0], os.cpu_count() or 0)
    except OSError:
        load = ""
    try:
        from cotrt import _cpu

        kernel = f"cotrt._cpu {_cpu.isa()} (work-claiming pool)"
    except ImportError:
        kernel = "cotrt._cpu not built"
    parts = [dev, cpu_model(), f"torch threads {torch.get_num_threads()}", load,
             f"torch {torch.__version__}", f"transformers {transformers.__version__}", kernel,
             f"cotrt {_commit()}", model_name(model), note]
    return "# " + ", ".join(p for p in parts if p)


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def batched(fn, target_s=0.005):
    """(run, n): ``run`` calls ``fn`` n times, as many as fill ~target_s (timed once up
    front), for calls too short to time one by one."""
    fn()
    t0 = time.perf_counter()
    fn()
    n = max(1, int(target_s / max(time.perf_counter() - t0, 1e-7)))

    def run():
        for _ in range(n):
            fn()
    return run, n


def interleave(providers: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each provider: ``warmup`` untimed calls each, then ``repeats``
    rounds, each calling every provider once, the order reversed every other round."""
    for fn in providers.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in providers}
    names = list(providers)
    for i in range(repeats):
        for k in (names if i % 2 == 0 else names[::-1]):
            times[k].append(timed(providers[k]))
    return times


def quantiles(ts: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80)."""
    if len(ts) == 1:
        return ts[0], ts[0], ts[0]
    q = statistics.quantiles(ts, n=10, method="inclusive")
    return statistics.median(ts), q[1], q[7]


def summary(ts: list[float], scale: float = 1e3, unit: str = "ms", digits: int = 2) -> str:
    m, lo, hi = quantiles(ts)
    return f"{m * scale:.{digits}f} {unit} [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"


def ratio(num: list[float], den: list[float]) -> str:
    """median(num) / median(den), with the spread of the per-round ratios (p20-p80):
    rounds pair calls made back to back, so their ratio is less noisy than either time."""
    per = sorted(a / b for a, b in zip(num, den))
    m, lo, hi = quantiles(per)
    return f"{statistics.median(num) / statistics.median(den):.2f}x [{lo:.2f}, {hi:.2f}]"


# -- the two sides of an end-to-end comparison ------------------------------------------------


class plain_hf:
    """Context manager: the model's linears are plain nn.Linear inside (wrap() made them
    CpuLinear, which outside cotrt's forwards runs F.linear plus one Python check a call);
    the HF baseline then runs exactly the modules it came with."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        from cotrt.layers.cpu_linear import unswap_cpu_linears

        self.names = [n for n, m in self.model.named_modules() if type(m).__name__ == "CpuLinear"]
        unswap_cpu_linears(self.model)

    def __exit__(self, *exc):
        from cotrt.layers.cpu_linear import CpuLinear

        for n in self.names:
            self.model.get_submodule(n).__class__ = CpuLinear


def hf_generate(model, prompts, new_tokens, pad_id, batch):
    """HF ``generate`` as a user runs it: batches of ``batch`` prompts, left-padded, greedy,
    each batch generating exactly max(its new_tokens) tokens (min_new_tokens: EOS does not
    stop it). Returns the useful tokens (sum of new_tokens)."""
    for i in range(0, len(prompts), batch):
        ps, ns = prompts[i:i + batch], new_tokens[i:i + batch]
        T = max(map(len, ps))
        ids = torch.full((len(ps), T), pad_id, dtype=torch.long)
        mask = torch.zeros(len(ps), T, dtype=torch.long)
        for j, p in enumerate(ps):
            ids[j, T - len(p):] = torch.tensor(p)
            mask[j, T - len(p):] = 1
        with torch.inference_mode(), plain_hf(model):
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max(ns), min_new_tokens=max(ns),
                                 do_sample=False, pad_token_id=pad_id)
        assert out.shape[1] - T == max(ns)
    return sum(new_tokens)


def cotrt_generate(rt, prompts, params, batch=None):
    """``rt.generate`` over all prompts at once (continuous batching), or ``batch`` at a
    time (batch=1: one request at a time, as HF's batch 1). Returns tokens generated."""
    import cotrt

    params = params if isinstance(params, list) else [params] * len(prompts)
    step = batch or len(prompts)
    n = 0
    for i in range(0, len(prompts), step):
        outs = rt.generate(prompts[i:i + step], params[i:i + step])
        n += sum(len(o.token_ids) for o in outs)
    assert isinstance(params[0], cotrt.Params)
    return n
