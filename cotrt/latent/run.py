"""A request's latent (contemplation) phase, as the engine runs it.

Each latent step occupies one KV position, like a token, but its input is a fed-back state
instead of a token embedding: the row's sequence holds a placeholder id there
(``<|latent|>``, never embedded), and ``pending`` holds the input vector the next
forward uses. No LM head, no sampling. The phase ends after k steps (Coconut) or when the
END head fires or the cap is reached (CCoT); then the end token is forced and the row
decodes tokens, under ``valve_after`` if the spec switches valves.

Every input vector is kept by position (``inputs``): a preempted request's recompute feeds
them again where its sequence holds placeholders, so its cache is rebuilt exactly.
"""
from __future__ import annotations

import torch

from ..ops.contemplate import contemplate


class LatentRun:
    def __init__(self, bound):
        self.bound = bound
        self.active = True
        self.steps = 0
        self.pending: torch.Tensor | None = None  # [E] input embedding of the last placeholder
        self.fed_back: list[torch.Tensor] = []  # the vectors fed back, in order (tests, stats)
        self.inputs: dict[int, torch.Tensor] = {}  # position -> input vector of its placeholder
        self.refeed = False  # ended before any thought, no end token: the prompt's last token again

    @property
    def refeeding(self) -> bool:
        """The row's next forward feeds its last input again (a thought, or the prompt's
        last token) under the latent phase's valve, and samples the first answer token."""
        return self.pending is not None or self.refeed

    @property
    def tap(self) -> int | None:
        return self.bound.layer if self.active else None

    def step(self, row, final: torch.Tensor, tapped: torch.Tensor | None, embed_weight: torch.Tensor) -> None:
        """After a forward whose last position of this row produced ``final`` (final-norm
        state ``[H]``) and ``tapped`` (layer-l residual ``[H]`` or None): take one more latent
        step, or end the phase."""
        b = self.bound
        done = self.steps >= b.max_steps
        if not done and b.end_head is not None:
            done = bool(b.end_head(final[None])[0])
        if done:
            self.active = False
            self.pending = None
            if b.end_id is None:
                # No end token to feed: the first answer token comes from the forward of the
                # last thought. The row feeds that thought once more (its KV slot rewritten
                # with the same values, under the same valve) and samples from it; the valve
                # switches after that forward (``refed``). Ended before any thought (an END
                # head that fires on the prompt), the last input is the prompt's last token,
                # which the row feeds again as it appended nothing.
                if row.cache_len in self.inputs:
                    self.pending = self.inputs[row.cache_len]
                else:
                    self.refeed = True
                return
            self._switch_valve(row)
            if b.end_id is not None:
                row.uncounted += 1  # part of the latent phase, like Coconut's prompt-side end token
                row.forced.append(b.end_id)
                row.accept(row.forced.popleft(), forced=True)
            return
        state = final if b.layer is None else tapped
        x = contemplate(torch.zeros(1, dtype=torch.long, device=state.device),
                        torch.ones(1, dtype=torch.bool, device=state.device), state[None].to(embed_weight.dtype),
                        embed_weight, **b.contemplate_kwargs())[0]
        self.pending = x
        self.fed_back.append(state.detach().float().clone())
        self.steps += 1
        row.accept_latent(b.latent_id if b.latent_id is not None else 0)
        self.inputs[row.cache_len] = x  # the placeholder's position

    def refed(self, row) -> None:
        """After the forward that fed the last thought again (a phase without an end
        token): the row decodes tokens from now on."""
        self.pending = None
        self.refeed = False
        self._switch_valve(row)

    def _switch_valve(self, row) -> None:
        b = self.bound
        if b.valve_after is not None:
            row.set_valve(dict(b.valve_after))
        elif b.valve_during is not None:
            row.set_valve({})

    def forget_from(self, position: int) -> None:
        """Drop the inputs at ``position`` and after (the row rolled back past them)."""
        for p in [p for p in self.inputs if p >= position]:
            del self.inputs[p]

    def inputs_in(self, start: int, n: int) -> list[tuple[int, torch.Tensor]]:
        """``(offset, vector)`` for the placeholders at positions ``[start, start + n)``."""
        return [(p - start, x) for p, x in self.inputs.items() if start <= p < start + n]
