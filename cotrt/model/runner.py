"""ModelRunner: one forward of the wrapped HF model over the paged KV cache.

cotrt runs the model's own modules (embeddings, norms, rotary, MLPs) and owns only the KV
cache (cotrt.model.kv_cache) and the attention call (cotrt.model.attention), through
transformers' extension points. ``ModelRunner.forward`` runs the decoder on ``[B, T]`` new
tokens (right-padded) for ``B`` slots and returns the final hidden states; the LM head is
applied only to the rows that sample (``ModelRunner.logits``).
"""
from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn

from ..parallel.shard import TPEmbedding, tp_info
from .attention import ATTN_IMPL, UnsupportedModelError, _set_attn_impl, flash_attn_with_kvcache, register_attention
from .kv_cache import PagedCache, StepMeta

_UNSUPPORTED_LAYER_TYPES = ("linear_attention", "mamba", "conv", "recurrent", "chunked_attention")


def check_architecture(model) -> None:
    """Refuse models the paged cache cannot serve, with a message naming the reason."""
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
    """Runs the wrapped model's decoder over the paged KV cache.

    The runner keeps no tables and no lengths: the engine owns which pages each request
    holds and how many tokens they hold, and passes them as each step's block tables and
    ``starts``; ``forward`` writes the new tokens there and advances nothing, so accepting,
    probing and rolling back a row are the engine's bookkeeping (rollback is a smaller
    start next step, no copy).

    ``kv_tokens``: the cache's capacity in tokens, all requests together (default
    ``max_batch * max_len``), in pages of ``page_size`` tokens.
    """

    def __init__(self, model: nn.Module, max_batch: int, max_len: int, fuse: bool | None = None,
                 cpu_kernels: bool | None = None, kv_tokens: int | None = None, page_size: int = 16):
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
        # Tensor parallel (cotrt.parallel): the cache holds this rank's KV heads only.
        self.tp = tp_info(model)
        if self.tp is not None:
            kvh = self.tp.local_kv_heads(kvh, cfg.num_attention_heads)
        _set_attn_impl(model.config, ATTN_IMPL)
        kv_tokens = max_batch * max_len if kv_tokens is None else kv_tokens
        self.page_size = page_size
        self.num_pages = -(-kv_tokens // page_size)
        self.max_pages = -(-max_len // page_size)  # block table entries of one request
        self.cache = PagedCache(n_layers, self.num_pages, page_size, kvh, head_dim, self.dtype, self.device)
        params = inspect.signature(self.decoder.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)
        self.logits_scaling = getattr(cfg, "logits_scaling", None)  # Granite divides
        self.logit_scale = getattr(cfg, "logit_scale", None)  # Cohere multiplies
        # Attention of eager decode steps: "sdpa" over views or gathers of the live length,
        # or "by_table" (pages read in place, each row to its own length: flash-attn's
        # kv-cache kernel if installed, the C++ kernel on CPU, else the decode_attention op;
        # what a captured step always uses). On CPU the C++ kernel is the default: SDPA
        # pads every row to the longest and needs the pages gathered (bench/bench_paged.py,
        # bench/bench_cpu_attention.py); on a GPU which is faster is a measurement
        # (bench/gpu_suite.py).
        self.decode_backend = "by_table" if (flash_attn_with_kvcache is not None and self.device.type == "cuda")\
            or (self.device.type == "cpu" and _cpu_attention_built()) else "sdpa"
        self.embed = model.get_input_embeddings() if self.tp is None else TPEmbedding(model.get_input_embeddings())
        self._arange = torch.arange(max_len + 64, device=self.device)
        self.fused = {}
        self._rope_patch = contextlib.nullcontext()
        self._cpu_kernels = contextlib.nullcontext()
        self.lean = None  # cotrt.model.lean_decode.LeanDecode, set below where it applies
        self._self_check(n_layers)
        # Fewer kernels a step, by default where the kernels exist (CUDA): RMSNorm modules
        # as one kernel each (cotrt.layers.rms_norm) and HF's rotary function as one kernel for
        # q and k during cotrt's forwards (cotrt.layers.rope). After the self-check: a refused
        # model is left as it came.
        if fuse if fuse is not None else self.device.type == "cuda":
            from ..layers.rms_norm import fuse_rms_norms
            from ..layers.rope import RopePatch

            self.fused["norms"] = fuse_rms_norms(model)
            patch = RopePatch(model, head_dim)
            if patch.modules:
                self._rope_patch = patch
                self.fused["rope"] = patch.modules
        # Decode-sized linears on CPU through cotrt's kernel (cotrt.layers.cpu_linear): torch's fp32
        # GEMV at M=1 runs on one core (11-12 GB/s of the 31-36 a 2-thread read gets, issue
        # 12); the kernel splits W over every thread (bench/bench_cpu_linear.py).
        if cpu_kernels if cpu_kernels is not None else self.device.type == "cpu":
            from ..layers.cpu_linear import CpuKernels, swap_cpu_linears

            names = swap_cpu_linears(model)
            if names:
                self._cpu_kernels = CpuKernels()
                self.fused["cpu_linear"] = names
        # Decode steps on CPU without HF's per-module plumbing (cotrt.model.lean_decode), for
        # the architectures it knows, once a step through it equals HF's.
        if "cpu_linear" in self.fused:
            from .lean_decode import LeanDecode

            self.lean = LeanDecode(self)
            self.fused["lean_decode"] = self.lean.why_not or self._check_lean()
            if self.fused["lean_decode"] != "on":
                self.lean = None

    # -- building the step ----------------------------------------------------------------
    def make_meta(self, tables: list[list[int]], q_lens: list[int], starts: list[int]) -> StepMeta:
        """Step metadata for ``q_lens[b]`` new tokens of row b written from position
        ``starts[b]`` into the pages of its block table ``tables[b]`` (which must cover
        ``starts[b] + q_lens[b]`` positions; the engine allocates them)."""
        dev, ps = self.device, self.page_size
        B, T = len(tables), max(q_lens)
        for b, (st, q) in enumerate(zip(starts, q_lens)):
            if st + q > self.max_len:
                raise ValueError(f"row {b}: {st + q} tokens exceed max_len={self.max_len}")
            if st + q > len(tables[b]) * ps:
                raise ValueError(f"row {b}: {st + q} tokens exceed its {len(tables[b])} pages of {ps}")
        kv_len = max(st + q for st, q in zip(starts, q_lens))
        n_pages = -(-kv_len // ps)
        scratch = self.cache.scratch
        rows = [t[:n_pages] + [scratch] * (n_pages - len(t)) for t in tables]
        tables_t = torch.tensor(rows, dtype=torch.long, device=dev)
        starts_t = torch.tensor(starts, dtype=torch.long, device=dev)
        t_idx = self._arange[:T]
        positions = starts_t[:, None] + t_idx[None, :]  # [B, T]
        k_idx = self._arange[:kv_len]
        causal = k_idx.view(1, 1, -1) <= positions[:, :, None]  # [B, T, L]
        # A row shorter than T (a 1-token step beside a 4-token probe start) has padded
        # positions past its end, possibly past kv_len's pages: their page index is clamped
        # (they write to scratch below and attend to nothing real).
        pos_pages = torch.gather(tables_t, 1, (positions // ps).clamp(max=n_pages - 1))  # [B, T]
        if T > 1:
            q_lens_t = torch.tensor(q_lens, dtype=torch.long, device=dev)
            ends = starts_t + q_lens_t
            causal = causal & (k_idx.view(1, 1, -1) < ends.view(-1, 1, 1))
            valid = t_idx[None, :] < q_lens_t[:, None]  # [B, T]
            write_pages = torch.where(valid, pos_pages, scratch).reshape(-1)
            write_offs = torch.where(valid, positions % ps, t_idx[None, :] % ps).reshape(-1)
        else:
            write_pages, write_offs = pos_pages[:, 0], starts_t % ps
        lengths = starts_t + 1 if T == 1 and self.decode_backend == "by_table" else None
        return StepMeta(
            tables=tables_t, starts=starts_t, q_lens=list(q_lens), kv_len=kv_len, mask=causal[:, None],
            positions=positions, write_pages=write_pages, write_offs=write_offs, view=_strided(rows),
            decode=T == 1, page_size=ps, lengths=lengths, k_buffers=self.cache.keys_, v_buffers=self.cache.values_,
        )

    def static_meta(self, tables: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                    write_pages: torch.Tensor, write_offs: torch.Tensor) -> StepMeta:
        """Step metadata of a static decode step (cotrt.engine.graph) over caller-owned
        device buffers: block tables ``[B, max_pages]``, one token per row at ``starts``
        ``[B]``, attending ``lengths`` keys; the caller fills ``write_pages`` /
        ``write_offs`` ``[B]`` from them (``fill_static_writes``)."""
        B = tables.shape[0]
        return StepMeta(
            tables=tables, starts=starts, q_lens=[1] * B, kv_len=self.max_len,
            mask=torch.ones(B, 1, 1, 1, dtype=torch.bool, device=tables.device),  # HF needs a 4-D mask to skip its own
            positions=starts[:, None], write_pages=write_pages, write_offs=write_offs, view=None, decode=True,
            page_size=self.page_size, lengths=lengths, k_buffers=self.cache.keys_, v_buffers=self.cache.values_,
        )

    def fill_static_writes(self, meta: StepMeta) -> None:
        """A static step's lengths and write positions from its tables and starts, on the
        device (no host values: capturable)."""
        ps = self.page_size
        torch.add(meta.starts, 1, out=meta.lengths)  # keys per row, the new one included
        torch.gather(meta.tables, 1, (meta.starts // ps)[:, None], out=meta.write_pages[:, None])
        torch.remainder(meta.starts, ps, out=meta.write_offs)

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
        if self.lean is not None and self.lean.applies(meta):
            with self._cpu_kernels:
                hidden, self.tapped = self.lean.forward(meta, input_ids, inputs_embeds, taps)
            return hidden
        return self._hf_forward(meta, input_ids, inputs_embeds, taps)

    def _hf_forward(self, meta: StepMeta, input_ids=None, inputs_embeds=None, taps: tuple = ()) -> torch.Tensor:
        self.cache.meta = meta
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
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def _layers(self):
        from ..latent import decoder_layers  # found by shape: Llama's layers, GPT-2's h, ...

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
        """One 2-token forward on the first pages: every layer must go through our cache and attention.

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
            meta = self.make_meta([list(range(-(-2 // self.page_size)))], [2], starts=[0])
            ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)
            self.forward(meta, input_ids=ids)
        except UnsupportedModelError:
            raise
        except Exception as e:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: a forward through the paged cache failed ({type(e).__name__}: {e})"
            ) from e
        finally:
            cache.update = orig
        if calls["n"] != n_layers:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: {calls['n']} of {n_layers} layers used the KV cache interface; "
                "cotrt needs every layer's attention to go through transformers' Cache/AttentionInterface"
            )

    def _check_lean(self) -> str:
        """"on" when a decode step through LeanDecode equals HF's forward (two rows, two
        positions each, GQA and windows included), else why not."""
        g = torch.Generator().manual_seed(0)
        n_tok = self.config.vocab_size
        pages_per_row = -(-3 // self.page_size)
        if self.num_pages < 2 * pages_per_row:
            return "the cache is too small for the check"
        tables = [list(range(pages_per_row)), list(range(pages_per_row, 2 * pages_per_row))]
        ids = torch.randint(0, n_tok, (2, 2), generator=g).to(self.device)
        nxt = torch.randint(0, n_tok, (2, 1), generator=g).to(self.device)
        with torch.inference_mode():
            self._hf_forward(self.make_meta(tables, [2, 2], starts=[0, 0]), input_ids=ids)
            meta = self.make_meta(tables, [1, 1], starts=[2, 2])
            if not self.lean.applies(meta):
                return "decode steps do not read the cache by table"
            ref = self._hf_forward(meta, input_ids=nxt).float()
            with self._cpu_kernels:
                got = self.lean.forward(meta, input_ids=nxt)[0].float()
        tol = 1e-4 if self.dtype == torch.float32 else 2e-2
        err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
        return "on" if err <= tol else f"differs from HF's forward (relative error {err:.2e})"


def _strided(tables: list[list[int]]) -> tuple | None:
    """(first page, pages between rows) when row b's pages are consecutive from
    first + b * stride (see ``StepMeta.view``), else None."""
    first = tables[0][0]
    stride = tables[1][0] - first if len(tables) > 1 else 0
    for b, row in enumerate(tables):
        base = first + b * stride
        if row != list(range(base, base + len(row))):
            return None
    if stride < 0 or (len(tables) > 1 and stride < len(tables[0])):
        return None  # rows would overlap or run backwards
    return first, stride


def _cpu_attention_built() -> bool:
    from ..ops.cpu_attention import HAS_CPU_ATTENTION

    return HAS_CPU_ATTENTION
