"""SPMD stepping: one rank takes the requests, every rank runs the same steps.

Every rank must run the same engine steps on the same inputs (each forward's collectives
pair up across ranks, and the tokens each rank samples must agree). A script that makes
the same calls on every rank (``rt.generate`` with the same prompts) gets that for free:
``sync_seeds`` (called by ``wrap``) makes the seeds drawn for ``Params(seed=None)`` the same
on every rank. A server cannot: requests arrive on rank 0 only. Then

- rank 0's engine is wrapped in a ``Lockstep`` (``lockstep(rt, group)`` puts it in place
  of ``rt.engine``, so ``rt.generate``, ``AsyncEngine(rt)`` and the server use it
  unchanged). ``add`` / ``abort`` / ``set_valve`` act on the engine at once and are
  recorded (a new request with its prompt ids and its params, the seed filled in when it
  was None); ``step`` broadcasts the records, then steps;
- every other rank runs ``follow(rt, group)``: receive the records, replay them (the same
  request ids, checked), step; until rank 0 closes.

After each step the ranks compare a digest of what it produced (request ids, tokens,
finishes: one 16-byte all-reduce); ranks that differ stop the run with ``TPGroupError``
instead of decoding on apart. While rank 0 has no work it sends a heartbeat every
``timeout / 4`` s (a broadcast and an all-reduce), so a waiting follower's collective
never times out on an idle server, and a dead or stalled rank is noticed while idle too. Any collective that fails (a rank died or stalled
past the timeout) raises ``TPGroupError`` on the ranks that see it; the Lockstep then
refuses every call (no hang, no half-stepped group) and calls ``on_failure``.

Not replayed: loading or unloading valves (load them on every rank before ``lockstep`` /
``follow``). A follower compiles each new request's stop strings and cues itself, in its
step (cached per pattern set); rank 0 compiled them before ``add``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import pickle
import random
import threading
import time

from .group import TPGroup, TPGroupError, agree, broadcast

log = logging.getLogger("cotrt.parallel")

_OWN = frozenset({"_engine", "_group", "_ops", "_lock", "_failed", "_closed", "_steps", "_last", "_rng", "_check",
                  "_beat", "_stop_beat", "on_failure"})


def digest(events, engine) -> int:
    """A 62-bit digest of one step's outcome on this rank: each event's request id, tokens
    and finish, and the engine's running / waiting counts."""
    h = hashlib.blake2b(digest_size=8)
    for ev in events:
        reason = ev.output.finish_reason if ev.finished and ev.output is not None else None
        h.update(repr((ev.request_id, list(ev.token_ids), ev.finished, reason)).encode())
    h.update(repr((engine.num_running, engine.num_waiting)).encode())
    return int.from_bytes(h.digest(), "little") & ((1 << 62) - 1)


def sync_seeds(engine, group=None) -> None:
    """Seed the engine's draw of per-request seeds (``Params(seed=None)``) from rank 0, so
    that ranks adding the same requests in the same order draw the same seeds."""
    import torch.distributed as dist

    box = [random.SystemRandom().getrandbits(62)]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    engine.intake._seed_rng.seed(box[0])


class Lockstep:
    """Rank 0's engine, recording what changes and broadcasting it before each step.

    Behaves as the wrapped ``Engine`` (every other attribute is the engine's); thread-safe
    for ``add`` / ``abort`` / ``set_valve`` / ``step`` (one lock: the heartbeat thread
    shares the group). ``close()`` releases the followers. ``on_failure(exc)``: called once
    when the group fails (the server shuts down there).
    """

    def __init__(self, engine, group: TPGroup, check: bool = True, on_failure=None):
        if not group.is_driver:
            raise ValueError(f"Lockstep runs on rank 0; rank {group.rank} runs cotrt.parallel.follow")
        object.__setattr__(self, "_engine", engine)
        self._group, self._ops, self._check = group, [], check
        self._lock = threading.RLock()
        self._failed: TPGroupError | None = None
        self._closed = False
        self._steps = 0
        self._last = time.monotonic()
        self._rng = random.Random()
        self.on_failure = on_failure
        self._stop_beat = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="cotrt-tp-heartbeat", daemon=True)
        self._beat.start()

    # -- the engine's interface ------------------------------------------------------------
    def __getattr__(self, name):
        return getattr(self._engine, name)

    def __setattr__(self, name, value):
        if name in _OWN:
            object.__setattr__(self, name, value)
        else:  # e.g. Runtime.load_valve setting engine.valves
            setattr(self._engine, name, value)

    def add(self, prompt, params=None, patterns=None) -> int:
        from ..engine.intake import Intake

        params = Intake.params(params)
        if params.n != 1:
            raise ValueError(f"n: Engine.add queues one request, got n={params.n} (use Engine.add_samples)")
        return self.add_samples(prompt, params, patterns)[0]

    def add_samples(self, prompt, params=None, patterns=None) -> list[int]:
        from ..engine.intake import Intake

        params = Intake.params(params)
        if params.seed is None:  # drawn here, sent with the request: every rank samples alike
            params = dataclasses.replace(params, seed=self._rng.getrandbits(62 if params.n == 1 else 61))
        with self._lock:
            self._alive()
            ids = self._engine._prompt_ids(prompt)
            try:
                blob = pickle.dumps(("add", ids, params), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as e:  # noqa: BLE001 - a policy holding a lambda, an open file...
                raise ValueError(f"params: cannot be sent to the other tensor-parallel ranks "
                                 f"({type(e).__name__}: {e})") from None
            rids = self._engine.add_samples(ids, params, patterns)
            self._ops.append((blob, rids))
        return rids

    def abort(self, rid: int) -> bool:
        """Abort ``rid`` here, and on the followers at the next step. After the group failed
        or closed, here only (a server draining its requests on the way down)."""
        with self._lock:
            out = self._engine.abort(rid)
            if self._failed is None and not self._closed:
                self._ops.append((pickle.dumps(("abort", rid)), None))
        return out

    def set_valve(self, rid: int, valve: dict) -> None:
        with self._lock:
            self._alive()
            self._engine.set_valve(rid, valve)
            self._ops.append((pickle.dumps(("set_valve", rid, dict(valve))), None))

    def step(self):
        with self._lock:
            self._alive()
            ops, self._ops = self._ops, []
            try:
                broadcast(("step", ops), self._group)
                events = self._engine.step()
                if self._check:
                    agree(digest(events, self._engine), self._group, f"step {self._steps}")
            except TPGroupError as e:
                self._fail(e)
                raise
            except Exception as e:  # a failed step leaves the followers mid-step: the group is done
                self._fail(TPGroupError(f"rank 0: step {self._steps} failed ({type(e).__name__}: {e}); "
                                        "the tensor-parallel group cannot go on"))
                raise self._failed from e
            self._steps += 1
            self._last = time.monotonic()
        return events

    # -- lifetime --------------------------------------------------------------------------
    @property
    def failed(self) -> TPGroupError | None:
        return self._failed

    def close(self) -> None:
        """Release the followers (they return from ``follow``). Idempotent."""
        self._stop_beat.set()
        with self._lock:
            if self._closed or self._failed is not None:
                self._closed = True
                return
            self._closed = True
            try:
                broadcast(("stop", None), self._group)
            except TPGroupError as e:
                self._fail(e)

    def _alive(self) -> None:
        if self._failed is not None:
            raise self._failed
        if self._closed:
            raise RuntimeError("the tensor-parallel group was closed")

    def _fail(self, err: TPGroupError) -> None:
        if self._failed is not None:
            return
        self._failed = err
        self._stop_beat.set()
        log.error("%s", err)
        if self.on_failure is not None:
            self.on_failure(err)

    def _heartbeat(self) -> None:
        interval = self._group.timeout / 4
        while not self._stop_beat.wait(min(interval / 2, 5.0)):
            if time.monotonic() - self._last < interval:
                continue
            with self._lock:
                if self._closed or self._failed is not None:
                    return
                try:  # a broadcast may land in a stalled peer's socket buffer: also agree
                    broadcast(("beat", None), self._group)
                    agree(0, self._group, "a heartbeat")
                except TPGroupError as e:
                    self._fail(e)
                    return
                self._last = time.monotonic()


def lockstep(runtime, group: TPGroup, check: bool = True, on_failure=None) -> Lockstep:
    """Make ``runtime.engine`` (rank 0's) a Lockstep; returns it."""
    eng = runtime.engine
    if not isinstance(eng, Lockstep):
        eng = runtime.engine = Lockstep(eng, group, check=check, on_failure=on_failure)
    return eng


def follow(runtime_or_engine, group: TPGroup, check: bool = True) -> int:
    """Rank > 0: replay rank 0's records and step with it until it closes; returns the
    number of steps. Raises TPGroupError when the group fails or the ranks diverge."""
    if group.is_driver:
        raise ValueError("follow runs on ranks > 0; rank 0 drives (cotrt.parallel.lockstep)")
    eng = getattr(runtime_or_engine, "engine", runtime_or_engine)
    steps = 0
    while True:
        kind, ops = broadcast(None, group)
        if kind == "beat":
            agree(0, group, "a heartbeat")
            continue
        if kind == "stop":
            return steps
        for blob, rid in ops:
            _replay(eng, pickle.loads(blob), rid, group)
        try:
            events = eng.step()
        except Exception as e:
            raise TPGroupError(f"rank {group.rank}: step {steps} failed ({type(e).__name__}: {e})") from e
        if check:
            agree(digest(events, eng), group, f"step {steps}")
        steps += 1


def _replay(eng, op, rid, group: TPGroup) -> None:
    kind = op[0]
    try:
        if kind == "add":
            got = eng.add_samples(op[1], op[2])
            if got != rid:
                raise TPGroupError(f"rank {group.rank}: request ids {got} where rank 0 has {rid}: the ranks diverged")
        elif kind == "abort":
            eng.abort(op[1])
        elif kind == "set_valve":
            eng.set_valve(op[1], op[2])
        else:
            raise TPGroupError(f"rank {group.rank}: unknown lockstep record {kind!r}")
    except TPGroupError:
        raise
    except Exception as e:
        raise TPGroupError(f"rank {group.rank}: replaying {kind} failed where rank 0's succeeded "
                           f"({type(e).__name__}: {e})") from e
