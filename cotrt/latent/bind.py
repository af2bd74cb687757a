"""Binding a :class:`~cotrt.latent.spec.Latent` to a model: token ids, the tapped layer, the
END head and the projection, each checked against the model (``Latent.bind``).

Also what the engine and the model runner need of a model for latent decoding: the list
of decoder layers to tap (:func:`decoder_layers`) and the END decision (:class:`EndHead`).
"""
from __future__ import annotations

import torch
from torch import nn

from .spec import _TOKEN_FIELDS, BoundLatent, Latent, _fail, _is_int


class EndHead:
    """The END decision of a CCoT head: ``state [B, H] -> bool [B]``, on the head's dtype.

    One logit (``[B]`` or ``[B, 1]``): END when it is > 0 (sigmoid > 0.5). Two logits
    ``[B, 2]``: END when class 1 wins (ties: not END)."""

    def __init__(self, module: nn.Module, n_out: int, dtype: torch.dtype):
        self.module, self.n_out, self.dtype = module, n_out, dtype

    @torch.no_grad()
    def __call__(self, state: torch.Tensor) -> torch.Tensor:
        z = self.module(state.to(self.dtype))
        if self.n_out == 2:
            return z[:, 1] > z[:, 0]
        return z.reshape(state.shape[0]) > 0


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The ``nn.ModuleList`` of a causal LM's decoder layers, found by shape, or None.

    Names differ by family (Llama/Qwen ``model.layers``, GPT-2 ``transformer.h``, GPT-NeoX
    ``gpt_neox.layers``, Falcon ``transformer.h``, OPT ``model.decoder.layers``), so the rule
    is structural: under the decoder (``get_decoder()``, else ``base_model``), the module
    lists holding exactly ``num_hidden_layers`` entries; the shallowest one, if it is the
    only one at its depth.
    """
    cfg = _text_config(model)
    L = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    root = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "base_model", model)
    if root is None:
        root = model
    found: dict[int, list] = {}
    for name, mod in root.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == L and L > 0:
            found.setdefault(name.count(".") if name else -1, []).append(mod)
    if not found:
        return None
    shallowest = found[min(found)]
    return shallowest[0] if len(shallowest) == 1 else None


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _resolve_token(tokenizer, tok, n_rows: int):
    """(id, None) or (None, why)."""
    if _is_int(tok):
        if tok >= n_rows:
            return None, f"id {tok} >= the model's {n_rows} embedding rows"
        return tok, None
    tid = tokenizer.convert_tokens_to_ids(tok)
    # A missing token maps to the unk id (or None): the round trip tells them apart.
    if tid is None or tokenizer.convert_ids_to_tokens(tid) != tok:
        return None, "not in the tokenizer"
    if tid >= n_rows:
        return None, f"id {tid} >= the model's {n_rows} embedding rows (resize_token_embeddings?)"
    return tid, None


def _check_head(spec, model, H, end_heads):
    head = spec.end_head
    if isinstance(head, str):
        registry = dict(getattr(model, "cotrt_end_heads", None) or {})
        registry.update(end_heads or {})
        if head not in registry:
            _fail("end_head", f"no END head named {head!r}; known: {sorted(registry)}")
        head = registry[head]
        if not isinstance(head, nn.Module):
            _fail("end_head", f"head {spec.end_head!r} is a {type(head).__name__}, not an nn.Module")
    param = next(head.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else next(model.parameters()).device
    model_device = next(model.parameters()).device
    if device != model_device:
        _fail("end_head", f"is on {device}, the model on {model_device} (move it with .to())")
    if isinstance(head, nn.Linear):
        if head.in_features != H or head.out_features not in (1, 2):
            _fail("end_head", f"must map the final-norm state [B, H={H}] to [B, 1] or [B, 2]; "
                  f"got nn.Linear({head.in_features}, {head.out_features})")
        return EndHead(head, head.out_features, dtype)
    try:  # any other module: one trial call on two zero rows, under no_grad
        with torch.no_grad():
            z = head(torch.zeros(2, H, dtype=dtype, device=device))
    except Exception as e:  # noqa: BLE001 - reported as the spec's error
        _fail("end_head", f"calling it on a [2, H={H}] state failed: {type(e).__name__}: {e}")
    shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
    if shape not in ((2,), (2, 1), (2, 2)):
        _fail("end_head", f"must map [B, H={H}] to [B], [B, 1] or [B, 2]; on [2, {H}] it returned {shape}")
    return EndHead(head, 2 if shape == (2, 2) else 1, dtype)


def _check_projection(p, H, emb: torch.Tensor):
    E = emb.shape[1]
    if p is None:
        if H != E:
            _fail("projection", f"the fed-back state has H={H} but input embeddings have {E}: give a "
                  f"projection [{E}, {H}]")
        return None, None
    w, b = (p.weight, p.bias) if isinstance(p, nn.Linear) else (p, None)
    if tuple(w.shape) != (E, H):
        _fail("projection", f"must map the state (H={H}) to the embedding size {E}: expected weight "
              f"[{E}, {H}], got {list(w.shape)}")
    if not bool(torch.isfinite(w).all()) or (b is not None and not bool(torch.isfinite(b).all())):
        _fail("projection", "has non-finite values")
    # The op wants the embedding's dtype and device: copies when they differ, the
    # caller's module is never touched.
    w = w.detach().to(device=emb.device, dtype=emb.dtype)
    b = None if b is None else b.detach().to(device=emb.device, dtype=emb.dtype)
    return w, b


def bind(spec: Latent, model, tokenizer, end_heads, valve_names) -> BoundLatent:
    """``Latent.bind``'s work: check ``spec`` against the model and tokenizer (reads only)."""
    cfg = _text_config(model)
    L, H = int(cfg.num_hidden_layers), int(cfg.hidden_size)
    emb = model.get_input_embeddings().weight
    n_rows = emb.shape[0]

    ids, missing = {}, []
    for name in _TOKEN_FIELDS:
        tok = getattr(spec, name)
        if tok is None:
            ids[name] = None
            continue
        ids[name], why = _resolve_token(tokenizer, tok, n_rows)
        if why:
            missing.append(f"{name}={tok!r} ({why})")
    if missing:
        raise ValueError("Latent tokens missing from the model/tokenizer: " + "; ".join(missing) +
                         ". Add them (tokenizer.add_tokens + model.resize_token_embeddings), load the "
                         "checkpoint with cotrt.latent.load_coconut, or set the field to None")
    present = [(n, i) for n, i in ids.items() if i is not None]
    if len({i for _, i in present}) != len(present):
        _fail("begin_token", f"begin/end/latent tokens must be distinct ids, got {dict(present)}")

    layer = None
    if spec.feedback != "final_norm":
        if not -L <= spec.feedback < L:
            _fail("feedback", f"layer {spec.feedback} is out of range for a model with {L} decoder layers "
                  f"(valid: {-L} .. {L - 1})")
        layer = spec.feedback % L
        if decoder_layers(model) is None:
            _fail("feedback", f"layer {spec.feedback}: no list of {L} decoder layers found under "
                  f"{type(model).__name__}'s decoder to tap; use feedback='final_norm'")

    proj_w, proj_b = _check_projection(spec.projection, H, emb)
    head = _check_head(spec, model, H, end_heads) if spec.end_head is not None else None
    if valve_names is not None:
        for field in ("valve_during", "valve_after"):
            for name in getattr(spec, field) or {}:
                if name not in valve_names:
                    _fail(field, f"no valve named {name!r} is loaded; loaded: {sorted(valve_names)}")
    eps = getattr(cfg, "rms_norm_eps", None) or getattr(cfg, "layer_norm_eps", None) or 1e-6
    return BoundLatent(
        spec=spec, steps=spec.steps, max_steps=spec.steps if spec.steps is not None else spec.max_steps,
        begin_id=ids["begin_token"], end_id=ids["end_token"], latent_id=ids["latent_token"],
        insert_begin=spec.insert_begin, layer=layer, num_layers=L, hidden_size=H, embed_size=emb.shape[1],
        proj_weight=proj_w, proj_bias=proj_b, norm_weight=None, norm_eps=float(eps), end_head=head,
        valve_during=spec.valve_during, valve_after=spec.valve_after)
