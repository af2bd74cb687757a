"""What the engine hands back: events while a request runs, its Output when it ends.

Text is built from the generated tokens: stop strings cut, special tokens (EOS, pad) left
out but think markers kept, reasoning and answer split at the think format's markers.
Streaming text is decoded incrementally over a small window and holds back what the row
has not committed (see ``Request.holdback``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .control.phase import PHASE_NAMES, THINK
from .control.request import Request
from .control.think import ThinkFormat


@dataclass
class Event:
    """What one step did for one request: newly committed tokens and their text; the final
    output when the request finished."""

    request_id: int
    token_ids: list
    text: str
    finished: bool = False
    output: object = None


@dataclass
class Output:
    request_id: int
    prompt_token_ids: list
    token_ids: list
    text: str
    reasoning: str
    answer: str
    finish_reason: str
    stats: dict = field(default_factory=dict)
    error: str | None = None
    latent_states: list | None = None  # the states fed back by latent steps ([H] each)


class OutputBuilder:
    """Events and Outputs of one engine's rows (the tokenizer and think format are fixed)."""

    def __init__(self, tokenizer, fmt: ThinkFormat):
        self.tokenizer = tokenizer
        self.fmt = fmt
        self._decode = _window_decoder(tokenizer)
        self._specials: list | None = None  # special tokens to drop from text, found on first use

    def event(self, row: Request) -> Event | None:
        """The tokens (and text) ``row`` committed since the last event, if any."""
        if row.finished:
            return self.final_event(row)
        commit = len(row.gen) - row.holdback()
        if commit <= row.emitted:
            return None
        new = row.gen[row.emitted:commit]
        row.emitted = commit
        return Event(row.id, new, self._text_delta(row, commit))

    def final_event(self, row: Request) -> Event:
        out = self.output(row)
        new = row.gen[row.emitted:]
        row.emitted = len(row.gen)
        # The stream's text ends exactly where the final text does (stop strings cut).
        streamed = row.streamed_text
        delta = out.text[len(streamed):] if out.text.startswith(streamed) else ""
        return Event(row.id, new, delta, finished=True, output=out)

    def _text_delta(self, row: Request, upto: int) -> str:
        # Incremental detokenization over a small window (a token's text can depend on its
        # neighbours, e.g. SentencePiece's leading space).
        dec = lambda a, b: self._clean(self._decode(row.gen[a:b]))
        prefix = dec(row.stream_prefix, row.stream_read)
        full = dec(row.stream_prefix, upto)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix):]
        row.stream_prefix, row.stream_read = row.stream_read, upto
        row.streamed_text += delta
        return delta

    def _clean(self, s: str) -> str:
        """Text without special tokens (EOS, BOS, pad), but with the think markers."""
        specials = self._specials
        if specials is None:
            # Keep specials that are part of a marker (s1's "<|im_start|>think").
            markers = (self.fmt.start or "") + "\0" + self.fmt.end
            all_sp = getattr(self.tokenizer, "all_special_tokens", []) or []
            specials = self._specials = [t for t in all_sp if t and t not in markers]
        for sp in specials:
            if sp in s:
                s = s.replace(sp, "")
        return s

    def output(self, row: Request) -> Output:
        tok = self.tokenizer
        raw = tok.decode(row.gen, skip_special_tokens=False)
        raw = _cut_stop(raw, row.params.stop) if row.finished == "stop_string" else raw
        reasoning, answer = _split(raw, self.fmt, row.phase0, row.plain_split)
        clean = self._clean
        reasoning, answer = clean(reasoning).strip(), _drop(clean(answer), self.fmt).strip()
        text = clean(raw)
        stats = row.stats()
        done = row.t_done if row.t_done is not None else time.perf_counter()
        stats["time_s"] = round(done - row.t_add, 6)
        if row.t_first is not None:
            stats["ttft_s"] = round(row.t_first - row.t_add, 6)
        stats["phase"] = PHASE_NAMES[row.phase]
        return Output(row.id, row.prompt, list(row.gen), text, reasoning, answer,
                      row.finish_reason or "length", stats, row.error,
                      list(row.latent.fed_back) if row.latent is not None else None)


def _window_decoder(tokenizer):
    """``ids -> text`` as ``tokenizer.decode(ids, skip_special_tokens=False)`` gives it.

    Streaming decodes two windows per row per step. Through transformers' ``decode`` that
    cost ~19 us a call (argument conversion, then the Rust decoder); the Rust tokenizer's
    own ``decode`` is what it ends in when no clean-up of spaces is asked for. At batch 32
    the text deltas were ~1.5 ms of host time per step (CPU profile, forward stubbed), more
    than a captured 1B decode step on an H100 is expected to take on the device.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    slow = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return slow
    fast = lambda ids: backend.decode(ids, skip_special_tokens=False)
    probe = list(range(min(len(tokenizer), 64)))
    try:
        same = fast(probe) == slow(probe)
    except Exception:  # noqa: BLE001 - any doubt: the tokenizer's own decode
        same = False
    return fast if same else slow


def _cut_stop(text: str, stops) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text if cut < 0 else text[:cut]


def _split(raw: str, fmt: ThinkFormat, phase0: int, plain_split: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of the generated text. A plain model's text is all answer unless
    the answer cue was forced (``plain_split``): then it splits at the cue."""
    if fmt.plain:
        if not plain_split:
            return "", raw
        i = raw.find(fmt.end)
        return (raw, "") if i < 0 else (raw[:i], raw[i + len(fmt.end):])
    body = raw
    if phase0 != THINK:
        i = raw.find(fmt.start)
        if i < 0:
            return "", raw
        body = raw[i + len(fmt.start):]
    j = body.find(fmt.end)
    if j < 0:
        return body, ""
    return body[:j], body[j + len(fmt.end):]


def _drop(answer: str, fmt: ThinkFormat) -> str:
    # A second end marker after a forced one carries no content.
    return answer.replace(fmt.end, "") if not fmt.plain else answer
