"""The HF adapter: a slot KV cache, an attention function over it, and one model forward.

- ``kv_cache``: ``StepMeta`` (one step's placement and masks) and ``SlotCache``;
- ``attention``: ``slot_attention`` (registered with transformers) and its backends;
- ``runner``: ``ModelRunner``, the forward of one step and the LM head on sampling rows.
"""
from .attention import ATTN_IMPL, UnsupportedModelError, register_attention, slot_attention
from .kv_cache import SlotCache, StepMeta
from .runner import ModelRunner, check_architecture

__all__ = ["ATTN_IMPL", "ModelRunner", "SlotCache", "StepMeta", "UnsupportedModelError", "check_architecture",
           "register_attention", "slot_attention"]
