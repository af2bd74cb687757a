"""One rule for a plain model (no think markers), in ``rt.chat`` and in the server: its reply
is the answer unless a control forced the answer cue; then the text before the cue is
reasoning. Forced tokens are counted apart, so ``think_tokens <= think_budget``."""
from __future__ import annotations

import json

import pytest

import cotrt
from cotrt.testing import tiny_model
from cotrt.params import Params
from test_control import drain, feed, filler, make_row

CUE = cotrt.ThinkFormat.none().end  # "\nFinal answer:"


@pytest.fixture(scope="module")
def rt(smol_tokenizer):
    rt = cotrt.wrap(tiny_model("llama", len(smol_tokenizer), seed=31), smol_tokenizer, max_batch=2, max_len=256)
    assert rt.think_format.plain
    return rt


def test_a_plain_reply_is_the_answer(rt):
    o = rt.chat([[{"role": "user", "content": "hi"}]], cotrt.Params(max_new_tokens=12, ignore_eos=True))[0]
    assert o.reasoning == "" and o.answer == o.text.strip() and o.answer
    s = o.stats
    assert (s["think_tokens"], s["answer_tokens"], s["forced_tokens"]) == (0, 12, 0) and s["think_end"] is None


@pytest.mark.parametrize("budget", [0, 5, 16])
def test_a_forced_cue_splits_and_forced_tokens_count_apart(rt, smol_tokenizer, budget):
    p = cotrt.Params(max_new_tokens=40, think_budget=budget, answer_budget=6, ignore_eos=True)
    o = rt.chat([[{"role": "user", "content": "hi"}]], p)[0]
    s = o.stats
    n_cue = len(smol_tokenizer.encode(CUE, add_special_tokens=False))
    assert s["think_end"] == "think_budget" and s["think_tokens"] == budget  # not budget + the cue
    assert s["forced_tokens"] == n_cue and s["answer_tokens"] == 6
    assert s["think_tokens"] + s["forced_tokens"] + s["answer_tokens"] == len(o.token_ids)
    cut = o.text.index(CUE)
    assert o.reasoning == o.text[:cut].strip() and o.answer == o.text[cut + len(CUE):].strip()


def test_a_cue_the_model_writes_itself_is_answer(smol_tokenizer):
    row = make_row(smol_tokenizer, "Q: 2+3?\nA:", Params(), fmt=cotrt.ThinkFormat.none())
    feed(row, filler(smol_tokenizer, 4) + smol_tokenizer.encode(CUE + " 5", add_special_tokens=False))
    s = row.stats()
    assert row.think_end == "natural" and not row.plain_split
    assert s["think_tokens"] == 0 and s["answer_tokens"] == len(row.gen) and s["forced_tokens"] == 0
    forced = make_row(smol_tokenizer, "Q: 2+3?\nA:", Params(think_budget=4), fmt=cotrt.ThinkFormat.none())
    feed(forced, filler(smol_tokenizer, 4))
    cue = drain(forced)
    s = forced.stats()
    assert forced.plain_split and s["think_tokens"] == 4 and s["forced_tokens"] == len(cue)


def test_the_server_follows_the_same_rule(rt):
    from fastapi.testclient import TestClient

    from cotrt.async_engine import AsyncEngine
    from cotrt.server import create_app

    conv = [{"role": "user", "content": "hi"}]
    cases = [({}, cotrt.Params(max_new_tokens=12, temperature=0, ignore_eos=True)),
             ({"think_budget": 5, "answer_budget": 4},
              cotrt.Params(max_new_tokens=30, temperature=0, ignore_eos=True, think_budget=5, answer_budget=4))]
    # The references first: once the server runs, its engine thread owns the engine (a
    # request added from this thread could be stepped by both threads at once).
    wants = [rt.chat([conv], params)[0] for _, params in cases]
    app = create_app(AsyncEngine(rt, max_queue=4), "tiny")
    with TestClient(app) as client:
        for (extra, params), want in zip(cases, wants):
            body = {"model": "tiny", "messages": conv, "max_tokens": params.max_new_tokens, "temperature": 0,
                    "cotrt": {"ignore_eos": True, **extra}}
            r = client.post("/v1/chat/completions", json=body).json()
            msg = r["choices"][0]["message"]
            assert msg["content"] == want.answer and msg["reasoning_content"] == (want.reasoning or None)
            reasoning_tokens = r["usage"]["completion_tokens_details"]["reasoning_tokens"]
            assert reasoning_tokens == want.stats["think_tokens"] == r["cotrt"]["stats"]["think_tokens"]
            assert reasoning_tokens == (5 if extra else 0)
            if not extra:  # a stream cannot take text back: only an unforced reply streams as it is
                content, chunks = "", []
                stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
                with client.stream("POST", "/v1/chat/completions", json=stream) as s:
                    for line in s.iter_lines():
                        if line.startswith("data: {"):
                            chunks.append(json.loads(line[6:]))
                            for ch in chunks[-1]["choices"]:
                                content += ch["delta"].get("content") or ""
                                assert not ch["delta"].get("reasoning_content")
                assert content == want.answer
                # README: cotrt.stats comes in the chunk carrying finish_reason; the usage-only
                # chunk after it (the last) has none.
                (fin,) = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
                assert fin["cotrt"]["stats"]["answer_tokens"] == 12 and "cotrt" not in chunks[-1]
                assert chunks[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
