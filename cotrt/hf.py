"""Think controls for plain ``model.generate``: LogitsProcessors and StoppingCriteria.

For users who keep Hugging Face's own generation loop: a hard think budget (force the end
marker, with the format's transition phrase), s1's minimum thinking (replace an early end
by "Wait"), NoWait (mask reflection tokens while thinking) and stop conditions. No probes:
they need the runtime's slot cache (cotrt.engine).

    procs, stops = think_controls(tok, think_budget=512, min_think=64, nowait=True)
    model.generate(**inputs, logits_processor=procs, stopping_criteria=stops)

Each row's phase (before / inside / after thinking) is tracked from its prompt (a template
that pre-opens ``<think>``, markers closed in earlier turns) and its generated tokens by the
token automaton, so markers split over several tokens are seen; rows of a batch are
independent, left padding is skipped. The tracker advances one token per step (O(1) per row)
and rescans a row only when its history changed under it (beam search reordering).

Phases are tracked as the engine's are (cotrt/control/phase.py), and counting follows the
engine (cotrt/control/request.py): thinking tokens are the ones the model
chose inside the think phase (the end marker it emits itself included); tokens forced by
these processors (the end marker and transition, wait texts) are not counted. Tokens before
a ``<think>`` that never came count as answer tokens.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from cotrt.control.automaton import compile_cached, token_bytes
from cotrt.control.profiles import NOWAIT_WORDS, reflection_token_ids
from cotrt.control.phase import ANSWER, PHASE_NAMES, THINK, closes_thinking, opens_thinking, prompt_phase
from cotrt.control.request import incomplete_utf8_tail
from cotrt.control.think import ThinkFormat
from cotrt.params import _check_int

__all__ = ["ThinkTracker", "ThinkBudgetProcessor", "MinThinkProcessor", "NoWaitProcessor",
           "ThinkStoppingCriteria", "AnswerBudgetCriteria", "think_controls"]

# A forced end waits at most this many extra tokens for a UTF-8 character to complete, so
# the marker never splits one (a character is at most 4 bytes: 3 continuation tokens).
_MAX_UTF8_DELAY = 3


class _RowState:
    __slots__ = ("state", "phase", "think", "forced", "answer", "tail", "queue", "waits",
                 "last", "think_end", "closing")

    def __init__(self, phase: int):
        self.state, self.phase = 0, phase
        self.think = self.forced = self.answer = self.waits = 0
        self.tail = b""           # last <= 4 bytes of the generated text (UTF-8 boundary check)
        self.queue: list[int] = []  # tokens being forced, head next
        self.last = None          # last token seen, to detect reordered rows
        self.think_end = None     # "natural" or the reason thinking was cut
        self.closing = None


class ThinkTracker:
    """Per-row think state of the batch being generated; shared by the processors of one
    ``think_controls`` call so that each knows what the others forced.

    ``prompt_length``: the (padded) prompt width; by default the width of the first
    ``input_ids`` seen by a fresh generation (a call whose width is not one more than the
    last one starts a new generation).
    """

    def __init__(self, tokenizer, think_format: ThinkFormat | None = None,
                 prompt_length: int | None = None):
        _check_int("prompt_length", prompt_length, 1)
        fmt = ThinkFormat.detect(tokenizer) if think_format is None else think_format
        if not isinstance(fmt, ThinkFormat):
            raise ValueError(f"think_format must be a ThinkFormat or None, got {type(fmt).__name__}")
        self.fmt, self.tokenizer, self.prompt_length = fmt, tokenizer, prompt_length
        pats = (fmt.end,) + ((fmt.start,) if fmt.start else ())
        automaton = compile_cached(pats, tokenizer)
        self._next, self._emit = automaton.next_state.numpy(), automaton.emit.numpy()
        self.end_bit = automaton.bit(fmt.end)
        self.start_bit = automaton.bit(fmt.start) if fmt.start else 0
        self.vocab_bytes = token_bytes(tokenizer)
        self.pad_id = getattr(tokenizer, "pad_token_id", None)
        self.rows: list[_RowState] = []
        self._key = None          # (batch, width, last column) of the last sync
        self._epoch, self._seen = 0, {}
        self._prompt_len = prompt_length

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    # -- following the batch -------------------------------------------------------------
    def sync(self, input_ids: torch.Tensor, caller) -> list[_RowState]:
        """Bring the rows up to ``input_ids`` [B, T]; idempotent within one step (every
        processor and criterion of a step calls it, the first one advances)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        last = input_ids[:, -1].tolist() if t else []
        if self._key == (b, t, last) and self._seen.get(id(caller)) != self._epoch:
            self._seen[id(caller)] = self._epoch  # another caller already synced this step
            return self.rows
        if self._key is not None and self._key[:2] == (b, t - 1) and t >= 2:
            prev = input_ids[:, -2].tolist()
            for i, row in enumerate(self.rows):
                if prev[i] == row.last:
                    self._advance(row, last[i])
                else:  # history changed under the row (beam reorder): rebuild it
                    self.rows[i] = self._scan(input_ids[i].tolist())
        else:  # a new generation
            self._prompt_len = self.prompt_length if self.prompt_length is not None else t
            self.rows = [self._scan(r) for r in input_ids.tolist()]
        self._key, self._epoch = (b, t, last), self._epoch + 1
        self._seen = {id(caller): self._epoch}
        return self.rows

    def _scan(self, ids: list[int]) -> _RowState:
        """A row from scratch: the prompt decides the starting phase (the last marker in it
        wins), then every generated token is advanced."""
        p = min(self._prompt_len, len(ids))
        skip = 0
        while skip < p and ids[skip] == self.pad_id:  # left padding
            skip += 1
        phase = prompt_phase(ids[skip:p], self._next, self._emit, self.start_bit, self.end_bit, self.fmt.plain)
        row = _RowState(phase)  # matching restarts clean: prompt text does not count
        row.last = ids[p - 1] if p else None
        for tok in ids[p:]:
            self._advance(row, tok)
        return row

    def _advance(self, row: _RowState, tok: int) -> None:
        forced = bool(row.queue) and row.queue[0] == tok
        if forced:
            row.queue.pop(0)
        else:
            row.queue.clear()  # something else was chosen (another processor, a finished row)
        if tok < self._next.shape[1]:
            e = int(self._emit[row.state, tok])
            row.state = int(self._next[row.state, tok])
            row.tail = (row.tail + self.vocab_bytes[tok])[-4:]
        else:  # ids past the tokenizer (padded embedding matrix): no text
            e = 0
        if opens_thinking(row.phase, e, self.start_bit):
            row.phase = THINK
        if row.phase == THINK:
            if forced:
                row.forced += 1
            else:
                row.think += 1
            if closes_thinking(row.phase, e, self.end_bit):
                row.phase = ANSWER
                row.think_end = row.closing or "natural"
                row.queue.clear()
        else:
            row.answer += 1
            row.forced += forced
        row.last = tok

    # -- acting on scores ------------------------------------------------------------------
    def force(self, row: int, tokens: list[int], reason: str | None = None) -> None:
        """Force ``tokens`` on ``row``, one per step from this one."""
        r = self.rows[row]
        r.queue = list(tokens)
        if reason is not None:
            r.closing = reason

    def apply_forced(self, scores: torch.Tensor) -> torch.Tensor:
        """Rows forcing a token: every other logit -inf. Called last by every processor, so
        a later mask (NoWait masking a forced "Wait") cannot leave a row with no token."""
        for i, r in enumerate(self.rows):
            if r.queue:
                tok = r.queue[0]
                if tok >= scores.shape[1]:
                    raise ValueError(f"forced token id {tok} is outside the model's vocabulary "
                                     f"({scores.shape[1]})")
                scores[i].fill_(float("-inf"))
                scores[i, tok] = 0.0
        return scores

    def utf8_pending(self, row: int) -> bool:
        """Whether the row's text ends inside a multi-byte UTF-8 character."""
        return incomplete_utf8_tail(self.rows[row].tail) > 0

    def stats(self) -> list[dict]:
        """Per row: phase, think (chosen thinking tokens), forced, answer, waits, think_end."""
        return [{"phase": PHASE_NAMES[r.phase], "think_tokens": r.think, "forced_tokens": r.forced,
                 "answer_tokens": r.answer, "waits": r.waits, "think_end": r.think_end}
                for r in self.rows]


def _tracker(tokenizer, think_format, prompt_length, tracker) -> ThinkTracker:
    if tracker is None:
        return ThinkTracker(tokenizer, think_format, prompt_length)
    if not isinstance(tracker, ThinkTracker):
        raise ValueError(f"tracker must be a ThinkTracker, got {type(tracker).__name__}")
    if think_format is not None and think_format != tracker.fmt:
        raise ValueError("think_format differs from the shared tracker's format")
    return tracker


class ThinkBudgetProcessor(LogitsProcessor):
    """Hard think budget: once a row has chosen ``think_budget`` thinking tokens, force
    ``transition + end`` (one token per step, every other logit -inf).

    ``transition``: None takes the think format's (Qwen3's "limited time" phrase); "" none.
    The end is forced at the budget, or up to 3 tokens later when the text so far ends
    inside a multi-byte character (the processor cannot take tokens back, unlike the
    engine, so it lets the character finish). After thinking ends, a single-token end
    marker is masked: a model must not close thinking twice.
    """

    def __init__(self, tokenizer, think_budget: int, think_format: ThinkFormat | None = None,
                 prompt_length: int | None = None, transition: str | None = None, *,
                 tracker: ThinkTracker | None = None):
        _check_int("think_budget", think_budget, 0, allow_none=False)
        if transition is not None and not isinstance(transition, str):
            raise ValueError(f"transition must be a string or None, got {transition!r}")
        self.tracker = _tracker(tokenizer, think_format, prompt_length, tracker)
        self.budget = think_budget
        fmt = self.tracker.fmt
        text = (fmt.transition or "" if transition is None else transition) + fmt.end
        self.forced_ids = self.tracker.encode(text)
        end_ids = self.tracker.encode(fmt.end)
        self.end_single = end_ids[0] if len(end_ids) == 1 and not fmt.plain else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        tr = self.tracker
        for i, r in enumerate(tr.sync(input_ids, self)):
            if r.phase == THINK and not r.queue and r.think >= self.budget:
                if not (tr.utf8_pending(i) and r.think - self.budget < _MAX_UTF8_DELAY):
                    tr.force(i, self.forced_ids, "think_budget")
            elif r.phase == ANSWER and self.end_single is not None and not r.queue \
                    and self.end_single < scores.shape[1]:
                scores[i, self.end_single] = float("-inf")
        return tr.apply_forced(scores)


class MinThinkProcessor(LogitsProcessor):
    """s1's minimum thinking: while a row has chosen fewer than ``min_think`` thinking
    tokens and has used fewer than ``max_waits`` waits, it may not end thinking.

    A logits processor sees the scores before sampling and cannot take back tokens, so:
    when the end marker's first token is the row's top-scoring token (the model is ending),
    ``wait_text`` is forced instead (and counts as a wait); otherwise that token is masked,
    so sampling cannot draw it either. For a single-token marker ("</think>") this is exactly
    "replace the marker by the wait text"; for a multi-token marker it masks the marker's
    first token, which also masks that token's other uses meanwhile (e.g. "\\n" for the plain
    format's "\\nFinal answer:"), and a marker spelled with other tokens is not caught.
    Place it after processors that shape the distribution (biases), before samplers.
    """

    def __init__(self, tokenizer, min_think: int, wait_text: str = "\nWait", max_waits: int = 4,
                 think_format: ThinkFormat | None = None, prompt_length: int | None = None, *,
                 tracker: ThinkTracker | None = None):
        _check_int("min_think", min_think, 0, allow_none=False)
        _check_int("max_waits", max_waits, 0, allow_none=False)
        if not isinstance(wait_text, str) or not wait_text:
            raise ValueError(f"wait_text must be a non-empty string, got {wait_text!r}")
        self.tracker = _tracker(tokenizer, think_format, prompt_length, tracker)
        self.min_think, self.max_waits = min_think, max_waits
        self.wait_ids = self.tracker.encode(wait_text)
        self.end_first = self.tracker.encode(self.tracker.fmt.end)[0]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        tr = self.tracker
        for i, r in enumerate(tr.sync(input_ids, self)):
            if r.phase != THINK or r.queue or r.think >= self.min_think or r.waits >= self.max_waits:
                continue
            if int(scores[i].argmax()) == self.end_first:
                r.waits += 1
                tr.force(i, self.wait_ids)
            else:
                scores[i, self.end_first] = float("-inf")
        return tr.apply_forced(scores)


class NoWaitProcessor(LogitsProcessor):
    """NoWait: mask reflection tokens ("Wait", " Hmm", " however", ...; the rule is
    ``profiles.reflection_token_ids``) while a row is thinking; the answer is untouched."""

    def __init__(self, tokenizer, words=None, think_format: ThinkFormat | None = None,
                 prompt_length: int | None = None, *, tracker: ThinkTracker | None = None):
        self.tracker = _tracker(tokenizer, think_format, prompt_length, tracker)
        self.ids = torch.tensor(reflection_token_ids(tokenizer, NOWAIT_WORDS if words is None else words),
                                dtype=torch.long)
        self._ids_on: dict = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = [i for i, r in enumerate(self.tracker.sync(input_ids, self)) if r.phase == THINK]
        if rows and self.ids.numel():
            ids = self._ids_on.get(scores.device)
            if ids is None:
                ids = self._ids_on[scores.device] = self.ids[self.ids < scores.shape[1]].to(scores.device)
            sel = torch.tensor(rows, device=scores.device)
            scores[sel[:, None], ids[None, :]] = float("-inf")
        return self.tracker.apply_forced(scores)


class ThinkStoppingCriteria(StoppingCriteria):
    """Stops each row as soon as its thinking has ended (to read the reasoning alone)."""

    def __init__(self, tokenizer, think_format: ThinkFormat | None = None,
                 prompt_length: int | None = None, *, tracker: ThinkTracker | None = None):
        self.tracker = _tracker(tokenizer, think_format, prompt_length, tracker)

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        rows = self.tracker.sync(input_ids, self)
        return torch.tensor([r.think_end is not None for r in rows], dtype=torch.bool,
                            device=input_ids.device)


class AnswerBudgetCriteria(StoppingCriteria):
    """Stops each row once it has ``answer_budget`` answer tokens (tokens after thinking
    ended, or of a turn that never opened thinking)."""

    def __init__(self, tokenizer, answer_budget: int, think_format: ThinkFormat | None = None,
                 prompt_length: int | None = None, *, tracker: ThinkTracker | None = None):
        _check_int("answer_budget", answer_budget, 0, allow_none=False)
        self.tracker = _tracker(tokenizer, think_format, prompt_length, tracker)
        self.budget = answer_budget

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        rows = self.tracker.sync(input_ids, self)
        return torch.tensor([r.phase != THINK and r.answer >= self.budget for r in rows],
                            dtype=torch.bool, device=input_ids.device)


def think_controls(tokenizer, think_budget: int | None = None, min_think: int | None = None,
                   nowait: bool = False, answer_budget: int | None = None, *,
                   think_format: ThinkFormat | None = None, transition: str | None = None,
                   wait_text: str = "\nWait", max_waits: int = 4, nowait_words=None,
                   stop_at_think_end: bool = False, prompt_length: int | None = None,
                   ) -> tuple[LogitsProcessorList, StoppingCriteriaList]:
    """The processors and criteria for these controls, sharing one tracker.

    Order: NoWait, MinThink, ThinkBudget (a forced token always wins; each re-applies the
    shared forcing last). Build a fresh pair per ``generate`` call where convenient; reuse
    also works (a new generation is recognized by its input width).
    """
    if not isinstance(nowait, bool) or not isinstance(stop_at_think_end, bool):
        raise ValueError("nowait and stop_at_think_end must be bools")
    tracker = ThinkTracker(tokenizer, think_format, prompt_length)
    procs, stops = LogitsProcessorList(), StoppingCriteriaList()
    if nowait:
        procs.append(NoWaitProcessor(tokenizer, nowait_words, tracker=tracker))
    if min_think is not None:
        procs.append(MinThinkProcessor(tokenizer, min_think, wait_text, max_waits, tracker=tracker))
    if think_budget is not None:
        procs.append(ThinkBudgetProcessor(tokenizer, think_budget, transition=transition,
                                          tracker=tracker))
    if stop_at_think_end:
        stops.append(ThinkStoppingCriteria(tokenizer, tracker=tracker))
    if answer_budget is not None:
        stops.append(AnswerBudgetCriteria(tokenizer, answer_budget, tracker=tracker))
    return procs, stops
