"""``AsyncEngine``: the batching engine behind asyncio, for servers.

The ``Engine`` is not thread-safe, and a decode step holds the GIL-free torch kernels for
milliseconds to tens of milliseconds; running it on the event loop would stall every
connection. So one background thread owns the engine and is the only code that calls it
(or its tokenizer). Other threads talk to it through a lock-protected inbox (new requests,
aborts) that the thread drains before each step, and it hands events back to each
request's own event loop with one ``call_soon_threadsafe`` per loop per step. With no work
the thread sleeps on a condition variable: an idle server costs no CPU.

Admission is bounded: at most ``max_batch`` requests run and at most ``max_queue`` wait;
past that ``submit`` raises ``QueueFull`` (a server answers 429 with Retry-After) instead of
growing an unbounded backlog.

    async with AsyncEngine(cotrt.wrap(model, tok, max_batch=8), max_queue=32) as engine:
        async for ev in engine.stream("Hello", {"max_new_tokens": 32}):
            print(ev.text, end="")

Past ~400 lines on purpose: the file is one protocol between three kinds of threads (event
loops, the preparation thread, the engine thread) over one condition variable, and every
method here takes part in it; split, the rule "only the engine thread calls the engine"
would have to be checked across files. About a third of it is docstrings.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from .output import Event, Output
from .params import Params

log = logging.getLogger("cotrt.async_engine")

OUTCOMES = ("stop", "length", "abort", "error", "rejected", "invalid")
PHASES = ("prompt", "think", "answer", "probe")


class QueueFull(RuntimeError):
    """Too many requests waiting; retry after ``retry_after`` seconds."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"request queue is full ({waiting} waiting); retry after {retry_after}s")
        self.waiting = waiting
        self.retry_after = retry_after


class Request:
    """A submitted request: iterate it for its events (the last one has ``finished`` and
    ``output``); ``abort()`` from any thread. Leaving the iteration early (break, task
    cancelled, generator closed) aborts it, which frees its slot on the next step.

    After acceptance: ``id`` (the engine's request id; the first sample's with n > 1),
    ``ids`` (every sample's, in seed order: ``index(ev)`` is an event's sample),
    ``prompt_tokens`` (int) and ``thinking`` (True when the prompt leaves the think phase
    open, e.g. a template that pre-opens ``<think>``: the first generated text is
    reasoning). With ``params.n > 1`` the iteration ends when every sample has finished;
    ``outputs`` holds them in seed order (``output`` is the first).
    """

    def __init__(self, owner: "AsyncEngine", loop, prompt, params: Params, template_kwargs):
        self._owner = owner
        self._loop = loop
        self.prompt = prompt
        self.params = params
        self.template_kwargs = template_kwargs
        self.id: int | None = None
        self.ids: list = []
        self.outputs: list = []
        self.prompt_tokens = 0
        self.thinking = False
        self.output: Output | None = None
        self.patterns = None  # RowPatterns, compiled in the preparation thread
        self.cancelled = False
        self._accepted = loop.create_future()
        self._events: asyncio.Queue = asyncio.Queue()

    def abort(self) -> None:
        """Stop the request (thread-safe, idempotent); its final event says "abort"."""
        self._owner._abort(self)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    def index(self, ev: Event) -> int:
        """The sample (0 .. n - 1) an event belongs to."""
        return self.ids.index(ev.request_id) if len(self.ids) > 1 else 0

    async def _iterate(self) -> AsyncIterator[Event]:
        n = self.params.n
        done = [None] * n
        try:
            while self.output is None:
                ev = await self._events.get()
                if ev.finished:
                    done[self.index(ev)] = ev.output
                    if all(o is not None for o in done):
                        self.outputs = done
                        self.output = done[0]
                yield ev
        finally:
            if self.output is None:  # the consumer left early: free the slot now
                self.abort()


class AsyncEngine:
    """Owns an ``Engine`` (or a ``Runtime``, whose chat template it can then apply) and steps
    it in one background thread.

    ``max_queue``: requests allowed to wait for a slot beyond the ``max_batch`` running.
    A prompt is a string, a list of token ids, or (with a Runtime) a chat conversation: a
    list of ``{"role", "content"}`` dicts. Templating, tokenizing and compiling a request's
    stop strings and cues run in one preparation thread, never on the engine thread: a
    10 MB prompt took 13.6 s to tokenize and a 3,000-byte stop string 7 s to compile, and
    every running stream stalled for it. One thread, so that the tokenizer is not called
    from several preparing threads at once.
    """

    def __init__(self, runtime_or_engine, max_queue: int = 64):
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an int >= 0, got {max_queue!r}")
        self.runtime = runtime_or_engine if hasattr(runtime_or_engine, "engine") else None
        self.engine = runtime_or_engine.engine if self.runtime is not None else runtime_or_engine
        for attr in ("add", "add_samples", "step", "abort", "has_unfinished"):
            if not callable(getattr(self.engine, attr, None)):
                raise ValueError("runtime_or_engine must be a cotrt Runtime or Engine")
        self.think_format = self.engine.fmt
        self.max_batch, self.max_len = self.engine.max_batch, self.engine.max_len
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._inbox: list[Request] = []
        self._aborts: list[Request] = []
        self._live: dict[int, Request] = {}  # engine id -> request (engine thread only)
        self._outstanding = 0  # submitted and not yet finished (under _cond)
        self._thread: threading.Thread | None = None
        self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cotrt-prep")
        self._stopping = False
        self._avg_time_s = 1.0  # running mean of request time, for Retry-After
        self._counts = {"requests": dict.fromkeys(OUTCOMES, 0), "tokens": dict.fromkeys(PHASES, 0),
                        "steps": 0}
        self._gauges = {"queue_depth": 0, "running": 0, "slots_used": 0, "slots_total": self.max_batch,
                        "kv": self._kv_snapshot()}

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "AsyncEngine":
        with self._cond:
            if self._thread is not None:
                return self
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="cotrt-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the thread; requests still running or waiting end with "abort"."""
        with self._cond:
            thread, self._stopping = self._thread, True
            self._cond.notify()
        if thread is not None:
            thread.join(timeout)
        with self._cond:
            if thread is None or not thread.is_alive():  # a stuck step keeps its thread
                self._thread = None

    @property
    def running(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive() and not self._stopping

    async def __aenter__(self) -> "AsyncEngine":
        return self.start()

    async def __aexit__(self, *exc) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown)

    # -- requests --------------------------------------------------------------------------
    async def submit(self, prompt, params: Params | dict | None = None,
                     chat_template_kwargs: dict | None = None) -> Request:
        """Queue a request and wait until the engine thread accepted it.

        Raises ``ValueError`` naming the bad argument (nothing is queued), or ``QueueFull``.
        """
        try:
            params = _as_params(params)
            if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
                raise ValueError("chat_template_kwargs must be a dict")
            if params.n > self.max_batch + self.max_queue:  # would be refused forever, not "retry later"
                raise ValueError(f"n: {params.n} samples exceed what this engine holds "
                                 f"(max_batch + max_queue = {self.max_batch + self.max_queue})")
            if params.consistency is not None and params.n > self.max_batch:
                raise ValueError(f"n: {params.n} voting samples exceed max_batch={self.max_batch} "
                                 "(they must run together)")
        except ValueError:
            self._count("invalid")
            raise
        loop = asyncio.get_running_loop()
        req = Request(self, loop, prompt, params, chat_template_kwargs or {})
        if not self.running:
            raise RuntimeError("AsyncEngine is not running: call start() first")
        try:
            req.prompt, req.patterns = await loop.run_in_executor(self._prep, self._prepare, req)
        except ValueError:
            self._count("invalid")
            raise
        with self._cond:
            if not self.running:
                raise RuntimeError("AsyncEngine is not running: call start() first")
            if self._outstanding + params.n > self.max_batch + self.max_queue:
                self._counts["requests"]["rejected"] += 1
                waiting = max(0, self._outstanding - self.max_batch)
                raise QueueFull(waiting, max(1, math.ceil(self._avg_time_s * (waiting + 1) / self.max_batch)))
            self._outstanding += params.n  # one per sample: each takes a lane
            self._inbox.append(req)
            self._cond.notify()
        try:
            await req._accepted
        except asyncio.CancelledError:
            req.abort()
            raise
        return req

    async def stream(self, prompt, params: Params | dict | None = None,
                     chat_template_kwargs: dict | None = None) -> AsyncIterator[Event]:
        """Events of one request as they come; closing the generator aborts the request."""
        req = await self.submit(prompt, params, chat_template_kwargs)
        try:
            async for ev in req:
                yield ev
        finally:  # at once, not when the inner iterator is garbage-collected
            if req.output is None:
                req.abort()

    async def generate(self, prompt, params: Params | dict | None = None,
                       chat_template_kwargs: dict | None = None) -> Output:
        """The final ``Output`` of one request (cancelling the await aborts it)."""
        req = await self.submit(prompt, params, chat_template_kwargs)
        async for _ in req:
            pass
        return req.output

    def metrics(self) -> dict:
        """{"requests": {outcome: n}, "tokens": {phase: n}, "steps": n, "queue_depth",
        "running", "slots_used", "slots_total", "kv": {page_size, pages_total, pages_used,
        pages_shared, pages_cached, pages_free, cached_prompt_tokens, preempted}} (a
        consistent copy)."""
        with self._cond:
            out = {"requests": dict(self._counts["requests"]), "tokens": dict(self._counts["tokens"]),
                   "steps": self._counts["steps"], **self._gauges, "kv": dict(self._gauges["kv"])}
            out["queue_depth"] += len(self._inbox)
        return out

    # -- called from any thread ------------------------------------------------------------
    def _abort(self, req: Request) -> None:
        with self._cond:
            if req.cancelled or req.output is not None:
                return
            req.cancelled = True
            self._aborts.append(req)
            self._cond.notify()

    def _count(self, outcome: str) -> None:
        with self._cond:
            self._counts["requests"][outcome] += 1

    # -- the engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        while self._iteration():
            pass
        self._drain_on_exit()

    def _iteration(self) -> bool:
        """Wait for work, then apply aborts, accept new requests, step once, hand the events
        out. A method of its own so that its locals (the last requests) die when it returns:
        a sleeping thread's frame would otherwise keep them alive."""
        eng = self.engine
        with self._cond:
            while not (self._inbox or self._aborts or self._stopping or eng.has_unfinished()):
                self._cond.wait()
            if self._stopping:
                return False
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        for req in aborts:
            for rid in req.ids:
                if rid in self._live:
                    eng.abort(rid)
        for req in inbox:
            self._accept(req)
        if eng.has_unfinished():
            self._dispatch(self._step())
        self._snapshot()
        return True

    def _accept(self, req: Request) -> None:
        """engine.add on the engine thread; the outcome resolves the submitter's future."""
        if req.cancelled:  # aborted before it reached the engine
            self._finish_unqueued(req, None, "abort")
            return
        try:
            ids = self.engine.add_samples(req.prompt, req.params, patterns=req.patterns)
        except Exception as e:  # noqa: BLE001 - a bad request is answered, never fatal
            err = e if isinstance(e, ValueError) else ValueError(f"{type(e).__name__}: {e}")
            self._finish_unqueued(req, err, "invalid")
            return
        req.id, req.ids = ids[0], ids
        req.prompt_tokens, req.thinking = self.engine.prompt_state(ids[0])
        for rid in ids:
            self._live[rid] = req
        _call(req._loop, _resolve, req._accepted, None)

    def _prepare(self, req: Request):
        """(prompt token ids, compiled patterns) of a request, in the preparation thread."""
        try:
            prompt = req.prompt
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
                prompt = self._chat_prompt(prompt, req.template_kwargs)
            ids = self.engine._prompt_ids(prompt)
            return ids, self.engine.compile_patterns(req.params)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - a bad request is answered, never fatal
            raise ValueError(f"{type(e).__name__}: {e}") from None

    def _chat_prompt(self, messages, template_kwargs) -> list[int]:
        if self.runtime is None:
            raise ValueError("messages: chat prompts need a Runtime (AsyncEngine(cotrt.wrap(...)))")
        try:
            return self.runtime.chat_prompt(messages, **template_kwargs)
        except ValueError as e:
            raise ValueError(f"messages: {e}") from None
        except Exception as e:  # jinja errors from a template that rejects the messages
            raise ValueError(f"messages: the chat template failed: {type(e).__name__}: {e}") from None

    def _finish_unqueued(self, req: Request, err: Exception | None, outcome: str) -> None:
        """A request that never reached the engine: its submitter gets ``err`` (or a
        cancellation when it was aborted first)."""
        with self._cond:
            self._outstanding -= req.params.n
            self._counts["requests"][outcome] += 1
        _call(req._loop, _fail, req._accepted, err)

    def _step(self) -> list[Event]:
        try:
            events = self.engine.step()
        except Exception as e:  # noqa: BLE001 - the engine guards its forwards; this is a bug
            log.exception("engine step failed; ending the running requests")
            events = self._fail_all(f"{type(e).__name__}: {e}")
        with self._cond:
            self._counts["steps"] += 1
        return events

    def _fail_all(self, msg: str) -> list[Event]:
        events = []
        for rid, req in list(self._live.items()):
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001
                pass
            out = Output(rid, [], [], "", "", "", "error", {"prompt_tokens": req.prompt_tokens}, msg)
            events.append(Event(rid, [], "", finished=True, output=out))
        try:  # release the aborted rows' slots; their events are replaced by ours
            self.engine.step()
        except Exception:  # noqa: BLE001
            log.exception("engine could not recover")
        return events

    def _dispatch(self, events: list[Event]) -> None:
        by_loop: dict = defaultdict(list)
        for ev in events:
            req = self._live.get(ev.request_id)
            if req is None:
                continue
            if ev.finished:
                del self._live[ev.request_id]
                self._record(ev.output)
            by_loop[req._loop].append((req, ev))
        for loop, batch in by_loop.items():
            if not _call(loop, _deliver, batch):
                # The consumer's loop is gone: nobody will read these, free their slots.
                for _, ev in batch:
                    if not ev.finished:
                        self.engine.abort(ev.request_id)

    def _record(self, out: Output) -> None:
        s = out.stats or {}
        with self._cond:
            self._outstanding -= 1
            outcome = out.finish_reason if out.finish_reason in OUTCOMES else "error"
            self._counts["requests"][outcome] += 1
            tok = self._counts["tokens"]
            tok["prompt"] += s.get("prompt_tokens", 0)
            tok["think"] += s.get("think_tokens", 0)
            tok["answer"] += s.get("answer_tokens", 0)
            tok["probe"] += s.get("probe_tokens", 0)
            if "time_s" in s and out.finish_reason in ("stop", "length"):
                self._avg_time_s = 0.9 * self._avg_time_s + 0.1 * s["time_s"]

    def _kv_snapshot(self) -> dict:
        """The KV cache's pages (``Engine.kv_usage``) and its prefix-cache and preemption
        counters."""
        eng = self.engine
        kv = dict(eng.kv_usage()) if hasattr(eng, "kv_usage") else {}
        stats = getattr(eng, "stats", {})
        kv.update(cached_prompt_tokens=stats.get("cached_prompt_tokens", 0), preempted=stats.get("preempted", 0))
        return kv

    def _snapshot(self) -> None:
        eng = self.engine
        kv = self._kv_snapshot()
        with self._cond:
            self._gauges.update(queue_depth=eng.num_waiting, running=eng.num_running,
                                slots_used=self.max_batch - len(eng.free_slots), kv=kv)

    def _drain_on_exit(self) -> None:
        """Shutdown: end every request still here with "abort" so no consumer hangs."""
        with self._cond:
            inbox, self._inbox, self._aborts = self._inbox, [], []
        for req in inbox:
            self._finish_unqueued(req, RuntimeError("AsyncEngine shut down"), "abort")
        for rid in list(self._live):
            self.engine.abort(rid)
        try:
            events = self.engine.step() if self.engine.has_unfinished() else []
        except Exception:  # noqa: BLE001
            events = self._fail_all("AsyncEngine shut down")
        self._dispatch(events)
        self._snapshot()


def _as_params(params) -> Params:
    if params is None:
        return Params()
    if isinstance(params, dict):
        return Params.from_dict(params)
    if not isinstance(params, Params):
        raise ValueError(f"params must be a cotrt.Params or a dict, got {type(params).__name__}")
    return params


def _call(loop, fn, *args) -> bool:
    """Run ``fn(*args)`` on ``loop`` from the engine thread; False if the loop is closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:
        return False


def _resolve(fut, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _fail(fut, err) -> None:
    if not fut.done():
        if err is None:
            fut.cancel()
        else:
            fut.set_exception(err)


def _deliver(batch) -> None:
    for req, ev in batch:
        req._events.put_nowait(ev)


__all__ = ["AsyncEngine", "QueueFull", "Request"]
