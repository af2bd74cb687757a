"""One request's control state: phases, budgets, step boundaries, stops, rollback.

The engine feeds every token a row appends (sampled or forced) through ``Row.accept``.
Marker, cue and stop detection is the token automaton (csrc/): one table lookup per
token, on bytes, so markers split over several tokens, or sharing a token with other
text, are seen exactly where their last byte lands.

Invariant kept with the engine: the slot cache holds ``len(seq) - 1`` tokens; the last
token of ``seq`` is the next input. Rolling a row back is truncating ``gen`` and setting
the slot length, which the engine reads from ``cache_len``.
"""
from __future__ import annotations

import bisect
from collections import deque

PRE, THINK, ANSWER, LATENT = 0, 1, 2, 3
PHASE_NAMES = ("pre", "think", "answer", "latent")


def _incomplete_utf8_tail(buf: bytes) -> int:
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


class Row:
    """Host-side state of one request while it runs."""

    def __init__(self, rid, prompt_ids, params, fmt, pats: RowPatterns, vocab_bytes, eos_ids,
                 encode, max_len):
        self.id = rid
        self.prompt = list(prompt_ids)
        self.params = params
        self.fmt = fmt
        self.pats = pats
        self.vocab_bytes = vocab_bytes
        self.eos_ids = eos_ids
        self.encode = encode  # str -> list[int], no special tokens added
        self.max_len = max_len
        self.slot = -1
        self.gen: list[int] = []
        self.gen_phase: list[int] = []
        self.phase_counts = [0] * len(PHASE_NAMES)
        self.gen_forced: list[bool] = []
        self.states: list[int] = []  # automaton state after each generated token
        self.byte_ends: list[int] = []
        self.gen_bytes = bytearray()
        self.forced: deque = deque()
        self.closing: str | None = None  # why the forced end of thinking is underway
        self.finished: str | None = None  # exit reason once done
        self.finish_reason: str | None = None  # OpenAI-style: stop / length / abort / error
        self.error: str | None = None
        self.think_end: str | None = None
        self.steps = 0
        self.waits = 0
        self.rolled_back = 0
        self.soft_passed_at: int | None = None
        self.think_sampled = 0
        self.finish_after_forced = False
        self.last_cue: str | None = None
        self.valve = dict(getattr(params, "valve", None) or {})
        self.exits = None  # ExitControl, set by the engine when the request has policies
        self.latent = None  # LatentRun, set by the engine for a request with a latent phase
        # Latent steps and the forced end-latent token: max_new_tokens does not count them
        # (Coconut's generate counts answer tokens only: N=16, k=6 gives 16, not 9).
        self.uncounted = 0
        self.latent_steps = 0
        # Phase at the end of the prompt: a template may pre-open thinking, earlier turns
        # may hold closed markers; the last marker seen decides.
        phase = THINK if fmt.plain else PRE
        state = 0
        width = pats.next.shape[1]
        for t in self.prompt:
            if t >= width:
                continue
            e = int(pats.emit[state, t])
            state = int(pats.next[state, t])
            if fmt.plain:
                continue
            if e & pats.start_bit:
                phase = THINK
            if e & pats.end_bit:
                phase = PRE  # closed (in an earlier turn): this turn starts outside thinking
        # Matching restarts at a clean state: cues and stops in the prompt do not count.
        self.state0 = 0
        self.phase0 = self.phase = phase
        self.stream_prefix = 0  # incremental detokenization offsets (engine)
        self.stream_read = 0
        self.emitted = 0

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
        marker, cue or stop string still being matched, or an incomplete UTF-8 character."""
        if self.finished:
            return 0
        tail = max(int(self.pats.depth[self.state]), _incomplete_utf8_tail(self.gen_bytes))
        if tail == 0:
            return 0
        first_byte = len(self.gen_bytes) - tail
        j = bisect.bisect_right(self.byte_ends, first_byte)
        return len(self.gen) - j

    # -- the control logic -------------------------------------------------------------------
    def banned_tokens(self) -> list[int]:
        """Token ids this row must not sample now: a single-token end marker once thinking
        is over (a model that emits a second end marker after a forced one)."""
        if self.phase == ANSWER and not self.fmt.plain and self._end_single is not None:
            return [self._end_single]
        return []

    @property
    def _end_single(self):
        ids = getattr(self, "_end_ids", None)
        if ids is None:
            ids = self._end_ids = self.encode(self.fmt.end)
        return ids[0] if len(ids) == 1 else None

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
        if phase == PRE and pats.start_bit and emit & pats.start_bit:
            phase = self.phase = THINK
        # The forced end-latent token closes the latent phase: neither think nor answer.
        self._push_phase(LATENT if len(self.gen) <= self.uncounted else ANSWER if phase == PRE else phase)
        if phase == THINK and not forced:
            self.think_sampled += 1

        if emit & pats.stop_bits:
            return self._finish("stop_string", "stop")
        if tok in self.eos_ids and not p.ignore_eos:
            return self._finish("eos", "stop")
        self.last_cue = None
        if phase == THINK and emit & pats.end_bit:
            if self._extend_thinking(forced):
                return
            self.phase = ANSWER
            self.think_end = self.closing or "natural"
            self.closing = None
        elif phase == THINK:
            if emit & pats.cue_bits:
                self.steps += 1
                self.last_cue = pats.patterns[(emit & pats.cue_bits).bit_length() - 1].decode("utf-8", "replace")
            self._check_think_limits(emit)
        if forced and self.finish_after_forced and not self.forced:
            return self._finish("exit_finish", "stop")
        elif self.phase == ANSWER and p.answer_budget is not None and self.count(ANSWER) >= p.answer_budget:
            return self._finish("answer_budget", "length")
        if len(self.gen) - self.uncounted >= p.max_new_tokens:
            return self._finish("max_new_tokens", "length")
        if self.seq_len >= self.max_len:
            return self._finish("max_len", "length")

    def start(self) -> None:
        """Apply limits that bite before the first token (a budget of 0)."""
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
        check = getattr(self, "valve_check", None)
        if check is not None:
            check(valve)
        self.valve = dict(valve)

    def _force_end(self, reason: str, text: str | None = None) -> None:
        """Force the end of thinking: [transition] + end marker (or ``text``), never
        inside a character."""
        self.closing = reason
        prefix = b""
        cut = _incomplete_utf8_tail(self.gen_bytes)
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
        if self.seq_len >= self.max_len:
            return self._finish("max_len", "length")

    def truncate(self, n: int) -> None:
        """Roll back to the first ``n`` generated tokens (the engine sets the slot length)."""
        k = len(self.gen) - n
        if k <= 0:
            return
        self.rolled_back += k
        for lst in (self.gen, self.gen_phase, self.gen_forced, self.states, self.byte_ends):
            del lst[n:]
        self.think_sampled = sum(1 for ph, f in zip(self.gen_phase, self.gen_forced) if ph == THINK and not f)
        self.phase_counts = [sum(1 for ph in self.gen_phase if ph == k) for k in range(len(PHASE_NAMES))]
        del self.gen_bytes[(self.byte_ends[-1] if self.byte_ends else 0):]
        self.emitted = min(self.emitted, n)
        self.stream_read = min(self.stream_read, n)
        self.stream_prefix = min(self.stream_prefix, n)

    def _finish(self, reason: str, finish_reason: str) -> None:
        self.finished = reason
        self.finish_reason = finish_reason
        self.forced.clear()

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
            "think_end": self.think_end,
            "exit_reason": self.finished,
            **(self.exits.stats() if self.exits is not None else
               {"probe_tokens": 0, "probe_steps": 0, "probes": []}),
        }
