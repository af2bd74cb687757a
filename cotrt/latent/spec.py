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
                ``model.cotrt_end_heads`` (filled by :func:`cotrt.latent.load_ccot_bundle`).
            valve_names: the valves loaded in the runtime; when given, the names in
                valve_during / valve_after must be among them.

        Raises ValueError naming the field: tokens missing from the tokenizer (all of them,
        at once), a feedback layer out of range, a projection or END head of the wrong
        shape, an unknown head or valve name.
        """
        from .bind import bind

        return bind(self, model, tokenizer, end_heads, valve_names)


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
