"""Which requests run: the waiting queue, the batch lanes, admission, preemption, release,
aborts, and the grouping of multi-token feeds (prompts, probe starts) into padded forwards.

At most ``max_batch`` requests run (one lane each); the others wait in the queue, in
order, and never fail for it. A request is admitted when a lane is free and the KV cache
has pages for it (cotrt/engine/kv.py); a lane is freed the step its request finishes and
refilled, lowest first, on the next step. A preempted request goes back to the head of the
queue with its state, and is admitted again before any newer one.
"""
from __future__ import annotations

import itertools
import time
from collections import deque

from ..control.request import Request

# Prefill at most this many (padded) tokens per forward: bounds the memory of the
# attention scores and of the mask when many long prompts arrive at once.
PREFILL_TOKENS = 4096


class Scheduler:
    """The queue and the slots of one engine."""

    def __init__(self, max_batch: int):
        self.queue: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # slot -> request
        self.requests: dict[int, Request] = {}  # id -> request, until its slot is released
        self.free_slots = list(range(max_batch))
        self.aborted: list[Request] = []  # finished by abort, released at the next step
        self._ids = itertools.count()

    def next_id(self) -> int:
        return next(self._ids)

    def enqueue(self, req: Request) -> None:
        self.requests[req.id] = req
        self.queue.append(req)

    def live(self, rid: int) -> Request | None:
        """The request ``rid`` while it waits or runs (None when unknown or finished)."""
        req = self.requests.get(rid)
        return None if req is None or req.finished else req

    def abort(self, rid: int, reason: str = "abort") -> bool:
        """Finish ``rid`` now; its lane and pages are released at the next step. False if it is
        unknown or already done."""
        req = self.live(rid)
        if req is None:
            return False
        req.finish(reason, "abort")
        if req.slot < 0:
            self.queue.remove(req)
        self.aborted.append(req)
        return True

    def take_aborted(self) -> list[Request]:
        out, self.aborted = self.aborted, []
        return out

    def has_unfinished(self) -> bool:
        return bool(self.queue or self.running or self.aborted)

    def running_in_lane_order(self) -> list[Request]:
        return [self.running[s] for s in sorted(self.running)]

    def admit(self, fits) -> list[Request]:
        """Move waiting requests, in order, into free lanes (lowest first) while
        ``fits(req)`` gives them KV pages; apply the limits that bite before the first
        token (not again to a preempted request coming back)."""
        out = []
        while self.queue and self.free_slots:
            req = self.queue[0]
            if not fits(req):
                break
            self.queue.popleft()
            req.slot = self.free_slots.pop(0)
            self.running[req.slot] = req
            if not req.preemptions:
                req.start()
            out.append(req)
        return out

    def preempt(self, req: Request) -> None:
        """Take a running request off its lane and put it back at the head of the queue
        (its pages were released by the caller)."""
        self._free_lane(req)
        req.preemptions += 1
        req.resumed = True
        self.queue.appendleft(req)

    def _free_lane(self, req: Request) -> None:
        if req.slot >= 0 and self.running.get(req.slot) is req:
            del self.running[req.slot]
            self.free_slots.append(req.slot)
            self.free_slots.sort()
        req.slot = -1

    def release(self, req: Request) -> None:
        """Free a finished request's lane and forget it."""
        self._free_lane(req)
        req.t_done = time.perf_counter()
        self.requests.pop(req.id, None)


def plan(req: Request) -> tuple[list[int], int]:
    """(tokens to feed, slot position of the first) for a running request: its next input,
    or its probe's feed."""
    if req.exits is not None and req.exits.probe is not None:
        return req.exits.probe.plan()
    return [req.next_input], req.cache_len


def prefill_groups(reqs: list[Request], plans: dict):
    """Group multi-token feeds for padded forwards: at most PREFILL_TOKENS padded tokens a
    forward, and feeds within 25% of each other's length, so padding wastes little (these
    forwards are compute-bound: padded tokens cost as much as real ones)."""
    n_of = lambda r: len(plans[r.id][0])
    reqs = sorted(reqs, key=n_of)
    group: list[Request] = []
    for r in reqs:
        n = n_of(r)
        if group and (n * (len(group) + 1) > PREFILL_TOKENS or n > 1.25 * n_of(group[0]) + 8):
            yield group
            group = []
        group.append(r)
    if group:
        yield group
