"""Per-row sampling: greedy, temperature, top-k, top-p, seeded per request.

Randomness is counter-based: row b draws its uniform from ``hash(seed[b], position[b])``,
so a request's tokens depend only on its own seed and position, never on which other
requests share the batch or on how many draws they made (a per-batch torch.Generator
would couple them). The draw is inverse-CDF over the filtered distribution.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer on int64 tensors holding values in [0, 2**32)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def uniform(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """Uniform in (0, 1) per row from int64 ``seed[B]`` and ``counter[B]``; float64 ``[B]``."""
    lo, hi = seed & _M32, (seed >> 32) & _M32
    h = _fmix32(lo ^ _fmix32((counter & _M32) ^ 0x9E3779B9))
    h = _fmix32(h ^ _fmix32(hi + 0x7F4A7C15))
    h2 = _fmix32(h ^ 0x5BD1E995)
    bits = ((h >> 5) << 21) | (h2 >> 11)  # 27 + 21 = 48 random bits
    return (bits.double() + 0.5) / float(1 << 48)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           seed: torch.Tensor, counter: torch.Tensor, host: dict | None = None) -> torch.Tensor:
    """Next token per row. logits fp32 ``[B, V]``; temperature/top_p fp32 ``[B]``;
    top_k/seed/counter int64 ``[B]``. Rows with temperature 0 take the argmax.
    Returns int64 ``[B]``.

    ``host``: what the caller already knows on the host, to spare device syncs:
    {"sampled_rows": [indices of rows with temperature > 0], "filtered": any top-k/top-p
    among them, "kmax": the top-k to take (V when a row has no top-k)}.
    """
    greedy = logits.argmax(dim=-1)
    V = logits.shape[-1]
    if host is not None:
        if not host["sampled_rows"]:
            return greedy
        rows = torch.tensor(host["sampled_rows"], device=logits.device)
    else:
        do_sample = temperature > 0
        if not bool(do_sample.any()):
            return greedy
        rows = do_sample.nonzero().squeeze(1)
    scaled = logits[rows] / temperature[rows, None]
    k, p = top_k[rows], top_p[rows]
    u = uniform(seed[rows], counter[rows])
    filtered = host["filtered"] if host is not None else bool((k > 0).any()) or bool((p < 1).any())
    if filtered:
        if host is not None:
            kmax = host["kmax"]
        else:
            kmax = V if bool((k == 0).any()) else int(k.max())
        kmax = min(kmax, V)  # a top_k past the vocabulary keeps everything
        vals, idx = torch.topk(scaled, kmax, dim=-1)  # sorted, descending
        rank = torch.arange(kmax, device=logits.device)[None, :]
        in_k = rank < torch.where(k > 0, k, V)[:, None]
        # top-k first, renormalised (as HF's warpers chain), then top-p on that: keep the
        # smallest prefix whose mass reaches p (the first token always stays).
        probs = torch.softmax(vals.masked_fill(~in_k, float("-inf")), dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs
        probs = probs * (before < p[:, None])
    else:
        idx = None
        probs = torch.softmax(scaled, dim=-1)
    cdf = torch.cumsum(probs.double(), dim=-1)
    target = u * cdf[:, -1]
    choice = torch.searchsorted(cdf, target[:, None]).squeeze(1)
    # Never land on a zero-probability (filtered) entry through rounding at the top end.
    last_kept = (probs > 0).long().cumsum(-1).argmax(-1)
    choice = torch.minimum(choice, last_kept)
    tok = choice if idx is None else idx.gather(1, choice[:, None]).squeeze(1)
    out = greedy.clone()
    out[rows] = tok
    return out
