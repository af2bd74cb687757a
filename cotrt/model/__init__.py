"""The model side of a step: the KV cache, the attention function, and the runner.

- ``kv_cache``: ``StepMeta`` (one step's placement and masks) and ``PagedCache``;
- ``pages``: ``PagePool``, the host bookkeeping of the cache's pages and prefix cache;
- ``attention``: ``paged_attention`` (registered with transformers) and its backends;
- ``runner``: ``ModelRunner``, one forward of the wrapped HF model.
"""
from .attention import ATTN_IMPL, UnsupportedModelError, paged_attention, register_attention
from .kv_cache import PagedCache, StepMeta
from .pages import PagePool
from .runner import ModelRunner, check_architecture

__all__ = ["ATTN_IMPL", "ModelRunner", "PagePool", "PagedCache", "StepMeta", "UnsupportedModelError",
           "check_architecture", "paged_attention", "register_attention"]
