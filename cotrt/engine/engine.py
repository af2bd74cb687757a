"""Continuous batching over the paged KV cache.

One ``step()``: pages for the running rows' next tokens (preempting the newest request
when the cache is full), admission of waiting requests while lanes and pages are free,
then one forward for the rows that feed one token (the decode step: a captured graph when
it can, else eager) and one padded forward per group of rows that feed several (prompts,
probe starts, a preempted request's recompute); after each forward, logits -> sample ->
controls; finished requests free their lanes and pages at once.

    intake.py     requests in: validation, patterns, the Request
    scheduler.py  queue, lanes, admission, preemption, release, aborts, prefill groups
    kv.py         KvPages: each request's pages, prefix hits, growth and trim
    batch.py      StepBatch: one forward's rows, inputs, roles, valves, latent inputs
    sampler.py    the draws: biases and bans once, for captured and eager sampling
"""
from __future__ import annotations

import dataclasses
import time

import torch

from ..control.consistency import Vote
from ..control.phase import THINK
from ..control.request import Request, RowPatterns
from ..control.think import ThinkFormat
from ..output import Event, OutputBuilder
from ..params import Params, check_valve
from .batch import StepBatch, set_valves, set_token_valves
from .graph import DecodeGraphs, resolve_mode
from .intake import Intake
from .kv import KvPages, admission_tokens, extent
from .sampler import Sampler
from .scheduler import Scheduler, plan, prefill_groups


class Engine:
    """The batching engine. ``add`` -> id, ``step`` -> events, ``abort``, ``has_unfinished``."""

    def __init__(self, runner, tokenizer, think_format: ThinkFormat, max_batch: int, max_len: int,
                 eos_ids=None, decode_graph: str = "off"):
        self.runner = runner
        self.tokenizer = tokenizer
        self.fmt = think_format
        self.max_batch, self.max_len = max_batch, max_len
        self.device = runner.device
        self.intake = Intake(runner, tokenizer, think_format, max_len, eos_ids)
        self.vocab_size, self.eos_ids = self.intake.vocab_size, self.intake.eos_ids
        self.scheduler = Scheduler(max_batch)
        self.kv = KvPages(runner.num_pages, runner.page_size)
        self.sampler = Sampler(self.vocab_size)
        self.out = OutputBuilder(tokenizer, think_format)
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "cached_prompt_tokens": 0, "preempted": 0}
        self.valves = None  # cotrt.valve.ValveSet once a valve is loaded
        # Decode steps as captured CUDA graphs ("cuda"), the same static-shape step run
        # eagerly ("static"), or the eager step with live-length attention ("off").
        mode = resolve_mode(decode_graph, self.device)
        self.graphs = DecodeGraphs(runner, capture=mode == "cuda") if mode != "off" else None

    # -- requests ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.intake.encode(text)

    def _prompt_ids(self, prompt) -> list[int]:
        return self.intake.prompt_ids(prompt)

    def compile_patterns(self, params: Params) -> RowPatterns:
        """The automaton of a request's stop strings, step cues and policy cues (compiled
        now when not cached: servers call this in the request's own thread, then ``add``)."""
        return self.intake.compile_patterns(params)

    def add(self, prompt, params: Params | None = None, patterns: RowPatterns | None = None) -> int:
        """Queue a request; returns its id. Everything is validated before any state changes.
        ``patterns``: ``compile_patterns(params)``, already made (by another thread).
        ``params.n`` must be 1 here (``add_samples`` queues n)."""
        params = Intake.params(params)
        if params.n != 1:
            raise ValueError(f"n: Engine.add queues one request, got n={params.n} (use Engine.add_samples)")
        return self.add_samples(prompt, params, patterns)[0]

    def add_samples(self, prompt, params: Params | None = None, patterns: RowPatterns | None = None) -> list[int]:
        """Queue ``params.n`` samples of one prompt (seeds ``seed``, ``seed + 1``, ...; they
        share the prompt's KV pages); returns their ids. With ``params.consistency`` they
        vote (cotrt/control/consistency.py). Validated before any state changes."""
        params = Intake.params(params)
        ids = self._prompt_ids(prompt)
        if params.n > self.max_batch and params.consistency is not None:
            raise ValueError(f"n: {params.n} voting samples exceed max_batch={self.max_batch} (they must run together)")
        if params.seed is None:
            params = dataclasses.replace(params, seed=self.intake.draw_seed(params.n))
        reqs = []
        for i in range(params.n):
            p = dataclasses.replace(params, n=1, seed=params.seed + i, consistency=None) if params.n > 1 else params
            reqs.append(self.intake.make(ids, p, patterns, self.valves, self.check_valve_names, self._valve_check,
                                         self.scheduler.next_id))
            patterns = reqs[0].pats  # compiled once
        if params.consistency is not None:
            vote = Vote(params.consistency, params.n)
            for req in reqs:
                req.group = vote
                vote.members.append(req.id)
        for req in reqs:
            self.scheduler.enqueue(req)
        return [req.id for req in reqs]

    def prompt_state(self, rid: int) -> tuple[int, bool]:
        """``(prompt tokens, thinking)`` of a waiting or running request: ``thinking`` when
        its prompt leaves the think phase open (a template that pre-opens ``<think>``).
        ``(0, False)`` for an unknown one."""
        req = self.scheduler.requests.get(rid)
        return (0, False) if req is None else (len(req.prompt), req.phase0 == THINK)

    def check_valve_names(self, valve: dict, field: str = "valve") -> None:
        for name in valve:
            if self.valves is None or name not in self.valves:
                known = ", ".join(self.valves.names) if self.valves is not None else "none loaded"
                raise ValueError(f"{field}: unknown valve {name!r} (loaded: {known})")

    def _valve_check(self, valve: dict) -> None:
        check_valve(valve)
        self.check_valve_names(valve)

    def set_valve(self, rid: int, valve: dict) -> None:
        """Change a running request's valve from its next token on: {"name": alpha}, or {}
        for the base model. Validated first; no recompilation, no graph recapture."""
        self._valve_check(valve)
        req = self.scheduler.live(rid)
        if req is None:
            raise ValueError(f"set_valve: no running request {rid}")
        req.valve = dict(valve)

    def abort(self, rid: int) -> bool:
        """Stop a request now and free its lane and pages; False if it is unknown or already done."""
        return self.scheduler.abort(rid)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    queue = property(lambda self: self.scheduler.queue, doc="waiting requests, in order")
    running = property(lambda self: self.scheduler.running, doc="lane -> running request")
    requests = property(lambda self: self.scheduler.requests, doc="id -> waiting or running request")
    free_slots = property(lambda self: self.scheduler.free_slots, doc="free batch lanes, ascending")
    num_running = property(lambda self: len(self.scheduler.running))
    num_waiting = property(lambda self: len(self.scheduler.queue))

    def kv_usage(self) -> dict:
        """The KV cache's pages: ``page_size``, ``pages_total``, ``pages_used`` (held by a
        request), ``pages_shared`` (held by several), ``pages_cached`` (a known prefix
        nobody holds, reused or evicted on demand), ``pages_free``."""
        return self.kv.usage()

    # -- the step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Event]:
        events: list[Event] = []
        for req in self.scheduler.take_aborted():
            self._release(req)
            events.append(self.out.final_event(req))
            if req.group is not None:
                self._vote(req, events[-1].output)
        # Each row says what it feeds this step: one token (decode), or several (a prompt,
        # the first forward of a probe, a preempted request's recompute).
        running = self.scheduler.running_in_lane_order()
        plans = {r.id: plan(r) for r in running}
        running = self._grow(running, plans)
        writes = {}  # admitted request -> what its first forward leaves written

        def fits(r):
            writes[r.id] = admission_tokens(r)
            return self.kv.admit(r, self._salt(r), reserve=len(running), tokens=writes[r.id])

        admitted = self.scheduler.admit(fits)
        plans.update({r.id: (writes[r.id][r.cached:], r.cached) for r in admitted})
        rows = running + admitted
        # One-token feeds share the decode forward, unless they read prompt pages that a
        # multi-token forward of this step computes (they run after it).
        single = [r for r in rows if len(plans[r.id][0]) == 1 and not self.kv.waiting_on(r)]
        if single:
            self._guarded(single, lambda: self._decode(StepBatch(single, plans, self.sampler)))
        self._extend_all([r for r in rows if r not in single], plans)
        self.kv.end_step()
        self.stats["steps"] += 1
        self.stats["cached_prompt_tokens"] = self.kv.stats["cached_prompt_tokens"]
        for req in rows:
            if req.slot < 0:  # preempted this step: back in the queue
                continue
            ev = self.out.event(req)
            if ev is not None:
                events.append(ev)
            if req.finished:
                self._release(req)
                if req.group is not None:
                    self._vote(req, ev.output)
            else:
                self.kv.trim(req, extent(req))
        return events

    def _vote(self, req: Request, output) -> None:
        """Count a finished sample; at the quorum, abort its group's other samples."""
        if output is not None and req.group.record(output):
            for rid in req.group.members:
                self.scheduler.abort(rid, reason="consistency")

    def _grow(self, running: list[Request], plans: dict) -> list[Request]:
        """Pages for what each running row writes this step, oldest request first; when
        the cache is full, the newest running request is preempted (its pages freed,
        itself requeued, to be rebuilt from its tokens, valves and latent inputs).
        Returns the rows that run."""
        kept = list(running)
        for req in sorted(running, key=lambda r: r.id):
            if req not in kept:
                continue
            feed, start = plans[req.id]
            while not self.kv.ensure(req, start + len(feed)):
                victim = max(kept, key=lambda r: r.id)
                self._preempt(victim)
                kept.remove(victim)
                if victim is req:
                    break
        return [r for r in running if r in kept]

    def _preempt(self, req: Request) -> None:
        self.kv.release(req)
        if req.exits is not None and req.exits.probe is not None:
            req.exits.probe.restart()
        self.scheduler.preempt(req)
        self.stats["preempted"] += 1

    def _extend_all(self, rows: list[Request], plans: dict) -> None:
        """The multi-token forwards, in waves: a request that shares prompt pages another
        computes this step runs after it (and is requeued if that forward failed)."""
        while rows:
            ready = [r for r in rows if not self.kv.waiting_on(r)] or rows
            rows = [r for r in rows if r not in ready]
            for r in [r for r in ready if self.kv.poisoned(r)]:
                ready.remove(r)
                self._preempt(r)
            for group in prefill_groups(ready, plans):
                self._guarded(group, lambda: self._extend(StepBatch(group, plans, self.sampler)))
                self.kv.settle(group)

    def _salt(self, req: Request) -> tuple:
        """What besides its tokens sets a prompt's KV: the valve it is computed under."""
        prompt_valve = req.prompt_valve if req.resumed else req.valve
        valve = tuple((n, a) for n, a in prompt_valve.items() if a != 0.0)
        return (valve, self.valves.generation) if valve and self.valves is not None else ()

    @staticmethod
    def _guarded(rows: list[Request], forward) -> None:
        """Run a forward; a failure ends its requests with an error instead of taking the
        engine down."""
        try:
            forward()
        except Exception as e:  # noqa: BLE001 - one bad batch must not kill the engine
            for req in rows:
                if not req.finished:
                    req.finish("error", "error", f"{type(e).__name__}: {e}")

    def _set_valves(self, b: StepBatch, rows: list, tokens_per_row: int) -> bool:
        """The valves of a forward of ``b`` (``rows``: b.rows, padded with None for a
        captured step). Each row's log records the positions it writes now; a resumed row
        recomputes each position under the valve the log records for it."""
        per_token = False
        for r, start, feed in zip(b.rows, b.starts, b.feeds):
            if r.resumed:
                r.note_valve(r.cache_len)  # its positions past what it had written
                r.resumed = False
                per_token |= len(feed) > 1
            else:
                r.note_valve(start)
        if per_token:
            return set_token_valves(self.valves, b.rows, b.starts, list(map(len, b.feeds)), tokens_per_row)
        return set_valves(self.valves, rows, tokens_per_row)

    def _extend(self, b: StepBatch) -> None:
        """Several new tokens per row (right-padded): prompts, probe starts."""
        runner = self.runner
        ids = b.padded_ids()
        meta = runner.make_meta(b.tables, [len(f) for f in b.feeds], starts=b.starts)
        self._set_valves(b, b.rows, ids.shape[1])
        ids = ids.to(self.device)
        embeds = b.recomputed_latents(ids, runner.embed)
        if embeds is None:
            hidden = runner.forward(meta, input_ids=ids, taps=b.taps)
        else:  # a resumed request feeds its latent steps' vectors again
            hidden = runner.forward(meta, inputs_embeds=embeds, taps=b.taps)
        self.stats["prefill_tokens"] += sum(map(len, b.feeds))
        now = time.perf_counter()
        for r in b.rows:
            if r.t_first is None:
                r.t_first = now
        tapped = {l: runner.last_hidden(runner.tapped[l], meta) for l in b.taps}
        self._after_forward(b, runner.last_hidden(hidden, meta), tapped)

    def _decode(self, b: StepBatch) -> None:
        """One token per row: the captured step when it can run, else eager."""
        if self.graphs is not None and self._decode_static(b):
            return
        runner = self.runner
        ids = torch.tensor(b.tokens, dtype=torch.long, device=self.device)[:, None]
        meta = runner.make_meta(b.tables, [1] * len(b.rows), starts=b.starts)
        self._set_valves(b, b.rows, 1)
        if b.latent_inputs_needed:
            # Latent rows feed back a state instead of a token: one pass builds every row's
            # input embedding (contemplate op); token rows get E[tok].
            embeds = b.latent_inputs(ids[:, 0], runner.embed.weight)[:, None]
            hidden = runner.forward(meta, inputs_embeds=embeds, taps=b.taps)[:, 0]
        else:
            hidden = runner.forward(meta, input_ids=ids, taps=b.taps)[:, 0]
        tapped = {l: runner.tapped[l][:, 0] for l in b.taps}
        self.stats["decode_tokens"] += len(b.rows)
        self._after_forward(b, hidden, tapped)

    def _decode_static(self, b: StepBatch) -> bool:
        """The decode step through ``self.graphs`` (engine/graph.py), sampling inside it when the
        draws allow; False when this step's key cannot be captured (the eager step runs)."""
        graphs, n = self.graphs, len(b.rows)
        B = graphs.bucket(n)
        if self.valves is not None:
            graphs.sync_valves(self.valves.generation)
            self.valves.state.reserve_static(graphs.max_rows)
        valve = self._set_valves(b, b.rows + [None] * (B - n), 1)
        mode, spec = self.sampler.captured(n, b.sampling, b.draws)
        key = graphs.key(n, valve, b.latent_inputs_needed, b.taps, mode)
        if graphs.failed(key):
            return False
        embeds = None
        if b.latent_inputs_needed:
            ids = torch.tensor(b.tokens, dtype=torch.long, device=self.device)
            embeds = b.latent_inputs(ids, self.runner.embed.weight)
        out = graphs.run(key, b.tables, b.tokens, b.starts, embeds=embeds, sampling=spec)
        if out is None:
            return False
        hidden, logits, tapped, sampled = out
        self.stats["decode_tokens"] += n
        self._after_forward(b, hidden, tapped, logits_all=logits,
                            tokens_all=sampled.tolist() if sampled is not None else None)  # the step's sync
        return True

    def _after_forward(self, b: StepBatch, h: torch.Tensor, tapped: dict, logits_all: torch.Tensor | None = None,
                       tokens_all: list | None = None) -> None:
        """logits -> sample -> controls. ``logits_all``: every row's logits, already computed
        (a captured step's output buffer); ``tokens_all``: every row's token, sampled inside
        the captured step (taken for the rows that sample)."""
        if self.valves is not None:
            self.valves.state.clear()  # a user's own model.generate must see no valve
        sampled_in_graph = tokens_all is not None
        # Logits only for the rows that need them: the sampling rows (unless the captured
        # step sampled them), then the probing rows.
        need = ([] if sampled_in_graph else b.sampling) + b.probing
        logits = self._logits(need, h, logits_all)
        if sampled_in_graph:
            toks = {i: tokens_all[i] for i in b.sampling}
        elif b.sampling:
            toks = dict(zip(b.sampling, self.sampler.sample(logits[: len(b.sampling)], b.draws)))
        else:
            toks = {}
        self._controls(b, h, tapped, toks, logits, len(need) - len(b.probing))

    def _logits(self, need: list[int], h: torch.Tensor, logits_all: torch.Tensor | None):
        if not need:
            return None
        # Every row in order (the usual decode step): no gather, no index tensor to copy
        # to the device (each small host-to-device copy waits for the stream).
        if need == list(range(len(need))):
            return logits_all[: len(need)] if logits_all is not None else self.runner.logits(h[: len(need)])
        need_t = torch.tensor(need, device=h.device)
        return logits_all.index_select(0, need_t) if logits_all is not None else \
            self.runner.logits(h.index_select(0, need_t))

    def _controls(self, b: StepBatch, h, tapped: dict, toks: dict, logits, probe_at: int) -> None:
        """Each row's controls and policies, alone (a failure ends that request only):
        probes consume their logits (rows ``probe_at``... of ``logits``), latent rows take
        a step, the others append their sampled or forced token."""
        rows = b.rows
        for j, i in enumerate(b.probing):
            r = rows[i]
            r.guard(lambda r=r, j=j: r.exits.consume(r, logits[probe_at + j]))
        emb = self.runner.embed.weight
        for i in b.latent:
            r = rows[i]
            tap = tapped.get(r.latent.tap)[i] if r.latent.tap is not None else None
            r.guard(lambda r=r, i=i, tap=tap: r.latent.step(r, h[i], tap, emb))
        skip = set(b.probing) | set(b.latent)
        for i, r in enumerate(rows):
            if r.finished or i in skip:
                continue
            if r.latent is not None and r.latent.refeeding:  # fed its last input again
                r.guard(lambda r=r: r.latent.refed(r))
            if i in toks:
                r.guard(lambda r=r, t=toks[i]: _accept_sampled(r, t))
            else:
                r.guard(lambda r=r: r.accept(r.forced.popleft(), forced=True))

    def _release(self, req: Request) -> None:
        self.kv.release(req)
        self.scheduler.release(req)


def _accept_sampled(req: Request, tok: int) -> None:
    req.accept(tok, forced=False)
    if req.exits is not None and not req.finished:
        req.exits.after_token(req, req.last_cue is not None, req.last_cue)
