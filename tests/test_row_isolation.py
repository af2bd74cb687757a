"""One bad request never fails its batch-mates (issue 13, item 3): per-row code that runs
inside a batch-wide step (banned tokens, biases, policy hooks) ends only its own row."""
from __future__ import annotations

import pytest

import cotrt
from cotrt.control.policy import Policy

from cotrt.testing import tiny_model


class _Raises(Policy):
    name = "raises"
    on_boundary = False

    def banned_tokens(self, phase, tokenizer):
        raise RuntimeError("boom")


class _BadIds(Policy):
    name = "bad_ids"
    on_boundary = False

    def banned_tokens(self, phase, tokenizer):
        return [10**9]


class _BadStep(Policy):
    name = "bad_step"
    every = 2

    def on_step(self, view):
        raise KeyError("oops")


@pytest.mark.parametrize("bad,graph", [(_Raises, "off"), (_BadIds, "off"), (_BadStep, "off"), (_Raises, "static")])
def test_bad_policy_ends_only_its_row(smol_tokenizer, bad, graph):
    rt = cotrt.wrap(tiny_model("llama", len(smol_tokenizer), seed=8), smol_tokenizer, max_batch=4,
                    max_len=64, decode_graph=graph)
    good = [cotrt.Params(max_new_tokens=6, ignore_eos=True),
            cotrt.Params(max_new_tokens=6, ignore_eos=True, temperature=0.7, seed=1),
            cotrt.Params(max_new_tokens=6, ignore_eos=True, temperature=0.7, top_p=0.8, seed=2)]
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15]]
    alone = [o.token_ids for o in rt.generate(prompts[:3], good)]
    outs = rt.generate(prompts, good + [cotrt.Params(max_new_tokens=6, ignore_eos=True, exit=bad())])
    assert [o.finish_reason for o in outs] == ["length"] * 3 + ["error"], [o.error for o in outs]
    assert [o.token_ids for o in outs[:3]] == alone
    assert rt.engine.free_slots == [0, 1, 2, 3]
