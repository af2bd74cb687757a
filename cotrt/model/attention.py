"""The attention function cotrt registers with transformers, and its backends.

``paged_attention`` is registered with ``AttentionInterface`` under ``ATTN_IMPL``. Inside a
cotrt forward it receives the step's ``StepMeta`` through the forward's ``**kwargs`` and
attends each row over its own live length only; everything it needs comes from that
metadata (never from the runner). Outside one (a user calling the wrapped model's
``generate``) it defers to HF's SDPA/eager functions, so the model stays usable.

Backends: SDPA over the views or gathers ``PagedCache.update`` returns (prefill, and eager
decode by default on CPU); decode by block table and per-row length straight from the
page buffers (``StepMeta.lengths`` set): flash-attn's paged kv-cache kernel on CUDA when
installed and the page size suits it (a multiple of 256), else cotrt's decode_attention
op; plain math in fp32 for logit soft-capping (Gemma2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kv_cache import StepMeta

ATTN_IMPL = "cotrt_paged"

# Attention kwargs that change the math and that we do not implement: refuse the model
# rather than silently ignoring them (attention sinks of gpt-oss, ALiBi-style biases).
_UNSUPPORTED_ATTN_KWARGS = ("s_aux", "sinks", "position_bias", "alibi")

try:  # flash-attn is optional; it is used for decode steps on CUDA when importable.
    from flash_attn import flash_attn_with_kvcache  # type: ignore
except Exception:  # pragma: no cover - not installed on CPU machines
    flash_attn_with_kvcache = None


class UnsupportedModelError(ValueError):
    """The model's architecture cannot be served through the paged cache."""


def paged_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                   sliding_window=None, softcap=None, **kwargs):
    """Attention over the paged cache. query ``[B, H, T, D]``, key/value ``[B, KVH, L, D]``.

    Returns ``([B, T, H, D], None)`` like HF's attention functions.
    """
    meta: StepMeta | None = kwargs.pop("cotrt_meta", None)
    if meta is None:
        return _hf_fallback(module, query, key, value, attention_mask, dropout=dropout,
                            scaling=scaling, sliding_window=sliding_window, softcap=softcap, **kwargs)
    for name in _UNSUPPORTED_ATTN_KWARGS:
        if kwargs.get(name) is not None:
            raise UnsupportedModelError(f"attention argument {name!r} is not supported by cotrt")
    B, H, T, D = query.shape
    kvh = key.shape[1]
    if scaling is None:
        scaling = D ** -0.5
    if meta.lengths is not None:  # static decode, or decode_backend "by_table"
        return _decode_by_table(module, query, meta, scaling, softcap, sliding_window), None
    mask = meta.mask_for(sliding_window)

    if softcap is None and T == 1 and kvh != H:
        # Decode: fold each KV head's query group into the query length, [B, KVH, G, D],
        # so SDPA reads every K/V row once without GQA expansion (CPU, SmolLM2 at B=8,
        # L=250: 106 us vs 190 us per call with enable_gqa).
        q = query.view(B, kvh, H // kvh, D)
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
        out = out.view(B, H, 1, D)
    elif softcap is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                             enable_gqa=kvh != H)
    else:
        # SDPA has no logit soft-capping (Gemma2): plain math, scores in fp32.
        g = H // kvh
        q = query.reshape(B, kvh, g * T, D).float()
        s = torch.matmul(q, key.float().transpose(-1, -2)) * scaling  # [B, KVH, G*T, L]
        s = torch.tanh(s / softcap) * softcap
        s = s.view(B, kvh, g, T, -1).masked_fill(~mask[:, :, None], float("-inf"))
        p = torch.softmax(s, dim=-1).view(B, kvh, g * T, -1)
        out = torch.matmul(p, value.float()).view(B, H, T, D).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


# flash-attn's paged kv-cache kernel takes pages of a multiple of 256 tokens.
FLASH_PAGE_MULTIPLE = 256


def _decode_by_table(module, query, meta, scaling, softcap, sliding_window):
    """One query per row against its first ``meta.lengths[b]`` keys, read from the pages
    of its block table (no views, no host values): flash-attn's kv-cache kernel when
    installed and the page size suits it; on CPU cotrt's C++ kernel (cotrt.ops.cpu_attention)
    when built; else cotrt's decode_attention op. Returns ``[B, 1, H, D]``."""
    layer = module.layer_idx
    kc, vc = meta.k_buffers[layer], meta.v_buffers[layer]
    if flash_attn_with_kvcache is not None and query.is_cuda and query.dtype != torch.float32 \
            and meta.page_size % FLASH_PAGE_MULTIPLE == 0:  # pragma: no cover
        window = (sliding_window - 1, 0) if sliding_window else (-1, -1)
        extra = {"softcap": softcap} if softcap else {}  # flash-attn >= 2.6 only
        return flash_attn_with_kvcache(
            query.transpose(1, 2), kc, vc, cache_seqlens=meta.lengths.to(torch.int32),
            block_table=meta.tables.to(torch.int32), softmax_scale=scaling, causal=True,
            window_size=window, **extra)
    if not query.is_cuda and query.dtype in (torch.float32, torch.bfloat16):
        from ..ops.cpu_attention import HAS_CPU_ATTENTION, paged_decode_attention_cpu

        if HAS_CPU_ATTENTION:
            out = paged_decode_attention_cpu(query[:, :, 0], kc, vc, meta.tables, meta.lengths,
                                             scale=scaling, softcap=softcap, window=sliding_window)
            return out[:, None]
    from ..ops.decode_attention import decode_attention

    out = decode_attention(query[:, :, 0], kc, vc, meta.tables, meta.lengths,
                           scale=scaling, softcap=softcap, window=sliding_window)
    return out[:, None]


def _hf_fallback(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    if kwargs.get("softcap") is not None:
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("sliding_window", None)  # already applied by HF's mask
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


_REGISTERED = False


def register_attention() -> None:
    """Register ``paged_attention`` (and SDPA's mask builder, for calls outside cotrt)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPL, paged_attention)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)
    except ImportError:  # older transformers: masks built by the model itself
        pass
    _REGISTERED = True


def _set_attn_impl(config, name: str) -> None:
    seen = set()

    def visit(cfg):
        if cfg is None or id(cfg) in seen:
            return
        seen.add(id(cfg))
        try:
            cfg._attn_implementation = name
        except Exception:
            cfg._attn_implementation_internal = name
        for key in getattr(cfg, "sub_configs", {}) or {}:
            visit(getattr(cfg, key, None))

    visit(config)
