"""The OpenAI-compatible server on loopback, driven by the real ``openai`` client and httpx."""
from __future__ import annotations

import asyncio
import copy
import gc
import json
import random
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import psutil
import pytest

import cotrt
from cotrt.testing import tiny_model
from cotrt.async_engine import AsyncEngine, Request
from cotrt.output import _drop, _split
from cotrt.server import ReasoningSplitter, create_app

# A template that pre-opens thinking (R1 / Qwen3 style), for the think-marker model.
THINK_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
GREEDY = dict(temperature=0, extra_body={"cotrt": {"ignore_eos": True}})


@contextmanager
def serve(app):
    """uvicorn in a thread on 127.0.0.1, on a port the OS picks; stopped on exit."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        assert thread.is_alive() and time.monotonic() - t0 < 30, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class Served:
    def __init__(self, rt, max_queue, **app_kw):
        self.rt = rt
        self.engine = AsyncEngine(rt, max_queue=max_queue)
        self.app = create_app(self.engine, "tiny", **app_kw)

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, **kw)

    def idle(self, timeout=5.0):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            m = self.engine.metrics()
            if m["slots_used"] == m["running"] == m["queue_depth"] == 0 and not self.engine._outstanding:
                return m
            time.sleep(0.01)
        raise AssertionError(f"not idle: {self.engine.metrics()}")


@contextmanager
def _served(rt, max_queue, **kw):
    s = Served(rt, max_queue, **kw)
    with serve(s.app) as url:
        s.url = url
        yield s
    assert not s.engine.running  # the app started the engine, so it stopped it


@pytest.fixture(scope="module")
def plain(smol_tokenizer):
    rt = cotrt.wrap(tiny_model("llama", len(smol_tokenizer), seed=31), smol_tokenizer, max_batch=8, max_len=256)
    with _served(rt, max_queue=64) as s:
        yield s


@pytest.fixture(scope="module")
def think(think_tokenizer):
    tok = copy.deepcopy(think_tokenizer)
    tok.chat_template = THINK_TEMPLATE
    rt = cotrt.wrap(tiny_model("qwen3", len(tok), seed=32), tok, max_batch=2, max_len=256)
    assert rt.think_format.start == "<think>"
    with _served(rt, max_queue=4) as s:
        yield s


def _conv(i):
    rng = random.Random(i)
    words = " ".join(rng.choice(["apple", "river", "seven", "blue", "code", "think", "moon"]) for _ in range(6))
    return [{"role": "user", "content": f"Request {i}: {words}"}]


def test_models_health_metrics(plain):
    c = plain.client()
    assert [m.id for m in c.models.list().data] == ["tiny"]
    assert httpx.get(plain.url + "/health").json() == {"status": "ok"}
    text = httpx.get(plain.url + "/metrics").text
    for name in ("cotrt_requests_total{outcome=\"stop\"}", "cotrt_tokens_total{phase=\"think\"}",
                 "cotrt_probe_tokens_total", "cotrt_queue_depth", "cotrt_slots_used", "cotrt_running_requests"):
        assert name in text


def test_chat_and_completions_streaming_and_not(plain):
    c = plain.client()
    whole = c.chat.completions.create(model="tiny", messages=_conv(0), max_tokens=7, **GREEDY)
    ch = whole.choices[0]
    assert ch.finish_reason == "length" and ch.message.content
    assert whole.usage.completion_tokens == 7 and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 7
    stream = c.chat.completions.create(model="tiny", messages=_conv(0), max_completion_tokens=7, stream=True,
                                       stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    assert "".join(k.choices[0].delta.content or "" for k in chunks if k.choices) == ch.message.content
    assert [k.choices[0].finish_reason for k in chunks if k.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 7 and not chunks[-1].choices

    comp = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, **GREEDY)
    assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 5
    streamed = "".join(k.choices[0].text for k in c.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=5, stream=True, **GREEDY))
    assert streamed == comp.choices[0].text
    ids = c.completions.create(model="tiny", prompt=[5, 6, 7, 8], max_tokens=3, **GREEDY)
    assert ids.usage.prompt_tokens == 4 and ids.usage.completion_tokens == 3


def test_n_choices_share_the_prompt_and_match_single_requests(plain):
    """OpenAI's n: n choices (index 0..n-1), each equal to a single request with seed
    seed + index; streamed choices carry their index; usage counts the prompt once; the
    KV metrics show the shared prompt pages."""
    c = plain.client()
    conv = [{"role": "user", "content": "Tell me a long story about " + "rivers and moons " * 12}]
    kw = dict(model="tiny", messages=conv, max_tokens=6, temperature=1.0, seed=7)
    whole = c.chat.completions.create(n=3, **kw)
    assert [ch.index for ch in whole.choices] == [0, 1, 2]
    singles = [c.chat.completions.create(**{**kw, "seed": 7 + i}).choices[0].message.content for i in range(3)]
    assert [ch.message.content for ch in whole.choices] == singles
    prompt = whole.usage.prompt_tokens
    assert whole.usage.completion_tokens == 18 and whole.usage.total_tokens == prompt + 18
    stream = c.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kw)
    texts, reasons = ["", "", ""], [None] * 3
    for k in stream:
        for ch in k.choices:
            texts[ch.index] += ch.delta.content or ""
            reasons[ch.index] = ch.finish_reason or reasons[ch.index]
    assert texts == singles and reasons == ["length"] * 3 and k.usage.completion_tokens == 18
    m = plain.idle()
    assert m["kv"]["cached_prompt_tokens"] >= 2 * (prompt // 16) * 16  # choices 2 and 3 shared the prompt
    text = httpx.get(plain.url + "/metrics").text
    for name in ("cotrt_kv_pages_total", "cotrt_kv_pages_used 0", "cotrt_kv_pages_cached", "cotrt_kv_page_size 16",
                 "cotrt_cached_prompt_tokens_total", "cotrt_preemptions_total 0"):
        assert name in text


def test_reasoning_content_is_separated(think):
    c = think.client()
    kw = dict(model="tiny", messages=_conv(1), max_tokens=16, temperature=0,
              extra_body={"thinking_budget": 5, "cotrt": {"ignore_eos": True}})
    whole = c.chat.completions.create(**kw)
    msg = whole.choices[0].message
    # The budget forces </think> after 5 thinking tokens; the rest is the answer.
    assert msg.reasoning_content and msg.content and "</think>" not in msg.content + msg.reasoning_content
    assert whole.usage.completion_tokens_details.reasoning_tokens == 5  # the forced marker is counted apart
    reasoning, content = "", ""
    for k in c.chat.completions.create(stream=True, **kw):
        if k.choices:
            reasoning += getattr(k.choices[0].delta, "reasoning_content", None) or ""
            content += k.choices[0].delta.content or ""
    assert (reasoning, content) == (msg.reasoning_content, msg.content)


@pytest.mark.parametrize("seed", range(40))
def test_splitter_matches_the_output_split_at_any_chunking(seed):
    rng = random.Random(seed)
    fmt = cotrt.ThinkFormat("<think>", "</think>") if seed % 4 else cotrt.ThinkFormat.none()
    pieces = ["a", " b", "\n", "  ", "x y", fmt.end, fmt.end, "z"] + ([fmt.start] if fmt.start else [])
    raw = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 14)))
    thinking = fmt.plain or seed % 3 == 0
    if not thinking and fmt.start in raw:
        # Text before an opening marker streams as content but Output drops it: start there.
        raw = raw[raw.find(fmt.start):]
    reasoning, answer = _split(raw, fmt, 1 if thinking else 0, plain_split=fmt.plain)
    sp = ReasoningSplitter(fmt, thinking)
    parts, i = [], 0
    while i < len(raw):
        j = i + rng.randrange(1, 5)  # markers split across chunks
        parts += sp.feed(raw[i:j])
        i = j
    parts += sp.flush()
    got = {k: "".join(t for kk, t in parts if kk == k) for k in ("reasoning_content", "content")}
    assert got == {"reasoning_content": reasoning.strip(), "content": _drop(answer, fmt).strip()}, raw


def test_bad_requests_get_400_naming_the_field_while_others_run(plain):
    base = {"model": "tiny", "messages": _conv(2), "max_tokens": 4}
    cases = [
        (b"{not json", "body"),
        ({**base, "temperature": "hot"}, "temperature"),
        ({**base, "max_tokens": "10"}, "max_tokens"),
        ({**base, "messages": "hi"}, "messages"),
        ({**base, "stream": "yes"}, "stream"),
        ({**base, "cotrt": [1]}, "cotrt"),
        ({**base, "cotrt": {"think_budget": "many"}}, "think_budget"),
        ({**base, "cotrt": {"think_budget": -1}}, "think_budget"),
        ({**base, "thinking_budget": -5}, "thinking_budget"),
        ({**base, "cotrt": {"soft_budget": -2}}, "soft_budget"),
        ({**base, "cotrt": {"think_budget": 8, "think_budget_cut": "line"}}, "think_budget_cut"),
        ({**base, "cotrt": {"bogus": 1}}, "bogus"),
        ({**base, "cotrt": {"valve": {"no_such_adapter": 0.5}}}, ("valve", "no_such_adapter")),
        ({**base, "cotrt": {"exit": {"name": "no_such_policy"}}}, ("exit", "no_such_policy")),
        ({**base, "messages": [{"role": "user", "content": "word " * 400}]}, "messages"),
        ({**base, "n": 0}, "n"),
        ({**base, "n": 129}, "n"),
        ({**base, "logprobs": True}, "logprobs"),
        ({**base, "chat_template_kwargs": {"chat_template": "{{ 1 }}"}}, "chat_template_kwargs"),
        ({"model": "tiny", "prompt": [5] * 300}, "prompt"),
        ({"model": "tiny", "prompt": {"a": 1}}, "prompt"),
    ]

    async def main():
        async with httpx.AsyncClient(base_url=plain.url, timeout=30) as cl:
            good = {"model": "tiny", "messages": _conv(3), "max_tokens": 60, "stream": True,
                    "temperature": 0, "cotrt": {"ignore_eos": True}}
            async with cl.stream("POST", "/v1/chat/completions", json=good) as r:
                lines = r.aiter_lines()
                assert (await anext(lines)).startswith("data:")  # the good request is running
                for body, names in cases:
                    url = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
                    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
                    resp = await cl.post(url, headers={"content-type": "application/json"}, **kw)
                    err = resp.json()["error"]
                    names = (names,) if isinstance(names, str) else names
                    assert resp.status_code == 400 and any(n in err["message"] for n in names), (body, err)
                    assert err["type"] == "invalid_request_error"
                rest = [ln async for ln in lines if ln.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        final = json.loads(rest[-2][len("data: "):])
        assert final["choices"][0]["finish_reason"] == "length" and final["cotrt"]["stats"]["answer_tokens"] == 60  # a plain reply

    asyncio.run(main())
    metrics = httpx.get(plain.url + "/metrics").text.splitlines()
    assert int(next(ln for ln in metrics if 'outcome="invalid"' in ln).split()[-1]) >= len(cases)


def test_queue_full_gets_429_with_retry_after(smol_tokenizer):
    rt = cotrt.wrap(tiny_model("llama", len(smol_tokenizer), seed=33), smol_tokenizer, max_batch=1, max_len=512)
    real = rt.engine.step
    rt.engine.step = lambda: (time.sleep(0.005), real())[1]  # long requests stay long
    long = {"model": "tiny", "prompt": "Hi", "max_tokens": 500, "stream": True, "cotrt": {"ignore_eos": True}}
    with _served(rt, max_queue=1) as s, httpx.Client(base_url=s.url, timeout=30) as cl:
        with cl.stream("POST", "/v1/completions", json=long) as a:
            lines = a.iter_lines()  # (dropping this generator would close the connection)
            next(lines)  # running
            with cl.stream("POST", "/v1/completions", json=long) as b:
                assert b.status_code == 200  # accepted, waiting for the slot
                with pytest.raises(openai.RateLimitError) as e:
                    s.client().completions.create(model="tiny", prompt="Hi", max_tokens=2)
                assert int(e.value.response.headers["retry-after"]) >= 1
        s.idle()  # both hang-ups aborted their requests
        assert s.client().completions.create(model="tiny", prompt="Hi", max_tokens=2).usage.completion_tokens
        m = s.engine.metrics()["requests"]
        assert m["rejected"] == 1 and m["abort"] == 2


def test_disconnect_aborts_a_non_streaming_request(plain):
    before = plain.engine.metrics()["requests"]["abort"]
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 240, "cotrt": {"ignore_eos": True}}
    real = plain.rt.engine.step
    plain.rt.engine.step = lambda: (time.sleep(0.005), real())[1]
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(plain.url + "/v1/completions", json=body, timeout=0.3)
        plain.idle()
    finally:
        plain.rt.engine.step = real
    assert plain.engine.metrics()["requests"]["abort"] == before + 1


def _handles_released(timeout=15.0):
    # The server thread may still be closing the last responses (which hold their handles)
    # when the engine is already idle: poll. Usually ~0.5 s; but a client whose stream was
    # cancelled mid-read may fail to close its connection (httpx: "async generator already
    # executing"), and then uvicorn lets go of that connection's last request only at its
    # keep-alive timeout (5 s): wait past it. A handle that is really leaked stays.
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        gc.collect()
        if not [o for o in gc.get_objects() if type(o) is Request]:
            return True
        time.sleep(0.05)
    return False


def test_load_64_streaming_clients_a_quarter_cancelling(plain):
    """64 concurrent streams, 16 of them hanging up at random points, 3 rounds: every request
    completes or is cancelled, slots drain, memory is flat, no stream sees another's text."""
    n, max_tokens = 64, 8
    c = plain.client()
    expected = [c.chat.completions.create(model="tiny", messages=_conv(i), max_tokens=max_tokens, **GREEDY)
                .choices[0].message.content for i in range(n)]
    assert len(set(expected)) > n // 2  # distinct outputs: a mix-up would show

    async def client(ac, i, cancel):
        text = ""
        stream = await ac.chat.completions.create(model="tiny", messages=_conv(i), max_tokens=max_tokens,
                                                  stream=True, **GREEDY)
        k = 0
        async for chunk in stream:
            text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
            k += 1
            if cancel is not None and k >= cancel:
                await stream.close()
                return "cancelled", text
        return "done", text

    async def round_(seed):
        rng = random.Random(seed)
        cancel = dict.fromkeys(rng.sample(range(n), n // 4))
        async with openai.AsyncOpenAI(base_url=plain.url + "/v1", api_key="none", max_retries=0) as ac:
            tasks = {}
            for i in range(n):
                # Half of the cancellers hang up after a few chunks, half by cancelling the task.
                kind = rng.random() if i in cancel else None
                tasks[i] = asyncio.ensure_future(client(ac, i, rng.randrange(1, 6) if kind and kind < 0.5 else None))
                if kind and kind >= 0.5:
                    asyncio.get_running_loop().call_later(rng.uniform(0, 0.3), tasks[i].cancel)
            done, _ = await asyncio.wait(tasks.values(), timeout=60)
            assert len(done) == n, "clients hung"
        results = {}
        for i, t in tasks.items():
            if t.cancelled():
                results[i] = ("cancelled", None)
            else:
                results[i] = t.result()
        return results

    rss = []
    for r in range(3):
        t0 = time.monotonic()
        results = asyncio.run(round_(r))
        for i, (how, text) in results.items():
            if how == "done":
                assert text == expected[i], i
            else:
                assert i is not None and (text is None or expected[i].startswith(text)), i
        assert sum(how == "done" for how, _ in results.values()) >= n - n // 4
        m = plain.idle()
        assert m["slots_used"] == 0 and plain.rt.engine.free_slots == list(range(8))
        assert not plain.engine._live and not plain.rt.engine.requests
        assert time.monotonic() - t0 < 60
        assert _handles_released(), "a request handle outlived its request"
        rss.append(psutil.Process().memory_info().rss)
    # Round 0 warms up allocators and caches; later rounds must not keep growing (measured:
    # +0.02 MiB from round 1 to round 2).
    assert rss[2] - rss[1] < 8 * 2**20, [x // 2**20 for x in rss]


def test_serve_arguments_default_to_loopback_and_bad_ones_exit_2(capsys):
    import argparse

    from cotrt.server import add_serve_arguments, run_serve

    ap = argparse.ArgumentParser()
    add_serve_arguments(ap)
    args = ap.parse_args([])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 8000, "default")
    assert run_serve(ap.parse_args(["--max-batch", "0"])) == 2
    assert "max_batch" in capsys.readouterr().err


def test_exit_policy_by_name_and_probe_tokens_metric(think):
    def probe_total():
        text = httpx.get(think.url + "/metrics").text
        return int(next(ln for ln in text.splitlines() if ln.startswith("cotrt_probe_tokens_total ")).split()[-1])

    before = probe_total()
    r = httpx.post(think.url + "/v1/chat/completions", timeout=30, json={
        "model": "tiny", "messages": _conv(4), "max_tokens": 24, "temperature": 0,
        "cotrt": {"exit": {"name": "dynasor", "every": 4, "k": 2, "max_tokens": 4}, "ignore_eos": True}})
    assert r.status_code == 200, r.text
    stats = r.json()["cotrt"]["stats"]
    assert stats["probe_tokens"] > 0 and probe_total() - before == stats["probe_tokens"]
