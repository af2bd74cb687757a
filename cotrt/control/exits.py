"""Running a request's early-exit policies: calling them, probing in place, acting.

A probe is decoded in the row's own slot, after its current length: its first forward
feeds the row's next input (or, with ``before_last``, nothing of the row's own) plus the
probe text; then one token a step. When it ends the row's slot length is simply its
length before the probe: the probe's keys and values lie past it and are overwritten by
the row's next tokens. The row's sampling counter and automaton state never see the probe,
so the continuation after a "continue" is the one the row would have produced anyway.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .policy import Continue, Exit, Probe, ProbeRecord, ProbeResult, RowView, SetValve
from .phase import PHASE_NAMES, THINK


@dataclass
class ProbeRun:
    spec: Probe
    policy: object
    position: int  # visible tokens when the probe started
    start: int  # slot position of the probe's first fed token
    feed: list  # tokens of the first forward
    tokens: list = field(default_factory=list)
    max_probs: list = field(default_factory=list)
    token_probs: list = field(default_factory=list)
    entropy: float = float("nan")
    started: bool = False
    stopped: str | None = None

    def plan(self) -> tuple[list[int], int]:
        if not self.started:
            return self.feed, self.start
        return [self.tokens[-1]], self.start + len(self.feed) + len(self.tokens) - 1

    def restart(self) -> None:
        """Back to not started (its request was preempted: the pages it wrote are gone).
        Its draws are keyed by position, so it picks the same tokens again."""
        self.tokens, self.max_probs, self.token_probs = [], [], []
        self.entropy, self.started = float("nan"), False


class ExitControl:
    """The policies of one request and its probe in flight."""

    def __init__(self, policies, tokenizer, eos_ids):
        self.policies = [copy.deepcopy(p) for p in policies]
        for p in self.policies:  # policies that read token ids (DEER's script variants)
            bind = getattr(p, "bind_tokenizer", None)
            if bind is not None:
                bind(tokenizer)
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.probe: ProbeRun | None = None
        self.records: list[ProbeRecord] = []
        self.probe_tokens = 0
        self.probe_steps = 0
        self.last_every = 0
        self.cues = tuple(c for p in self.policies for c in getattr(p, "cues", ()))

    # -- when to ask -----------------------------------------------------------------------
    def after_token(self, row, at_boundary: bool, cue: str | None) -> None:
        """Called after each visible token the row samples while thinking."""
        if self.probe is not None or row.finished or row.forced or row.phase != THINK:
            return
        for pol in self.policies:
            every = getattr(pol, "every", None)
            due_every = bool(every) and row.think_sampled >= self.last_every + every
            due_boundary = at_boundary and getattr(pol, "on_boundary", True)
            if not (due_every or due_boundary):
                continue
            if due_every:
                self.last_every = row.think_sampled - row.think_sampled % every
            action = pol.on_step(self.view(row, at_boundary, cue))
            if self.apply(row, pol, action):
                return

    def view(self, row, boundary=False, cue=None) -> RowView:
        tok = self.tokenizer
        cue_in_last = False
        if cue:
            start = row.byte_ends[-2] if len(row.byte_ends) > 1 else 0
            cue_in_last = row.gen_bytes.find(cue.encode(), start) >= start
        return RowView(
            request_id=row.id, phase=PHASE_NAMES[row.phase], think_tokens=row.think_sampled,
            steps=row.steps, generated=len(row.gen), boundary=boundary, cue=cue,
            last_token_is_cue=cue_in_last,
            text=lambda: tok.decode(row.gen, skip_special_tokens=True),
            step_text=lambda: _last_step(tok.decode(row.gen, skip_special_tokens=True)),
            probes=list(self.records), think_budget=row.params.think_budget,
            valve=dict(row.valve),
            last_token=row.gen[-1] if row.gen else None,
        )

    # -- acting -----------------------------------------------------------------------------
    def apply(self, row, pol, action) -> bool:
        """Carry out a policy's action; True if it did something."""
        if action is None or isinstance(action, Continue):
            return False
        if isinstance(action, Probe):
            return self._start_probe(row, pol, action)
        if isinstance(action, Exit):
            row.exit_thinking(f"{getattr(pol, 'name', 'policy')}:{action.reason}", action.inject, action.finish,
                              action.lead)
            return True
        if isinstance(action, SetValve):
            row.set_valve(action.alphas)
            return False
        raise TypeError(f"policy {type(pol).__name__} returned {action!r}; expected Continue/Probe/Exit/SetValve")

    def _start_probe(self, row, pol, spec: Probe) -> bool:
        before_last = spec.before_last and bool(spec.text) and bool(row.gen)
        text_ids = self.tokenizer.encode(spec.text, add_special_tokens=False) if spec.text else []
        feed = text_ids if before_last else [row.next_input] + text_ids
        start = row.cache_len
        room = row.max_len - (start + len(feed))
        if not feed or room < 0:
            self.records.append(ProbeRecord(len(row.gen), None, None, "skipped: no room", 0, spec.tag))
            return False
        spec_max = min(spec.max_tokens, room)
        self.probe = ProbeRun(spec=Probe(spec.text, spec_max, spec.stop, spec.temperature, before_last, spec.tag,
                                         spec.until, spec.stop_ids, spec.stop_at_eos),
                              policy=pol, position=len(row.gen), start=start, feed=feed)
        return True

    def consume(self, row, logits: torch.Tensor) -> None:
        """The probe's logits for this step ``[V]`` (fp32): record, pick, maybe finish."""
        pr = self.probe
        self.probe_steps += 1
        if not pr.started:
            pr.started = True
            logp = torch.log_softmax(logits, -1)
            pr.entropy = float(-(logp.exp() * logp).sum())
            if pr.spec.max_tokens == 0:
                return self._finish(row, "length")
        from ..engine.sampler import draw_probe  # here: cotrt.engine imports this module

        tok = draw_probe(logits, pr.spec.temperature, row.params.seed, pr.start + len(pr.tokens))
        pr.tokens.append(tok)
        p1 = torch.softmax(logits, -1)
        pr.max_probs.append(float(p1.max()))
        pr.token_probs.append(float(p1[tok]))
        if tok in pr.spec.stop_ids:
            return self._finish(row, "stop")
        if tok in self.eos_ids and pr.spec.stop_at_eos:
            return self._finish(row, "eos")
        if pr.spec.stop or pr.spec.until is not None:
            text = self.tokenizer.decode(pr.tokens, skip_special_tokens=True)
            if any(s in text for s in pr.spec.stop) or (pr.spec.until is not None and pr.spec.until(text)):
                return self._finish(row, "stop")
        if len(pr.tokens) >= pr.spec.max_tokens:
            return self._finish(row, "length")
        room = row.max_len - (pr.start + len(pr.feed) + len(pr.tokens))
        if room <= 0:
            return self._finish(row, "length")

    def _finish(self, row, stopped: str) -> None:
        pr = self.probe
        pr.stopped = stopped
        self.probe_tokens += len(pr.feed) + len(pr.tokens)  # text fed + tokens generated
        self.probe = None  # the slot is rolled back by construction: row.cache_len is unchanged
        text = self.tokenizer.decode(pr.tokens, skip_special_tokens=True)
        for s in pr.spec.stop:
            if s in text:
                text = text[: text.index(s) + len(s)]
        result = ProbeResult(position=pr.position, token_ids=list(pr.tokens), text=text,
                             max_probs=list(pr.max_probs), entropy=pr.entropy, stopped=stopped, tag=pr.spec.tag,
                             token_probs=list(pr.token_probs))
        view = self.view(row)
        action = pr.policy.on_probe(view, result)
        decision = _decision_name(action)
        if isinstance(action, Exit) and pr.spec.before_last and row.gen:
            # The probe stood in for the row's last token (DEER replaces the transition
            # word by the answer inducer): exiting on it takes that token back too, or the
            # end marker would follow a dangling "Wait".
            row.truncate(len(row.gen) - 1)
        self.records.append(ProbeRecord(
            position=pr.position, answer=getattr(pr.policy, "last_answer", None),
            confidence=getattr(pr.policy, "last_confidence", None), decision=decision,
            tokens=len(pr.feed) + len(pr.tokens), tag=pr.spec.tag, text=text))
        self.apply(row, pr.policy, action)

    def banned(self, row) -> list[int]:
        out: list[int] = []
        for p in self.policies:
            out += p.banned_tokens(PHASE_NAMES[row.phase], self.tokenizer)
        return out

    def stats(self) -> dict:
        return {"probe_tokens": self.probe_tokens, "probe_steps": self.probe_steps,
                "probes": [vars(r) for r in self.records]}


def _decision_name(action) -> str:
    if action is None or isinstance(action, Continue):
        return "continue"
    if isinstance(action, Exit):
        return "exit"
    if isinstance(action, Probe):
        return "probe"
    return type(action).__name__.lower()


def _last_step(text: str) -> str:
    parts = [p for p in text.split("\n\n") if p.strip()]
    return parts[-1] if parts else ""
