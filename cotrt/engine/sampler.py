"""Sampling: the engine's one sampler and the draws it makes.

Per-row sampling, greedy, temperature, top-k, top-p, seeded per request. Randomness is
counter-based: row b draws its uniform from ``hash(seed[b], position[b])``, so a request's
tokens depend only on its own seed and position, never on which other requests share the
batch or on how many draws they made (a per-batch torch.Generator would couple them). The
draw is inverse-CDF over the filtered distribution.

``Sampler`` decides each sampling row's draw once per forward: its temperature, top-k,
top-p, seed and counter, and its logit biases plus banned tokens (its controls' and its
policies' bans, asked once and checked). The same draws serve both ways a step samples:

- inside a captured decode step (:meth:`Sampler.captured`): the ``(mode, spec)`` that
  ``DecodeGraphs.run`` (engine/graph.py) packs into its buffers for
  :func:`sample_captured`, when every row allows it (no top-k / top-p, at most
  ``MAX_BIASES`` biases and bans);
- after an eager forward, or a captured step that could not sample
  (:meth:`Sampler.sample`): the biases applied to the logits, then the argmax or
  :func:`sample`.

A probe's token is :func:`draw_probe` (cotrt/control/exits.py), on the same uniform with
its own stream.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..control.request import Request


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


# -- the engine's sampler ----------------------------------------------------------------
@dataclass
class Draw:
    """One sampling row's draw this step."""

    temperature: float
    top_k: int
    top_p: float
    seed: int
    counter: int  # the row's position: its tokens so far
    bias: dict  # token id -> added logit (Params.logit_bias)
    banned: list | None  # token ids set to -inf; None: a policy failed, the row has ended

    @property
    def biases(self) -> list:
        """``[(token id, added logit), ...]``, bans as -inf."""
        return list(self.bias.items()) + [(t, float("-inf")) for t in self.banned or ()]


class Sampler:
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def draws(self, reqs: list[Request]) -> list[Draw]:
        """The draws of ``reqs`` (the rows that sample this forward), bans asked now."""
        out = []
        for r in reqs:
            p = r.params
            out.append(Draw(float(p.temperature), p.top_k, p.top_p, p.seed, r.seq_len, p.logit_bias,
                            self._banned(r)))
        return out

    def _banned(self, req: Request) -> list[int] | None:
        """The request's banned token ids now (its controls' and its policies'), checked;
        None when a policy failed or named a bad id: the request then ends with an error
        alone."""
        V = self.vocab_size

        def get():
            banned = req.banned_tokens() + (req.exits.banned(req) if req.exits is not None else [])
            for t in banned:  # numpy ints pass (operator.index); floats, bools and strings do not
                if isinstance(t, bool) or not hasattr(t, "__index__") or not 0 <= t < V:
                    raise ValueError(f"banned_tokens: {t!r} is not a token id in [0, {V})")
            return banned

        out: list = []
        req.guard(lambda: out.append(get()))
        return out[0] if out else None

    @staticmethod
    def captured(n: int, sampling: list[int], draws: list[Draw]):
        """``(mode, spec)`` for sampling inside a captured step of ``n`` rows, of which the
        rows ``sampling`` sample with ``draws``: "greedy" when every draw is greedy, "plain"
        when none uses top-k / top-p, and per row ``(temperature, seed, counter, biases)``
        (placeholders for the other rows and for rows that ended); ``(None, None)`` when a
        draw needs the eager sampler (top-k, top-p, more than MAX_BIASES biases and bans)."""
        spec = [(0.0, 0, 0, ())] * n
        mode = "greedy"
        for i, d in zip(sampling, draws):
            if d.banned is None:  # its policy failed: the row has ended; a placeholder spec
                continue
            biases = d.biases
            if len(biases) > MAX_BIASES:
                return None, None
            if d.temperature > 0:
                if d.top_k > 0 or d.top_p < 1:
                    return None, None
                mode = "plain"
            spec[i] = (d.temperature, d.seed, d.counter, biases)
        return mode, spec

    @staticmethod
    def sample(logits: torch.Tensor, draws: list[Draw]) -> list[int]:
        """Tokens for ``logits`` fp32 ``[R, V]``, one row a draw. Biases and bans are applied
        in place (a captured step's output buffer may be passed: the next replay rewrites
        it). Reading the tokens is the step's one host sync."""
        for i, d in enumerate(draws):
            if d.banned is None:  # the row ended: its token is dropped
                continue
            if d.bias:
                ids = list(d.bias)
                logits[i, ids] += torch.tensor([d.bias[k] for k in ids], device=logits.device)
            if d.banned:
                logits[i, d.banned] = float("-inf")
        hot = [j for j, d in enumerate(draws) if d.temperature > 0]
        if not hot:  # all greedy
            return logits.argmax(dim=-1).tolist()
        filt = [j for j in hot if draws[j].top_k > 0 or draws[j].top_p < 1]  # only these are sorted
        host = {"sampled_rows": hot, "filtered": bool(filt),
                "kmax": logits.shape[-1] if any(draws[j].top_k == 0 for j in filt) else
                max((draws[j].top_k for j in filt), default=1)}
        # Per-row parameters in two host-to-device copies, not five.
        ints = torch.tensor([[d.top_k for d in draws], [d.seed for d in draws], [d.counter for d in draws]],
                            dtype=torch.long).to(logits.device)
        floats = torch.tensor([[d.temperature for d in draws], [d.top_p for d in draws]],
                              dtype=torch.float32).to(logits.device)
        return sample(logits, temperature=floats[0], top_p=floats[1], top_k=ints[0], seed=ints[1],
                      counter=ints[2], host=host).tolist()
