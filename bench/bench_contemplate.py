"""contemplate against its reference and the obvious torch code, one run, grouped by shape.

Providers:
  ref          contemplate_ref: fp32, both branches for every row, then a select (the oracle)
  contemplate  cotrt.ops.contemplate (on CPU: the torch path; on CUDA: the Triton kernel)
  naive        what a Coconut-style loop does: embed every row, then overwrite the latent rows
               with ``emb[mask] = f(hidden[mask])`` (a boolean index: a host sync on CUDA)
  embedding    F.embedding alone: the floor for a step's input (token rows only)

SmolLM2-135M shapes: H = 576, V = 49152, B in {1, 8}, every other row latent (B = 1: the
one row is latent). Two feedbacks: ``coconut`` (the final-norm state fed back as is) and
``norm+proj`` (an RMSNorm and a [576, 576] projection with bias). fp32 on CPU (on CUDA:
fp16, B up to 64). Run: ``python3 -m pytest bench/bench_contemplate.py --benchmark-only -q``;
``extra_info`` holds GB/s (bytes read and written over the median) and the device / versions.
"""

import pytest
import torch
import torch.nn.functional as F

from _microbench import device_info, measure
from cotrt.ops.contemplate import contemplate, contemplate_ref

pytest.importorskip("pytest_benchmark")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.float16 if CUDA else torch.float32
H = 576
V = 49152
ROWS = [1, 8, 64] if CUDA else [1, 8]
FEEDBACKS = ["coconut", "norm+proj"]
PROVIDERS = ["ref", "contemplate", "naive", "embedding"]

pytestmark = pytest.mark.benchmark(warmup=True, warmup_iterations=50, min_rounds=300)



def _setup(B, feedback, provider):
    g = torch.Generator().manual_seed(0)
    E = torch.randn(V, H, generator=g).to(DEVICE, DTYPE)
    tokens = torch.randint(0, V, (B,), generator=g).to(DEVICE)
    mask = (torch.arange(B) % 2 == 0).to(DEVICE)
    hidden = torch.randn(B, H, generator=g).to(DEVICE, DTYPE)
    kw = {}
    if feedback == "norm+proj":
        kw = dict(norm_weight=torch.ones(H, device=DEVICE, dtype=DTYPE),
                  proj_weight=(torch.randn(H, H, generator=g) * H**-0.5).to(DEVICE, DTYPE),
                  proj_bias=torch.zeros(H, device=DEVICE, dtype=DTYPE))
    if provider == "ref":
        return lambda: contemplate_ref(tokens, mask, hidden, E, **kw)
    if provider == "contemplate":
        out = torch.empty(B, H, device=DEVICE, dtype=DTYPE)
        return lambda: contemplate(tokens, mask, hidden, E, **kw, out=out)
    if provider == "embedding":
        return lambda: F.embedding(tokens, E)

    def naive():
        emb = F.embedding(tokens.masked_fill(mask, 0), E)
        x = hidden[mask]
        if kw:
            x32 = x.float()
            x = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(DTYPE) * kw["norm_weight"]
            x = F.linear(x, kw["proj_weight"], kw["proj_bias"])
        emb[mask] = x
        return emb

    return naive


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("feedback", FEEDBACKS)
@pytest.mark.parametrize("B", ROWS)
def test_contemplate(benchmark, B, feedback, provider):
    fn = torch.no_grad()(_setup(B, feedback, provider))
    benchmark.group = f"contemplate B={B} H={H} V={V} {feedback} {str(DTYPE).replace('torch.', '')} {DEVICE}"
    measure(benchmark, fn)
    elt = torch.finfo(DTYPE).bits // 8
    n_lat = (B + 1) // 2
    moved = B * H * elt  # the output
    moved += (B - n_lat) * H * elt + n_lat * H * elt  # embedding rows read, states read
    if feedback == "norm+proj" and provider != "embedding":
        moved += (H * H + 2 * H) * elt
    benchmark.extra_info.update(
        provider=provider, B=B, H=H, V=V, feedback=feedback, latent_rows=n_lat, dtype=str(DTYPE),
        gbps=round(moved / benchmark.stats.stats.median / 1e9, 3),
        device=device_info(), torch=torch.__version__,
    )
