"""Coconut checkpoints: :func:`load_coconut` puts the state dict of Coconut's wrapper (whose
HF model is ``self.base_causallm``) onto its base model and tokenizer.

It validates everything it reads against the model before it changes anything: after an
error, model and tokenizer are as they were.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .spec import Latent

COCONUT_PREFIX = "base_causallm."
COCONUT_TOKENS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")  # Coconut's order of addition
# Coconut's wrapper also keeps the input embedding as ``self.embedding``: the same tensor
# under a second key.
_COCONUT_ALIAS = "embedding.weight"
_LIST = 8  # keys named in an error message


def _keys(keys) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - _LIST} more)" if len(keys) > _LIST else ""
    return ", ".join(repr(k) for k in keys[:_LIST]) + more


def _param_names(model: nn.Module, param) -> list[str]:
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p is param]


def _read_state_dict(src) -> dict:
    if isinstance(src, Mapping):
        sd = dict(src)
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise ValueError(f"load_coconut: checkpoint {str(path)!r} is not a file")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(sd, Mapping):
            raise ValueError(f"load_coconut: {str(path)!r} holds a {type(sd).__name__}, not a state dict")
        sd = dict(sd)
    else:
        raise TypeError(f"load_coconut: state_dict_or_path must be a state dict or a path, got {type(src).__name__}")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"load_coconut: not a state dict of tensors; offending keys: {_keys(map(str, bad))}")
    return sd


def _plan_coconut(model, tokenizer, sd: dict, prefix: str):
    """Validate; returns (state dict for ``model``, checkpoint vocabulary, tokens to add)."""
    outside = [k for k in sd if not k.startswith(prefix) and k != _COCONUT_ALIAS]
    if outside:
        raise ValueError(f"load_coconut: {len(outside)} key(s) lack the {prefix!r} prefix of Coconut's wrapper "
                         f"(is this a Coconut checkpoint?): {_keys(outside)}")
    stripped = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    emb_param = model.get_input_embeddings().weight
    out_mod = model.get_output_embeddings()
    tied = out_mod is not None and out_mod.weight is emb_param
    emb_keys = _param_names(model, emb_param)
    vocab_keys = set(emb_keys)  # parameters whose first dimension is the vocabulary
    if out_mod is not None:
        vocab_keys.update(_param_names(model, out_mod.weight))
        if getattr(out_mod, "bias", None) is not None:
            vocab_keys.update(_param_names(model, out_mod.bias))
    emb_key = next((k for k in emb_keys if k in stripped), None)
    if emb_key is None:
        raise ValueError(f"load_coconut: the checkpoint has no input embedding ({_keys(prefix + k for k in emb_keys)})")
    V_ck = stripped[emb_key].shape[0]
    if _COCONUT_ALIAS in sd and not torch.equal(sd[_COCONUT_ALIAS], stripped[emb_key]):
        raise ValueError(f"load_coconut: {_COCONUT_ALIAS!r} differs from {prefix + emb_key!r}; Coconut stores "
                         "the same embedding under both keys")

    expected = model.state_dict()
    allowed_missing = set(vocab_keys) - set(emb_keys) if tied else set()  # tied head: from the embedding
    missing = set(expected) - set(stripped) - allowed_missing
    unexpected = set(stripped) - set(expected)
    if missing or unexpected:
        raise ValueError("load_coconut: the checkpoint does not match the model (after stripping "
                         f"{prefix!r}): missing keys: {_keys(missing) or 'none'}; unexpected keys: "
                         f"{_keys(unexpected) or 'none'}")
    for k, v in stripped.items():
        want = list(expected[k].shape)
        if k in vocab_keys:
            want[0] = V_ck
        if list(v.shape) != want:
            raise ValueError(f"load_coconut: shape mismatch for {prefix + k!r}: checkpoint {list(v.shape)}, "
                             f"model {want}" + (" (vocabulary resized to the checkpoint's)" if k in vocab_keys else ""))
    if tied:
        for k in vocab_keys & set(stripped):
            if not torch.equal(stripped[k], stripped[emb_key]):
                raise ValueError(f"load_coconut: the model ties its LM head to the input embedding but the "
                                 f"checkpoint's {prefix + k!r} differs from {prefix + emb_key!r}")

    vocab = tokenizer.get_vocab()
    to_add = [t for t in COCONUT_TOKENS if t not in vocab]
    have = {t: vocab[t] for t in COCONUT_TOKENS if t in vocab}
    n_after = len(tokenizer) + len(to_add)
    if n_after > V_ck or any(i >= V_ck for i in have.values()):
        raise ValueError(f"load_coconut: vocabulary mismatch: the checkpoint has {V_ck} embedding rows but the "
                         f"tokenizer with the latent tokens needs {max([n_after, *(i + 1 for i in have.values())])} "
                         f"(tokenizer: {len(tokenizer)} tokens, adding {to_add or 'none'}); was the checkpoint "
                         "trained from this tokenizer?")
    if tied:
        stripped = {**stripped, **{k: stripped[emb_key] for k in allowed_missing}}
    return stripped, V_ck, to_add


def load_coconut(base_model, tokenizer, state_dict_or_path, *, steps: int = 0, prefix: str = COCONUT_PREFIX):
    """Load a Coconut checkpoint onto its HF base model; returns ``(model, tokenizer, Latent)``.

    The checkpoint is the state dict of Coconut's wrapper module: the HF model's keys with
    the ``base_causallm.`` prefix (plus ``embedding.weight``, the same embedding again), and a
    vocabulary extended by ``<|start-latent|>``, ``<|end-latent|>``, ``<|latent|>``.

    Args:
        base_model: the HF causal LM the checkpoint was trained from (modified in place:
            embeddings resized to the checkpoint's vocabulary, weights loaded strictly).
        tokenizer: its tokenizer (modified in place: the three tokens are added if missing,
            in Coconut's order, as ordinary added tokens like Coconut's ``add_tokens``).
        state_dict_or_path: the state dict, or a file (``torch.save`` output or .safetensors).
        steps: k, the latent steps of the returned spec. Coconut's k is a training choice
            (c thoughts per stage x stages), not stored in the checkpoint: pass it here or
            use ``dataclasses.replace(latent, steps=k)``. 0 means no latent thought.
        prefix: the wrapper's key prefix.

    Returns:
        (base_model, tokenizer, ``Latent(steps=steps, begin/end/latent_token=<ids>)``).

    Raises ValueError before anything is changed: keys without the prefix, missing or
    unexpected keys, a shape mismatch (naming the key and both shapes), a vocabulary that
    cannot hold the tokenizer plus the latent tokens.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"load_coconut: steps must be an int >= 0, got {steps!r}")
    sd = _read_state_dict(state_dict_or_path)
    stripped, V_ck, to_add = _plan_coconut(base_model, tokenizer, sd, prefix)
    # Validated: from here on nothing is expected to fail.
    if to_add:
        tokenizer.add_tokens(to_add)
    if base_model.get_input_embeddings().weight.shape[0] != V_ck:
        # mean_resizing would spend time estimating a distribution for rows we overwrite.
        base_model.resize_token_embeddings(V_ck, mean_resizing=False)
    base_model.load_state_dict(stripped, strict=True)
    ids = tokenizer.convert_tokens_to_ids(list(COCONUT_TOKENS))
    latent = Latent(steps=steps, begin_token=ids[0], end_token=ids[1], latent_token=ids[2])
    return base_model, tokenizer, latent
