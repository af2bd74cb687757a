"""One request's state: phases, budgets, step boundaries, stops, rollback.

The engine feeds every token a request appends (sampled or forced) through
``Request.accept``.
Marker, cue and stop detection is the token automaton (csrc/): one table lookup per
token, on bytes, so markers split over several tokens, or sharing a token with other
text, are seen exactly where their last byte lands.

Invariant kept with the engine: the KV cache holds ``len(seq) - 1`` tokens (in the pages of
``Request.pages``); the last token of ``seq`` is the next input. Rolling a row back is
truncating ``gen``; the engine reads the new length from ``cache_len`` and frees the
pages past it.
"""
from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from .phase import ANSWER, LATENT, PHASE_NAMES, PRE, THINK, closes_thinking, opens_thinking, prompt_phase

if TYPE_CHECKING:
    from .exits import ExitControl
    from ..latent.run import LatentRun

__all__ = ["Request", "RowPatterns", "incomplete_utf8_tail", "PRE", "THINK", "ANSWER", "LATENT", "PHASE_NAMES"]


def incomplete_utf8_tail(buf: bytes) -> int:
    """Number of trailing bytes of ``buf`` that start a UTF-8 character not yet complete."""
    for back in range(1, min(4, len(buf)) + 1):
        b = buf[-back]
        if b & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
        return back if need > back else 0
    return 0


class RowPatterns:
    """The compiled automaton of one request and the bit of each pattern kind."""

    def __init__(self, automaton, fmt, stop: tuple, cues: tuple):
        self.automaton = automaton
        self.next = automaton.host_next  # numpy, or computed per entry when lazy
        self.emit = automaton.host_emit
        self.depth = automaton.depth.numpy()
        pats = automaton.patterns
        enc = lambda s: s.encode("utf-8")
        self.end_bytes = enc(fmt.end)
        self.end_bit = automaton.bit(fmt.end)
        self.start_bit = automaton.bit(fmt.start) if fmt.start else 0
        self.cue_bits = 0
        for c in cues:
            self.cue_bits |= automaton.bit(c)
        self.stop_bits = 0
        for s in stop:
            self.stop_bits |= automaton.bit(s)
        self.stop_bytes = [(automaton.bit(s), enc(s)) for s in stop]
        self.patterns = pats

    @staticmethod
    def pattern_list(fmt, stop: tuple, cues: tuple) -> tuple:
        seen, out = set(), []
        for p in ((fmt.end,) + ((fmt.start,) if fmt.start else ()) + tuple(cues) + tuple(stop)):
            if p not in seen:
                seen.add(p)
                out.append(p)
        return tuple(out)


@dataclass(eq=False, repr=False)
class Request:
    """Host-side state of one request, from ``Engine.add`` until its output is built.

    Every field is declared here: the controls' state, what the engine attaches (exit
    policies, latent phase, valve check), the timing it records and the streaming offsets
    ``cotrt/output.py`` keeps. The first nine are the constructor's arguments, in order.
    """

    id: int
    prompt: list
    params: object  # cotrt.Params
    fmt: object  # cotrt.control.think.ThinkFormat
    pats: RowPatterns
    vocab_bytes: list = field(repr=False)
    eos_ids: frozenset = frozenset()
    encode: Callable[[str], list] | None = None  # str -> token ids, no special tokens added
    max_len: int = 0
    # -- the request's attachments (set by the engine at add) ---------------------------------
    exits: ExitControl | None = None  # its early-exit policies and probe in flight
    latent: LatentRun | None = None  # its latent (contemplation) phase
    valve_check: Callable[[dict], None] | None = None  # validates a valve a policy sets
    valve: dict = field(default_factory=dict)  # {"name": alpha} or {} (the base model)
    # -- the sequence -------------------------------------------------------------------------
    slot: int = -1  # batch lane while running, -1 waiting or done
    pages: list = field(default_factory=list)  # block table: the KV pages of its positions, in order
    cached: int = 0  # prompt tokens its last admission found in the prefix cache
    depends: set = field(default_factory=set)  # shared pages computed by this step's forward of another
    preemptions: int = 0  # times its pages were taken back (it was requeued, then recomputed)
    resumed: bool = False  # preempted, and its recompute has not run yet
    # (first position, valve) runs: the valve each written position was computed under, so
    # a preempted request recomputes every position as it was (valves change mid-request:
    # set_valve, a policy's Switch, a latent phase's valve_during / valve_after).
    valve_log: list = field(default_factory=list)
    group: object = None  # the cotrt.control.consistency.Vote of its samples, if they vote
    gen: list = field(default_factory=list)
    gen_phase: list = field(default_factory=list)
    phase_counts: list = field(default_factory=lambda: [0] * len(PHASE_NAMES))
    gen_forced: list = field(default_factory=list)
    states: list = field(default_factory=list)  # automaton state after each generated token
    byte_ends: list = field(default_factory=list)
    gen_bytes: bytearray = field(default_factory=bytearray)
    forced: deque = field(default_factory=deque)  # tokens to force, head next
    # -- control state --------------------------------------------------------------------------
    state0: int = 0  # matching restarts at a clean state: cues and stops in the prompt do not count
    phase0: int = PRE  # the phase the prompt leaves open (set from the prompt)
    phase: int = PRE
    closing: str | None = None  # why the forced end of thinking is underway
    finished: str | None = None  # exit reason once done
    finish_reason: str | None = None  # OpenAI-style: stop / length / abort / error
    error: str | None = None
    think_end: str | None = None
    steps: int = 0
    waits: int = 0
    rolled_back: int = 0
    soft_passed_at: int | None = None
    step_end: int = 0  # generated tokens up to the last step boundary while thinking (or thinking's start)
    think_sampled: int = 0
    finish_after_forced: bool = False
    last_cue: str | None = None
    # Latent steps and the forced end-latent token: max_new_tokens does not count them
    # (Coconut's generate counts answer tokens only: N=16, k=6 gives 16, not 9).
    uncounted: int = 0
    latent_steps: int = 0
    end_ids: list | None = None  # the end marker's token ids, encoded on first use
    # -- streaming offsets (cotrt/output.py) ------------------------------------------------------
    emitted: int = 0  # tokens handed out in events
    stream_prefix: int = 0  # incremental detokenization window
    stream_read: int = 0
    streamed_text: str = ""  # the text handed out in events
    # -- timing (time.perf_counter) ---------------------------------------------------------------
    t_add: float = field(default_factory=time.perf_counter)
    t_first: float | None = None  # after its prompt's forward
    t_done: float | None = None  # when its slot was released

    def __post_init__(self):
        self.prompt = list(self.prompt)
        self.valve = dict(self.valve or self.params.valve or {})
        pats = self.pats
        self.phase0 = self.phase = prompt_phase(self.prompt, pats.next, pats.emit, pats.start_bit, pats.end_bit,
                                                self.fmt.plain)

    def __repr__(self) -> str:
        return (f"Request(id={self.id}, slot={self.slot}, pages={len(self.pages)}, prompt={len(self.prompt)} tokens, "
                f"gen={len(self.gen)} tokens, phase={PHASE_NAMES[self.phase]}, finished={self.finished!r})")

    # -- accounting --------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return len(self.prompt) + len(self.gen)

    @property
    def cache_len(self) -> int:
        return self.seq_len - 1

    @property
    def next_input(self) -> int:
        return self.gen[-1] if self.gen else self.prompt[-1]

    @property
    def state(self) -> int:
        return self.states[-1] if self.states else self.state0

    def count(self, phase: int) -> int:
        """Generated tokens in ``phase`` (kept incrementally: the answer budget asks every token)."""
        return self.phase_counts[phase]

    def _push_phase(self, phase: int) -> None:
        self.gen_phase.append(phase)
        self.phase_counts[phase] += 1

    def holdback(self) -> int:
        """Tokens at the end of ``gen`` not safe to stream yet: they hold the start of a
        marker, cue or stop string still being matched, or an incomplete UTF-8 character;
        under a step-cut think budget, the step being written (the budget may take it back)."""
        if self.finished:
            return 0
        p = self.params
        step = (len(self.gen) - self.step_end
                if self.phase == THINK and p.think_budget is not None and p.think_budget_cut == "step" else 0)
        tail = max(int(self.pats.depth[self.state]), incomplete_utf8_tail(self.gen_bytes))
        if tail == 0:
            return step
        first_byte = len(self.gen_bytes) - tail
        j = bisect.bisect_right(self.byte_ends, first_byte)
        return max(step, len(self.gen) - j)

    # -- the control logic -------------------------------------------------------------------
    def banned_tokens(self) -> list[int]:
        """Token ids this row must not sample now: a single-token end marker once thinking
        is over (a model that emits a second end marker after a forced one)."""
        if self.phase == ANSWER and not self.fmt.plain and self._end_single is not None:
            return [self._end_single]
        return []

    @property
    def _end_single(self):
        if self.end_ids is None:
            self.end_ids = self.encode(self.fmt.end)
        return self.end_ids[0] if len(self.end_ids) == 1 else None

    def accept(self, tok: int, forced: bool) -> None:
        """Append one token and apply every control that it triggers."""
        p = self.params
        pats = self.pats
        state = self.state
        if tok < pats.next.shape[1]:
            emit = int(pats.emit[state, tok])
            self.states.append(int(pats.next[state, tok]))
        else:  # padded model vocabulary beyond the tokenizer: no text, no match
            emit = 0
            self.states.append(state)
        self.gen.append(tok)
        self.gen_forced.append(forced)
        self.gen_bytes += self.vocab_bytes[tok] if tok < len(self.vocab_bytes) else b""
        self.byte_ends.append(len(self.gen_bytes))
        phase = self.phase
        if opens_thinking(phase, emit, pats.start_bit):
            phase = self.phase = THINK
            self.step_end = len(self.gen)
        # The forced end-latent token closes the latent phase: neither think nor answer.
        self._push_phase(LATENT if len(self.gen) <= self.uncounted else ANSWER if phase == PRE else phase)
        if phase == THINK and not forced:
            self.think_sampled += 1

        if emit & pats.stop_bits:
            return self.finish("stop_string", "stop")
        if tok in self.eos_ids and not p.ignore_eos:
            return self.finish("eos", "stop")
        self.last_cue = None
        if closes_thinking(phase, emit, pats.end_bit):
            if self._extend_thinking(forced):
                return
            self.phase = ANSWER
            self.think_end = self.closing or "natural"
            self.closing = None
        elif phase == THINK:
            if emit & pats.cue_bits:
                self.steps += 1
                self.step_end = len(self.gen)
                self.last_cue = pats.patterns[(emit & pats.cue_bits).bit_length() - 1].decode("utf-8", "replace")
            self._check_think_limits(emit)
        if forced and self.finish_after_forced and not self.forced:
            return self.finish("exit_finish", "stop")
        elif self.phase == ANSWER and p.answer_budget is not None and self.count(ANSWER) >= p.answer_budget:
            return self.finish("answer_budget", "length")
        if len(self.gen) - self.uncounted >= p.max_new_tokens:
            return self.finish("max_new_tokens", "length")
        if self.seq_len >= self.max_len:
            return self.finish("max_len", "length")

    def start(self) -> None:
        """At first admission: the prompt is computed under the valve it has now; apply
        limits that bite before the first token (a budget of 0)."""
        self.valve_log = [(0, dict(self.valve))]
        if self.phase == THINK:
            self._check_think_limits(0)

    def _check_think_limits(self, emit: int) -> None:
        p = self.params
        if self.closing or self.forced:
            return
        at_boundary = bool(emit & self.pats.cue_bits)
        if p.max_steps is not None and self.steps >= p.max_steps and (at_boundary or p.max_steps == 0):
            return self._force_end("max_steps")
        if p.think_budget is not None and self.think_sampled >= p.think_budget:
            if p.think_budget_cut == "step":
                self.truncate(self.step_end)  # the unfinished step goes
            return self._force_end("think_budget")
        if p.soft_budget is not None and self.think_sampled >= p.soft_budget:
            if self.soft_passed_at is None:
                self.soft_passed_at = self.think_sampled
            if at_boundary:
                return self._force_end("soft_budget")
            if self.think_sampled >= self.soft_passed_at + p.soft_grace:
                return self._force_end("soft_budget_grace")

    def exit_thinking(self, reason: str, inject: str = "", finish: bool = False, lead: str = "") -> None:
        """A policy's exit: force ``lead``, the end marker, then ``inject``; with ``finish``
        the request ends once that text is out."""
        if self.phase != THINK or self.closing or self.finished:
            return
        self._force_end(reason, (lead or "") + self.fmt.end + (inject or ""))
        self.finish_after_forced = finish

    def set_valve(self, valve: dict) -> None:
        """Replace this request's valve ({"name": alpha}, or {} for none) from the next
        token on; validated by the engine's check."""
        if self.valve_check is not None:
            self.valve_check(valve)
        self.valve = dict(valve)

    def _force_end(self, reason: str, text: str | None = None) -> None:
        """Force the end of thinking: [transition] + end marker (or ``text``), never
        inside a character."""
        self.closing = reason
        prefix = b""
        cut = incomplete_utf8_tail(self.gen_bytes)
        if cut:
            # The last token(s) stop mid-character: take them back and re-emit the
            # complete part, so the marker never splits a multi-byte character.
            first_byte = len(self.gen_bytes) - cut
            j = bisect.bisect_right(self.byte_ends, first_byte)
            start = self.byte_ends[j - 1] if j > 0 else 0
            prefix = bytes(self.gen_bytes[start:first_byte])
            self.truncate(j)
        if text is None:
            text = (self.fmt.transition or "") + self.fmt.end
        self.forced.extend(self.encode(prefix.decode("utf-8", "ignore") + text))

    def _extend_thinking(self, forced: bool) -> bool:
        """min_think (s1): an end marker before ``min_think`` thinking tokens is taken back
        and ``wait_text`` appended instead, at most ``max_waits`` times."""
        p = self.params
        if forced or p.min_think is None or self.waits >= p.max_waits:
            return False
        if self.think_sampled >= p.min_think:
            return False
        end = self.pats.end_bytes
        prev_end = self.byte_ends[-2] if len(self.byte_ends) > 1 else 0
        m = self.gen_bytes.find(end, max(0, prev_end - len(end) + 1))
        if m < 0:  # the marker began in the prompt: nothing of ours to take back
            return False
        j = bisect.bisect_right(self.byte_ends, m)
        start = self.byte_ends[j - 1] if j > 0 else 0
        prefix = bytes(self.gen_bytes[start:m])
        self.truncate(j)
        self.waits += 1
        self.forced.extend(self.encode(prefix.decode("utf-8", "ignore") + p.wait_text))
        return True

    def accept_latent(self, placeholder: int) -> None:
        """Append a latent step: a KV position whose input is a fed-back state. The
        placeholder id is never embedded or matched; it keeps positions and lengths."""
        self.states.append(self.state)
        self.gen.append(placeholder)
        self.gen_forced.append(True)
        self.byte_ends.append(len(self.gen_bytes))
        self._push_phase(LATENT)
        self.uncounted += 1
        self.latent_steps += 1
        self.step_end = len(self.gen)  # a latent step is whole: a step-cut budget keeps it
        if self.seq_len >= self.max_len:
            return self.finish("max_len", "length")

    # -- valves by position ------------------------------------------------------------------
    def note_valve(self, start: int) -> None:
        """A forward writes this request's positions from ``start`` on under its current
        valve (positions from ``start`` that were written before are being rewritten)."""
        log = self.valve_log
        while log and log[-1][0] >= start:
            log.pop()
        if not log or log[-1][1] != self.valve:
            log.append((start, dict(self.valve)))

    def valve_runs(self, start: int, n: int) -> list[tuple[int, dict]]:
        """``(count, valve)`` runs covering positions ``[start, start + n)`` as the log
        records them."""
        log, runs, end = self.valve_log, [], start + n
        for j, (p, valve) in enumerate(log):
            q = log[j + 1][0] if j + 1 < len(log) else end
            lo, hi = max(p, start), min(q, end)
            if hi > lo:
                runs.append((hi - lo, valve))
        return runs

    @property
    def prompt_valve(self) -> dict:
        """The valve its prompt's KV is computed under (the prefix cache's salt)."""
        return self.valve_log[0][1] if self.valve_log else self.valve

    def truncate(self, n: int) -> None:
        """Roll back to the first ``n`` generated tokens (the engine sets the slot length)."""
        k = len(self.gen) - n
        if k <= 0:
            return
        if self.latent is not None:
            self.latent.forget_from(len(self.prompt) + n)
        self.rolled_back += k
        self.step_end = min(self.step_end, n)
        for lst in (self.gen, self.gen_phase, self.gen_forced, self.states, self.byte_ends):
            del lst[n:]
        self.think_sampled = sum(1 for ph, f in zip(self.gen_phase, self.gen_forced) if ph == THINK and not f)
        self.phase_counts = [sum(1 for ph in self.gen_phase if ph == k) for k in range(len(PHASE_NAMES))]
        del self.gen_bytes[(self.byte_ends[-1] if self.byte_ends else 0):]
        self.emitted = min(self.emitted, n)
        self.stream_read = min(self.stream_read, n)
        self.stream_prefix = min(self.stream_prefix, n)

    def finish(self, reason: str, finish_reason: str, error: str | None = None) -> None:
        """End the request: ``reason`` is its exit reason (stats), ``finish_reason`` the
        OpenAI-style one (stop / length / abort / error)."""
        self.finished = reason
        self.finish_reason = finish_reason
        self.forced.clear()
        if error is not None:
            self.error = error

    def guard(self, fn) -> bool:
        """Run per-request work (controls, user policies): a failure ends this request with
        an error and leaves the others alone. True when ``fn`` returned."""
        try:
            fn()
            return True
        except Exception as e:  # noqa: BLE001 - one request's failure must not end the others
            if not self.finished:
                self.finish("error", "error", f"{type(e).__name__}: {e}")
            return False

    @property
    def plain_split(self) -> bool:
        """A plain model's reply is its answer unless a control forced the answer cue
        (a budget, a step cap, an exit policy): then the text before the cue is reasoning.
        A cue the model writes itself is part of its answer."""
        return self.fmt.plain and self.think_end not in (None, "natural")

    def stats(self) -> dict:
        # think_tokens: tokens the model chose while thinking (its own end marker included);
        # forced ones (transition, end marker or cue, wait texts) are counted apart, so
        # think_tokens <= think_budget. answer_tokens: every token after thinking.
        think, answer = self.think_sampled, self.count(ANSWER)
        if self.fmt.plain and not self.plain_split:
            think, answer = 0, answer + self.count(THINK)
        return {
            "prompt_tokens": len(self.prompt),
            "think_tokens": think,
            "answer_tokens": answer,
            "think_sampled": self.think_sampled,
            "forced_tokens": sum(f for f, ph in zip(self.gen_forced, self.gen_phase) if ph != LATENT),
            "steps": self.steps,
            "latent_steps": self.latent_steps,
            "new_tokens": len(self.gen) - self.uncounted,  # what max_new_tokens counts
            "waits": self.waits,
            "rolled_back": self.rolled_back,
            "cached_tokens": self.cached,
            "preemptions": self.preemptions,
            "think_end": self.think_end,
            "exit_reason": self.finished,
            **(self.exits.stats() if self.exits is not None else
               {"probe_tokens": 0, "probe_steps": 0, "probes": []}),
            **({"consistency": self.group.result} if self.group is not None else {}),
        }
