"""AsyncEngine: one engine thread, asyncio streams, cancellation, backpressure, faults."""
from __future__ import annotations

import asyncio
import time

import psutil
import pytest

import cotrt
from cotrt.testing import tiny_model
from cotrt.async_engine import AsyncEngine, QueueFull

P = dict(max_new_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def rt(smol_tokenizer):
    return cotrt.wrap(tiny_model("llama", len(smol_tokenizer), seed=21), smol_tokenizer, max_batch=3, max_len=256)


@pytest.fixture
def aengine(rt):
    eng = AsyncEngine(rt, max_queue=4).start()
    yield eng
    eng.shutdown()
    assert not eng.running and rt.engine.free_slots == [0, 1, 2] and not rt.engine.has_unfinished()


def _prompts(n):
    return [[5 + i, 17 * i + 3, 400 + i, 9] for i in range(n)]


async def _idle(eng, timeout=5.0):
    """Wait until nothing runs or waits (slots are released on the step after an abort)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        m = eng.metrics()
        if m["slots_used"] == m["running"] == m["queue_depth"] == 0 and not eng._outstanding:
            return m
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine not idle: {eng.metrics()}")


def test_streams_match_the_requests_alone(rt, aengine):
    prompts = _prompts(7)  # more than max_batch: some wait in the queue
    expected = [o.text for o in _alone(rt, aengine, prompts)]

    async def one(p):
        text, final = "", None
        async for ev in aengine.stream(p, P):
            text += ev.text
            final = ev.output
        assert final.text == text and final.finish_reason == "length"
        return text

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(main()) == expected
    m = aengine.metrics()
    assert m["requests"]["length"] == 14 and m["tokens"]["think"] + m["tokens"]["answer"] == 14 * 6


def _alone(rt, aengine, prompts):
    async def main():
        return [await aengine.generate(p, P) for p in prompts]

    return asyncio.run(main())


def test_leaving_a_stream_aborts_and_frees_the_slot(rt, aengine):
    long = dict(P, max_new_tokens=200)

    async def main():
        agen = aengine.stream(_prompts(1)[0], long)
        async for ev in agen:
            if ev.token_ids:
                break
        await agen.aclose()  # what `async for` + break leaves to the garbage collector
        # Cancelling the task of generate() aborts it as well.
        task = asyncio.ensure_future(aengine.generate(_prompts(2)[1], long))
        await asyncio.sleep(0.02)  # admitted and decoding, far from its 200 tokens
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await _idle(aengine)

    m = asyncio.run(main())
    assert m["requests"]["abort"] == 2 and m["slots_used"] == 0
    assert rt.engine.free_slots == [0, 1, 2] and not aengine._live


def test_queue_full_raises_and_counts(rt):
    eng = AsyncEngine(rt, max_queue=1).start()
    long = dict(P, max_new_tokens=250)

    async def main():
        held = [await eng.submit(p, long) for p in _prompts(4)]  # 3 running + 1 waiting
        with pytest.raises(QueueFull) as e:
            await eng.submit(_prompts(5)[4], long)
        assert e.value.retry_after >= 1 and e.value.waiting == 1
        for r in held:
            r.abort()
        for r in held:
            async for _ in r:
                pass
            assert r.output.finish_reason == "abort"
        out = await eng.generate(_prompts(1)[0], P)  # room again
        assert out.finish_reason == "length"
        return eng.metrics()

    try:
        m = asyncio.run(main())
    finally:
        eng.shutdown()
    assert m["requests"]["rejected"] == 1 and m["requests"]["abort"] == 4


@pytest.mark.parametrize("prompt,params,name", [
    ([1] * 300, P, "max_len"),
    ("", P, "prompt"),
    ([5, 6], dict(P, think_budget=-1), "think_budget"),
    ([5, 6], dict(P, bogus=1), "bogus"),
    ([{"role": "user"}], P, "messages"),
])
def test_bad_requests_raise_and_others_complete(rt, aengine, prompt, params, name):
    async def main():
        good = asyncio.ensure_future(aengine.generate(_prompts(1)[0], dict(P, max_new_tokens=20)))
        with pytest.raises(ValueError, match=name):
            await aengine.submit(prompt, params)
        return await good

    out = asyncio.run(main())
    assert len(out.token_ids) == 20 and aengine.metrics()["requests"]["invalid"] == 1


def test_chat_messages_are_templated_on_the_engine_thread(rt, aengine):
    conv = [{"role": "user", "content": "Hello there"}]
    expected = rt.chat_prompt(conv)

    async def main():
        r = await aengine.submit(conv, P)
        async for _ in r:
            pass
        return r

    r = asyncio.run(main())
    assert r.prompt_tokens == len(expected) and r.output.prompt_token_ids == expected


def test_the_thread_sleeps_when_idle(aengine):
    async def main():
        await aengine.generate(_prompts(1)[0], P)

    asyncio.run(main())
    tid = aengine._thread.native_id
    cpu = lambda: sum(t.user_time + t.system_time for t in psutil.Process().threads() if t.id == tid)
    steps, c0 = aengine.metrics()["steps"], cpu()
    time.sleep(0.3)
    assert aengine.metrics()["steps"] == steps and cpu() - c0 < 0.03


def test_a_failing_step_ends_its_requests_not_the_thread(rt, aengine, monkeypatch):
    real, calls = rt.engine.step, {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated engine bug")
        return real()

    monkeypatch.setattr(rt.engine, "step", flaky)

    async def main():
        first = await aengine.generate(_prompts(1)[0], dict(P, max_new_tokens=30))
        second = await aengine.generate(_prompts(2)[1], P)
        return first, second

    first, second = asyncio.run(main())
    assert first.finish_reason == "error" and "simulated" in first.error
    assert second.finish_reason == "length" and aengine.running


def test_shutdown_ends_running_requests(rt):
    eng = AsyncEngine(rt).start()

    async def main():
        r = await eng.submit(_prompts(1)[0], dict(P, max_new_tokens=250))
        await asyncio.get_running_loop().run_in_executor(None, eng.shutdown)
        async for _ in r:
            pass
        with pytest.raises(RuntimeError, match="start"):
            await eng.submit(_prompts(1)[0], P)
        return r.output

    assert asyncio.run(main()).finish_reason == "abort"
    assert rt.engine.free_slots == [0, 1, 2] and not rt.engine.has_unfinished()
