"""The early-exit policy interface.

A policy is plain Python that looks at one request at its reasoning-step boundaries (or
every N thinking tokens) and answers with an action:

- ``Continue()`` (or None): go on;
- ``Probe(text, max_tokens, ...)``: decode ``text`` plus up to ``max_tokens`` tokens *in the
  row's own slot*, after its current length, then roll the slot back. Nothing is copied and
  nothing the user sees changes; the policy receives a ``ProbeResult`` in ``on_probe``;
- ``Exit(inject=...)``: end thinking now (force the end marker, then ``inject``), or
  finish the request with ``finish=True`` (a templated ending);
- ``SetValve({"name": alpha})``: change the request's valve scales from the next token on.

Policies are copied per request (``copy.deepcopy``), so an instance may keep state in
``self``. A policy in a few lines::

    class ExitAfterThreeProbes(cotrt.Policy):
        def on_step(self, view):
            return cotrt.Probe("\\n</think>\\nThe answer is", max_tokens=8)
        def on_probe(self, view, result):
            return cotrt.Exit() if len(view.probes) >= 3 else None
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Continue:
    pass


@dataclass(frozen=True)
class Probe:
    """Decode ``text`` then up to ``max_tokens`` tokens in place, and report back.

    stop:        strings that end the probe's generation (e.g. "}" for a \\boxed{ inducer)
    temperature: 0 = greedy (the usual choice for answer probes)
    before_last: probe from before the row's last token (DEER's "replace the transition
                 word": the cue token that triggered the boundary is left out of the
                 probe's context). Only the last token can be left out: everything before it
                 is already in the cache. If the policy then exits, that token is taken back
                 (rolled back in place) before the end marker is forced.
    tag:         free label copied to the probe record
    until:       optional ``(generated_text) -> bool``: the probe's answer is complete
                 (e.g. the box it opened is closed, counting braces)
    stop_ids:    token ids that end the probe once generated (DEER's HF script stops on ids)
    stop_at_eos: an EOS ends the probe (False: only stop / stop_ids / until / max_tokens do)
    """

    text: str
    max_tokens: int = 20
    stop: tuple = ()
    temperature: float = 0.0
    before_last: bool = False
    tag: str | None = None
    until: object = None
    stop_ids: frozenset = frozenset()
    stop_at_eos: bool = True

    def __post_init__(self):
        if not isinstance(self.text, str):
            raise ValueError(f"Probe.text must be a string, got {type(self.text).__name__}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"Probe.max_tokens must be an int >= 0, got {self.max_tokens!r}")
        if not self.text and self.max_tokens == 0:
            raise ValueError("Probe: empty text and max_tokens=0 probes nothing")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"Probe.temperature must be >= 0, got {self.temperature!r}")
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        object.__setattr__(self, "stop_ids", frozenset(int(i) for i in self.stop_ids))


@dataclass(frozen=True)
class Exit:
    """End thinking now. The end marker is forced, then ``inject`` (e.g. an answer
    template). With ``finish=True`` the request ends after that text (Dynasor's templated
    ending); otherwise the model goes on to write its answer. ``lead`` is forced before the
    end marker (DEER's scripts end thinking with "\n</think>\n\n": lead "\n", inject "\n\n")."""

    inject: str = ""
    finish: bool = False
    reason: str = "policy"
    lead: str = ""


@dataclass(frozen=True)
class SetValve:
    alphas: dict


@dataclass
class ProbeResult:
    """What a probe produced.

    token_ids / text: the generated tokens (not the probe's prompt text)
    max_probs:        per generated token, the probability of the most likely token
    token_probs:      per generated token, the probability of the token taken (= max_probs
                      when greedy; what vLLM's logprobs=1 reports for a sampled token)
    entropy:          entropy (nats) of the next-token distribution right after the probe's
                      text, before any generated token (EAT reads this)
    stopped:          "stop" (a stop string), "eos", or "length"
    """

    position: int
    token_ids: list
    text: str
    max_probs: list
    entropy: float
    stopped: str
    tag: str | None = None
    token_probs: list = field(default_factory=list)

    def confidence(self, how: str = "mean", skip_first: bool = True) -> float:
        """Mean / geometric mean / min of the max-probs (the first token skipped when
        there are others: it is mostly formatting right after the inducer)."""
        p = self.max_probs[1:] if skip_first and len(self.max_probs) > 1 else self.max_probs
        if not p:
            return 0.0
        if how == "mean":
            return sum(p) / len(p)
        if how in ("geo", "geometric", "gmean"):
            return math.exp(sum(math.log(max(x, 1e-30)) for x in p) / len(p))
        if how == "min":
            return min(p)
        raise ValueError(f"confidence: unknown aggregate {how!r} (mean, geo, min)")


@dataclass
class ProbeRecord:
    position: int  # visible tokens generated when the probe ran
    answer: str | None
    confidence: float | None
    decision: str
    tokens: int  # probe tokens decoded (prompt text + generated)
    tag: str | None = None
    text: str = ""  # what the probe generated


@dataclass
class RowView:
    """Read-only facts about a request, handed to policies."""

    request_id: int
    phase: str  # "pre" | "think" | "answer"
    think_tokens: int  # thinking tokens sampled so far (forced text not counted)
    steps: int
    generated: int  # visible tokens so far
    boundary: bool  # this call comes at a step boundary
    cue: str | None  # the cue that made the boundary, if known
    last_token_is_cue: bool  # the cue lies wholly in the last token
    text: callable  # () -> the visible text so far (decoded on demand)
    step_text: callable  # () -> the text of the current/last step
    probes: list = field(default_factory=list)  # ProbeRecords so far
    think_budget: int | None = None
    valve: dict = field(default_factory=dict)
    last_token: int | None = None  # the id of the last visible token


class Policy:
    """Base class. Override ``on_step`` (and ``on_probe`` if you probe).

    cues:        extra strings that make step boundaries for this request
    every:       also call ``on_step`` every N thinking tokens (Dynasor)
    on_boundary: call ``on_step`` at step boundaries
    """

    name = "policy"
    cues: tuple = ()
    every: int | None = None
    on_boundary: bool = True

    def on_step(self, view: RowView):
        return None

    def on_probe(self, view: RowView, result: ProbeResult):
        return None

    def banned_tokens(self, view_phase: str, tokenizer) -> list:
        """Token ids this policy forbids now (NoWait)."""
        return []
