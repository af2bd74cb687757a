"""valve_lora against its floor and alternatives, one run, grouped by shape.

Providers:
  linear         F.linear(x, W, b): the floor (what a valve costs at alpha = 0 is on top of this)
  valve_lora     cotrt.ops.valve_lora, one adapter, per-row alphas (on CPU: the torch path)
  valve_lora_2ad valve_lora with two adapters and a per-row adapter index
  peft_unmerged  peft's lora.Linear forward (base + lora_B(lora_A(x)) * scaling)
  merged         F.linear with W + s·B A precomputed (one alpha for the whole batch only)

Decode shapes: M in {1, 8}, K = N in {576, 1536}, r = 16, fp32 on CPU (on CUDA: fp16,
M up to 16, K = N up to 4096). Run: ``python3 -m pytest bench/bench_valve_lora.py --benchmark-only -q``;
pytest-benchmark prints each group's median with ratios to the fastest; ``extra_info``
holds GB/s (W, A and B bytes over the median) and the device / versions.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _microbench import device_info, measure
from cotrt.ops.valve_lora import valve_lora

peft = pytest.importorskip("peft")
pytest.importorskip("pytest_benchmark")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.float16 if CUDA else torch.float32
SIZES = [576, 1536, 4096] if CUDA else [576, 1536]
ROWS = [1, 8, 16] if CUDA else [1, 8]  # the GPU goal is stated for M <= 16
R = 16
PROVIDERS = ["linear", "valve_lora", "valve_lora_2ad", "peft_unmerged", "merged"]

pytestmark = pytest.mark.benchmark(warmup=True, warmup_iterations=50, min_rounds=200)



class _One(nn.Module):
    def __init__(self, K, N):
        super().__init__()
        self.proj = nn.Linear(K, N)


def _setup(M, K, provider):
    N = K
    g = torch.Generator().manual_seed(0)
    one = _One(K, N)
    lora_cfg = peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=["proj"], init_lora_weights=False)
    layer = peft.get_peft_model(one, lora_cfg).base_model.model.proj.to(DEVICE, DTYPE).eval()
    W, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    A = layer.lora_A["default"].weight.detach()  # [r, K]
    B = layer.lora_B["default"].weight.detach() * layer.scaling["default"]  # [N, r], s folded
    x = torch.randn(M, K, generator=g).to(DEVICE, DTYPE)
    alpha = torch.linspace(0.5, 1.7, M).to(DEVICE)
    if provider == "linear":
        return lambda: F.linear(x, W, b)
    if provider == "merged":
        Wm = W + B @ A
        return lambda: F.linear(x, Wm, b)
    if provider == "peft_unmerged":
        return lambda: layer(x)
    if provider == "valve_lora":
        la, lb = A[None].contiguous(), B[None].contiguous()
        return lambda: valve_lora(x, W, la, lb, alpha, None, b)
    # The bank as ValveLinear stores it: lora_b [2, N, r] N-major in memory.
    la, lb = torch.stack([A, A.flip(0)]), torch.stack([B, B.flip(1)], dim=1).permute(1, 0, 2)
    idx = (torch.arange(M) % 2).to(DEVICE, torch.int32)
    return lambda: valve_lora(x, W, la, lb, alpha, idx, b)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("K", SIZES)
@pytest.mark.parametrize("M", ROWS)
def test_valve_lora(benchmark, M, K, provider):
    fn = torch.no_grad()(_setup(M, K, provider))
    benchmark.group = f"valve_lora M={M} K=N={K} r={R} {str(DTYPE).replace('torch.', '')} {DEVICE}"
    measure(benchmark, fn)
    elt = torch.finfo(DTYPE).bits // 8
    moved = (K * K + (0 if provider in ("linear", "merged") else 2 * R * K)) * elt
    benchmark.extra_info.update(
        provider=provider, M=M, K=K, N=K, r=R, dtype=str(DTYPE),
        gbps=round(moved / benchmark.stats.stats.median / 1e9, 2),
        device=device_info(), torch=torch.__version__, peft=peft.__version__,
    )
