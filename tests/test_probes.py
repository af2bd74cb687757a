"""In-place probes: invisible unless the policy exits, nothing copied, nothing left behind."""
from __future__ import annotations

import pytest
import torch

import cotrt
from cotrt.testing import tiny_model


class ProbeEvery(cotrt.Policy):
    """Probe at every boundary and every ``every`` thinking tokens; always continue."""

    name = "probe-every"

    def __init__(self, every=None, text="\n</think>\nThe answer is", max_tokens=5, before_last=False):
        self.every, self.text, self.max_tokens, self.before_last = every, text, max_tokens, before_last
        self.results = []

    def on_step(self, view):
        return cotrt.Probe(self.text, max_tokens=self.max_tokens, before_last=self.before_last)

    def on_probe(self, view, result):
        self.results.append(result)
        return None


class ExitAtProbe(cotrt.Policy):
    name = "exit-at"

    def __init__(self, n=2, inject="", finish=False):
        self.n, self.inject, self.finish, self.seen = n, inject, finish, 0
        self.every = 3

    def on_step(self, view):
        return cotrt.Probe(" Answer:", max_tokens=3)

    def on_probe(self, view, result):
        self.seen += 1
        if self.seen >= self.n:
            return cotrt.Exit(inject=self.inject, finish=self.finish, reason="test")
        return None


@pytest.fixture(scope="module")
def rt(think_tokenizer):
    model = tiny_model("qwen3", len(think_tokenizer), seed=21)
    return cotrt.wrap(model, think_tokenizer, max_batch=4, max_len=256)


def _prompts(tok):
    texts = ["Q: 2+2?\nA: <think>\n", "Question: name a color.\nAnswer: <think>\n",
             "Solve x+1=3.\n<think>\n", "Hi\n<think>", "What is the capital of Peru? <think>\n"]
    return [tok.encode(t, add_special_tokens=False) for t in texts]


def _snapshot_on_release(engine, store):
    real = engine._release

    def release(row):
        if row.slot >= 0:
            cache = engine.runner.cache
            store[row.id] = [cache.read(l, row.pages, row.cache_len) for l in range(len(cache))]
        real(row)

    engine._release = release


@pytest.mark.parametrize("before_last", [False, True])
def test_probe_invariant_in_mixed_batches(rt, think_tokenizer, before_last):
    """A policy that probes at every boundary (and every 4 tokens) and always continues
    changes nothing: same tokens, same cache contents, with seeded sampling, in a batch
    mixing probing and plain rows and more requests than slots."""
    tok = think_tokenizer
    nl2 = tok.encode("\n\n", add_special_tokens=False)[0]
    prompts = _prompts(tok)

    def params(with_policy):
        out = []
        for i in range(len(prompts)):
            pol = ProbeEvery(every=4, before_last=before_last) if with_policy and i % 4 != 3 else None
            out.append(cotrt.Params(max_new_tokens=30, temperature=1.0, top_p=0.95, seed=40 + i,
                                    logit_bias={nl2: 9.0}, think_budget=20, ignore_eos=True, exit=pol))
        return out

    eng = rt.engine
    plain_kv, probed_kv = {}, {}
    _snapshot_on_release(eng, plain_kv)
    plain = rt.generate(prompts, params(False))
    eng.__dict__.pop("_release")
    _snapshot_on_release(eng, probed_kv)
    probed = rt.generate(prompts, params(True))
    eng.__dict__.pop("_release")
    for a, b in zip(plain, probed):
        assert a.token_ids == b.token_ids
        assert a.text == b.text and a.stats["think_tokens"] == b.stats["think_tokens"]
    total_probe = sum(o.stats["probe_tokens"] for o in probed)
    assert total_probe > 0 and all(o.stats["probe_tokens"] == 0 for o in plain)
    assert any(o.stats["steps"] > 0 for o in probed)  # boundaries did occur
    for o in probed:
        for rec in o.stats["probes"]:
            assert rec["decision"] == "continue" and rec["tokens"] > 0
    # The slot cache holds no trace of the probes: every row's cached K/V at release is
    # the same as without probes (same length, same values).
    for (ida, kva), (idb, kvb) in zip(sorted(plain_kv.items()), sorted(probed_kv.items())):
        for (ka, va), (kb, vb) in zip(kva, kvb):
            assert ka.shape == kb.shape
            torch.testing.assert_close(ka, kb, rtol=0, atol=1e-5)
            torch.testing.assert_close(va, vb, rtol=0, atol=1e-5)
    assert eng.free_slots == [0, 1, 2, 3]


def test_probe_result_is_what_the_model_says_there(rt, think_tokenizer):
    """A probe's tokens equal greedy decoding of (visible text + probe text) from scratch."""
    tok = think_tokenizer
    pol = ProbeEvery(every=6, max_tokens=4)
    prompt = _prompts(tok)[0]
    out = rt.generate([prompt], cotrt.Params(max_new_tokens=13, ignore_eos=True, think_budget=50, exit=pol))[0]
    assert out.stats["probes"], "no probe ran"
    first = out.stats["probes"][0]
    pos = first["position"]
    inducer = tok.encode("\n</think>\nThe answer is", add_special_tokens=False)
    ctx = prompt + out.token_ids[:pos] + inducer
    ref = rt.generate([ctx], cotrt.Params(max_new_tokens=4, ignore_eos=True))[0].token_ids
    assert first["text"] == tok.decode(ref, skip_special_tokens=True)
    assert first["tokens"] == 1 + len(inducer) + 4  # the row's next input, the text, 4 generated
    assert out.stats["probe_steps"] == 4 * len(out.stats["probes"])


def test_exit_forces_the_end_and_continues_to_answer(rt, think_tokenizer):
    tok = think_tokenizer
    end_id = tok.convert_tokens_to_ids("</think>")
    out = rt.generate([_prompts(tok)[1]], cotrt.Params(max_new_tokens=40, ignore_eos=True,
                                                        exit=ExitAtProbe(n=2)))[0]
    assert out.stats["think_end"] == "exit-at:test"
    assert [p["decision"] for p in out.stats["probes"]] == ["continue", "exit"]
    assert out.token_ids.count(end_id) == 1 and out.stats["answer_tokens"] > 0
    assert out.stats["think_sampled"] == 6  # two probes, every 3 tokens


def test_exit_with_template_finishes(rt, think_tokenizer):
    tok = think_tokenizer
    out = rt.generate([_prompts(tok)[2]], cotrt.Params(
        max_new_tokens=60, ignore_eos=True, exit=ExitAtProbe(n=1, inject="\n\nFinal: 42", finish=True)))[0]
    assert out.stats["exit_reason"] == "exit_finish" and out.finish_reason == "stop"
    assert out.text.endswith("</think>\n\nFinal: 42") and out.answer == "Final: 42"


def test_policy_errors_are_contained(rt, think_tokenizer):
    class Broken(cotrt.Policy):
        every = 2

        def on_step(self, view):
            return "not an action"

    tok = think_tokenizer
    ok, bad = rt.generate(_prompts(tok)[:2], [cotrt.Params(max_new_tokens=8, ignore_eos=True),
                                              cotrt.Params(max_new_tokens=8, ignore_eos=True, exit=Broken())])
    assert ok.finish_reason == "length" and len(ok.token_ids) == 8
    assert bad.finish_reason == "error" and "not an action" in bad.error
    with pytest.raises(ValueError, match="exit"):
        cotrt.Params(exit=42)
