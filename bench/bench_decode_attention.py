"""decode_attention against the decode attention cotrt runs today, one run, grouped by shape.

Providers (all fast paths; the per-row reference is not timed):
  sdpa    what cotrt's decode step does now (cotrt/model/attention.py): contiguous slots 0..B-1 sliced
          to the live length, K/V views [B, KVH, L, D], each kv head's query group folded
          into the query length ([B, KVH, G, D]), F.scaled_dot_product_attention, no mask.
          Its shapes follow L, so it cannot be captured once and replayed.
  torch   decode_attention(impl="torch"): the static-shape, sync-free path (gathers all T
          positions of each slot, masks by length)
  triton  decode_attention(impl="triton"): the flash-decoding kernels (CUDA only)

With ``--page-size PS`` (PS > 0; default 0: the slot form only) each group also holds
``torch-paged`` and ``triton-paged``: the same op at the same lengths on a paged cache of
the same capacity, [S · ceil(T / PS), PS, KVH, D] pages, each row's block table a random
draw of pages (scattered, as after a while of serving), so one run compares paged against
slot.

Head layouts of SmolLM2-135M (H=9, KVH=3), Qwen2.5-0.5B (14, 2) and Llama-3.2-1B (32, 8),
D = 64; every row at live length L in {128, 1024} of a T = 2048 cache; B in {1, 8, 32}.
fp16 on CUDA; fp32 on CPU with B in {1, 8}. ``COTRT_BENCH_QUICK=1``: B = 1 and 8, L = 128,
T = 512, few rounds (a smoke run: 1-2 minutes on a 2-core CPU). Run:
``python3 -m pytest bench/bench_decode_attention.py --benchmark-only -q [--page-size 16]``.
``extra_info`` holds GB/s of the live K/V bytes (2 · B · L · KVH · D · elt over the median:
the torch path reads and writes more, all T positions, so its figure is an effective
rate), the page size (0: slot form) and the device / versions.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from _microbench import device_info, measure
from cotrt.ops._triton import HAS_TRITON
from cotrt.ops.decode_attention import decode_attention

pytest.importorskip("pytest_benchmark")

CUDA = torch.cuda.is_available()
QUICK = os.environ.get("COTRT_BENCH_QUICK", "") not in ("", "0")
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.float16 if CUDA else torch.float32
D = 64
T = 512 if QUICK else 2048
HEADS = {"smollm2-135m": (9, 3), "qwen2.5-0.5b": (14, 2), "llama-3.2-1b": (32, 8)}
ROWS = [1, 8] if QUICK or not CUDA else [1, 8, 32]
LIVE = [128] if QUICK else [128, 1024]
PROVIDERS = ["sdpa", "torch", "triton"]
PAGED_PROVIDERS = ["torch-paged", "triton-paged"]

pytestmark = pytest.mark.benchmark(warmup=True, warmup_iterations=5 if QUICK else 50,
                                   min_rounds=10 if QUICK else 200)


def pytest_generate_tests(metafunc):
    """model x B x L x provider, the paged providers only with --page-size > 0 (an option
    of bench/conftest.py, so here rather than in parametrize marks)."""
    paged = metafunc.config.getoption("page_size", 0) > 0
    metafunc.parametrize("model", list(HEADS))
    metafunc.parametrize("B", ROWS)
    metafunc.parametrize("L", LIVE)
    metafunc.parametrize("provider", PROVIDERS + (PAGED_PROVIDERS if paged else []))


def _setup(model, B, L, provider, page_size):
    H, KVH = HEADS[model]
    G = H // KVH
    g = torch.Generator().manual_seed(0)
    S = B + 1  # the engine's cache has a scratch slot past max_batch
    q = torch.randn(B, H, D, generator=g).to(DEVICE, DTYPE)
    k_cache = torch.randn(S, T, KVH, D, generator=g).to(DEVICE, DTYPE)
    v_cache = torch.randn(S, T, KVH, D, generator=g).to(DEVICE, DTYPE)
    if provider == "sdpa":
        k = k_cache[:B, :L].transpose(1, 2)  # [B, KVH, L, D] views, as SlotCache.update returns
        v = v_cache[:B, :L].transpose(1, 2)
        qg = q.view(B, KVH, G, D)
        return lambda: F.scaled_dot_product_attention(qg, k, v).view(B, H, D)
    tables = torch.arange(B, device=DEVICE)  # the slot form
    if provider.endswith("-paged"):
        NP = -(-T // page_size)
        k_cache = torch.randn(S * NP, page_size, KVH, D, generator=g).to(DEVICE, DTYPE)
        v_cache = torch.randn(S * NP, page_size, KVH, D, generator=g).to(DEVICE, DTYPE)
        tables = torch.randperm(S * NP, generator=g)[:B * NP].view(B, NP).to(DEVICE, torch.int32)
    lengths = torch.full((B,), L, device=DEVICE)
    out = torch.empty(B, H, D, device=DEVICE, dtype=DTYPE)
    impl = provider.removesuffix("-paged")
    return lambda: decode_attention(q, k_cache, v_cache, tables, lengths, out=out, impl=impl)


def test_decode_attention(benchmark, request, model, B, L, provider):
    if provider.startswith("triton") and not (CUDA and HAS_TRITON):
        pytest.skip("the Triton kernels need CUDA (on CPU they run in the interpreter)")
    H, KVH = HEADS[model]
    page_size = request.config.getoption("page_size", 0) if provider.endswith("-paged") else 0
    fn = torch.no_grad()(_setup(model, B, L, provider, page_size))
    benchmark.group = f"decode_attention {model} H={H} KVH={KVH} D={D} B={B} L={L} T={T} " \
                      f"{str(DTYPE).replace('torch.', '')} {DEVICE}"
    measure(benchmark, fn)
    elt = torch.finfo(DTYPE).bits // 8
    moved = 2 * B * L * KVH * D * elt  # live K and V
    benchmark.extra_info.update(
        provider=provider, model=model, B=B, H=H, KVH=KVH, D=D, L=L, T=T, page_size=page_size, dtype=str(DTYPE),
        gbps=round(moved / benchmark.stats.stats.median / 1e9, 3),
        device=device_info(), torch=torch.__version__,
    )
