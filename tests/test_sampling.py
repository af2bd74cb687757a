"""Sampling is tested statistically: frequencies against probabilities, filtered tokens
never drawn, draws reproducible per (seed, position) and independent of the batch."""
from __future__ import annotations

import pytest
import torch

from cotrt.engine.sampler import sample, uniform


def _draw(logits, n, temperature=1.0, top_p=1.0, top_k=0, seed0=0):
    """n independent draws from one distribution: n rows, distinct counters."""
    V = logits.shape[-1]
    L = logits.expand(n, V).contiguous()
    f = lambda v, dt: torch.full((n,), v, dtype=dt)
    return sample(L, f(temperature, torch.float32), f(top_p, torch.float32), f(top_k, torch.long),
                  seed=f(seed0, torch.long), counter=torch.arange(n, dtype=torch.long))


def test_uniform_is_uniform_and_deterministic():
    seed = torch.full((20000,), 1234, dtype=torch.long)
    u = uniform(seed, torch.arange(20000))
    assert float(u.min()) > 0 and float(u.max()) < 1
    hist = torch.histc(u.float(), bins=10, min=0, max=1)
    assert torch.all((hist - 2000).abs() < 200), hist  # ~4.5 sigma
    assert torch.equal(u, uniform(seed, torch.arange(20000)))
    assert not torch.equal(u, uniform(seed + 1, torch.arange(20000)))
    # Neighbouring seeds and counters must not be correlated.
    c = torch.corrcoef(torch.stack([u[:-1], u[1:]]).float())[0, 1]
    assert abs(float(c)) < 0.03


def test_frequencies_match_probabilities():
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 1.5
    n = 40000
    toks = _draw(logits, n, temperature=0.7)
    freq = torch.bincount(toks, minlength=12).float() / n
    probs = torch.softmax(logits[0] / 0.7, -1)
    sigma = (probs * (1 - probs) / n).sqrt()
    assert torch.all((freq - probs).abs() < 5 * sigma + 1e-4), (freq, probs)


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.6), (4, 0.8)])
def test_filtered_tokens_never_drawn_and_rest_renormalised(top_k, top_p):
    torch.manual_seed(1)
    logits = torch.randn(1, 16) * 2
    n = 30000
    toks = _draw(logits, n, top_k=top_k, top_p=top_p, seed0=7)
    probs = torch.softmax(logits[0], -1)
    order = torch.argsort(probs, descending=True).tolist()
    if top_k:  # top-k, renormalised, then top-p (HF's warper order)
        order = order[:top_k]
    kept_mass = float(probs[order].sum())
    keep = torch.zeros(16, dtype=torch.bool)
    mass = 0.0
    for t in order:
        if mass >= top_p:
            break
        keep[t] = True
        mass += float(probs[t]) / kept_mass
    freq = torch.bincount(toks, minlength=16).float() / n
    assert torch.all(freq[~keep] == 0), "a filtered token was drawn"
    target = torch.where(keep, probs, torch.zeros_like(probs))
    target = target / target.sum()
    sigma = (target * (1 - target) / n).sqrt()
    assert torch.all((freq - target).abs() < 5 * sigma + 1e-4), (freq, target)


def test_greedy_rows_and_sampled_rows_mix():
    torch.manual_seed(2)
    logits = torch.randn(4, 50)
    temp = torch.tensor([0.0, 1.0, 0.0, 1.0])
    ones = torch.ones(4)
    zeros = torch.zeros(4, dtype=torch.long)
    out = sample(logits, temp, ones, zeros, seed=torch.arange(4), counter=zeros)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_row_draw_independent_of_batch():
    """A row's token depends on its own logits, seed and position only."""
    torch.manual_seed(3)
    logits = torch.randn(6, 100)
    temp, top_p, top_k = torch.full((6,), 0.9), torch.full((6,), 0.95), torch.tensor([0, 5, 0, 20, 0, 3])
    seed, ctr = torch.arange(100, 106), torch.arange(10, 16)
    full = sample(logits, temp, top_p, top_k, seed, ctr)
    for i in range(6):
        one = sample(logits[i:i + 1], temp[i:i + 1], top_p[i:i + 1], top_k[i:i + 1], seed[i:i + 1], ctr[i:i + 1])
        assert one.item() == full[i].item()


def test_top_k_past_the_vocabulary_keeps_everything():
    logits = torch.randn(2, 10)
    f = lambda v, dt: torch.full((2,), v, dtype=dt)
    out = sample(logits, f(1.0, torch.float32), f(1.0, torch.float32), f(500, torch.long),
                 seed=torch.arange(2), counter=torch.arange(2))
    assert out.shape == (2,) and bool((out < 10).all())


@pytest.mark.parametrize("V", [49152, 151936, 1000, 50, 7])
def test_inverse_cdf_equals_a_full_cumsum(V):
    """The two-level inverse CDF picks what a row-long float64 cumsum picks, never a
    zero-mass entry (zero entries inside the row and a V that is no multiple of 32)."""
    from cotrt.engine.sampler import inverse_cdf

    g = torch.Generator().manual_seed(V)
    p = torch.softmax(torch.randn(64, V, generator=g) * 4, -1)
    p[:, ::3] = 0
    p[0] = 0
    p[0, V - 1] = 1.0  # all the mass on the very last entry
    u = torch.rand(64, generator=g, dtype=torch.float64)
    u[1] = 1 - 2**-48  # the top end
    # The total is the cumsum's own last entry: sum() rounds differently (by 1 ulp at
    # V = 151936 on a 2-core CPU), and u near 1 then pointed one past the row's end.
    c = p.double().cumsum(-1)
    ref = torch.searchsorted(c, (u * c[:, -1])[:, None]).squeeze(1)
    got = inverse_cdf(p, u)
    assert torch.equal(got, ref)
    assert (p.gather(1, got[:, None]) > 0).all()


def test_sample_static_equals_sample_without_filters():
    """The captured step's sampler gives each row what sample() gives it (greedy and
    temperature rows mixed, no top-k / top-p)."""
    from cotrt.engine.sampler import sample_static

    g = torch.Generator().manual_seed(3)
    B, V = 12, 999
    logits = torch.randn(B, V, generator=g) * 3
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3] * 3)
    seed = torch.randint(0, 2**62, (B,), generator=g)
    counter = torch.randint(0, 10**6, (B,), generator=g)
    ref = sample(logits, temperature, torch.ones(B), torch.zeros(B, dtype=torch.long), seed, counter)
    assert torch.equal(sample_static(logits, temperature, seed, counter), ref)
