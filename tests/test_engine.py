"""The engine: continuous batching, seeded sampling, streaming, errors, budgets end to end."""
from __future__ import annotations

import bisect
import itertools
import random

import pytest
import torch

import cotrt
from cotrt.testing import tiny_model


@pytest.fixture(scope="module")
def think_rt(think_tokenizer):
    model = tiny_model("qwen3", len(think_tokenizer), seed=11)
    return cotrt.wrap(model, think_tokenizer, max_batch=4, max_len=256)


@pytest.fixture(scope="module")
def plain_rt(smol_tokenizer):
    model = tiny_model("llama", len(smol_tokenizer), seed=12)
    return cotrt.wrap(model, smol_tokenizer, max_batch=3, max_len=256)


def _rand_prompts(n, seed, lo=3, hi=30):
    rng = random.Random(seed)
    return [[rng.randrange(3, 40000) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def test_seeded_sampling_independent_of_batch(plain_rt):
    prompts = _rand_prompts(5, 1)
    params = [cotrt.Params(max_new_tokens=20, temperature=0.9, top_p=0.9, top_k=k, seed=100 + i, ignore_eos=True)
              for i, k in enumerate([0, 50, 0, 5, 0])]
    together = plain_rt.generate(prompts, params)
    alone = [plain_rt.generate([p], [q])[0] for p, q in zip(prompts, params)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    again = plain_rt.generate(prompts[::-1], params[::-1])[::-1]
    assert [o.token_ids for o in again] == [o.token_ids for o in together]
    # A different seed gives a different sample (not a constant).
    other = plain_rt.generate([prompts[0]], [cotrt.Params(max_new_tokens=20, temperature=0.9, seed=999,
                                                          ignore_eos=True)])[0]
    assert other.token_ids != together[0].token_ids


def test_more_requests_than_slots_wait(plain_rt):
    outs = plain_rt.generate(_rand_prompts(10, 2), cotrt.Params(max_new_tokens=6, ignore_eos=True))
    assert all(len(o.token_ids) == 6 and o.finish_reason == "length" for o in outs)
    assert not plain_rt.engine.has_unfinished() and plain_rt.engine.free_slots == [0, 1, 2]


def test_streaming_events_add_up_to_the_output(plain_rt):
    eng = plain_rt.engine
    rid = eng.add(_rand_prompts(1, 3)[0], cotrt.Params(max_new_tokens=25, temperature=1.0, seed=3, ignore_eos=True))
    toks, text, final = [], "", None
    while eng.has_unfinished():
        for ev in eng.step():
            assert ev.request_id == rid
            toks += ev.token_ids
            text += ev.text
            if ev.finished:
                final = ev.output
    assert toks == final.token_ids and text == final.text


def test_stop_string_is_never_streamed(smol_model):
    model, tok = smol_model
    rt = cotrt.wrap(model, tok, max_batch=2, max_len=256)
    conv = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    full = rt.chat([conv], cotrt.Params(max_new_tokens=40))[0].text
    assert "5" in full, full
    text, final = "", None
    for ev in rt.stream(rt.chat_prompt(conv), cotrt.Params(max_new_tokens=40, stop=("5",))):
        text += ev.text
        assert "5" not in text
        final = ev.output
    assert final.stats["exit_reason"] == "stop_string" and final.finish_reason == "stop"
    assert final.text == full[: full.index("5")] == text


def test_abort_frees_the_slot(plain_rt):
    eng = plain_rt.engine
    a = eng.add(_rand_prompts(1, 4)[0], cotrt.Params(max_new_tokens=100, ignore_eos=True))
    b = eng.add(_rand_prompts(1, 5)[0], cotrt.Params(max_new_tokens=5, ignore_eos=True))
    eng.step()
    assert eng.abort(a) and not eng.abort(a) and not eng.abort(12345)
    done = {}
    while eng.has_unfinished():
        for ev in eng.step():
            if ev.finished:
                done[ev.request_id] = ev.output
    assert done[a].finish_reason == "abort" and done[b].finish_reason == "length"
    assert eng.free_slots == [0, 1, 2]
    q = eng.add([5, 6], cotrt.Params())  # abort while still queued
    assert eng.abort(q)
    evs = eng.step()
    assert evs[0].finished and evs[0].output.finish_reason == "abort" and not eng.has_unfinished()


@pytest.mark.parametrize("bad,match", [
    (dict(prompt=""), "prompt"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=[1, 2, 10**7]), "outside the vocabulary"),
    (dict(prompt=[1] * 300), "max_len"),
    (dict(prompt=3.5), "prompt"),
    (dict(params=dict(think_budget=-1)), "think_budget"),
    (dict(params=dict(temperature=-0.1)), "temperature"),
    (dict(params=dict(top_p=0.0)), "top_p"),
    (dict(params=dict(max_new_tokens=0)), "max_new_tokens"),
    (dict(params=dict(bogus=1)), "bogus"),
    (dict(params=dict(temperature=float("nan"))), "temperature"),
    (dict(params=dict(stop=["", "x"])), "stop"),
    (dict(params=dict(logit_bias={10**7: 1.0})), "logit_bias"),
])
def test_bad_requests_raise_and_the_engine_keeps_serving(plain_rt, bad, match):
    eng = plain_rt.engine
    good = eng.add([5, 6, 7], cotrt.Params(max_new_tokens=4, ignore_eos=True))
    eng.step()
    before = (len(eng.queue), dict(eng.running), list(eng.free_slots))
    with pytest.raises(ValueError, match=match):
        params = bad.get("params", {})
        eng.add(bad.get("prompt", [5, 6]), params if isinstance(params, cotrt.Params) else params)
    assert (len(eng.queue), dict(eng.running), list(eng.free_slots)) == before
    outs = {}
    while eng.has_unfinished():
        for ev in eng.step():
            if ev.finished:
                outs[ev.request_id] = ev.output
    assert len(outs[good].token_ids) == 4


def test_generate_validates_every_prompt_before_queueing(plain_rt):
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        plain_rt.generate([[5, 6], ""], cotrt.Params())
    assert not plain_rt.engine.has_unfinished()
    with pytest.raises(ValueError, match="params"):
        plain_rt.generate([[5, 6], [7]], [cotrt.Params()])


def test_a_failing_forward_ends_only_its_requests(plain_rt, monkeypatch):
    eng = plain_rt.engine
    ok = eng.add([5, 6, 7], cotrt.Params(max_new_tokens=3, ignore_eos=True))
    eng.step()
    runner = eng.runner
    real = runner.forward
    calls = {"n": 0}

    def flaky(meta, **kw):  # the prefill of the next admitted request fails once
        calls["n"] += 1
        if meta.q_lens[0] > 1:
            raise RuntimeError("simulated kernel failure")
        return real(meta, **kw)

    monkeypatch.setattr(runner, "forward", flaky)
    bad = eng.add([8, 9, 10, 11], cotrt.Params(max_new_tokens=3))
    outs = {}
    while eng.has_unfinished():
        for ev in eng.step():
            if ev.finished:
                outs[ev.request_id] = ev.output
    assert outs[bad].finish_reason == "error" and "simulated" in outs[bad].error
    assert outs[ok].finish_reason == "length" and len(outs[ok].token_ids) == 3
    assert eng.free_slots == [0, 1, 2]


# -- budgets through the engine (random model, markers as single tokens) ----------------------

def _think_prompt(tok):
    return tok.encode("Question: what is 2+2?\nAnswer: <think>\n", add_special_tokens=False)


@pytest.mark.parametrize("budget", [0, 3, 16])
def test_think_budget_end_to_end(think_rt, think_tokenizer, budget):
    tok = think_tokenizer
    end_id = tok.convert_tokens_to_ids("</think>")
    outs = think_rt.generate([_think_prompt(tok)] * 2, [
        cotrt.Params(max_new_tokens=40, think_budget=budget, temperature=1.0, seed=s, ignore_eos=True)
        for s in (1, 2)])
    for o in outs:
        assert o.stats["think_sampled"] == budget and o.stats["think_end"] == "think_budget"
        assert o.token_ids[budget] == end_id and o.token_ids.count(end_id) == 1
        assert o.stats["think_tokens"] == budget and o.stats["forced_tokens"] == 1
        assert o.stats["answer_tokens"] == 40 - budget - 1
        assert "</think>" not in o.answer and o.reasoning == tok.decode(o.token_ids[:budget]).strip()


@pytest.mark.parametrize("budget", [2, 14])
def test_step_cut_budget_end_to_end_matches_a_naive_rerun(think_tokenizer, budget):
    """``think_budget_cut="step"`` through the engine: the kept thinking is the greedy
    chain up to its last boundary within the budget, the tokens after it are rolled back
    in the cache, and the answer equals HF generate rerun from the kept text plus the end
    marker (a stale cache position would change it). A neighbour in the batch without the
    cut is unaffected."""
    from cotrt.control.automaton import token_bytes

    from _parity import assert_greedy_match, hf_greedy

    tok = think_tokenizer
    end_id = tok.convert_tokens_to_ids("</think>")
    model = tiny_model("qwen3", len(tok), seed=11)
    rt = cotrt.wrap(model, tok, max_batch=4, max_len=256)
    prompt = _think_prompt(tok)
    free = rt.generate([prompt], cotrt.Params(max_new_tokens=40, ignore_eos=True, logit_bias={end_id: -100.0}))[0]
    chain = free.token_ids
    # A cue the greedy chain writes early (the text of its 3rd token). A boundary is every
    # token that completes an occurrence of the cue's bytes; the cut keeps the chain up to
    # the last boundary within the budget.
    vb = token_bytes(tok)
    cue = vb[chain[2]]
    assert cue.strip(), cue
    data = b"".join(vb[t] for t in chain[:budget])
    tok_end = list(itertools.accumulate(len(vb[t]) for t in chain[:budget]))
    keep = max((bisect.bisect_left(tok_end, j + len(cue)) + 1 for j in range(len(data)) if data.startswith(cue, j)),
               default=0)
    assert 0 <= keep <= budget
    n_answer = 10
    params = cotrt.Params(max_new_tokens=budget + 1 + n_answer, think_budget=budget, think_budget_cut="step",
                          step_cues=(cue.decode("utf-8"),), ignore_eos=True)
    plain = cotrt.Params(max_new_tokens=budget + 1 + n_answer, think_budget=budget, ignore_eos=True)
    cut, neighbour = rt.generate([prompt, prompt], [params, plain])
    assert cut.stats["think_end"] == "think_budget"
    assert cut.token_ids[:keep] == chain[:keep] and cut.token_ids[keep] == end_id, (cut.token_ids, keep)
    assert cut.stats["think_tokens"] == keep and cut.stats["rolled_back"] == budget - keep
    answer = cut.token_ids[keep + 1:]
    assert len(answer) == n_answer + budget - keep
    ref = hf_greedy(model, prompt + chain[:keep] + [end_id], len(answer))
    assert_greedy_match(model, prompt + chain[:keep] + [end_id], answer, ref, f"step cut at {budget}")
    # Streamed, the step the cut takes back is never shown: the events add up to the output.
    eng = rt.engine
    rid = eng.add(prompt, params)
    toks, text, final = [], "", None
    while eng.has_unfinished():
        for ev in eng.step():
            toks += ev.token_ids
            text += ev.text
            assert toks == cut.token_ids[:len(toks)], (toks, cut.token_ids)
            final = ev.output if ev.finished else final
    assert final.token_ids == cut.token_ids and toks == cut.token_ids and text == final.text
    # The neighbour cut at the budget's token, as without the option.
    assert neighbour.token_ids[:budget] == chain[:budget] and neighbour.token_ids[budget] == end_id
    assert neighbour.stats["rolled_back"] == 0


def test_min_think_extends_with_wait(think_rt, think_tokenizer):
    tok = think_tokenizer
    end_id = tok.convert_tokens_to_ids("</think>")
    # The bias makes the model try to close thinking at once, every time.
    p = cotrt.Params(max_new_tokens=60, min_think=30, max_waits=3, wait_text="\nWait",
                     logit_bias={end_id: 60.0}, ignore_eos=True)
    o = think_rt.generate([_think_prompt(tok)], p)[0]
    assert o.stats["waits"] == 3 and o.stats["think_end"] == "natural"
    assert o.reasoning.count("Wait") == 3
    # After the end marker the (single-token) marker is banned despite the bias.
    assert o.token_ids.count(end_id) == 1 and o.stats["answer_tokens"] > 0


def test_plain_model_budget_and_answer(smol_model):
    model, tok = smol_model
    rt = cotrt.wrap(model, tok, max_batch=2, max_len=512)
    conv = [[{"role": "user", "content": "Explain step by step: what is 12 * 13?"}]]
    free = rt.chat(conv, cotrt.Params(max_new_tokens=120))[0]
    cut = rt.chat(conv, cotrt.Params(max_new_tokens=120, think_budget=20, answer_budget=15))[0]
    assert free.stats["think_sampled"] > 20
    assert cut.stats["think_sampled"] == 20 and cut.stats["think_end"] == "think_budget"
    assert cut.stats["answer_tokens"] <= 15 and "Final answer:" in cut.text
    assert cut.token_ids[:20] == free.token_ids[:20]  # identical until the budget bites


def test_window_decoder_equals_the_tokenizers_decode(smol_tokenizer):
    import copy
    import random

    from cotrt.output import _window_decoder

    tok = smol_tokenizer
    dec = _window_decoder(tok)
    fast_path = copy.deepcopy(tok)
    fast_dec = _window_decoder(fast_path)
    fast_path.decode = None  # the fast path never goes through transformers' decode
    assert fast_dec([5, 6, 7]) == tok.decode([5, 6, 7])
    rng = random.Random(0)
    specials = list(tok.all_special_ids)
    for _ in range(200):  # windows with multi-byte pieces, specials, partial characters
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(len(tok)) for _ in range(rng.randrange(1, 9))]
        assert dec(ids) == tok.decode(ids, skip_special_tokens=False)
    cleaning = copy.deepcopy(tok)
    cleaning.clean_up_tokenization_spaces = True  # asks for more than the Rust decoder does
    ids = tok.encode("Hello , world !")
    assert _window_decoder(cleaning)(ids) == cleaning.decode(ids, skip_special_tokens=False)
