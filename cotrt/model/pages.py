"""The KV page pool: which pages are free, held, shared or cached, and the prefix cache.

The paged KV cache (cotrt.model.kv_cache) stores each layer's keys and values as pages of
``page_size`` tokens; a request's block table lists its pages in order. ``PagePool`` does
the bookkeeping on the host, never touching the tensors:

- a page is *free* (no content anyone may want), *held* (``ref[p]`` requests use it; more
  than one: *shared*), or *cached* (no holder, but its content is a known prefix: kept,
  least recently released first out, until a page is needed);
- the prefix cache maps a *key* to a page. Only full pages of prompt tokens are keyed: a
  key is ``(parent, tokens)`` with ``parent`` the identity of the previous page's content
  (or the request's salt for the first page), so a key names a whole prefix, and equal keys
  mean equal tokens (dict equality, no hash collision can alias two prefixes). A keyed page
  is never written again: requests write only at positions past their own prefix hit.

Allocation takes the lowest free page id first (a request running alone gets consecutive
pages, which the attention reads as one view), then evicts the least recently cached page.
"""
from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict


class PagePool:
    """Refcounts, the free heap, the prefix cache and its LRU for ``num_pages`` pages."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"PagePool: num_pages and page_size must be >= 1, got {num_pages}, {page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        self.ref = [0] * num_pages
        self._held = self._shared = 0  # pages with ref > 0, with ref > 1 (kept as refs change)
        self._free = list(range(num_pages))  # a heap: lowest id first
        self._page_of: dict = {}  # key -> page
        self._key_of: dict = {}  # page -> key
        self._uid_of: dict = {}  # page -> identity of its content (the parent of the next key)
        self._lru: OrderedDict = OrderedDict()  # cached pages nobody holds, oldest first
        self._uids = itertools.count(1)

    # -- counts -----------------------------------------------------------------------------
    def available(self) -> int:
        """Pages an allocation can take now: free ones and cached ones nobody holds."""
        return len(self._free) + len(self._lru)

    def usage(self) -> dict:
        """Counts kept as pages change hands: no pass over the pool (servers read it every step)."""
        return {"page_size": self.page_size, "pages_total": self.num_pages, "pages_used": self._held,
                "pages_shared": self._shared, "pages_cached": len(self._lru), "pages_free": len(self._free)}

    # -- holding pages -----------------------------------------------------------------------
    def alloc(self) -> int | None:
        """A page for new content (held once), or None when every page is held."""
        if self._free:
            p = heapq.heappop(self._free)
        elif self._lru:
            p, _ = self._lru.popitem(last=False)
            self._forget(p)
        else:
            return None
        self.ref[p] = 1
        self._held += 1
        return p

    def retain(self, p: int) -> None:
        """One more holder of page ``p`` (a prefix hit)."""
        if self.ref[p] == 0:
            self._lru.pop(p, None)
            self._held += 1
        elif self.ref[p] == 1:
            self._shared += 1
        self.ref[p] += 1

    def release(self, p: int) -> None:
        """One holder fewer; a page nobody holds is cached when keyed, else free."""
        if self.ref[p] <= 0:
            raise RuntimeError(f"PagePool: page {p} released more often than held")
        self.ref[p] -= 1
        if self.ref[p] == 1:
            self._shared -= 1
        if self.ref[p] == 0:
            self._held -= 1
            if p in self._key_of:
                self._lru[p] = None
            else:
                heapq.heappush(self._free, p)

    # -- the prefix cache --------------------------------------------------------------------
    @staticmethod
    def key(parent, tokens) -> tuple:
        return (parent, tuple(tokens))

    def lookup(self, salt, tokens: list, n_pages: int) -> list[int]:
        """Pages holding the longest cached prefix of ``tokens``' first ``n_pages`` full
        pages (not retained: the caller retains the ones it uses)."""
        ps, out, parent = self.page_size, [], ("salt", salt)
        for i in range(n_pages):
            p = self._page_of.get(self.key(parent, tokens[i * ps:(i + 1) * ps]))
            if p is None:
                break
            out.append(p)
            parent = self._uid_of[p]
        return out

    def register(self, salt, tokens: list, pages: list[int], first: int) -> list[int]:
        """Key the pages ``pages[first:]`` by the tokens they hold (``tokens`` from position
        0; ``pages[:first]`` are already keyed, a prefix hit). Returns the pages keyed now.
        A key already cached elsewhere (another request computing the same prefix) stays
        with its page; this request's copy is left unkeyed, and so are the pages after it."""
        ps, parent = self.page_size, ("salt", salt)
        for p in pages[:first]:
            parent = self._uid_of[p]
        keyed = []
        for i in range(first, len(pages)):
            k = self.key(parent, tokens[i * ps:(i + 1) * ps])
            if k in self._page_of:
                break
            p = pages[i]
            self._page_of[k], self._key_of[p] = p, k
            parent = self._uid_of[p] = next(self._uids)
            keyed.append(p)
        return keyed

    def unregister(self, p: int) -> None:
        """Forget page ``p``'s key (content that was never computed, e.g. its forward failed):
        held, it stays held; else it becomes free."""
        if p not in self._key_of:
            return
        self._forget(p)
        if self.ref[p] == 0 and p in self._lru:
            del self._lru[p]
            heapq.heappush(self._free, p)

    def _forget(self, p: int) -> None:
        k = self._key_of.pop(p, None)
        if k is not None and self._page_of.get(k) == p:
            del self._page_of[k]
        self._uid_of.pop(p, None)

    def is_keyed(self, p: int) -> bool:
        return p in self._key_of
