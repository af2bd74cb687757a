"""Requests in: a prompt and its params checked, its patterns compiled, its ``Request`` built.

Everything is validated before any engine state changes: a bad request raises a
``ValueError`` naming the argument and the engine keeps serving.
"""
from __future__ import annotations

import dataclasses
import random

from ..control.automaton import check_pattern_sizes, compile_cached, token_bytes
from ..control.exits import ExitControl
from ..latent.run import LatentRun
from ..control.request import Request, RowPatterns
from ..params import Params


class Intake:
    """Builds the engine's requests (the tokenizer, format and limits are fixed)."""

    def __init__(self, runner, tokenizer, think_format, max_len: int, eos_ids):
        self.runner = runner
        self.tokenizer = tokenizer
        self.fmt = think_format
        self.max_len = max_len
        self.vocab_bytes = token_bytes(tokenizer)
        self.vocab_size = runner.lm_head.weight.shape[0] if hasattr(runner.lm_head, "weight") else len(tokenizer)
        self.eos_ids = frozenset(eos_ids or ())
        self._seed_rng = random.Random()

    def draw_seed(self, n: int = 1) -> int:
        """A random seed for a request without one (``n <= 2**61`` consecutive seeds from
        it stay below 2**62)."""
        return self._seed_rng.getrandbits(62 if n == 1 else 61)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: empty string")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            if any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
                raise ValueError("prompt: token ids must be ints")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt: token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
        else:
            raise ValueError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt: no tokens")
        if len(ids) >= self.max_len:
            raise ValueError(f"prompt: {len(ids)} tokens leave no room to generate within max_len={self.max_len}")
        return ids

    def compile_patterns(self, params: Params) -> RowPatterns:
        """The automaton of a request's stop strings, step cues and policy cues (from the
        compile cache, or compiled now: up to ~0.1 s of CPU, so servers call this in the
        request's own thread and hand the result to ``add``)."""
        cues = params.step_cues + tuple(c for p in params.exit for c in getattr(p, "cues", ()) if c not in params.step_cues)
        patterns = RowPatterns.pattern_list(self.fmt, params.stop, cues)
        if len(patterns) > 63:
            raise ValueError(f"stop, step_cues and policy cues: {len(patterns)} patterns, at most 63")
        check_pattern_sizes(patterns, "stop, step_cues and policy cues")
        return RowPatterns(compile_cached(patterns, self.tokenizer), self.fmt, params.stop, cues)

    @staticmethod
    def params(params) -> Params:
        params = Params() if params is None else params
        if isinstance(params, dict):
            params = Params.from_dict(params)
        if not isinstance(params, Params):
            raise ValueError(f"params must be a cotrt.Params, got {type(params).__name__}")
        return params

    def make(self, ids: list[int], params: Params, patterns: RowPatterns | None, valves, check_valve_names,
             valve_check, next_id) -> Request:
        """The request of (checked) prompt ``ids`` and ``params``; raises before taking an
        id (``next_id()``) when a field is bad. ``valves``: the engine's ValveSet or None."""
        bad = [k for k in params.logit_bias if k >= self.vocab_size]
        if bad:
            raise ValueError(f"logit_bias: token id {bad[0]} outside the vocabulary")
        check_valve_names(params.valve)
        for pol in params.exit:  # a schedule naming no loaded valve failed mid-generation
            if isinstance(getattr(pol, "valve", None), str):
                check_valve_names({pol.valve: 0.0}, f"exit: {pol.name}: valve")
        bound = None
        if params.latent is not None:
            names = valves.names if valves is not None else []
            bound = params.latent.bind(self.runner.model, self.tokenizer, valve_names=names)
            ids, bound = bound.for_prompt(ids)  # a prompt in Coconut's layout sets k
            if len(ids) + bound.max_steps + 1 >= self.max_len:
                raise ValueError(f"prompt: {len(ids)} tokens and {bound.max_steps} latent steps leave no room "
                                 f"within max_len={self.max_len}")
        pats = self.compile_patterns(params) if patterns is None else patterns
        if params.seed is None:
            params = dataclasses.replace(params, seed=self.draw_seed())
        req = Request(next_id(), ids, params, self.fmt, pats, self.vocab_bytes, self.eos_ids, self.encode, self.max_len,
                      valve_check=valve_check)
        if params.exit:
            req.exits = ExitControl(params.exit, self.tokenizer, self.eos_ids)
        if bound is not None:
            req.latent = LatentRun(bound)
            if bound.valve_during:
                req.valve = dict(bound.valve_during)
        return req
