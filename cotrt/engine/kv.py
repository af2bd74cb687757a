"""Which KV pages each request holds: admission by free pages, growth, rollback, prefix
hits, preemption's release.

The cache's pages are counted by a ``PagePool`` (cotrt/model/pages.py); a request's block
table is ``Request.pages``. The rules:

- **Admission.** A request is admitted when pages for its whole feed are available (free
  or cached), beyond a reserve of one page per running request (their growth next step).
  Its first full prompt pages may already be cached, keyed by their tokens and by the
  valve the prompt is computed under: those are shared (``Request.cached`` tokens are not
  recomputed; at least the last prompt token always is, for its logits). Its other full
  prompt pages are keyed at once, so a request admitted later in the same step (n samples
  of one prompt) shares them too: it then depends on this step's forward of the first and
  runs after it (``depends``; when that forward fails, it is requeued instead).
- **Growth** before each forward covers the positions the row writes (``ensure``).
- **Trim** after each step frees whole trailing pages past what the row holds (a rollback,
  a finished probe: rolling back stays a length change plus freeing pages).
- **Preemption** frees every page of the newest request; any request can be preempted.
  Its readmission recomputes what it had written (``admission_tokens``), each position
  under the valve it was computed under (``Request.valve_log``) and with the vector a
  latent step fed there (``LatentRun.inputs``); a probe in flight restarts.
- Only full prompt pages are ever shared, and a request writes only past its prefix hit,
  so a shared page is never written: no copy-on-write is needed (the first page where two
  requests differ is each one's own, computed by its own prefill).
"""
from __future__ import annotations

from ..control.request import Request
from ..model.pages import PagePool


class KvPages:
    """The engine's view of the page pool: pages per request, prefix hits, pending keys."""

    def __init__(self, num_pages: int, page_size: int):
        self.pool = PagePool(num_pages, page_size)
        self.page_size = page_size
        # Pages keyed this step whose content this step's prefill of ``producer`` computes.
        self.pending: dict[int, int] = {}  # page -> producer request id
        self._poisoned: set = set()
        self.stats = {"cached_prompt_tokens": 0}

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    # -- admission ----------------------------------------------------------------------------
    def admit(self, req: Request, salt, reserve: int, tokens: list[int]) -> bool:
        """Give ``req`` pages for ``tokens``, what its first forward leaves written from
        position 0 (``admission_tokens``: its prompt, or what a preempted request had),
        sharing cached prompt pages; False (nothing changed) when fewer than that plus
        ``reserve`` pages are available."""
        pool, ps = self.pool, self.page_size
        seq_len = len(tokens)
        n_total = self.pages_for(seq_len)
        n_prompt_full = len(req.prompt) // ps
        hit = pool.lookup(salt, req.prompt, min(n_prompt_full, (seq_len - 1) // ps))
        revived = sum(1 for p in hit if pool.ref[p] == 0)  # cached pages nobody holds: no longer available
        if pool.available() - revived < n_total - len(hit) + reserve:
            return False
        for p in hit:
            pool.retain(p)
        pages = hit + [pool.alloc() for _ in range(n_total - len(hit))]
        for p in pool.register(salt, req.prompt, pages[:n_prompt_full], len(hit)):
            self.pending[p] = req.id
        req.pages = pages
        req.cached = len(hit) * ps
        req.depends = {p for p in hit if p in self.pending}
        self.stats["cached_prompt_tokens"] += req.cached
        return True

    # -- growth and trim ------------------------------------------------------------------------
    def ensure(self, req: Request, end: int) -> bool:
        """Pages covering positions ``[0, end)`` of ``req``; False when the pool ran out
        (the pages taken so far stay with the request)."""
        need = self.pages_for(end)
        while len(req.pages) < need:
            p = self.pool.alloc()
            if p is None:
                return False
            req.pages.append(p)
        return True

    def trim(self, req: Request, extent: int) -> None:
        """Free ``req``'s whole pages past its first ``extent`` positions."""
        keep = self.pages_for(extent)
        while len(req.pages) > keep:
            self.pool.release(req.pages.pop())

    def release(self, req: Request) -> None:
        """Every page of ``req`` back to the pool (keyed ones stay cached)."""
        for p in req.pages:
            if self.pending.get(p) == req.id:  # never computed: nobody may hit it
                self.pool.unregister(p)
        for p in reversed(req.pages):
            self.pool.release(p)
        req.pages = []
        req.depends = set()

    # -- this step's keyed pages ---------------------------------------------------------------
    def waiting_on(self, req: Request) -> bool:
        """Whether ``req`` reads pages that a forward of this step has yet to compute."""
        return any(p in self.pending for p in req.depends)

    def poisoned(self, req: Request) -> bool:
        """Whether ``req`` shares pages whose computing forward failed this step."""
        return bool(req.depends & self._poisoned)

    def settle(self, rows: list[Request]) -> None:
        """After the forward of ``rows``: their keyed pages are computed, or, when their
        forward failed, unkeyed and poisoned for the requests that hit them."""
        ids = {r.id: r for r in rows}
        for p, rid in list(self.pending.items()):
            r = ids.get(rid)
            if r is None:
                continue
            del self.pending[p]
            if r.finish_reason == "error":
                self.pool.unregister(p)
                self._poisoned.add(p)

    def end_step(self) -> None:
        self.pending.clear()
        self._poisoned.clear()

    def usage(self) -> dict:
        return self.pool.usage()


def extent(req: Request) -> int:
    """Cache positions ``req`` has written and will read again: its tokens, or up to its
    probe's last written token while a probe runs past them (a probe planned but not yet
    run has written nothing; the token it sampled last is not written yet)."""
    n = req.cache_len
    probe = req.exits.probe if req.exits is not None else None
    if probe is not None and probe.started:
        n = max(n, probe.start + len(probe.feed) + len(probe.tokens) - 1)
    return n


def admission_tokens(req: Request) -> list[int]:
    """What an admitted request's first forward leaves written, from position 0: its
    prompt; for a preempted request, everything it had plus its next input, or, when it was
    running a probe, its tokens up to the probe and the probe's first feed (the probe
    restarts)."""
    seq = req.prompt + req.gen
    probe = req.exits.probe if req.exits is not None else None
    return seq if probe is None else seq[:probe.start] + probe.feed
