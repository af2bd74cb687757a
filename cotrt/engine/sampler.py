"""The engine's one sampler: each sampling row's draw, decided once per forward.

A row's draw is its temperature, top-k, top-p, seed and counter, and its logit biases plus
banned tokens (its controls' and its policies' bans, asked once per forward and checked).
The same draws serve both ways a step samples:

- inside a captured decode step (:meth:`Sampler.captured`): the ``(mode, spec)`` that
  ``DecodeGraphs.run`` packs into its buffers for ``sampling.sample_captured``, when every
  row allows it (no top-k / top-p, at most ``MAX_BIASES`` biases and bans);
- after an eager forward, or a captured step that could not sample (:meth:`Sampler.sample`):
  the biases applied to the logits, then the argmax or ``sampling.sample``.

A probe's token is drawn by ``sampling.draw_probe`` (cotrt/control/exits.py) on the same
counter-based uniform, with its own stream. A row's token depends only on its own draw and
position, whichever way the step took.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..control.request import Request
from ..sampling import MAX_BIASES, sample


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
