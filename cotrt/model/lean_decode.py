"""A lean CPU decode step for Llama-family decoders (issue 12).

On a 2-core CPU a SmolLM2 decode step through HF's modules spends ~30 ms outside its
linears: module calls, keyword plumbing, mask and cache APIs, a dozen small ops a layer
that do no arithmetic worth the name. The linears themselves run near the read-bandwidth
limit through cotrt's kernel (cotrt.layers.cpu_linear). ``LeanDecode`` runs the same math
for one token per row with the fewest calls: the model's own modules for what carries
weights (projections, norms: a valve's ValveLinear and the CPU kernel ride along), plain
tensor ops for the rest, the cache written in place and read by block table through the
C++ paged attention kernel.

It is used for decode forwards only (one token per row, block-table metadata, CPU, no
tensor parallelism) of the architectures below, and only after a check at wrap time that
its output equals HF's forward through the same cache; anything else runs HF's forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kv_cache import StepMeta

# model_type -> (per-head q/k norms, sliding window read from the config for every layer)
_ARCHS = {"llama": (False, False), "mistral": (False, True), "qwen2": (False, False), "qwen3": (True, False)}
_LAYER_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class LeanDecode:
    """The decode forward of one wrapped model (see the module docstring). ``why_not``
    says why a model does not qualify (None when it does)."""

    def __init__(self, runner):
        self.why_not = _why_not(runner)
        if self.why_not is not None:
            return
        dec, cfg = runner.decoder, runner.text_config
        qk_norm, config_window = _ARCHS[cfg.model_type]
        self.decoder = dec
        # The layers' modules are looked up at each step: loading a valve or fusing norms
        # replaces them after this is built.
        self.layers = []
        for layer in dec.layers:
            window = getattr(cfg, "sliding_window", None) if config_window else getattr(layer.self_attn, "sliding_window", None)
            self.layers.append((layer, layer.self_attn, layer.mlp, layer.self_attn.scaling, window))
        self.qk_norm = qk_norm
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden, self.inter = cfg.hidden_size, cfg.intermediate_size
        # Each layer in one C++ call (csrc/cpu_layer.cpp) when the model is fp32 with plain
        # weights (a valve's banks ride along); the wrap-time check runs this path too.
        self.native = runner.dtype == torch.float32 and _native_built() and all(
            _plain(m) for layer in dec.layers for m in layer.modules() if m is not layer)
        self._native_cache = None  # _native_layers' result and what it was read from

    def applies(self, meta: StepMeta) -> bool:
        return self.why_not is None and meta.decode and meta.lengths is not None and meta.k_buffers is not None

    def forward(self, meta: StepMeta, input_ids=None, inputs_embeds=None, taps: tuple = ()):
        """``[B, 1, H]`` final hidden states of one token per row, and ``{layer: [B, 1, H]}``
        residuals after the ``taps`` layers."""
        dec = self.decoder
        x = (dec.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds)[:, 0]
        cos, sin = dec.rotary_emb(x[:, None], meta.positions)  # [B, 1, D]
        layers = self._native_layers() if self.native else None
        if layers is not None:
            return self._native(meta, x, cos[:, 0].contiguous(), sin[:, 0].contiguous(), layers, taps)
        return self._modules(meta, x, cos, sin, taps)

    def _modules(self, meta, x, cos, sin, taps):
        """The layers through their modules and PyTorch ops (bf16, a module the native layer cannot read)."""
        from ..ops.cpu_attention import paged_decode_attention_cpu

        B = x.shape[0]
        Hq, Hk, D = self.heads, self.kv_heads, self.head_dim
        pages, offs, tables, lengths = meta.write_pages, meta.write_offs, meta.tables, meta.lengths
        tapped = {}
        for i, (layer, attn, mlp, scaling, window) in enumerate(self.layers):
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(B, Hq, D)
            k = attn.k_proj(h).view(B, Hk, D)
            v = attn.v_proj(h).view(B, Hk, D)
            if self.qk_norm:
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kc, vc = meta.k_buffers[i], meta.v_buffers[i]
            kc.index_put_((pages, offs), k)
            vc.index_put_((pages, offs), v)
            a = paged_decode_attention_cpu(q, kc, vc, tables, lengths, scale=scaling, window=window)
            x = x + attn.o_proj(a.reshape(B, Hq * D))
            h = layer.post_attention_layernorm(x)
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
            if i in taps:
                tapped[i] = x[:, None]
        return self.decoder.norm(x)[:, None], tapped

    def _native_layers(self) -> list | None:
        """Per layer, the pointers ``_cpu.decode_layer`` reads (weights, norms, valve banks)
        and the eps values; None when a layer cannot run there (a module replaced by
        another kind, a valve bank it cannot read). Also sets ``self._valve``: the step's
        per-row alpha and adapter when a valve is in use.

        Collecting them walks ~270 modules through ``nn.Module.__getattr__`` (2-4 ms of a
        35 ms SmolLM2 step), so the result is kept with what it was read from, and reused
        while all of it is unchanged: every module and tensor still the object in its
        parent's slot (``_modules``/``_parameters``/``_buffers``), every tensor's storage
        where it was (``.data`` swaps), and every valve state on or off as it was."""
        c = self._native_cache
        if c is not None and _unchanged(c):
            self._valve = c[3]
            return c[4]
        slots, tensors, states = [], [], []
        layers = self._collect_native_layers(slots, tensors, states)
        self._native_cache = None if layers is None else \
            (tuple(slots), tuple(tensors), tuple(states), self._valve, layers)
        return layers

    def _collect_native_layers(self, slots, tensors, states) -> list | None:
        """``_native_layers``' walk; appends to ``slots`` (container, key, object),
        ``tensors`` (tensor, data_ptr) and ``states`` (valve state, alpha is None)."""
        from ..layers.valve_lora import ValveLinear

        def track(m, *names):
            for name in names:
                for d in (m._parameters, m._buffers, m.__dict__):
                    if name in d:
                        slots.append((d, name, d[name]))
                        if isinstance(d[name], torch.Tensor):
                            tensors.append((d[name], d[name].data_ptr()))
                        break

        out, self._valve, seen = [], None, set()
        for layer, attn, mlp, _, _ in self.layers:
            mods = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            for parent, names in ((attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                  (mlp, ("gate_proj", "up_proj", "down_proj")),
                                  (layer, ("input_layernorm", "post_attention_layernorm"))):
                slots.extend((parent._modules, n, parent._modules[n]) for n in names)
            banks = [None] * 7
            for i, m in enumerate(mods):
                track(m, "weight", "bias")
                if isinstance(m, ValveLinear):
                    track(m, "lora_a", "lora_b", "state")
                    if id(m.state) not in seen:
                        seen.add(id(m.state))
                        states.append((m.state, m.state.alpha is None))
                    if m.state.alpha is not None and m.lora_a.shape[0] > 0:
                        if m.transposed or m.lora_a.dtype != torch.float32 or not m.lora_a.is_contiguous() \
                                or not m.lora_b.permute(1, 0, 2).is_contiguous():
                            return None
                        banks[i] = m
                        self._valve = m.state
                elif not isinstance(m, torch.nn.Linear):
                    return None
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            qk = (attn.q_norm, attn.k_norm) if self.qk_norm else (None, None)
            if self.qk_norm:
                slots.extend((attn._modules, n, attn._modules[n]) for n in ("q_norm", "k_norm"))
            for n in norms + qk:
                if n is not None:
                    track(n, "weight")
            ptrs = [n.weight.data_ptr() for n in norms] + [m.weight.data_ptr() for m in mods] + \
                [0 if m.bias is None else m.bias.data_ptr() for m in mods] + \
                [0 if n is None else n.weight.data_ptr() for n in qk]
            lora = [0 if m is None else m.lora_a.data_ptr() for m in banks] + \
                [0 if m is None else m.lora_b.data_ptr() for m in banks]
            sizes = [0 if m is None else m.lora_a.shape[0] for m in banks] + \
                [0 if m is None else m.lora_a.shape[1] for m in banks]
            out.append((ptrs, lora, sizes, _eps(norms[0]), _eps(norms[1]), _eps(qk[0]) if qk[0] is not None else 0.0))
        return out

    def _native(self, meta, x, cos, sin, layers, taps):
        """Each layer in one call of ``_cpu.decode_layer`` (fp32)."""
        from ..ops.cpu_attention import _cpu

        x = x.contiguous().clone()  # the residual stream, updated in place
        B = x.shape[0]
        tables, lengths = meta.tables.contiguous(), meta.lengths.contiguous()
        pages, offs = meta.write_pages.contiguous(), meta.write_offs.contiguous()
        tail = [cos.data_ptr(), sin.data_ptr()]
        step = [pages.data_ptr(), offs.data_ptr(), tables.data_ptr(), lengths.data_ptr()]
        rows, s_alpha, s_adapter, i64 = [0, 0], 0, 0, False
        state = self._valve
        if state is not None:  # one alpha and adapter per row ([1]: broadcast), as ValveLinear reads them
            alpha, adapter = state.alpha, state.adapter
            rows = [alpha.data_ptr(), 0 if adapter is None else adapter.data_ptr()]
            s_alpha = 0 if alpha.shape[0] == 1 else alpha.stride(0)
            if adapter is not None:
                s_adapter, i64 = (0 if adapter.shape[0] == 1 else adapter.stride(0)), adapter.dtype == torch.int64
        P, PS = meta.k_buffers[0].shape[:2]
        threads = torch.get_num_threads()
        tapped = {}
        for i, ((ptrs, lora, sizes, eps1, eps2, qk_eps), (_, _, _, scaling, window)) in \
                enumerate(zip(layers, self.layers)):
            kc, vc = meta.k_buffers[i], meta.v_buffers[i]
            _cpu.decode_layer([x.data_ptr()] + ptrs + tail + [kc.data_ptr(), vc.data_ptr()] + step, lora + rows,
                              sizes, s_alpha, s_adapter, i64, B, self.hidden, self.heads, self.kv_heads,
                              self.head_dim, self.inter, P, PS, tables.shape[1], eps1, eps2, qk_eps, scaling,
                              window or 0, threads)
            if i in taps:
                tapped[i] = x[:, None].clone()
        return self.decoder.norm(x)[:, None], tapped


def _unchanged(cache) -> bool:
    """Whether what ``LeanDecode._native_layers`` read is all still in place (its docstring)."""
    slots, tensors, states = cache[:3]
    return all(d.get(k) is o for d, k, o in slots) and all(t.data_ptr() == p for t, p in tensors) and \
        all((st.alpha is None) is none for st, none in states)


def _eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _plain(m) -> bool:
    """A module whose weights the native layer may read in place (contiguous fp32 on CPU)."""
    w = getattr(m, "weight", None)
    return w is None or (type(w.data) is torch.Tensor and w.dtype == torch.float32 and w.is_contiguous())


def _native_built() -> bool:
    from ..ops.cpu_attention import _cpu

    return _cpu is not None and hasattr(_cpu, "decode_layer")


def _why_not(runner) -> str | None:
    from ..ops.cpu_attention import HAS_CPU_ATTENTION

    cfg = runner.text_config
    if runner.device.type != "cpu" or not HAS_CPU_ATTENTION:
        return "CPU with cotrt._cpu built only"
    if runner.tp is not None:
        return "not under tensor parallelism"
    if runner.dtype not in (torch.float32, torch.bfloat16):
        return f"dtype {runner.dtype}"
    if getattr(cfg, "model_type", None) not in _ARCHS:
        return f"model type {getattr(cfg, 'model_type', None)!r} (lean decode knows {sorted(_ARCHS)})"
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"activation {getattr(cfg, 'hidden_act', None)!r}"
    dec = runner.decoder
    for name in ("embed_tokens", "norm", "rotary_emb", "layers"):
        if not hasattr(dec, name):
            return f"the decoder has no {name}"
    for layer in dec.layers:
        for part in _LAYER_PARTS:
            obj = layer
            for attr in part.split("."):
                obj = getattr(obj, attr, None)
            if obj is None:
                return f"a layer has no {part}"
    return None
