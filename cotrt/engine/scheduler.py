"""Which requests run: the waiting queue, the cache slots, admission, release, aborts, and
the grouping of multi-token feeds (prompts, probe starts) into padded forwards.

Requests beyond ``max_batch`` wait in the queue; they never fail for it. A slot is freed
the step its request finishes and refilled, lowest slot first, on the next step.
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

    def abort(self, rid: int) -> bool:
        """Finish ``rid`` now; its slot is released at the next step. False if it is
        unknown or already done."""
        req = self.live(rid)
        if req is None:
            return False
        req.finish("abort", "abort")
        if req.slot < 0:
            self.queue.remove(req)
        self.aborted.append(req)
        return True

    def take_aborted(self) -> list[Request]:
        out, self.aborted = self.aborted, []
        return out

    def has_unfinished(self) -> bool:
        return bool(self.queue or self.running or self.aborted)

    def running_in_slot_order(self) -> list[Request]:
        return [self.running[s] for s in sorted(self.running)]

    def admit(self) -> list[Request]:
        """Move waiting requests into free slots (lowest first) and apply their limits that
        bite before the first token."""
        out = []
        while self.queue and self.free_slots:
            req = self.queue.popleft()
            req.slot = self.free_slots.pop(0)
            self.running[req.slot] = req
            req.start()
            out.append(req)
        return out

    def release(self, req: Request) -> None:
        """Free a finished request's slot and forget it."""
        if req.slot >= 0 and self.running.get(req.slot) is req:
            del self.running[req.slot]
            self.free_slots.append(req.slot)
            self.free_slots.sort()
        req.slot = -1
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
