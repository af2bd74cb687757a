"""Greedy decoding through the slot cache equals HF generate, token for token."""
from __future__ import annotations

import random

import pytest
import torch

import cotrt
from _parity import assert_greedy_match, hf_greedy
from cotrt.testing import ARCHS, tiny_model


def _prompts(seed: int, n: int, vocab: int, lo=3, hi=40):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


@pytest.mark.parametrize("arch", ARCHS)
def test_ragged_batch_matches_hf(arch, smol_tokenizer):
    vocab = len(smol_tokenizer)
    model = tiny_model(arch, vocab)
    prompts = _prompts(1, 5, vocab)  # mixed lengths, some past the sliding windows (12)
    refs = [hf_greedy(model, p, 24, eos=None) for p in prompts]
    rt = cotrt.wrap(model, smol_tokenizer, max_batch=4, max_len=128)
    outs = rt.generate(prompts, cotrt.Params(max_new_tokens=24, ignore_eos=True))
    for p, o, r in zip(prompts, outs, refs):
        assert_greedy_match(model, p, o.token_ids, r, label=arch)
        assert o.finish_reason == "length"


def test_midflight_admission_equals_alone(smol_tokenizer):
    """Requests admitted while others decode, into slots freed mid-run, give what they
    give alone."""
    vocab = len(smol_tokenizer)
    model = tiny_model("llama", vocab, seed=3)
    prompts = _prompts(7, 9, vocab, lo=2, hi=60)
    lengths = [5, 30, 12, 3, 25, 8, 17, 40, 9]
    rt = cotrt.wrap(model, smol_tokenizer, max_batch=3, max_len=160)
    alone = [rt.generate([p], cotrt.Params(max_new_tokens=n, ignore_eos=True))[0].token_ids
             for p, n in zip(prompts, lengths)]
    eng = rt.engine
    ids, results = {}, {}
    pending = list(zip(prompts, lengths))
    step = 0
    while pending or eng.has_unfinished():
        # Admit one new request every other step: prefill overlaps running decodes.
        if pending and step % 2 == 0:
            p, n = pending.pop(0)
            ids[eng.add(p, cotrt.Params(max_new_tokens=n, ignore_eos=True))] = len(ids)
        for ev in eng.step():
            if ev.finished:
                results[ids[ev.request_id]] = ev.output.token_ids
        step += 1
        assert eng.num_running <= 3
    assert [results[i] for i in range(len(prompts))] == alone
    assert eng.free_slots == [0, 1, 2]


@pytest.mark.parametrize("max_batch", [1, 4])
def test_smollm2_matches_hf(smol_model, max_batch):
    model, tok = smol_model
    questions = ["What is 2+3?", "Name three primary colors.", "Explain what a CPU does in one sentence.",
                 "What is the capital of France?", "Write a haiku about the sea."]
    rt = cotrt.wrap(model, tok, max_batch=max_batch, max_len=256)
    outs = rt.chat([[{"role": "user", "content": q}] for q in questions], cotrt.Params(max_new_tokens=32))
    for q, o in zip(questions, outs):
        prompt = rt.chat_prompt([{"role": "user", "content": q}])
        ref = hf_greedy(model, prompt, 32)
        assert_greedy_match(model, prompt, o.token_ids, ref, label=q)
        if ref and ref[-1] == tok.eos_token_id:
            assert o.finish_reason == "stop" and o.stats["exit_reason"] == "eos"
            assert o.token_ids == ref


def test_hf_generate_still_works_after_wrap(smol_tokenizer):
    model = tiny_model("qwen2", len(smol_tokenizer), seed=5)
    p = _prompts(2, 1, 500)[0]
    before = hf_greedy(model, p, 12, eos=None)
    cotrt.wrap(model, smol_tokenizer, max_batch=2, max_len=64)
    assert hf_greedy(model, p, 12, eos=None) == before


def test_unsupported_architecture_is_refused(smol_tokenizer):
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=32, d_ff=64, num_layers=1,
                                                num_heads=2, d_kv=16))
    with pytest.raises(ValueError, match="encoder-decoder"):
        cotrt.wrap(model, smol_tokenizer)


def test_model_bypassing_the_interface_is_refused(smol_tokenizer):
    """A model one of whose layers does not go through the cache (patched here) must fail
    at wrap time, not decode garbage."""
    model = tiny_model("llama", 300)
    attn = model.model.layers[1].self_attn
    orig = attn.forward

    def no_cache_forward(hidden_states, position_embeddings=None, attention_mask=None, **kw):
        kw.pop("cache", None)
        kw.pop("past_key_values", None)
        return orig(hidden_states, position_embeddings, attention_mask, **kw)

    attn.forward = no_cache_forward
    from cotrt.model import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="slot cache|1 of 2 layers"):
        cotrt.wrap(model, smol_tokenizer, max_batch=1, max_len=32)
