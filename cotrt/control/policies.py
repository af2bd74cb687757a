"""Built-in early-exit policies: DEER, Dynasor, EAT, NoWait, step limits.

Each is a ``Policy`` (see policy.py) and runs through the engine's in-place probes, so a
probe costs the tokens it decodes and nothing that grows with the row's length. Defaults
follow the papers (sources in profiles.py); every knob is a constructor argument.
"""
from __future__ import annotations

import math

from .answers import equivalent
from .automaton import check_pattern_sizes
from .deer_scripts import (EXIT_TEXT, HF_END_WORDS, HF_PROBE_STOPS, SCRIPTS, VARIANTS, VLLM_PROBE_STOPS,
                           hf_confidence, special_prefix, token_ids, vllm_confidence)
from .policy import Exit, Policy, Probe, SetValve
from .profiles import get_profile, reflection_token_ids


def _profile(profile, who: str):
    from .profiles import ModelProfile

    if isinstance(profile, str):
        try:
            return get_profile(profile)
        except ValueError as e:
            raise ValueError(f"{who}: profile: {e}") from None
    if not isinstance(profile, ModelProfile):
        raise ValueError(f"{who}: profile must be a profile name or a ModelProfile, got {profile!r}")
    return profile


# Settings are checked in the constructors, so a bad one is a 400 before anything is queued
# (not a 500, or an error event in a stream that had started, when the policy first runs).

def _int(who, name, v, lo, none=False):
    if v is None and none:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{who}: {name} must be an int >= {lo}{' or None' if none else ''}, got {v!r}")
    return v


def _num(who, name, v, lo=None, hi=None, lo_open=False, hi_open=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or (lo is not None and (v < lo or (lo_open and v == lo))) \
            or (hi is not None and (v > hi or (hi_open and v == hi))):
        span = f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}" if lo is not None and hi is not None \
            else f" {'>' if lo_open else '>='} {lo}" if lo is not None else ""
        raise ValueError(f"{who}: {name} must be a finite number{span}, got {v!r}")
    return float(v)


def _bool(who, name, v, none=False):
    if not (isinstance(v, bool) or (v is None and none)):
        raise ValueError(f"{who}: {name} must be true or false, got {v!r}")
    return v


def _text(who, name, v, none=True):
    if v is None and none:
        return None
    if not isinstance(v, str) or not v:
        raise ValueError(f"{who}: {name} must be a non-empty string, got {v!r}")
    return v


def _texts(who, name, v, none=True):
    """A sequence of non-empty strings (patterns: sizes capped as stop strings are)."""
    if v is None and none:
        return None
    if isinstance(v, str) or not isinstance(v, (list, tuple)) or not all(isinstance(c, str) and c for c in v):
        raise ValueError(f"{who}: {name} must be a list of non-empty strings, got {v!r}")
    check_pattern_sizes(v, f"{who}: {name}")
    return tuple(v)


class DEER(Policy):
    """Dynamic Early Exit (Yang et al. 2025): at a thought transition ("Wait"), probe with
    the answer inducer; exit when the trial answer's confidence passes ``threshold``.

    variant: whose rule decides. "cotrt" (default): at the text cue, probe until the box
        closes (braces counted); a probe must close its box to count; confidence skips the
        first token and keeps the last; exit when it is ``>= threshold`` by forcing the end
        marker and the inducer's answer lead. "hf" and "vllm" reproduce DEER's released
        scripts (vanilla_deer.py and vllm-deer.py; the rules are in
        ``cotrt.control.deer_scripts``): their triggers, inducers, probe stops and caps,
        confidence spans, ``>``, and their exit text "\n</think>\n\n" after which the model
        answers.
    confidence: "mean" | "geo" | "min" of the per-token max probabilities of the trial
        answer ("hf": "mean" only, the script's method).
    require_end: the Qwen3 variant, whose probe must end thinking ("</think>") to count
        (variant "cotrt" only).
    before_last: probe as if the transition word were replaced by the inducer (DEER's
        placement), when the word lies wholly in the last token (variant "cotrt"; the
        script variants always probe from before it).
    """

    name = "deer"

    def __init__(self, threshold: float = 0.95, confidence: str = "mean", max_probes: int | None = None,
                 profile="r1-distill", cues=None, inducer: str | None = None, max_tokens: int | None = None,
                 require_end: bool | None = None, before_last: bool = True, variant: str = "cotrt"):
        if variant not in VARIANTS:
            raise ValueError(f"deer: variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        threshold = _num("deer", "threshold", threshold, 0, 1, lo_open=True)
        if confidence not in ("mean", "geo", "min"):
            raise ValueError(f"deer: confidence must be mean, geo or min, got {confidence!r}")
        max_probes = _int("deer", "max_probes", max_probes, 0, none=True)
        cues = _texts("deer", "cues", cues)
        _text("deer", "inducer", inducer)
        _int("deer", "max_tokens", max_tokens, 1, none=True)
        _bool("deer", "require_end", require_end, none=True)
        _bool("deer", "before_last", before_last)
        if variant == "hf" and confidence != "mean":
            raise ValueError(f"deer: confidence={confidence!r}: variant 'hf' averages, as its script does "
                             "(confidence='mean')")
        if variant != "cotrt" and require_end:
            raise ValueError(f"deer: require_end is the cotrt variant's (Qwen3); variant {variant!r} follows "
                             "its script")
        prof = _profile(profile, "deer")
        self.profile, self.variant = prof, variant
        self.threshold, self.how, self.max_probes = threshold, confidence, max_probes
        self.cues = tuple(cues) if cues is not None else ("Wait",)
        self.probes = 0
        self.last_answer = self.last_confidence = None
        if variant != "cotrt":
            script = SCRIPTS[variant]
            self.inducer = inducer if inducer is not None else script.inducer
            self.max_tokens = max_tokens or script.probe_tokens
            self.max_probes = max_probes if max_probes is not None else script.max_probes
            self.require_end, self.before_last = False, True
            if variant == "hf":
                # Token ids, not text: every thinking token is looked at (no text cues).
                self.words, self.cues, self.every, self.on_boundary = self.cues, (), 1, False
            self._tok = None
            return
        self.inducer = inducer if inducer is not None else prof.answer_inducer
        self.max_tokens = max_tokens or prof.probe_max_tokens
        self.require_end = (prof.probe_close == prof.think_format.end) if require_end is None else require_end
        self.close = prof.think_format.end if self.require_end else prof.probe_close
        self.before_last = before_last
        # On exit the answer is led in as the probe elicited it: the inducer's text after the
        # end marker (or all of it, after the marker, when it stays inside thinking), so the
        # model writes the answer it was confident about instead of resuming its checks.
        end = prof.think_format.end
        self.answer_lead = self.inducer.split(end, 1)[1] if end in self.inducer else self.inducer

    def bind_tokenizer(self, tokenizer) -> None:
        """The script variants read token ids (called once per request by the engine)."""
        if self.variant == "cotrt":
            return
        self._tok = tokenizer
        if self.variant == "hf":
            self._wait_ids = token_ids(tokenizer, self.words)
            eos = getattr(tokenizer, "eos_token_id", None)
            self._end_ids = token_ids(tokenizer, HF_END_WORDS) | ({eos} if eos is not None else set())
            self._probe_stop_ids = token_ids(tokenizer, HF_PROBE_STOPS, special=True)
            self._lead = special_prefix(tokenizer, EXIT_TEXT[0] + "</think>" + EXIT_TEXT[1]) + EXIT_TEXT[0]

    def on_step(self, view):
        if self.variant == "hf":
            return self._hf_step(view)
        if view.cue not in self.cues or (self.max_probes is not None and self.probes >= self.max_probes):
            return None
        self.probes += 1
        if self.variant == "vllm":
            return self._vllm_step(view)
        # The answer is complete when the box the inducer opened closes (braces counted, so
        # "\frac{1}{2}" is read whole) or, for the Qwen3 variant, at the end marker.
        stop = (self.close,) if self.require_end else ()
        until = None if self.require_end else (lambda text: self.profile.probe_finished(text, self.inducer))
        return Probe(self.inducer, max_tokens=self.max_tokens, stop=stop, until=until,
                     before_last=self.before_last and view.last_token_is_cue, tag="deer")

    def _hf_step(self, view):
        t = view.last_token
        self._real_stop = t in self._end_ids
        if not self._real_stop and (t not in self._wait_ids or
                                    (self.max_probes is not None and self.probes >= self.max_probes)):
            return None
        self.probes += 1
        return Probe(self.inducer, max_tokens=self.max_tokens, stop_ids=self._probe_stop_ids, stop_at_eos=False,
                     before_last=True, tag="deer")

    def _vllm_step(self, view):
        # vLLM cuts the text before the stop string: the part of the last token before the
        # cue stays, so it is fed ahead of the inducer, from before that token.
        last = self._tok.decode([view.last_token]) if view.last_token is not None else ""
        i = last.find(view.cue)
        self._pre = last[:i] if i >= 0 else ""
        return Probe(self._pre + self.inducer, max_tokens=self.max_tokens, stop=VLLM_PROBE_STOPS,
                     temperature=SCRIPTS["vllm"].temperature, before_last=i >= 0, tag="deer")

    def on_probe(self, view, result):
        if self.variant != "cotrt":
            return self._script_probe(result)
        self.last_answer = self.profile.probe_answer(result.text, self.inducer, partial=False)
        ended = result.stopped == "stop"
        self.last_confidence = result.confidence(self.how)
        if self.last_answer is None or not ended:
            return None
        if self.last_confidence >= self.threshold:
            return Exit(inject=self.answer_lead, reason="confident")
        return None

    def _script_probe(self, result):
        # Both scripts count a probe however it ended (a box left open at the cap included).
        self.last_answer = self.profile.probe_answer(result.text, self.inducer, partial=True)
        if self.variant == "hf":
            conf = self.last_confidence = hf_confidence(result.max_probs)
            if self._real_stop:
                return Exit(lead=self._lead, inject=EXIT_TEXT[1], reason="end")
            if conf > self.threshold:  # NaN is never above
                return Exit(lead=self._lead, inject=EXIT_TEXT[1], reason="confident")
            return None
        conf = self.last_confidence = vllm_confidence(result.token_probs, self.how)
        if conf is not None and conf > self.threshold:
            return Exit(lead=self._pre + EXIT_TEXT[0], inject=EXIT_TEXT[1], reason="confident")
        return None


class Dynasor(Policy):
    """Dynasor-CoT (Fu et al.): probe every ``every`` thinking tokens; exit when the last
    ``k`` probe answers agree and none hesitates (a hesitation word on word boundaries).

    ending: "template" appends the probed answer in Dynasor's template and finishes;
    "regenerate" ends thinking and lets the model write its answer.
    """

    name = "dynasor"

    def __init__(self, every: int = 64, k: int = 3, max_tokens: int = 32, profile="r1-distill",
                 ending: str = "template", inducer: str | None = None):
        _int("dynasor", "every", every, 1)
        _int("dynasor", "k", k, 1)
        _int("dynasor", "max_tokens", max_tokens, 1)
        _text("dynasor", "inducer", inducer)
        if ending not in ("template", "regenerate"):
            raise ValueError(f"dynasor: ending must be template or regenerate, got {ending!r}")
        self.profile = _profile(profile, "dynasor")
        self.every, self.k, self.max_tokens, self.ending = every, k, max_tokens, ending
        self.inducer = inducer if inducer is not None else self.profile.dynasor_inducer
        self.on_boundary = False
        self.answers: list = []
        self.last_answer = self.last_confidence = None

    def on_step(self, view):
        return Probe(self.inducer, max_tokens=self.max_tokens, tag="dynasor",
                     until=lambda text: self.profile.probe_finished(text, self.inducer))

    def on_probe(self, view, result):
        ans = self.profile.probe_answer(result.text, self.inducer, partial=False)
        certain = ans is not None and result.stopped == "stop" and not self.profile.hesitates(result.text)
        self.answers.append(ans if certain else None)
        self.last_answer = ans
        recent = self.answers[-self.k:]
        agree = (len(recent) == self.k and all(a is not None for a in recent)
                 and all(equivalent(recent[0], a) for a in recent[1:]))
        self.last_confidence = sum(a is not None for a in recent) / self.k
        if not agree:
            return None
        if self.ending == "template":
            return Exit(inject=self.inducer + ans + self.profile.dynasor_ending, finish=True, reason="consistent")
        return Exit(reason="consistent")


class EAT(Policy):
    """Entropy After </think> (EAT): every ``every`` thinking tokens (and at boundaries),
    append the end marker virtually and read the entropy of the next token; keep its
    exponential moving average and variance; exit once the variance settles below
    ``threshold`` (after ``min_probes``)."""

    name = "eat"

    def __init__(self, every: int = 32, alpha: float = 0.2, threshold: float = 1e-3, min_probes: int = 4,
                 end_text: str | None = None, on_boundary: bool = False):
        _int("eat", "every", every, 1, none=True)
        alpha = _num("eat", "alpha", alpha, 0, 1, lo_open=True, hi_open=True)
        threshold = _num("eat", "threshold", threshold, 0)
        _int("eat", "min_probes", min_probes, 1)
        _text("eat", "end_text", end_text)
        _bool("eat", "on_boundary", on_boundary)
        self.every, self.alpha, self.threshold, self.min_probes = every, alpha, threshold, min_probes
        self.end_text = end_text
        self.on_boundary = on_boundary
        self.mean = self.var = None
        self.n = 0
        self.history: list[float] = []
        self.last_answer = None
        self.last_confidence = None

    def on_step(self, view):
        return Probe(self.end_text or "\n</think>\n\n", max_tokens=0, tag="eat")

    def on_probe(self, view, result):
        h = result.entropy
        self.history.append(h)
        self.n += 1
        if self.mean is None:
            self.mean, self.var = h, 0.0
        else:
            d = h - self.mean
            self.mean += self.alpha * d
            self.var = (1 - self.alpha) * (self.var + self.alpha * d * d)
        self.last_confidence = self.var
        if self.n >= self.min_probes and self.var < self.threshold:
            return Exit(reason="entropy_settled")
        return None


class NoWait(Policy):
    """NoWait (Wang et al. 2025): forbid reflection tokens ("Wait", "Hmm", ...) while
    thinking. The vocabulary is scanned once per tokenizer."""

    name = "nowait"
    on_boundary = False

    def __init__(self, words=None, profile="r1-distill"):
        words = _texts("nowait", "words", words)
        self.words = words if words is not None else _profile(profile, "nowait").reflection_words
        self._ids = None

    def banned_tokens(self, phase, tokenizer):
        if phase != "think":
            return []
        if self._ids is None:
            self._ids = reflection_token_ids(tokenizer, self.words)
        return self._ids


class StepLimit(Policy):
    """End thinking after ``max_steps`` reasoning steps (boundaries)."""

    name = "steps"

    def __init__(self, max_steps: int, cues=None):
        self.max_steps = _int("steps", "max_steps", max_steps, 0)
        self.cues = _texts("steps", "cues", cues) or ()

    def on_step(self, view):
        return Exit(reason="max_steps") if view.steps >= self.max_steps else None


class ValveSchedule(Policy):
    """Valve alpha as a function of how much of the thinking budget is spent.

    At each boundary (and every ``every`` tokens), alpha moves from ``start`` towards
    ``end`` as ``(think_tokens / budget) ** power``: a request that is running long gets
    more compression in time to land near ``budget`` instead of being cut off there. The
    feedback is the row's own measured length; which alpha shortens chains is the valve's
    metadata (``start``/``end`` say it). Changes below ``min_change`` are not sent.
    """

    name = "valve_schedule"

    def __init__(self, valve: str, budget: int, start: float = 0.0, end: float = 1.0, power: float = 1.0,
                 every: int | None = 16, min_change: float = 0.05):
        _text("valve_schedule", "valve", valve, none=False)
        _int("valve_schedule", "budget", budget, 1)
        start, end = _num("valve_schedule", "start", start), _num("valve_schedule", "end", end)
        power = _num("valve_schedule", "power", power, 0, lo_open=True)
        _int("valve_schedule", "every", every, 1, none=True)
        min_change = _num("valve_schedule", "min_change", min_change, 0)
        self.valve, self.budget, self.start, self.end = valve, budget, float(start), float(end)
        self.power, self.every, self.min_change = power, every, min_change
        self.current: float | None = None
        self.history: list[tuple[int, float]] = []

    def on_step(self, view):
        frac = min(1.0, view.think_tokens / self.budget)
        alpha = self.start + (self.end - self.start) * frac ** self.power
        if self.current is not None and abs(alpha - self.current) < self.min_change:
            return None
        self.current = alpha
        self.history.append((view.think_tokens, alpha))
        return SetValve({self.valve: alpha})


POLICIES = {"deer": DEER, "dynasor": Dynasor, "eat": EAT, "nowait": NoWait, "steps": StepLimit,
            "valve_schedule": ValveSchedule}


def build_policy(spec: dict) -> Policy:
    """A built-in policy from ``{"name": ..., **settings}`` (server requests, configs)."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError("exit: a policy spec is a dict with a 'name'")
    if not isinstance(spec["name"], str):
        raise ValueError(f"exit: name must be a string, got {spec['name']!r}")
    name = spec["name"].lower()
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"exit: unknown policy {spec['name']!r}; known: {', '.join(sorted(POLICIES))}")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"exit: bad settings for {name}: {e}") from None


__all__ = ["DEER", "Dynasor", "EAT", "NoWait", "StepLimit", "ValveSchedule", "build_policy", "POLICIES"]
