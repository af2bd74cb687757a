"""Per-request generation parameters, validated at construction."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields


def _check_int(name, value, minimum, allow_none=True):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int{' or None' if allow_none else ''}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_float(name, value, lo=None, hi=None, lo_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")


# Temperatures below this are greedy (0): dividing logits by less overflows fp32 (a 1e-300
# temperature drew NaN garbage), and the distribution is then its argmax anyway.
GREEDY_TEMPERATURE = 1e-5
# Samples of one prompt (Params.n): one request each, so at most what a batch can hold.
MAX_SAMPLES = 128


@dataclass(frozen=True)
class Params:
    """How one request is decoded.

    Sampling: ``temperature == 0`` is greedy (and so is any below ``GREEDY_TEMPERATURE``, 1e-5); ``top_k == 0`` and ``top_p == 1`` disable those
    filters. ``seed`` makes a sampled request reproducible and independent of what else is in
    the batch (None draws one).

    Thinking control (tokens of the think phase; for a model without think markers the whole
    output is the think phase and its "end marker" is the answer cue "\\nFinal answer:"):

    - ``think_budget``: hard cap. When reached, the end marker is forced (preceded by the
      think format's transition phrase, if it has one). The forced text is not counted
      against the budget. ``think_budget_cut`` says where: ``"token"`` right after the
      budget's last token; ``"step"`` at the end of the last whole step within the budget
      (the tokens of the step still being written are taken back, ``stats["rolled_back"]``;
      with no whole step yet, thinking closes empty), so the answer never follows a
      half-written step. Streaming then holds each step back until it is whole.
    - ``soft_budget``: past it, thinking ends at the next step boundary; if none comes within
      ``soft_grace`` tokens the end is forced anyway.
    - ``min_think``: thinking shorter than this is extended: an end marker produced earlier
      is taken back and ``wait_text`` appended instead, at most ``max_waits`` times (s1).
    - ``answer_budget``: cap on the answer phase's tokens; the request then finishes.
    - ``max_steps``: cap on reasoning steps (boundaries seen while thinking); reaching it
      ends thinking at that boundary.
    - ``step_cues``: the strings that mark a step boundary ("\\n\\n" by default; e.g. add
      "Wait", "Alternatively").

    ``stop``: strings that finish the request (not included in the text).
    ``logit_bias``: token id -> additive bias on its logit (OpenAI's convention).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple = ()
    think_budget: int | None = None
    think_budget_cut: str = "token"
    soft_budget: int | None = None
    min_think: int | None = None
    answer_budget: int | None = None
    max_steps: int | None = None
    soft_grace: int = 64
    max_waits: int = 4
    wait_text: str = "Wait"
    step_cues: tuple = ("\n\n",)
    ignore_eos: bool = False
    logit_bias: dict = field(default_factory=dict)
    exit: object = None
    valve: dict = field(default_factory=dict)
    latent: object = None
    n: int = 1
    consistency: object = None

    # ``n``: samples of the prompt (seeds ``seed``, ``seed + 1``, ...; with seed None one
    # base seed is drawn). They share the prompt's KV pages. ``Runtime.generate`` returns
    # n outputs per prompt, prompt-major; ``Engine.add_samples`` queues them.
    # ``consistency``: a cotrt.SelfConsistency (or its dict form) over the n samples:
    # early exit once enough finished samples agree on an answer, the others aborted.

    # ``latent``: a cotrt.Latent (or its dict form): a dense latent phase (Coconut's k
    # steps, or CCoT's END head) right after the prompt; see cotrt/latent/.

    # ``valve``: {"name": alpha} of a loaded valve (``Runtime.load_valve``): the request
    # runs θ + alpha·Δθ for that LoRA. One valve per request; alpha may be any finite
    # number (0 = the base model exactly; > 1 extrapolates).

    # ``exit``: an early-exit policy (cotrt.Policy) or a sequence of them, or a dict /
    # list of dicts {"name": "deer", ...settings} naming built-in ones. Each request gets
    # its own copy of each policy.

    def __post_init__(self):
        _check_int("max_new_tokens", self.max_new_tokens, 1, allow_none=False)
        _check_float("temperature", self.temperature, lo=0.0)
        if self.temperature < GREEDY_TEMPERATURE:  # logits / 1e-300 overflow to inf: NaN draws
            object.__setattr__(self, "temperature", 0.0)
        _check_float("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        _check_int("top_k", self.top_k, 0, allow_none=False)
        _check_int("seed", self.seed, 0)
        for name in ("think_budget", "soft_budget", "min_think", "answer_budget", "max_steps"):
            _check_int(name, getattr(self, name), 0)
        if self.think_budget_cut not in ("token", "step"):
            raise ValueError(f"think_budget_cut must be 'token' or 'step', got {self.think_budget_cut!r}")
        _check_int("soft_grace", self.soft_grace, 0, allow_none=False)
        _check_int("max_waits", self.max_waits, 0, allow_none=False)
        if self.seed is not None and self.seed >= 2**63:
            raise ValueError(f"seed must be < 2**63, got {self.seed}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a string or a sequence of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        cues = (self.step_cues,) if isinstance(self.step_cues, str) else self.step_cues
        if not isinstance(cues, (tuple, list)) or not all(isinstance(s, str) and s for s in cues):
            raise ValueError(f"step_cues must be a sequence of non-empty strings, got {self.step_cues!r}")
        object.__setattr__(self, "step_cues", tuple(cues))
        if not isinstance(self.wait_text, str) or not self.wait_text:
            raise ValueError(f"wait_text must be a non-empty string, got {self.wait_text!r}")
        if len(self.stop) + len(self.step_cues) > 48:
            raise ValueError("stop and step_cues: at most 48 strings together")
        from .control.automaton import check_pattern_sizes

        check_pattern_sizes(self.stop, "stop")
        check_pattern_sizes(self.step_cues, "step_cues")
        check_pattern_sizes(self.stop + self.step_cues, "stop and step_cues")
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id -> float, got {type(self.logit_bias).__name__}")
        for k, v in self.logit_bias.items():
            _check_int("logit_bias key", k, 0, allow_none=False)
            _check_float(f"logit_bias[{k}]", v, lo=-100.0, hi=100.0)
        object.__setattr__(self, "exit", _policies(self.exit))
        check_valve(self.valve, "valve")
        if self.latent is not None:
            from .latent import Latent

            if isinstance(self.latent, dict):
                object.__setattr__(self, "latent", Latent.from_dict(self.latent))
            elif not isinstance(self.latent, Latent):
                raise ValueError(f"latent must be a cotrt.Latent or a dict, got {type(self.latent).__name__}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        _check_int("n", self.n, 1, allow_none=False)
        if self.n > MAX_SAMPLES:
            raise ValueError(f"n must be <= {MAX_SAMPLES}, got {self.n}")
        if self.seed is not None and self.seed + self.n - 1 >= 2**63:
            raise ValueError(f"seed + n - 1 must be < 2**63 (seeds seed .. seed + n - 1), got seed={self.seed}")
        if self.consistency is not None:
            from .control.consistency import SelfConsistency

            if isinstance(self.consistency, dict):
                object.__setattr__(self, "consistency", SelfConsistency.from_dict(self.consistency))
            elif not isinstance(self.consistency, SelfConsistency):
                raise ValueError(f"consistency must be a cotrt.SelfConsistency or a dict, "
                                 f"got {type(self.consistency).__name__}")
            self.consistency.check(self.n)

    @classmethod
    def from_dict(cls, d: dict) -> "Params":
        """Build from a dict (e.g. a JSON request), naming any unknown key."""
        if not isinstance(d, dict):
            raise ValueError(f"params must be a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown parameter(s): {', '.join(unknown)}")
        d = dict(d)
        for key in ("stop", "step_cues"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(**d)


def _policies(value) -> tuple:
    from .control.policy import Policy

    if value is None:
        return ()
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            from .control.policies import build_policy

            item = build_policy(item)
        if not isinstance(item, Policy):
            raise ValueError(f"exit[{i}] must be a cotrt.Policy or a {{'name': ...}} dict, got {type(item).__name__}")
        out.append(item)
    return tuple(out)


def check_valve(valve, name: str = "valve") -> None:
    """{"valve name": alpha} with one entry at most and a finite alpha."""
    if not isinstance(valve, dict):
        raise ValueError(f"{name} must be a dict {{'valve name': alpha}}, got {type(valve).__name__}")
    if len(valve) > 1:
        raise ValueError(f"{name}: one valve per request (got {sorted(valve)})")
    for k, v in valve.items():
        if not isinstance(k, str) or not k:
            raise ValueError(f"{name}: valve names are non-empty strings, got {k!r}")
        _check_float(f"{name}[{k!r}]", v)
