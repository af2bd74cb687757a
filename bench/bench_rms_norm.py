"""rms_norm against HF's module, its reference and a copy, one run, grouped by shape.

Providers:
  hf_module     transformers' LlamaRMSNorm (what cotrt.layers.rms_norm replaces)
  rms_norm      cotrt.ops.rms_norm (on CUDA: the Triton kernel; on CPU: HF's op sequence)
  rms_norm_ref  cotrt.ops.rms_norm_ref, the fp32 reference
  copy          x.clone(): the floor, reading and writing the same bytes once

Shapes: rows M in {1, 8, 256} (decode steps and a prefill chunk), hidden N in {576, 2048}
(SmolLM2-135M, Llama-3.2-1B); fp32 on CPU, bf16 on CUDA. Run:
``python3 -m pytest bench/bench_rms_norm.py --benchmark-only -q``; pytest-benchmark prints
each group's median with ratios to the fastest; ``extra_info`` holds GB/s (x read, y
written, w read, over the median) and the device / versions.
"""

import pytest
import torch

from _microbench import device_info, measure
from cotrt.ops.rms_norm import rms_norm, rms_norm_ref

pytest.importorskip("pytest_benchmark")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
ROWS = [1, 8, 256]
SIZES = [576, 2048]
EPS = 1e-5
PROVIDERS = ["hf_module", "rms_norm", "rms_norm_ref", "copy"]

pytestmark = pytest.mark.benchmark(warmup=True, warmup_iterations=50, min_rounds=200)


def _setup(M, N, provider):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, N, generator=g).to(DEVICE, DTYPE)
    w = (1 + 0.1 * torch.randn(N, generator=g)).to(DEVICE, DTYPE)
    if provider == "hf_module":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        mod = LlamaRMSNorm(N, eps=EPS).to(DEVICE, DTYPE)
        mod.weight.data.copy_(w)
        return lambda: mod(x)
    if provider == "rms_norm":
        return lambda: rms_norm(x, w, EPS)
    if provider == "rms_norm_ref":
        return lambda: rms_norm_ref(x, w, EPS)
    return lambda: x.clone()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("N", SIZES)
@pytest.mark.parametrize("M", ROWS)
def test_rms_norm(benchmark, M, N, provider):
    fn = torch.no_grad()(_setup(M, N, provider))
    benchmark.group = f"rms_norm M={M} N={N} {str(DTYPE).replace('torch.', '')} {DEVICE}"
    measure(benchmark, fn)
    elt = torch.finfo(DTYPE).bits // 8
    moved = (2 * M * N + (0 if provider == "copy" else N)) * elt
    benchmark.extra_info.update(
        provider=provider, M=M, N=N, dtype=str(DTYPE),
        gbps=round(moved / benchmark.stats.stats.median / 1e9, 2),
        device=device_info(), torch=torch.__version__,
    )
