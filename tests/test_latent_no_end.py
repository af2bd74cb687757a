"""A latent phase that ends without an end token (``Latent(end_token=None)``: CCoT's default
in the README, Coconut served without ``<|end-latent|>``): the first answer token comes from
the forward that consumed the last thought, as in a naive loop."""
from __future__ import annotations

import copy

import pytest
import torch

import cotrt
from conftest import LATENT_TOKENS
from test_coconut_fidelity import _model, _questions, coconut_generate


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_no_end_token_keeps_the_last_thought(arch, smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.add_tokens(LATENT_TOKENS, special_tokens=True)
    lat = tok.convert_tokens_to_ids(LATENT_TOKENS[2])
    model = _model(arch, tok, seed=83)
    rt = cotrt.wrap(model, tok, max_batch=3, max_len=128)
    n = 6
    for k in (1, 3):
        spec = cotrt.Latent(steps=k, begin_token=None, end_token=None)
        outs = rt.generate(_questions(tok), cotrt.Params(max_new_tokens=n, ignore_eos=True, latent=spec))
        for q, o in zip(_questions(tok), outs):
            ref, fed = coconut_generate(model, q + [lat] * k, lat, eos_id=-1, max_new_tokens=n)
            answer = [t for t in o.token_ids if t != lat]
            assert answer == ref, (arch, k)
