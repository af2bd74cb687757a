"""Continuous batching over the slot cache.

One ``step()``: admit waiting requests into free slots and prefill them (one padded
forward), decode every running row by one token (one forward), sample the rows that
sample, run each appended token through its row's controls, free finished slots at once.
Requests beyond ``max_batch`` wait in the queue; they never fail for it.
"""
from __future__ import annotations

import itertools
import random
import time
from collections import deque

import torch

from .control.automaton import check_pattern_sizes, compile_cached, token_bytes
from .control.exits import ExitControl
from .control.latent_run import LatentRun
from .control.row import Row, RowPatterns
from .control.think import ThinkFormat
from .output import Event, OutputBuilder
from .params import Params
from .sampling import sample

# Prefill at most this many (padded) tokens per forward: bounds the memory of the
# attention scores and of the mask when many long prompts arrive at once.
PREFILL_TOKENS = 4096


class Engine:
    """The batching engine. ``add`` -> id, ``step`` -> events, ``abort``, ``has_unfinished``."""

    def __init__(self, runner, tokenizer, think_format: ThinkFormat, max_batch: int, max_len: int,
                 eos_ids=None, decode_graph: str = "off"):
        self.runner = runner
        self.tokenizer = tokenizer
        self.fmt = think_format
        self.max_batch, self.max_len = max_batch, max_len
        self.vocab_bytes = token_bytes(tokenizer)
        self.vocab_size = runner.lm_head.weight.shape[0] if hasattr(runner.lm_head, "weight") else len(tokenizer)
        self.eos_ids = frozenset(eos_ids or ())
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", []) or [])
        self.queue: deque[Row] = deque()
        self.running: dict[int, Row] = {}  # slot -> row
        self.requests: dict[int, Row] = {}
        self.free_slots = list(range(max_batch))
        self._ids = itertools.count()
        self._seed_rng = random.Random()
        self._aborted: list[Row] = []
        self.device = runner.device
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0}
        self.valves = None  # cotrt.valve.ValveSet once a valve is loaded
        self.out = OutputBuilder(tokenizer, think_format)
        # Decode steps as captured CUDA graphs ("cuda"), the same static-shape step run
        # eagerly ("static"), or the eager step with live-length attention ("off").
        from .graph import DecodeGraphs, resolve_mode

        mode = resolve_mode(decode_graph, self.device)
        self.graphs = DecodeGraphs(runner, capture=mode == "cuda") if mode != "off" else None

    # -- requests ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _prompt_ids(self, prompt) -> list[int]:
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

    def add(self, prompt, params: Params | None = None, patterns: RowPatterns | None = None) -> int:
        """Queue a request; returns its id. Everything is validated before any state changes.
        ``patterns``: ``compile_patterns(params)``, already made (by another thread)."""
        params = Params() if params is None else params
        if isinstance(params, dict):
            params = Params.from_dict(params)
        if not isinstance(params, Params):
            raise ValueError(f"params must be a cotrt.Params, got {type(params).__name__}")
        ids = self._prompt_ids(prompt)
        bad = [k for k in params.logit_bias if k >= self.vocab_size]
        if bad:
            raise ValueError(f"logit_bias: token id {bad[0]} outside the vocabulary")
        self.check_valve_names(params.valve)
        for pol in params.exit:  # a schedule naming no loaded valve failed mid-generation
            if isinstance(getattr(pol, "valve", None), str):
                self.check_valve_names({pol.valve: 0.0}, f"exit: {pol.name}: valve")
        bound = None
        if params.latent is not None:
            names = self.valves.names if self.valves is not None else []
            bound = params.latent.bind(self.runner.model, self.tokenizer, valve_names=names)
            ids, bound = bound.for_prompt(ids)  # a prompt in Coconut's layout sets k
            if len(ids) + bound.max_steps + 1 >= self.max_len:
                raise ValueError(f"prompt: {len(ids)} tokens and {bound.max_steps} latent steps leave no room "
                                 f"within max_len={self.max_len}")
        pats = self.compile_patterns(params) if patterns is None else patterns
        if params.seed is None:
            params = _with_seed(params, self._seed_rng.getrandbits(62))
        rid = next(self._ids)
        row = Row(rid, ids, params, self.fmt, pats, self.vocab_bytes, self.eos_ids, self.encode, self.max_len)
        if params.exit:
            row.exits = ExitControl(params.exit, self.tokenizer, self.eos_ids)
        row.valve_check = self._valve_check
        if bound is not None:
            row.latent = LatentRun(bound)
            if bound.valve_during:
                row.valve = dict(bound.valve_during)
        row.t_add = time.perf_counter()
        self.requests[rid] = row
        self.queue.append(row)
        return rid

    def check_valve_names(self, valve: dict, field: str = "valve") -> None:
        for name in valve:
            if self.valves is None or name not in self.valves:
                known = ", ".join(self.valves.names) if self.valves is not None else "none loaded"
                raise ValueError(f"{field}: unknown valve {name!r} (loaded: {known})")

    def _valve_check(self, valve: dict) -> None:
        from .params import check_valve

        check_valve(valve)
        self.check_valve_names(valve)

    def set_valve(self, rid: int, valve: dict) -> None:
        """Change a running request's valve from its next token on: {"name": alpha}, or {}
        for the base model. Validated first; no recompilation, no graph recapture."""
        from .params import check_valve

        check_valve(valve)
        self.check_valve_names(valve)
        row = self.requests.get(rid)
        if row is None or row.finished:
            raise ValueError(f"set_valve: no running request {rid}")
        row.valve = dict(valve)

    def abort(self, rid: int) -> bool:
        """Stop a request now and free its slot; False if it is unknown or already done."""
        row = self.requests.get(rid)
        if row is None or row.finished:
            return False
        row._finish("abort", "abort")
        if row.slot < 0:
            self.queue.remove(row)
        self._aborted.append(row)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.queue or self.running or self._aborted)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.queue)

    # -- the step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Event]:
        events: list[Event] = []
        for row in self._aborted:
            self._release(row)
            events.append(self.out.final_event(row))
        self._aborted.clear()
        running = [self.running[s] for s in sorted(self.running)]
        admitted = self._admit()
        # Each row says what it feeds this step: one token (decode), or several (a prompt,
        # the first forward of a probe).
        plans = {r.id: self._plan(r) for r in running}
        plans.update({r.id: (r.prompt, 0) for r in admitted})
        rows = running + admitted
        single = [r for r in rows if len(plans[r.id][0]) == 1]
        multi = [r for r in rows if len(plans[r.id][0]) > 1]
        if single:
            self._guarded(single, lambda rs: self._decode(rs, plans))
        for group in _extend_groups(multi, plans):
            self._guarded(group, lambda rs: self._extend(rs, plans))
        self.stats["steps"] += 1
        for row in rows:
            ev = self.out.event(row)
            if ev is not None:
                events.append(ev)
            if row.finished:
                self._release(row)
        return events

    def _plan(self, row: Row) -> tuple[list[int], int]:
        """(tokens to feed, slot position of the first) for a running row."""
        if row.exits is not None and row.exits.probe is not None:
            return row.exits.probe.plan()
        return [row.next_input], row.cache_len

    def _admit(self) -> list[Row]:
        rows = []
        while self.queue and self.free_slots:
            row = self.queue.popleft()
            row.slot = self.free_slots.pop(0)
            self.running[row.slot] = row
            row.start()
            rows.append(row)
        return rows

    def _guarded(self, rows, fn) -> None:
        """Run a forward for ``rows``; a failure ends those requests with an error instead
        of taking the engine down."""
        try:
            fn(rows)
        except Exception as e:  # noqa: BLE001 - one bad batch must not kill the engine
            for row in rows:
                if not row.finished:
                    row._finish("error", "error")
                    row.error = f"{type(e).__name__}: {e}"

    def _extend(self, rows: list[Row], plans) -> None:
        """Several new tokens per row (right-padded): prompts, probe starts."""
        runner = self.runner
        feeds = [plans[r.id][0] for r in rows]
        T = max(map(len, feeds))
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        for i, f in enumerate(feeds):
            ids[i, : len(f)] = torch.tensor(f)
        meta = runner.make_meta([r.slot for r in rows], [len(f) for f in feeds],
                                starts=[plans[r.id][1] for r in rows])
        self._set_valves(rows, T)
        taps = _taps(rows)
        hidden = runner.forward(meta, input_ids=ids.to(self.device), taps=taps)
        self.stats["prefill_tokens"] += sum(map(len, feeds))
        now = time.perf_counter()
        for r in rows:
            if not hasattr(r, "t_first"):
                r.t_first = now
        tapped = {l: runner.last_hidden(runner.tapped[l], meta) for l in taps}
        self._after_forward(rows, runner.last_hidden(hidden, meta), tapped)

    def _decode(self, rows: list[Row], plans) -> None:
        """One token per row."""
        if self.graphs is not None and self._decode_static(rows, plans):
            return
        runner = self.runner
        slots = [r.slot for r in rows]
        inputs = [plans[r.id][0][0] for r in rows]
        starts = [plans[r.id][1] for r in rows]
        span = range(slots[0], slots[-1] + 1)
        holes = set(span) - set(slots)
        # Only free slots may be padded: a hole can also be a row that runs a multi-token
        # forward this step (a prompt, a probe start), whose cache must not be touched.
        if holes and len(span) <= 2 * len(rows) and not holes & set(self.running):
            # Free slots between running ones: decode them as dummy rows (token 0 at
            # position 0 of a free slot) so that attention reads the cache through views.
            # A decode step is bound by reading the weights, so a few extra rows cost
            # little, while gathering every layer's K/V rows cost ~10% of the step (CPU).
            by_slot = {r.slot: i for i, r in enumerate(rows)}
            slots = list(span)
            inputs = [inputs[by_slot[s]] if s in by_slot else 0 for s in slots]
            starts = [starts[by_slot[s]] if s in by_slot else 0 for s in slots]
        ids = torch.tensor(inputs, dtype=torch.long, device=self.device)[:, None]
        meta = runner.make_meta(slots, [1] * len(slots), starts=starts)
        if len(slots) != len(rows):
            by_slot = {r.slot: r for r in rows}
            self._set_valves([by_slot.get(s) for s in slots], 1)
        else:
            self._set_valves(rows, 1)
        taps = _taps(rows)
        latent_in = [r.latent is not None and r.latent.pending is not None for r in rows]
        if any(latent_in):
            # Latent rows feed back a state instead of a token: one pass builds every row's
            # input embedding (contemplate op); token rows get E[tok].
            hidden = runner.forward(meta, inputs_embeds=self._latent_inputs(rows, slots, ids[:, 0])[:, None],
                                    taps=taps)[:, 0]
        else:
            hidden = runner.forward(meta, input_ids=ids, taps=taps)[:, 0]
        tapped = {l: runner.tapped[l][:, 0] for l in taps}
        if len(slots) != len(rows):
            keep = torch.tensor([r.slot - slots[0] for r in rows], device=hidden.device)
            hidden = hidden.index_select(0, keep)
            tapped = {l: t.index_select(0, keep) for l, t in tapped.items()}
        self.stats["decode_tokens"] += len(rows)
        self._after_forward(rows, hidden, tapped)

    def _decode_static(self, rows: list[Row], plans) -> bool:
        """The decode step through ``self.graphs`` (cotrt.graph); False when this step's
        key cannot be captured, and the eager step runs instead."""
        graphs = self.graphs
        n = len(rows)
        B = graphs.bucket(n)
        if self.valves is not None:
            graphs.sync_valves(self.valves.generation)
            self.valves.state.reserve_static(graphs.max_rows)
        valve = self._set_valves(rows + [None] * (B - n), 1)
        latent = any(r.latent is not None and r.latent.pending is not None for r in rows)
        mode, sampling = self._graph_sampling(rows)
        key = graphs.key(n, valve, latent, _taps(rows), mode)
        if graphs.failed(key):
            return False
        slots = [r.slot for r in rows]
        tokens = [plans[r.id][0][0] for r in rows]
        embeds = None
        if latent:
            ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
            embeds = self._latent_inputs(rows, slots, ids)
        out = graphs.run(key, slots, tokens, [plans[r.id][1] for r in rows], embeds=embeds, sampling=sampling)
        if out is None:
            return False
        hidden, logits, tapped, sampled = out
        self.stats["decode_tokens"] += n
        self._after_forward(rows, hidden, tapped, logits_all=logits,
                            tokens_all=sampled.tolist() if sampled is not None else None)  # the step's sync
        return True

    def _graph_sampling(self, rows: list[Row]):
        """``(mode, per-row inputs)`` for sampling inside a captured step: "greedy" when
        every sampling row is greedy, "plain" when none uses top-k / top-p; ``(None, None)``
        otherwise (or when a row carries more than MAX_BIASES biases and banned tokens),
        and the engine samples the step's logits itself."""
        from .graph import MAX_BIASES

        _, _, sampling = _row_roles(rows)
        sampling = set(sampling)
        mode, spec = "greedy", []
        for i, r in enumerate(rows):
            if i not in sampling:
                spec.append((0.0, 0, 0, ()))
                continue
            p = r.params
            banned = _row_banned(r, self.vocab_size)
            if banned is None:  # its policy failed: the row has ended; a placeholder spec
                spec.append((0.0, 0, 0, ()))
                continue
            biases = list(p.logit_bias.items()) + [(t, float("-inf")) for t in banned]
            if len(biases) > MAX_BIASES:
                return None, None
            if p.temperature > 0:
                if p.top_k > 0 or p.top_p < 1:
                    return None, None
                mode = "plain"
            spec.append((float(p.temperature), p.seed, r.seq_len, biases))
        return mode, spec

    def _latent_inputs(self, rows, slots, tokens: torch.Tensor) -> torch.Tensor:
        """``[len(slots), E]`` next inputs: fed-back vectors on latent rows, E[tok] on others."""
        from .ops.contemplate import contemplate

        emb = self.runner.embed.weight
        by_slot = {r.slot: r for r in rows}
        states = torch.zeros(len(slots), emb.shape[1], dtype=emb.dtype, device=emb.device)
        mask = torch.zeros(len(slots), dtype=torch.bool, device=emb.device)
        for i, s in enumerate(slots):
            r = by_slot.get(s)
            if r is not None and r.latent is not None and r.latent.pending is not None:
                states[i] = r.latent.pending
                mask[i] = True
        return contemplate(tokens.to(emb.device), mask, states, emb)

    def _set_valves(self, rows, tokens_per_row: int) -> bool:
        """Per-token valve alpha and adapter index for this forward (None rows: padding).
        With no valve in use the ValveLinears run plain F.linear. True when a valve is on."""
        if self.valves is None:
            return False
        state = self.valves.state
        alphas, adapters = [], []
        for r in rows:
            valve = r.valve if r is not None else None
            (name, alpha), = valve.items() if valve else ((None, 0.0),)
            if alpha != 0.0:  # alpha 0 is the base model exactly: no delta to compute
                alphas.append(float(alpha))
                adapters.append(self.valves.index(name))
            else:
                alphas.append(0.0)
                adapters.append(-1)
        if all(a < 0 for a in adapters):
            state.clear()
            return False
        state.set_rows(alphas, adapters, tokens_per_row)
        return True

    def _after_forward(self, rows: list[Row], h: torch.Tensor, tapped: dict | None = None,
                       logits_all: torch.Tensor | None = None, tokens_all: list | None = None) -> None:
        """LM head on the rows that need logits (sampling rows, probes); forced tokens for
        the others; then each row's controls and policies. ``logits_all``: every row's
        logits, already computed (a captured step's output buffer: biases may be applied to
        it in place; the next replay rewrites it anyway). ``tokens_all``: every row's token,
        sampled inside the captured step (used for the rows that sample)."""
        if self.valves is not None:
            self.valves.state.clear()  # a user's own model.generate must see no valve
        probing, latent, sampling = _row_roles(rows)
        skip = set(probing) | set(latent)
        toks: dict[int, int] = {}
        if tokens_all is not None:  # sampled inside the captured step
            toks = {i: tokens_all[i] for i in sampling}
            sampling = []
        need = sampling + probing
        logits = None
        if need:
            # Every row in order (the usual decode step): no gather, no index tensor to
            # copy to the device (each small host-to-device copy waits for the stream).
            if need == list(range(len(need))):
                logits = logits_all[: len(need)] if logits_all is not None else self.runner.logits(h[: len(need)])
            else:
                need_t = torch.tensor(need, device=h.device)
                logits = logits_all.index_select(0, need_t) if logits_all is not None else \
                    self.runner.logits(h.index_select(0, need_t))
        if sampling:
            lg = logits[: len(sampling)]
            self._apply_biases(lg, [rows[i] for i in sampling])
            ps = [rows[i].params for i in sampling]
            hot = [j for j, p in enumerate(ps) if p.temperature > 0]
            if not hot:  # all greedy
                out = lg.argmax(dim=-1).tolist()  # the step's one host sync: the tokens
            else:
                filt = [j for j in hot if ps[j].top_k > 0 or ps[j].top_p < 1]  # only these are sorted
                host = {"sampled_rows": hot, "filtered": bool(filt),
                        "kmax": lg.shape[-1] if any(ps[j].top_k == 0 for j in filt) else
                        max((ps[j].top_k for j in filt), default=1)}
                # Per-row parameters in two host-to-device copies, not five.
                ints = torch.tensor([[p.top_k for p in ps], [p.seed for p in ps],
                                     [rows[i].seq_len for i in sampling]], dtype=torch.long).to(lg.device)
                floats = torch.tensor([[p.temperature for p in ps], [p.top_p for p in ps]],
                                      dtype=torch.float32).to(lg.device)
                out = sample(lg, temperature=floats[0], top_p=floats[1], top_k=ints[0], seed=ints[1],
                             counter=ints[2], host=host).tolist()  # the step's one host sync
            toks = dict(zip(sampling, out))
        for j, i in enumerate(probing):
            _isolated(rows[i], lambda r=rows[i], j=j: r.exits.consume(r, logits[len(sampling) + j]))
        emb = self.runner.embed.weight
        for i in latent:
            r = rows[i]
            tap = tapped.get(r.latent.tap)[i] if r.latent.tap is not None else None
            _isolated(r, lambda r=r, i=i, tap=tap: r.latent.step(r, h[i], tap, emb))
        for i, r in enumerate(rows):
            if r.finished or i in skip:
                continue
            if i in toks:
                _isolated(r, lambda r=r, t=toks[i]: self._accept_sampled(r, t))
            else:
                _isolated(r, lambda r=r: r.accept(r.forced.popleft(), forced=True))

    @staticmethod
    def _accept_sampled(row: Row, tok: int) -> None:
        row.accept(tok, forced=False)
        if row.exits is not None and not row.finished:
            row.exits.after_token(row, row.last_cue is not None, row.last_cue)

    def _apply_biases(self, logits: torch.Tensor, rows: list[Row]) -> None:
        """Logit biases and banned tokens, row by row: a row whose policy fails ends alone
        (its batch-mates' rows of ``logits`` are untouched; its own token is dropped)."""
        for i, r in enumerate(rows):
            banned = _row_banned(r, self.vocab_size)
            if banned is None:
                continue
            if r.params.logit_bias:
                ids = list(r.params.logit_bias)
                logits[i, ids] += torch.tensor([r.params.logit_bias[k] for k in ids], device=logits.device)
            if banned:
                logits[i, banned] = float("-inf")

    # -- outputs ----------------------------------------------------------------------------
    def _release(self, row: Row) -> None:
        if row.slot >= 0 and self.running.get(row.slot) is row:
            del self.running[row.slot]
            self.free_slots.append(row.slot)
            self.free_slots.sort()
        row.slot = -1
        row.t_done = time.perf_counter()
        self.requests.pop(row.id, None)


def _row_roles(rows) -> tuple[list, list, list]:
    """Indices of the rows that probe, that take a latent step, and that sample this step
    (the others force a token or are done)."""
    probing = [i for i, r in enumerate(rows) if r.exits is not None and r.exits.probe is not None]
    latent = [i for i, r in enumerate(rows) if r.latent is not None and r.latent.active and not r.finished]
    skip = set(probing) | set(latent)
    sampling = [i for i, r in enumerate(rows) if i not in skip and not r.forced and not r.finished]
    return probing, latent, sampling


def _taps(rows) -> tuple:
    """Decoder layers whose residual some latent row feeds back this step."""
    return tuple(sorted({r.latent.tap for r in rows if r.latent is not None and r.latent.tap is not None}))


def _isolated(row: Row, fn) -> None:
    """Per-row work after a forward (controls, user policies): a failure ends that request
    with an error and leaves the others alone."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        if not row.finished:
            row._finish("error", "error")
            row.error = f"{type(e).__name__}: {e}"


def _row_banned(row: Row, vocab_size: int) -> list[int] | None:
    """The row's banned token ids this step (its controls' and its policies'), checked;
    None when a policy failed or named a bad id: the row then ends with an error alone."""
    def get():
        banned = row.banned_tokens() + (row.exits.banned(row) if row.exits is not None else [])
        for t in banned:  # numpy ints pass (operator.index); floats, bools and strings do not
            if isinstance(t, bool) or not hasattr(t, "__index__") or not 0 <= t < vocab_size:
                raise ValueError(f"banned_tokens: {t!r} is not a token id in [0, {vocab_size})")
        return banned

    out: list = []
    _isolated(row, lambda: out.append(get()))
    return out[0] if out else None


def _with_seed(params: Params, seed: int) -> Params:
    import dataclasses

    return dataclasses.replace(params, seed=seed)


def _extend_groups(rows: list[Row], plans):
    """Group multi-token rows for padded forwards: at most PREFILL_TOKENS padded tokens a
    forward, and feeds within 25% of each other's length, so padding wastes little (these
    forwards are compute-bound: padded tokens cost as much as real ones)."""
    n_of = lambda r: len(plans[r.id][0])
    rows = sorted(rows, key=n_of)
    group: list[Row] = []
    for r in rows:
        n = n_of(r)
        if group and (n * (len(group) + 1) > PREFILL_TOKENS or n > 1.25 * n_of(group[0]) + 8):
            yield group
            group = []
        group.append(r)
    if group:
        yield group

