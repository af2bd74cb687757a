"""The HF adapter: a slot KV cache, an attention function over it, and one model forward.

cotrt runs the model's own modules (embeddings, norms, rotary, MLPs) and owns only the KV
cache and the attention call, through transformers' extension points:

- ``SlotCache`` (a ``transformers.Cache``) holds one slot per running request, per layer
  ``[max_batch + 1, max_len, kv_heads, head_dim]`` (flash-attn's layout; the extra row is a
  scratch slot that absorbs the writes of padding tokens). Each slot's length lives on the
  host (``ModelRunner.lengths``); rolling a row back is setting its length, no copy.
- ``slot_attention`` is registered with ``AttentionInterface`` under ``ATTN_IMPL``. Inside a
  cotrt forward it receives the step's ``StepMeta`` through the forward's ``**kwargs`` and
  attends each row over its own live length only; outside one (a user calling the wrapped
  model's ``generate``) it defers to HF's SDPA/eager functions, so the model stays usable.
- ``ModelRunner.forward`` runs the decoder on ``[B, T]`` new tokens (right-padded) for
  ``B`` slots and returns the final hidden state of each row's last real token; the LM head
  is applied only to the rows that sample (``ModelRunner.logits``).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

ATTN_IMPL = "cotrt_slot"

# Attention kwargs that change the math and that we do not implement: refuse the model
# rather than silently ignoring them (attention sinks of gpt-oss, ALiBi-style biases).
_UNSUPPORTED_ATTN_KWARGS = ("s_aux", "sinks", "position_bias", "alibi")

try:  # flash-attn is optional; it is used for decode steps on CUDA when importable.
    from flash_attn import flash_attn_with_kvcache  # type: ignore
except Exception:  # pragma: no cover - not installed on CPU machines
    flash_attn_with_kvcache = None


class UnsupportedModelError(ValueError):
    """The model's architecture cannot be served through the slot cache."""


@dataclass
class StepMeta:
    """Everything one forward needs to place and attend its tokens; built once per step.

    slots:    [B] int64   cache row of each batch row
    starts:   [B] int64   tokens already cached in each row (= position of its first new token)
    q_lens:   list[int]   real new tokens per row (the rest of T is right padding)
    kv_len:   int         keys attended: max(start + q_len)
    mask:     [B, 1, T, kv_len] bool, True where a query may attend a key
    positions:[B, T] int64 absolute positions of the new tokens
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
    _window_masks: dict = field(default_factory=dict)

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


def slot_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                   sliding_window=None, softcap=None, **kwargs):
    """Attention over the slot cache. query ``[B, H, T, D]``, key/value ``[B, KVH, L, D]``.

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
    if meta.lengths is not None:  # static decode, or decode_backend "by_slot"
        return _decode_by_slot(module, query, meta, scaling, softcap, sliding_window), None
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


def _decode_by_slot(module, query, meta, scaling, softcap, sliding_window):
    """One query per row against its slot's first ``meta.lengths[b]`` keys, read straight
    from the cache buffers (no views, no host values): flash-attn's kv-cache kernel when
    installed, else cotrt's decode_attention op. Returns ``[B, 1, H, D]``."""
    cache = meta.runner.cache  # type: ignore[attr-defined]
    layer = module.layer_idx
    kc, vc = cache.keys_[layer], cache.values_[layer]
    if flash_attn_with_kvcache is not None and query.is_cuda and query.dtype != torch.float32:  # pragma: no cover
        window = (sliding_window - 1, 0) if sliding_window else (-1, -1)
        extra = {"softcap": softcap} if softcap else {}  # flash-attn >= 2.6 only
        return flash_attn_with_kvcache(
            query.transpose(1, 2), kc, vc, cache_seqlens=meta.lengths.to(torch.int32),
            cache_batch_idx=meta.slots.to(torch.int32), softmax_scale=scaling, causal=True,
            window_size=window, **extra)
    from .ops.decode_attention import decode_attention

    out = decode_attention(query[:, :, 0], kc, vc, meta.slots, meta.lengths,
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
    """Register ``slot_attention`` (and SDPA's mask builder, for calls outside cotrt)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPL, slot_attention)
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


_UNSUPPORTED_LAYER_TYPES = ("linear_attention", "mamba", "conv", "recurrent", "chunked_attention")


def check_architecture(model) -> None:
    """Refuse models the slot cache cannot serve, with a message naming the reason."""
    config = model.config
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name}: encoder-decoder models are not supported (decoder-only LMs)")
    if model.get_output_embeddings() is None:
        raise UnsupportedModelError(f"{name}: no output embeddings (is this a causal LM?)")
    layer_types = getattr(config, "layer_types", None) or []
    bad = sorted({t for t in layer_types if any(u in str(t) for u in _UNSUPPORTED_LAYER_TYPES)})
    if bad:
        raise UnsupportedModelError(f"{name}: layer types {bad} keep non-KV state; cotrt serves attention-only decoders")
    for attr in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        if getattr(config, attr, None) is None:
            raise UnsupportedModelError(f"{name}: config has no {attr}")


class ModelRunner:
    """Runs the wrapped model's decoder over the slot cache.

    ``lengths`` (host, list[int]) is the number of cached tokens per slot; the engine owns
    it: ``forward`` does not advance it, the caller does after accepting the step (which is
    what makes in-place probes and rollback free).
    """

    def __init__(self, model: nn.Module, max_batch: int, max_len: int, fuse: bool | None = None,
                 cpu_kernels: bool | None = None):
        check_architecture(model)
        register_attention()
        self.model = model
        self.config = model.config
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        self.lm_head = model.get_output_embeddings()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_batch, self.max_len = max_batch, max_len
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.text_config = cfg
        n_layers = cfg.num_hidden_layers
        kvh = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        _set_attn_impl(model.config, ATTN_IMPL)
        self.cache = SlotCache(n_layers, max_batch, max_len, kvh, head_dim, self.dtype, self.device)
        params = inspect.signature(self.decoder.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)
        self.logits_scaling = getattr(cfg, "logits_scaling", None)  # Granite divides
        self.logit_scale = getattr(cfg, "logit_scale", None)  # Cohere multiplies
        self.lengths = [0] * max_batch
        # Attention of eager decode steps: "sdpa" over views of the live length, or
        # "by_slot" (flash-attn's kv-cache kernel if installed, else the decode_attention
        # op: by slot and per-row length, what a captured step always uses). Which is
        # faster is a GPU measurement (bench/gpu_suite.py).
        self.decode_backend = "by_slot" if flash_attn_with_kvcache is not None and self.device.type == "cuda" \
            else "sdpa"
        self.embed = model.get_input_embeddings()
        self._arange = torch.arange(max_len + 64, device=self.device)
        self._calls = 0
        self.fused = {}
        self._rope_patch = contextlib.nullcontext()
        self._cpu_kernels = contextlib.nullcontext()
        self._self_check(n_layers)
        # Fewer kernels a step, by default where the kernels exist (CUDA): RMSNorm modules
        # as one kernel each (cotrt.norms) and HF's rotary function as one kernel for q
        # and k during cotrt's forwards (cotrt.rotary). After the self-check: a refused
        # model is left as it came.
        if fuse if fuse is not None else self.device.type == "cuda":
            from .norms import fuse_rms_norms
            from .rotary import RopePatch

            self.fused["norms"] = fuse_rms_norms(model)
            patch = RopePatch(model, head_dim)
            if patch.modules:
                self._rope_patch = patch
                self.fused["rope"] = patch.modules
        # Decode-sized linears on CPU through cotrt's kernel (cotrt.cpu_linear): torch's fp32
        # GEMV at M=1 runs on one core (11-12 GB/s of the 31-36 a 2-thread read gets, issue
        # 12); the kernel splits W over every thread (bench/bench_cpu_linear.py).
        if cpu_kernels if cpu_kernels is not None else self.device.type == "cpu":
            from .cpu_linear import CpuKernels, swap_cpu_linears

            names = swap_cpu_linears(model)
            if names:
                self._cpu_kernels = CpuKernels()
                self.fused["cpu_linear"] = names

    # -- building the step ----------------------------------------------------------------
    def make_meta(self, slots: list[int], q_lens: list[int], starts: list[int] | None = None) -> StepMeta:
        """Step metadata for new tokens ``q_lens[b]`` appended to slot ``slots[b]``."""
        dev = self.device
        if starts is None:
            starts = [self.lengths[s] for s in slots]
        B, T = len(slots), max(q_lens)
        for s, st, q in zip(slots, starts, q_lens):
            if st + q > self.max_len:
                raise ValueError(f"slot {s}: {st + q} tokens exceed max_len={self.max_len}")
        kv_len = max(st + q for st, q in zip(starts, q_lens))
        slots_t = torch.tensor(slots, dtype=torch.long, device=dev)
        starts_t = torch.tensor(starts, dtype=torch.long, device=dev)
        t_idx = self._arange[:T]
        positions = starts_t[:, None] + t_idx[None, :]  # [B, T]
        k_idx = self._arange[:kv_len]
        causal = k_idx.view(1, 1, -1) <= positions[:, :, None]  # [B, T, L]
        if T > 1:
            q_lens_t = torch.tensor(q_lens, dtype=torch.long, device=dev)
            ends = starts_t + q_lens_t
            causal = causal & (k_idx.view(1, 1, -1) < ends.view(-1, 1, 1))
            valid = t_idx[None, :] < q_lens_t[:, None]  # [B, T]
            write_rows = torch.where(valid, slots_t[:, None], self.max_batch).reshape(-1)
            write_pos = torch.where(valid, positions, t_idx[None, :]).reshape(-1)
        else:
            write_rows, write_pos = slots_t, starts_t
        contiguous = slots == list(range(slots[0], slots[0] + B))
        lengths = starts_t + 1 if T == 1 and self.decode_backend == "by_slot" else None
        return StepMeta(
            slots=slots_t, starts=starts_t, q_lens=list(q_lens), kv_len=kv_len,
            mask=causal[:, None], positions=positions, write_rows=write_rows, write_pos=write_pos,
            slot_range=(slots[0], slots[0] + B) if contiguous else None, decode=T == 1, lengths=lengths,
        )

    def static_meta(self, slots: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor) -> StepMeta:
        """Step metadata of a static decode step (cotrt.graph) over caller-owned device
        buffers ``[B]``: one token per row at ``starts``, attending ``lengths`` keys."""
        B = slots.shape[0]
        return StepMeta(
            slots=slots, starts=starts, q_lens=[1] * B, kv_len=self.max_len,
            mask=torch.ones(B, 1, 1, 1, dtype=torch.bool, device=slots.device),  # HF needs a 4-D mask to skip its own
            positions=starts[:, None], write_rows=slots, write_pos=starts, slot_range=None, decode=True,
            lengths=lengths,
        )

    # -- the forward --------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, meta: StepMeta, input_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, taps: tuple = ()) -> torch.Tensor:
        """Run the decoder for ``[B, T]`` new tokens; returns the final hidden states ``[B, T, H]``.

        The cache rows are written at positions ``starts[b] + t``; lengths are not advanced.
        ``taps``: decoder layer indices whose output residual ``[B, T, H]`` to keep; they
        land in ``self.tapped[layer]`` (a forward hook on those layers only, so no other
        layer's states are kept).
        """
        self.cache.meta = meta
        meta.runner = self  # type: ignore[attr-defined]  (flash-attn decode reads the buffers)
        self.tapped = {}
        hooks = [self._layers()[l].register_forward_hook(self._tap_hook(l)) for l in taps]
        try:
            with self._rope_patch, self._cpu_kernels:
                out = self.decoder(
                    input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=meta.mask,
                    position_ids=meta.positions, use_cache=True, cotrt_meta=meta,
                    **{self._cache_kw: self.cache},
                )
        finally:
            self.cache.meta = None
            for h in hooks:
                h.remove()
        self._calls += 1
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def _layers(self):
        from .latent import decoder_layers  # found by shape: Llama's layers, GPT-2's h, ...

        layers = getattr(self, "_layer_list", None) or decoder_layers(self.model)
        self._layer_list = layers  # found once: the walk visits every module
        if layers is None:
            raise UnsupportedModelError(f"{type(self.model).__name__}: no list of decoder layers to tap")
        return layers

    def _tap_hook(self, layer: int):
        def hook(module, args, output):
            self.tapped[layer] = output[0] if isinstance(output, tuple) else output
        return hook

    def last_hidden(self, hidden: torch.Tensor, meta: StepMeta) -> torch.Tensor:
        """``[B, T, H]`` -> ``[B, H]`` at each row's last real token."""
        if meta.decode:
            return hidden[:, 0]
        idx = torch.tensor([q - 1 for q in meta.q_lens], device=hidden.device)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """LM head on the rows that sample: ``[R, H]`` -> fp32 ``[R, V]``."""
        with torch.inference_mode(), self._cpu_kernels:
            logits = self.lm_head(h).float()
        if self.logits_scaling:
            logits = logits / self.logits_scaling
        if self.logit_scale:
            logits = logits * self.logit_scale
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    # -- checks ---------------------------------------------------------------------------------
    def _self_check(self, n_layers: int) -> None:
        """One 2-token forward on slot 0: every layer must go through our cache and attention.

        Architectures whose attention bypasses ``AttentionInterface`` (or keeps other state)
        would silently decode garbage; this makes them fail at wrap time instead.
        """
        calls = {"n": 0}
        cache = self.cache
        orig = cache.update

        def counting_update(*args, **kwargs):
            calls["n"] += 1
            return orig(*args, **kwargs)

        cache.update = counting_update
        try:
            meta = self.make_meta([0], [2], starts=[0])
            ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)
            self.forward(meta, input_ids=ids)
        except UnsupportedModelError:
            raise
        except Exception as e:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: a forward through the slot cache failed ({type(e).__name__}: {e})"
            ) from e
        finally:
            cache.update = orig
        if calls["n"] != n_layers:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: {calls['n']} of {n_layers} layers used the KV cache interface; "
                "cotrt needs every layer's attention to go through transformers' Cache/AttentionInterface"
            )
