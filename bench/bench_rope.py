"""rope against HF's function, its reference and a copy, one run, grouped by shape.

Providers:
  hf_function  transformers' apply_rotary_pos_emb (Llama's; what cotrt.layers.rope patches)
  rope         cotrt.ops.rope (on CUDA: one Triton kernel for q and k; on CPU: HF's formula)
  rope_ref     cotrt.ops.rope_ref, the fp32 reference
  copy         q.clone(), k.clone(): the floor, reading and writing the same bytes once

Shapes: SmolLM2-135M's heads (H=9, KVH=3, D=64) and Llama-3.2-1B's (H=32, KVH=8, D=64), a
decode step of B in {1, 8} rows (T=1) and a 256-token prefill (B=1); fp32 on CPU, bf16 on
CUDA. Run: ``python3 -m pytest bench/bench_rope.py --benchmark-only -q``; ``extra_info``
holds GB/s (q, k, cos, sin read, q and k written, over the median) and the device / versions.
"""

import pytest
import torch

from _microbench import device_info, measure
from cotrt.ops.rope import rope, rope_ref

pytest.importorskip("pytest_benchmark")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
HEADS = {"smollm2": (9, 3, 64), "llama1b": (32, 8, 64)}
STEPS = [(1, 1), (8, 1), (1, 256)]  # (B, T)
PROVIDERS = ["hf_function", "rope", "rope_ref", "copy"]

pytestmark = pytest.mark.benchmark(warmup=True, warmup_iterations=50, min_rounds=200)


def _setup(B, T, H, KVH, D, provider):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, D, generator=g).to(DEVICE, DTYPE)
    k = torch.randn(B, KVH, T, D, generator=g).to(DEVICE, DTYPE)
    ang = torch.rand(B, T, D // 2, generator=g) * 6.28
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(DEVICE, DTYPE)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(DEVICE, DTYPE)
    if provider == "hf_function":
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        return lambda: apply_rotary_pos_emb(q, k, cos, sin)
    if provider == "rope":
        return lambda: rope(q, k, cos, sin)
    if provider == "rope_ref":
        return lambda: rope_ref(q, k, cos, sin)
    return lambda: (q.clone(), k.clone())


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("model", list(HEADS))
@pytest.mark.parametrize("B, T", STEPS)
def test_rope(benchmark, B, T, model, provider):
    H, KVH, D = HEADS[model]
    fn = torch.no_grad()(_setup(B, T, H, KVH, D, provider))
    benchmark.group = f"rope {model} B={B} T={T} {str(DTYPE).replace('torch.', '')} {DEVICE}"
    measure(benchmark, fn)
    elt = torch.finfo(DTYPE).bits // 8
    moved = (2 * B * T * (H + KVH) * D + (0 if provider == "copy" else 2 * B * T * D)) * elt
    benchmark.extra_info.update(
        provider=provider, B=B, T=T, H=H, KVH=KVH, D=D, dtype=str(DTYPE),
        gbps=round(moved / benchmark.stats.stats.median / 1e9, 2),
        device=device_info(), torch=torch.__version__,
    )
