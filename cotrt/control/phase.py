"""A request's phase: before thinking, inside it, after it (or a latent step).

Written once for the two places that track it token by token, the engine's requests
(``cotrt/control/request.py``) and the HF processors' rows (``cotrt/hf.py``). Both run
the token automaton over the tokens; the bits of the think markers in its ``emit`` table
decide the transitions, so a marker split over several tokens changes the phase where its
last byte lands.
"""
from __future__ import annotations

PRE, THINK, ANSWER, LATENT = 0, 1, 2, 3
PHASE_NAMES = ("pre", "think", "answer", "latent")


def prompt_phase(ids, next_table, emit_table, start_bit: int, end_bit: int, plain: bool) -> int:
    """The phase a prompt leaves open: a template may pre-open thinking, earlier turns may
    hold closed markers; the last marker seen decides. A plain format (no markers) thinks
    from the start. ``next_table`` / ``emit_table``: the automaton's ``[states, vocab]``
    tables (ids past the vocabulary are skipped)."""
    if plain:
        return THINK
    phase, state = PRE, 0
    width = next_table.shape[1]
    for t in ids:
        if t >= width:
            continue
        e = int(emit_table[state, t])
        state = int(next_table[state, t])
        if e & start_bit:
            phase = THINK
        if e & end_bit:
            phase = PRE  # closed (in an earlier turn): this turn starts outside thinking
    return phase


def opens_thinking(phase: int, emit: int, start_bit: int) -> bool:
    """Whether a token with automaton output ``emit`` starts thinking."""
    return phase == PRE and bool(start_bit) and bool(emit & start_bit)


def closes_thinking(phase: int, emit: int, end_bit: int) -> bool:
    """Whether a token with automaton output ``emit`` ends thinking."""
    return phase == THINK and bool(emit & end_bit)
