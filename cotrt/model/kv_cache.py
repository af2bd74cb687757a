"""The slot KV cache and the per-step metadata that places and attends a step's tokens.

- ``StepMeta``: everything one forward needs (slots, start positions, masks, the cache
  buffers for decode by slot); built once per step by the runner, read by ``SlotCache``
  and by the attention function (cotrt.model.attention).
- ``SlotCache`` (a ``transformers.Cache``) holds one slot per running request, per layer
  ``[max_batch + 1, max_len, kv_heads, head_dim]`` (flash-attn's layout; the extra row is a
  scratch slot that absorbs the writes of padding tokens). The cache keeps no lengths:
  each step's ``StepMeta.starts`` say where its tokens go, and the engine owns how many
  tokens each slot holds (rolling a row back is giving a smaller start, no copy).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepMeta:
    """Everything one forward needs to place and attend its tokens; built once per step.

    slots:    [B] int64   cache row of each batch row
    starts:   [B] int64   tokens already cached in each row (= position of its first new token)
    q_lens:   list[int]   real new tokens per row (the rest of T is right padding)
    kv_len:   int         keys attended: max(start + q_len)
    mask:     [B, 1, T, kv_len] bool, True where a query may attend a key
    positions:[B, T] int64 absolute positions of the new tokens

    Built by ``ModelRunner.make_meta`` (eager steps) or ``ModelRunner.static_meta``
    (cotrt.graph's captured decode step); every field the cache and the attention
    function read is declared here.
    """

    slots: torch.Tensor
    starts: torch.Tensor
    q_lens: list
    kv_len: int
    mask: torch.Tensor
    positions: torch.Tensor
    write_rows: torch.Tensor  # [B*T] cache row of each new token (scratch row for padding)
    write_pos: torch.Tensor  # [B*T] position of each new token in its row
    slot_range: tuple | None  # (s0, s1) when slots are s0..s1-1: attend through views
    decode: bool  # T == 1 for every row
    # Decode by slot (cotrt.graph's static step, or decode_backend "by_slot"): attention
    # reads the cache buffers by slot, ``lengths[b]`` keys per row (a device tensor,
    # = starts + 1), so no shape depends on the rows' lengths and the forward can be
    # captured as a CUDA graph; kv_len, mask and slot_range are then unused.
    lengths: torch.Tensor | None = None
    # The slot cache's per-layer buffers ``[max_batch + 1, max_len, KVH, D]`` (the
    # runner's ``cache.keys_`` / ``cache.values_``): decode by slot reads them directly.
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


def _make_cache_class():
    from transformers import Cache

    class SlotCache(Cache):
        """Static slot KV cache, ``[max_batch + 1, max_len, kv_heads, head_dim]`` per layer.

        ``update`` writes the new keys/values of each row at its own positions (from the
        current ``StepMeta``) and returns ``[B, kv_heads, kv_len, head_dim]`` views (or
        gathers, when the batch's slots are not contiguous) for the attention call.
        """

        is_compileable = False

        def __init__(self, n_layers, max_batch, max_len, kv_heads, head_dim, dtype, device):
            _cache_base_init(self)
            shape = (max_batch + 1, max_len, kv_heads, head_dim)
            self.keys_ = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
            self.values_ = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
            self.max_batch, self.max_len = max_batch, max_len
            self.meta: StepMeta | None = None

        # -- what HF's model code asks of a cache ------------------------------------------
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            meta = self.meta
            if meta is None:
                raise RuntimeError("SlotCache used outside a cotrt forward")
            kc, vc = self.keys_[layer_idx], self.values_[layer_idx]
            B, H, T, D = key_states.shape
            if meta.lengths is not None:
                # Decode attention by slot and length (static decode: graph-safe: fixed
                # shapes, no host values): the attention reads the buffers themselves.
                kc.index_put_((meta.slots, meta.starts), key_states[:, :, 0])
                vc.index_put_((meta.slots, meta.starts), value_states[:, :, 0])
                return kc.transpose(1, 2), vc.transpose(1, 2)
            if meta.decode:
                kc.index_put_((meta.slots, meta.starts), key_states[:, :, 0])
                vc.index_put_((meta.slots, meta.starts), value_states[:, :, 0])
            else:
                k = key_states.transpose(1, 2).reshape(B * T, H, D)
                v = value_states.transpose(1, 2).reshape(B * T, H, D)
                kc.index_put_((meta.write_rows, meta.write_pos), k)
                vc.index_put_((meta.write_rows, meta.write_pos), v)
            L = meta.kv_len
            if meta.slot_range is not None:
                s0, s1 = meta.slot_range
                k_out, v_out = kc[s0:s1, :L], vc[s0:s1, :L]
            else:
                k_out = kc[:, :L].index_select(0, meta.slots)
                v_out = vc[:, :L].index_select(0, meta.slots)
            return k_out.transpose(1, 2), v_out.transpose(1, 2)

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return 0 if self.meta is None else int(self.meta.kv_len)

        def get_max_cache_shape(self, layer_idx: int = 0) -> int:
            return self.max_len

        def get_mask_sizes(self, *args, **kwargs):
            return self.max_len, 0

        @property
        def is_sliding(self):
            return []

        def __len__(self):
            return len(self.keys_)

    return SlotCache


_SLOT_CACHE_CLASS = None


def SlotCache(*args, **kwargs):
    """Factory so that importing this module does not import transformers' cache machinery."""
    global _SLOT_CACHE_CLASS
    if _SLOT_CACHE_CLASS is None:
        _SLOT_CACHE_CLASS = _make_cache_class()
    return _SLOT_CACHE_CLASS(*args, **kwargs)
