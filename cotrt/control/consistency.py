"""Self-consistency with early exit: n samples of one prompt vote on the answer, and the
vote ends as soon as enough of them agree.

    rt.generate([question], cotrt.Params(n=8, temperature=0.7, consistency=cotrt.SelfConsistency()))

Each finished sample's answer is extracted (cotrt.control.answers: ``\\boxed{}``, "####",
"the answer is", the last number) and grouped with equivalent ones (numerically equal
numbers and expressions, else normalized text). Once ``quorum`` finished samples agree
(default: a majority of n), the samples still running are aborted (exit reason
``"consistency"``): their remaining tokens are never computed. The samples share the
prompt's KV pages (cotrt/engine/kv.py), so a vote of n costs one prompt and n tails.

Every sample's ``stats["consistency"]`` is the group's result (one dict, final once the
last sample is out): ``answer`` (the majority answer, None when no sample answered),
``votes`` (answer -> count), ``quorum``, ``samples``, ``finished`` (samples that ran to
their end), ``aborted`` (stopped by the vote) and ``decided`` (True when the quorum was
reached; else the answer is the plurality of all finished samples).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from .answers import DEFAULT_METHODS, _EXTRACTORS, equivalent, extract


@dataclass(frozen=True)
class SelfConsistency:
    """Settings of the vote. ``quorum``: agreeing answers that end it (None: n // 2 + 1).
    ``methods``: answer extractors tried in order. ``source``: "answer" (the text after
    thinking; the whole text for a model without think markers) or "text"."""

    quorum: int | None = None
    methods: tuple = DEFAULT_METHODS
    source: str = "answer"

    def __post_init__(self):
        if self.quorum is not None and (isinstance(self.quorum, bool) or not isinstance(self.quorum, int)
                                        or self.quorum < 1):
            raise ValueError(f"consistency.quorum must be an int >= 1 or None, got {self.quorum!r}")
        methods = (self.methods,) if isinstance(self.methods, str) else self.methods
        if not isinstance(methods, (tuple, list)) or not methods or any(m not in _EXTRACTORS for m in methods):
            raise ValueError(f"consistency.methods must name extractors among {sorted(_EXTRACTORS)}, "
                             f"got {self.methods!r}")
        object.__setattr__(self, "methods", tuple(methods))
        if self.source not in ("answer", "text"):
            raise ValueError(f"consistency.source must be 'answer' or 'text', got {self.source!r}")

    def check(self, n: int) -> None:
        if self.quorum is not None and self.quorum > n:
            raise ValueError(f"consistency.quorum={self.quorum} exceeds n={n} samples")

    @classmethod
    def from_dict(cls, d: dict) -> "SelfConsistency":
        if not isinstance(d, dict):
            raise ValueError(f"consistency must be a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"consistency: unknown setting(s): {', '.join(unknown)}")
        return cls(**d)


class Vote:
    """The vote of one group of samples (the engine keeps one per ``add_samples`` call)."""

    def __init__(self, spec: SelfConsistency, n: int):
        self.spec = spec
        self.quorum = spec.quorum or n // 2 + 1
        self.members: list = []  # request ids
        self._classes: list[list] = []  # [representative answer, count]
        self.result = {"answer": None, "votes": {}, "quorum": self.quorum, "samples": n, "finished": 0,
                       "aborted": 0, "decided": False}

    def record(self, output) -> bool:
        """Count a finished sample's answer; True when this vote just reached the quorum
        (the caller aborts the samples still running)."""
        res = self.result
        if output.finish_reason in ("abort", "error"):
            if output.stats.get("exit_reason") == "consistency":
                res["aborted"] += 1
            return False
        res["finished"] += 1
        text = output.answer if self.spec.source == "answer" else output.text
        ans = extract(text or "", self.spec.methods)
        if ans is None or res["decided"]:
            return False
        for cls in self._classes:
            if equivalent(cls[0], ans):
                cls[1] += 1
                break
        else:
            self._classes.append([ans, 1])
        best = max(self._classes, key=lambda c: c[1])  # ties go to the answer seen first
        res["answer"] = best[0]
        res["votes"] = {c[0]: c[1] for c in self._classes}
        if best[1] >= self.quorum:
            res["decided"] = True
            return True
        return False
