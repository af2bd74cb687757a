"""``StepBatch``: the rows of one forward and everything the forward and the sampler read.

Built once per forward (the step's decode forward, each padded prefill group): each row's
feed and start position, its role this step (probing, latent, sampling: decided before the
forward, and no row changes until its own controls run after it), the decoder layers to
tap, the input tensors (padded token ids, latent inputs), the rows each valve slot serves,
and the sampling rows' draws (asked of the sampler once, on first use).
"""
from __future__ import annotations

import torch

from ..control.request import Request


class StepBatch:
    def __init__(self, rows: list[Request], plans: dict, sampler):
        self.rows = rows
        self.feeds = [plans[r.id][0] for r in rows]  # tokens each row feeds
        self.starts = [plans[r.id][1] for r in rows]  # cache position of each row's first fed token
        self.tables = [r.pages for r in rows]  # block tables
        # Roles: rows that probe, that take a latent step, that sample (the others force a
        # token or are done).
        self.probing = [i for i, r in enumerate(rows) if r.exits is not None and r.exits.probe is not None]
        self.latent = [i for i, r in enumerate(rows) if r.latent is not None and r.latent.active and not r.finished]
        skip = set(self.probing) | set(self.latent)
        self.sampling = [i for i, r in enumerate(rows) if i not in skip and not r.forced and not r.finished]
        # Decoder layers whose residual some latent row feeds back this step.
        self.taps = tuple(sorted({r.latent.tap for r in rows if r.latent is not None and r.latent.tap is not None}))
        # Rows whose next input is a fed-back state instead of a token.
        self.latent_inputs_needed = any(r.latent is not None and r.latent.pending is not None for r in rows)
        self._sampler = sampler
        self._draws = None

    @property
    def draws(self) -> list:
        """The sampling rows' draws (``Sampler.draws``): biases and bans asked once."""
        if self._draws is None:
            self._draws = self._sampler.draws([self.rows[i] for i in self.sampling])
        return self._draws

    @property
    def tokens(self) -> list[int]:
        """Each row's one input token (decode batches)."""
        return [f[0] for f in self.feeds]

    def padded_ids(self) -> torch.Tensor:
        """``[R, T]`` int64 feeds, right-padded with 0 (multi-token forwards)."""
        T = max(map(len, self.feeds))
        ids = torch.zeros(len(self.rows), T, dtype=torch.long)
        for i, f in enumerate(self.feeds):
            ids[i, : len(f)] = torch.tensor(f)
        return ids

    def latent_inputs(self, tokens: torch.Tensor, embed_weight: torch.Tensor) -> torch.Tensor:
        """``[R, E]`` next inputs of the rows: fed-back vectors on latent rows, E[tok] on
        the others (one pass of the contemplate op)."""
        from ..ops.contemplate import contemplate

        emb = embed_weight
        n = len(self.rows)
        states = torch.zeros(n, emb.shape[1], dtype=emb.dtype, device=emb.device)
        mask = torch.zeros(n, dtype=torch.bool, device=emb.device)
        for i, r in enumerate(self.rows):
            if r.latent is not None and r.latent.pending is not None:
                states[i] = r.latent.pending
                mask[i] = True
        return contemplate(tokens.to(emb.device), mask, states, emb)

    def recomputed_latents(self, ids: torch.Tensor, embed) -> torch.Tensor | None:
        """``[R, T, E]`` inputs of a multi-token forward (``ids``: its padded feeds) in which a
        resumed request recomputes latent steps: the vector each step fed, where its
        placeholders are, token embeddings elsewhere. None when no row has any."""
        found = [(i, r.latent.inputs_in(s, len(f))) for i, (r, s, f) in
                 enumerate(zip(self.rows, self.starts, self.feeds)) if r.latent is not None and r.latent.inputs]
        found = [(i, xs) for i, xs in found if xs]
        if not found:
            return None
        embeds = embed(ids)
        for i, xs in found:
            for t, x in xs:
                embeds[i, t] = x.to(embeds.dtype)
        return embeds


def _valve_slot(valves, valve: dict | None) -> tuple[float, int]:
    """(alpha, adapter index) of one ``{"name": alpha}`` valve (None or {}: the base model);
    alpha 0 is the base model exactly, adapter -1: no delta to compute."""
    (name, alpha), = valve.items() if valve else ((None, 0.0),)
    return (float(alpha), valves.index(name)) if alpha != 0.0 else (0.0, -1)


def _apply(valves, alphas: list, adapters: list, tokens_per_row: int) -> bool:
    if all(a < 0 for a in adapters):
        valves.state.clear()
        return False
    valves.state.set_rows(alphas, adapters, tokens_per_row)
    return True


def set_token_valves(valves, rows, starts, lengths, tokens_per_row: int) -> bool:
    """Per-token valves of a multi-token forward in which rows recompute positions written
    under several valves: each row's ``valve_runs`` over its ``lengths[i]`` tokens from
    ``starts[i]``, right-padded (base model) to ``tokens_per_row``. True when a valve is on."""
    if valves is None:
        return False
    alphas, adapters = [], []
    for r, start, n in zip(rows, starts, lengths):
        for count, valve in r.valve_runs(start, n):
            alpha, adapter = _valve_slot(valves, valve)
            alphas += [alpha] * count
            adapters += [adapter] * count
        alphas += [0.0] * (tokens_per_row - n)
        adapters += [-1] * (tokens_per_row - n)
    return _apply(valves, alphas, adapters, 1)  # one "row" per token


def set_valves(valves, rows, tokens_per_row: int) -> bool:
    """Per-token valve alpha and adapter index for a forward of ``rows`` (None: padding) in
    ``valves`` (a ValveSet, or None when none is loaded). With no valve in use the
    ValveLinears run plain F.linear. True when a valve is on."""
    if valves is None:
        return False
    slots = [_valve_slot(valves, r.valve if r is not None else None) for r in rows]
    return _apply(valves, [a for a, _ in slots], [i for _, i in slots], tokens_per_row)
