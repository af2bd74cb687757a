"""Latent (contemplation) decoding specs: what a request's dense latent phase looks like.

A latent step feeds a hidden state back as the next input embedding instead of sampling a
token (no LM head, no sampling). Two methods are covered:

- **Coconut**: after the prompt (ending with ``<|start-latent|>``), k latent steps feed back
  the last position's *final-norm* output (the state the LM head would read); then
  ``<|end-latent|>`` is forced and token decoding continues.
  ``Latent(steps=k)``. A prompt already in Coconut's layout (question, start, k x latent,
  end) takes its k from the prompt (:meth:`BoundLatent.for_prompt`). ``max_new_tokens``
  counts the tokens after ``<|end-latent|>`` only, as Coconut's ``generate`` does.
- **CCoT**: contemplation vectors are the *raw residual after decoder layer l* (l ≈ L/2),
  generated under one LoRA ("contemplate"); a binary END head on the final-norm state
  decides when to stop (capped by max_steps); the answer is decoded under another LoRA
  ("answer") over the same KV cache.
  ``Latent(end_head=head, max_steps=N, feedback=l, valve_during={"contemplate": 1.0},
  valve_after={"answer": 1.0})``.

``Latent`` is the user's, model-free spec, validated at construction. ``Latent.bind(model,
tokenizer)`` checks it against a model and returns a :class:`BoundLatent` with everything
the engine needs as ids, ints and tensors; binding changes nothing on the model.

What is applied where (the engine's side of the contract):

- the state is tapped for the latent row at its last position: ``layer is None`` ->
  the final norm's output (``model.model(...).last_hidden_state``); ``layer == l`` -> the
  output of decoder layer l, in the model's list of decoder layers (``model.layers`` in
  Llama-likes, ``transformer.h`` in GPT-2: :func:`decoder_layers` finds it by shape) (in transformers 5, ``output_hidden_states[l + 1]`` for
  ``l < L - 1``; for ``l = L - 1`` HF's last entry is already normed, the raw residual is not
  in that tuple);
- neither gets another norm: the final-norm output is normed once already, and CCoT feeds
  the raw residual. ``norm_weight`` is None in both cases (the field exists so that a spec
  can ask for one without an engine change);
- ``cotrt.ops.contemplate(tokens, latent_mask, state, embed_weight, **bound.contemplate_kwargs())``
  builds the next inputs (projection, if any, applied there);
- the END head reads the final-norm state of the same step, whatever ``layer`` is.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType

import torch
from torch import nn

DEFAULT_BEGIN = "<|start-latent|>"
DEFAULT_END = "<|end-latent|>"
DEFAULT_LATENT = "<|latent|>"
_TOKEN_FIELDS = ("begin_token", "end_token", "latent_token")


def _fail(field: str, msg: str):
    raise ValueError(f"Latent.{field}: {msg}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _valves(field: str, v):
    if v is None:
        return None
    if not isinstance(v, Mapping):
        _fail(field, f"must be a dict {{valve name: alpha}} or None, got {type(v).__name__}")
    for name, alpha in v.items():
        if not isinstance(name, str) or not name:
            _fail(field, f"valve names must be non-empty strings, got {name!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            _fail(field, f"alpha of valve {name!r} must be a finite number, got {alpha!r}")
    return MappingProxyType({k: float(a) for k, a in v.items()})


@dataclass(frozen=True, eq=False)
class Latent:
    """A request's latent phase (see the module docstring).

    Fields:
        steps: k >= 0 latent steps (Coconut). Exactly one of ``steps`` / ``end_head``.
        end_head: CCoT's binary END head: a module mapping the final-norm state [B, H] to a
            logit [B] or [B, 1] (END when > 0) or to two logits [B, 2] (class 1 = END); or
            the name of a head registered by a loaded bundle.
        max_steps: the cap on latent steps; required with ``end_head``, refused with ``steps``.
        feedback: "final_norm" or a decoder layer index l (the residual after layer l;
            negative counts from the end, checked against the model at bind time).
        projection: None, an ``nn.Linear`` (H -> embedding size) or a weight tensor
            [embedding size, H] mapping the fed-back state to an input embedding.
        begin_token / end_token / latent_token: a token string, an id, or None. ``begin``
            opens the latent phase, ``end`` is forced when it ends, ``latent`` is the
            placeholder whose embedding slots Coconut's own algorithm replaces.
        insert_begin: append the begin token to the prompt if it does not end with it.
        valve_during / valve_after: {valve name: alpha} during the latent phase and after
            it (CCoT's adapter switch); None keeps the request's own valve setting.
    """

    steps: int | None = None
    end_head: nn.Module | str | None = None
    max_steps: int | None = None
    feedback: str | int = "final_norm"
    projection: nn.Module | torch.Tensor | None = None
    begin_token: str | int | None = DEFAULT_BEGIN
    end_token: str | int | None = DEFAULT_END
    latent_token: str | int | None = DEFAULT_LATENT
    insert_begin: bool = True
    valve_during: Mapping[str, float] | None = None
    valve_after: Mapping[str, float] | None = None

    def __post_init__(self):
        if (self.steps is None) == (self.end_head is None):
            _fail("steps", "give exactly one of steps=k (Coconut) and end_head=... (CCoT), "
                  f"got steps={self.steps!r}, end_head={self.end_head!r}")
        if self.steps is not None and (not _is_int(self.steps) or self.steps < 0):
            _fail("steps", f"must be an int >= 0, got {self.steps!r}")
        if self.end_head is not None:
            if isinstance(self.end_head, str):
                if not self.end_head:
                    _fail("end_head", "a head name must be non-empty")
            elif not isinstance(self.end_head, nn.Module):
                _fail("end_head", f"must be an nn.Module or a head name, got {type(self.end_head).__name__}")
            if self.max_steps is None:
                _fail("max_steps", "is required with end_head (the cap on latent steps)")
        if self.max_steps is not None:
            if self.steps is not None:
                _fail("max_steps", "caps an end_head's latent phase; with steps=k the phase is exactly k steps")
            if not _is_int(self.max_steps) or self.max_steps < 1:
                _fail("max_steps", f"must be an int >= 1, got {self.max_steps!r}")
        if self.feedback != "final_norm" and not _is_int(self.feedback):
            _fail("feedback", f"must be 'final_norm' or a decoder layer index (int), got {self.feedback!r}")
        p = self.projection
        if p is not None:
            if isinstance(p, torch.Tensor):
                if p.dim() != 2 or not p.is_floating_point():
                    _fail("projection", f"a tensor projection must be a 2-D float weight [embedding size, H], "
                          f"got shape {tuple(p.shape)} {p.dtype}")
            elif not isinstance(p, nn.Linear):
                _fail("projection", f"must be None, an nn.Linear or a weight tensor, got {type(p).__name__} "
                      "(the contemplate op applies an affine projection only)")
        for name in _TOKEN_FIELDS:
            t = getattr(self, name)
            if t is None or (isinstance(t, str) and t) or (_is_int(t) and t >= 0):
                continue
            _fail(name, f"must be a token string, a token id >= 0 or None, got {t!r}")
        if not isinstance(self.insert_begin, bool):
            _fail("insert_begin", f"must be a bool, got {self.insert_begin!r}")
        object.__setattr__(self, "valve_during", _valves("valve_during", self.valve_during))
        object.__setattr__(self, "valve_after", _valves("valve_after", self.valve_after))

    @classmethod
    def from_dict(cls, d: Mapping) -> "Latent":
        """From a JSON-like dict (a server request): ``end_head`` by name, no projection
        module; unknown keys are named."""
        if not isinstance(d, Mapping):
            raise ValueError(f"latent must be a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)} | ({"projection"} & set(d)))
        if unknown:
            raise ValueError(f"latent: unknown or non-JSON field(s): {', '.join(unknown)}")
        return cls(**d)

    def bind(self, model: nn.Module, tokenizer, *, end_heads: Mapping[str, nn.Module] | None = None,
             valve_names: Collection[str] | None = None) -> "BoundLatent":
        """Check this spec against ``model`` and ``tokenizer``; nothing is changed on either.

        Args:
            end_heads: heads by name, for ``end_head="name"``; names are also looked up in
                ``model.cotrt_end_heads`` (filled by :func:`cotrt.loaders.load_ccot_bundle`).
            valve_names: the valves loaded in the runtime; when given, the names in
                valve_during / valve_after must be among them.

        Raises ValueError naming the field: tokens missing from the tokenizer (all of them,
        at once), a feedback layer out of range, a projection or END head of the wrong
        shape, an unknown head or valve name.
        """
        return _bind(self, model, tokenizer, end_heads, valve_names)


@dataclass(frozen=True, eq=False)
class BoundLatent:
    """A :class:`Latent` checked against one model: ids, ints and tensors for the engine.

    Attributes:
        spec: the Latent this was bound from.
        steps: k (Coconut) or None (END head).
        max_steps: the most latent steps the phase can take: k, or the END head's cap.
        begin_id / end_id / latent_id: token ids or None.
        insert_begin: append ``begin_id`` to a prompt that does not end with it
            (:meth:`prepare_prompt`).
        layer: the decoder layer whose output residual is fed back (0 <= layer < L), or
            None for the final norm's output.
        num_layers: L, the model's decoder layers.
        hidden_size: H, the size of the fed-back state.
        embed_size: the input embedding size (= H unless a projection maps H to it).
        proj_weight: [embed_size, H] on the embedding's device and dtype, or None.
        proj_bias: [embed_size] or None.
        norm_weight: [H] or None; None for both feedbacks (see the module docstring).
        norm_eps: the model's RMSNorm epsilon (used only with norm_weight).
        end_head: None, or a callable ``state [B, H] (final-norm) -> bool [B]``, True where
            the row should end its latent phase now.
        valve_during / valve_after: as in the spec.
    """

    spec: Latent
    steps: int | None
    max_steps: int
    begin_id: int | None
    end_id: int | None
    latent_id: int | None
    insert_begin: bool
    layer: int | None
    num_layers: int
    hidden_size: int
    embed_size: int
    proj_weight: torch.Tensor | None
    proj_bias: torch.Tensor | None
    norm_weight: torch.Tensor | None
    norm_eps: float
    end_head: Callable[[torch.Tensor], torch.Tensor] | None
    valve_during: Mapping[str, float] | None
    valve_after: Mapping[str, float] | None

    def contemplate_kwargs(self) -> dict:
        """The feedback stages as :func:`cotrt.ops.contemplate` keyword arguments."""
        return dict(norm_weight=self.norm_weight, norm_eps=self.norm_eps, proj_weight=self.proj_weight,
                    proj_bias=self.proj_bias)

    def prepare_prompt(self, ids: list[int]) -> list[int]:
        """The prompt ids with ``begin_id`` appended when ``insert_begin`` asks for it."""
        return self.for_prompt(ids)[0]

    def for_prompt(self, ids: list[int]) -> tuple[list[int], "BoundLatent"]:
        """The prompt as the engine runs it, and this spec as it applies to that prompt.

        A prompt already in Coconut's own layout, ``question, begin, k x latent, end`` (what
        Coconut's eval loop feeds its ``generate``), is read as Coconut reads it: the k
        placeholders are latent steps, whose inputs are fed-back states. The prompt is cut
        after ``begin`` and the returned spec takes k steps, whatever ``steps`` said: Coconut's
        eval gives each question its own k (min(max_latent_stage, its number of steps)).
        The output is then that of ``question, begin`` with ``Latent(steps=k)``.

        Otherwise ``begin_id`` is appended when ``insert_begin`` asks for it.

        Raises ValueError naming ``prompt``: latent placeholders anywhere else (they would be
        embedded as text, which Coconut never does), or the layout with an END head (its
        phase chooses its own length).
        """
        ids = list(ids)
        lat, begin, end = self.latent_id, self.begin_id, self.end_id
        k = _coconut_layout(ids, begin, lat, end)
        if k is None and lat is not None and lat in ids:
            raise ValueError(
                f"prompt: holds latent placeholder id {lat} outside Coconut's layout (question, begin "
                f"id {begin}, k x latent id {lat}, end id {end}, at the very end); give the question "
                "alone (the latent steps are added) or the whole layout")
        if k is not None:
            if self.end_head is not None:
                raise ValueError(f"prompt: is in Coconut's layout with {k} latent placeholders, but this "
                                 "Latent has an END head, which chooses its own number of steps")
            return ids[: len(ids) - k - 1], dataclasses.replace(self, steps=k, max_steps=k)
        if self.insert_begin and begin is not None and (not ids or ids[-1] != begin):
            ids.append(begin)
        return ids, self


def _coconut_layout(ids: list[int], begin, lat, end) -> int | None:
    """k when ``ids`` is ``question, begin, k x lat, end`` (k >= 0, a non-empty question,
    no other ``lat``); else None."""
    if begin is None or end is None or len(ids) < 3 or ids[-1] != end:
        return None
    j = len(ids) - 2
    while j >= 0 and lat is not None and ids[j] == lat:
        j -= 1
    if j < 1 or ids[j] != begin or (lat is not None and lat in ids[:j]):
        return None
    return len(ids) - 2 - j


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


# ------------------------------------------------------------------------------ binding


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


def _bind(spec: Latent, model, tokenizer, end_heads, valve_names) -> BoundLatent:
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
                         "checkpoint with cotrt.loaders.load_coconut, or set the field to None")
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
