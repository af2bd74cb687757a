"""The paged KV cache and the per-step metadata that places and attends a step's tokens.

- ``StepMeta``: everything one forward needs (block tables, start positions, masks, where
  each new token's key goes, the cache buffers for decode by table); built once per step
  by the runner, read by ``PagedCache`` and by the attention function
  (cotrt.model.attention).
- ``PagedCache`` (a ``transformers.Cache``) holds, per layer, ``[num_pages + 1, page_size,
  kv_heads, head_dim]`` keys and values (flash-attn's paged layout; the last page is a
  scratch page that absorbs the writes of padding tokens). A request's tokens live in the
  pages of its block table, in order: position ``n`` at ``(table[n // page_size],
  n % page_size)``. The cache keeps no lengths and no tables of its own: each step's
  ``StepMeta`` says where its tokens go, and the engine owns which pages a request holds
  and how many tokens they hold (cotrt.engine.kv, cotrt.model.pages). The slot cache of
  earlier versions is the special case ``page_size = max_len``: one page per request.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepMeta:
    """Everything one forward needs to place and attend its tokens; built once per step.

    tables:   [B, NP] int64 block table of each batch row (pages covering kv_len keys;
              entries past a row's own pages point at the scratch page)
    starts:   [B] int64   tokens already cached in each row (= position of its first new token)
    q_lens:   list[int]   real new tokens per row (the rest of T is right padding)
    kv_len:   int         keys attended: max(start + q_len)
    mask:     [B, 1, T, kv_len] bool, True where a query may attend a key
    positions:[B, T] int64 absolute positions of the new tokens

    Built by ``ModelRunner.make_meta`` (eager steps) or ``ModelRunner.static_meta``
    (cotrt.engine.graph's static decode step); every field the cache and the attention
    function read is declared here.
    """

    tables: torch.Tensor
    starts: torch.Tensor
    q_lens: list
    kv_len: int
    mask: torch.Tensor
    positions: torch.Tensor
    write_pages: torch.Tensor  # [B*T] page of each new token (the scratch page for padding)
    write_offs: torch.Tensor  # [B*T] its offset in that page
    # (first page, pages between rows) when row b's first ceil(kv_len / page_size) pages
    # are first + b * stride, first + b * stride + 1, ...: attend through one strided view
    # instead of gathering the pages (a request running alone; the slot layout).
    view: tuple | None
    decode: bool  # T == 1 for every row
    page_size: int
    # Decode by table (the static step of cotrt.engine.graph, or a decode backend that
    # reads pages in place): attention reads the cache buffers through ``tables``,
    # ``lengths[b]`` keys per row (a device tensor, = starts + 1), so no shape depends on
    # the rows' lengths and the forward can be captured as a CUDA graph; kv_len, mask and
    # view are then unused.
    lengths: torch.Tensor | None = None
    # The cache's per-layer page buffers ``[num_pages + 1, page_size, KVH, D]``.
    k_buffers: list | None = None
    v_buffers: list | None = None
    _window_masks: dict = field(default_factory=dict)  # sliding window -> narrowed mask

    def mask_for(self, sliding_window: int | None) -> torch.Tensor:
        """The mask, narrowed to the last ``sliding_window`` keys (HF: k > q - window)."""
        if not sliding_window or sliding_window >= self.kv_len:
            return self.mask
        m = self._window_masks.get(sliding_window)
        if m is None:
            k_idx = torch.arange(self.kv_len, device=self.mask.device)
            in_window = k_idx.view(1, 1, 1, -1) > (self.positions[:, None, :, None] - sliding_window)
            m = self.mask & in_window
            self._window_masks[sliding_window] = m
        return m


def _cache_base_init(cache) -> None:
    # transformers' Cache.__init__ differs across versions; an empty layer list is all the
    # mask helpers need (they look for the first full-attention layer).
    from transformers import Cache

    for kwargs in ({"layers": []}, {}):
        try:
            Cache.__init__(cache, **kwargs)
            return
        except TypeError:
            continue


def read_rows(buf: torch.Tensor, meta: StepMeta) -> torch.Tensor:
    """``[B, kv_len, KVH, D]``: each row's first kv_len positions of one layer's pages, as a
    strided view when ``meta.view`` allows, else gathered by table."""
    B, L, ps = meta.tables.shape[0], meta.kv_len, meta.page_size
    P, _, H, D = buf.shape
    if meta.view is not None:
        first, stride = meta.view
        s = buf.stride()
        return buf.as_strided((B, L, H, D), (stride * s[0], s[1], s[2], s[3]),
                              buf.storage_offset() + first * s[0])
    n_pages = -(-L // ps)
    return buf[meta.tables[:, :n_pages]].view(B, n_pages * ps, H, D)[:, :L]


def _make_cache_class():
    from transformers import Cache

    class PagedCache(Cache):
        """Paged KV cache, ``[num_pages + 1, page_size, kv_heads, head_dim]`` per layer.

        ``update`` writes the new keys/values of each row at its own positions (from the
        current ``StepMeta``) and returns ``[B, kv_heads, kv_len, head_dim]`` views (or
        gathers by block table) for the attention call.
        """

        is_compileable = False

        def __init__(self, n_layers, num_pages, page_size, kv_heads, head_dim, dtype, device):
            _cache_base_init(self)
            shape = (num_pages + 1, page_size, kv_heads, head_dim)
            self.keys_ = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
            self.values_ = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
            self.num_pages, self.page_size = num_pages, page_size
            self.scratch = num_pages  # the page that padding tokens write to
            self.meta: StepMeta | None = None

        # -- what HF's model code asks of a cache ------------------------------------------
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            meta = self.meta
            if meta is None:
                raise RuntimeError("PagedCache used outside a cotrt forward")
            kc, vc = self.keys_[layer_idx], self.values_[layer_idx]
            B, H, T, D = key_states.shape
            if meta.decode:
                kc.index_put_((meta.write_pages, meta.write_offs), key_states[:, :, 0])
                vc.index_put_((meta.write_pages, meta.write_offs), value_states[:, :, 0])
            else:
                k = key_states.transpose(1, 2).reshape(B * T, H, D)
                v = value_states.transpose(1, 2).reshape(B * T, H, D)
                kc.index_put_((meta.write_pages, meta.write_offs), k)
                vc.index_put_((meta.write_pages, meta.write_offs), v)
            if meta.lengths is not None:
                # Decode by table (graph-safe: fixed shapes, no host values): the attention
                # reads the page buffers themselves.
                return kc, vc
            return read_rows(kc, meta).transpose(1, 2), read_rows(vc, meta).transpose(1, 2)

        def read(self, layer_idx: int, pages: list, n: int) -> tuple[torch.Tensor, torch.Tensor]:
            """The first ``n`` keys and values ``[n, KVH, D]`` that block table ``pages``
            holds in layer ``layer_idx`` (copies; for tests and debugging)."""
            idx = torch.tensor(pages, dtype=torch.long, device=self.keys_[0].device)
            H, D = self.keys_[0].shape[2:]
            k = self.keys_[layer_idx][idx].reshape(-1, H, D)[:n].clone()
            v = self.values_[layer_idx][idx].reshape(-1, H, D)[:n].clone()
            return k, v

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return 0 if self.meta is None else int(self.meta.kv_len)

        def get_max_cache_shape(self, layer_idx: int = 0) -> int:
            return self.num_pages * self.page_size

        def get_mask_sizes(self, *args, **kwargs):
            return self.num_pages * self.page_size, 0

        @property
        def is_sliding(self):
            return []

        def __len__(self):
            return len(self.keys_)

    return PagedCache


_CACHE_CLASS = None


def PagedCache(*args, **kwargs):
    """Factory so that importing this module does not import transformers' cache machinery."""
    global _CACHE_CLASS
    if _CACHE_CLASS is None:
        _CACHE_CLASS = _make_cache_class()
    return _CACHE_CLASS(*args, **kwargs)
