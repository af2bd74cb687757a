"""Per-row sampling: greedy, temperature, top-k, top-p, seeded per request.

The draws, all on one counter-based uniform: :func:`sample` (the eager step, any
parameters), :func:`sample_captured` (inside a captured decode step: biases, then greedy
or a plain seeded draw) and :func:`draw_probe` (a probe's token). Which one a step uses,
and the per-row biases and bans, are decided once per step by
``cotrt.engine.sampler.Sampler``.

Randomness is counter-based: row b draws its uniform from ``hash(seed[b], position[b])``,
so a request's tokens depend only on its own seed and position, never on which other
requests share the batch or on how many draws they made (a per-batch torch.Generator
would couple them). The draw is inverse-CDF over the filtered distribution.
"""
from __future__ import annotations

import math

import torch

_M32 = 0xFFFFFFFF
MAX_BIASES = 16  # logit-bias / banned-token entries a row may carry into a captured sampling
_PROBE_SALT = 0x5EED  # a probe's draws use another stream than its row's tokens


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
    among them, "kmax": the top-k to take for the rows that filter (V when one of them has
    no top-k)}.
    """
    B, V = logits.shape
    if host is not None:
        if not host["sampled_rows"]:
            return logits.argmax(dim=-1)
        if host["sampled_rows"] == list(range(B)):  # every row samples: no gathers, no argmax
            rows = None
        else:
            rows = torch.tensor(host["sampled_rows"], device=logits.device)
    else:
        do_sample = temperature > 0
        if not bool(do_sample.any()):
            return logits.argmax(dim=-1)
        rows = do_sample.nonzero().squeeze(1)
    pick = (lambda t: t) if rows is None else (lambda t: t[rows])
    scaled = pick(logits) / pick(temperature)[:, None]
    k, p = pick(top_k), pick(top_p)
    u = uniform(pick(seed), pick(counter))
    filtered = host["filtered"] if host is not None else bool((k > 0).any()) or bool((p < 1).any())
    # Every row draws in vocabulary order from its own softmax: drawing from sorted order
    # (as top-k/top-p need to pick their set) made a row's token depend on its neighbours
    # (a top-p neighbour sorted every row) and on logit noise that swaps near-equal tokens.
    probs = torch.softmax(scaled, dim=-1)
    if filtered:
        probs = _filter(scaled, probs, k, p, host["kmax"] if host is not None else None)
    tok = inverse_cdf(probs, u)
    if rows is None:
        return tok
    out = logits.argmax(dim=-1)
    out[rows] = tok
    return out


def _filter(scaled: torch.Tensor, probs: torch.Tensor, k: torch.Tensor, p: torch.Tensor,
            kmax: int | None) -> torch.Tensor:
    """``probs`` with the tokens outside each row's top-k, then top-p, set zero: top-k
    first, renormalised (as HF's warpers chain), then the smallest prefix whose mass
    reaches p (the first token always stays). Ties at the cut-off value are all kept.

    Only the rows that filter are sorted; the decision for a row is a prefix computation
    over its own sorted values (a sequential float64 cumsum), so it does not depend on
    how many values the batch's ``kmax`` made topk return.
    """
    V = scaled.shape[-1]
    sel = ((k > 0) | (p < 1)).nonzero().squeeze(1)
    ks, ps = k[sel], p[sel]
    if kmax is None:
        kmax = V if bool((ks == 0).any()) else int(ks.max())
    kmax = min(kmax, V)  # a top_k past the vocabulary keeps everything
    vals, _ = torch.topk(scaled[sel], kmax, dim=-1)  # sorted, descending
    rank = torch.arange(kmax, device=scaled.device)[None, :]
    kk = torch.where(ks > 0, ks.clamp(max=kmax), kmax)  # [S]: each row's top-k, V when off
    e = torch.exp((vals - vals[:, :1]).double()).masked_fill(rank >= kk[:, None], 0.0)
    mass = e.cumsum(-1)  # [S, kmax]
    total = mass.gather(1, (kk - 1)[:, None])
    keep_n = ((mass - e) < ps.double()[:, None] * total).logical_and(rank < kk[:, None]).sum(-1)  # >= 1
    cut = vals.gather(1, (keep_n - 1)[:, None])  # the smallest kept value
    out = probs.clone()
    out[sel] = probs[sel].masked_fill(scaled[sel] < cut, 0.0)
    return out


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative mass reaches ``u · total``: a draw from
    ``probs`` (``[R, V]``, non-negative, unnormalised is fine) with uniforms ``u`` ``[R]``.
    Never an entry of zero mass. Returns int64 ``[R]``.

    Two levels, so no row-long cumsum: float64 sums of blocks of the row, a cumsum over the
    blocks, then a cumsum inside the one block the target falls in. A row-long float64
    cumsum (and the float64 copy it needs) made sampling ~1 ms a row at V = 49152 on a
    2-core CPU, more than the forward of a small model's row.
    """
    R, V = probs.shape
    bs = math.gcd(V, 256)
    if bs < 32:  # an awkward V: pad the row to a multiple of 256 with zero mass
        bs = 256
        probs = torch.nn.functional.pad(probs, (0, (-V) % bs))
    blocks = probs.view(R, -1, bs)
    block_mass = blocks.sum(-1, dtype=torch.float64)  # [R, nb]
    block_cdf = block_mass.cumsum(-1)
    target = (u.double() * block_cdf[:, -1])[:, None]  # [R, 1]
    b = torch.searchsorted(block_cdf, target).clamp_(max=block_cdf.shape[1] - 1)  # [R, 1]
    inside = blocks.gather(1, b[:, :, None].expand(R, 1, bs))[:, 0].double()  # [R, bs]
    before = block_cdf.gather(1, b) - block_mass.gather(1, b)
    j = torch.searchsorted(before + inside.cumsum(-1), target).clamp_(max=bs - 1)  # [R, 1]
    # The block's sum and its cumsum round differently: a target in that sliver would
    # land past the block's last entry of mass; take that entry instead.
    last = torch.where(inside > 0, torch.arange(bs, device=probs.device), -1).amax(-1, keepdim=True)
    j = torch.where(inside.gather(1, j) > 0, j, last.clamp(min=0))
    return (b * bs + j).squeeze(1)


def sample_static(logits: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor,
                  counter: torch.Tensor) -> torch.Tensor:
    """:func:`sample` for rows with no top-k / top-p, in fixed shapes with no host values
    (it runs inside a captured decode step): rows with temperature 0 take the argmax, the
    others draw from ``softmax(logits / t)``. A row gets the token :func:`sample` gives it.
    Returns int64 ``[B]``."""
    hot = temperature > 0
    t = torch.where(hot, temperature, 1.0)
    drawn = inverse_cdf(torch.softmax(logits / t[:, None], dim=-1), uniform(seed, counter))
    return torch.where(hot, drawn, logits.argmax(dim=-1))


def sample_captured(logits: torch.Tensor, mode: str, ints: torch.Tensor, floats: torch.Tensor) -> torch.Tensor:
    """The sampling of a captured decode step, from fixed-shape device buffers only:
    ``ints`` int64 ``[B, 2 + MAX_BIASES]`` (seed, counter, bias token ids...), ``floats``
    fp32 ``[B, 1 + MAX_BIASES]`` (temperature, bias values...; -inf bans). Adds the biases to
    ``logits`` (fp32 ``[B, V]``, in place), then takes the argmax (``mode="greedy"``) or
    :func:`sample_static`'s draw (``"plain"``). Returns int64 ``[B]``."""
    logits.scatter_add_(1, ints[:, 2:], floats[:, 1:])  # unused entries add 0.0 to logit 0
    if mode == "greedy":
        return logits.argmax(dim=-1)
    return sample_static(logits, floats[:, 0], ints[:, 0], ints[:, 1])


def draw_probe(logits: torch.Tensor, temperature: float, seed: int, counter: int) -> int:
    """A probe's next token from its logits ``[V]`` (fp32): the argmax, or a draw from
    ``softmax(logits / temperature)`` with the uniform of (``seed`` salted, ``counter``), so
    the probe never consumes its row's random stream. A float64 cumsum over the row: one
    row a step, and probes' recorded tokens stay what they were."""
    probs = torch.softmax(logits / temperature if temperature > 0 else logits, -1)
    if temperature <= 0:
        return int(probs.argmax())
    u = float(uniform(torch.tensor([seed ^ _PROBE_SALT]), torch.tensor([counter])))
    return int(torch.searchsorted(torch.cumsum(probs.double(), -1), torch.tensor([u])).clamp_max(probs.numel() - 1))
