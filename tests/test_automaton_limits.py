"""Pattern memory is bounded and compiling stays off the engine thread (issue 13, item 1)."""
from __future__ import annotations

import asyncio
import random
import threading

import pytest

import cotrt
from cotrt.control import automaton as am
from cotrt.control.automaton import Automaton, scan_ref

from cotrt.testing import tiny_model


def test_lazy_tables_equal_dense_ones():
    """Every (state, token) entry of the lazy automaton equals the compiled table's."""
    rng = random.Random(5)
    alphabet = b"ab \nW"
    vocab = [bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 5))) for _ in range(300)]
    patterns = [b"ab", b"b a", b"\n\n", b"Wait", b"aaa", b"a"]
    dense, lazy = Automaton(patterns, vocab, lazy=False), Automaton(patterns, vocab, lazy=True)
    assert lazy.lazy and not dense.lazy and lazy.n_states == dense.n_states
    for s in range(dense.n_states):
        for t in range(len(vocab)):
            assert (lazy.host_next[s, t], lazy.host_emit[s, t]) == (dense.host_next[s, t], dense.host_emit[s, t])
    ids = [rng.randrange(len(vocab)) for _ in range(500)]
    assert lazy.scan(ids)[1] == scan_ref(patterns, vocab, ids)
    assert int(lazy.depth.max()) == 4
    with pytest.raises(ValueError, match="lazy"):
        lazy.to("cpu")


def test_largest_allowed_patterns_stay_small(smol_tokenizer):
    """The largest allowed set (8 x 1024 bytes) over SmolLM2's 49k vocabulary: lazy, a few
    MB; the dense tables would be 12 B x 8193 states x 49152 = 4.8 GB."""
    vocab = am.token_bytes(smol_tokenizer)
    rng = random.Random(1)
    words = ["the", " cat", " sat", "\n\n", " Wait", ",", " on", " mat", "."]
    pats = [("".join(rng.choice(words) for _ in range(400)))[:am.MAX_PATTERN_BYTES] for _ in range(8)]
    assert sum(len(p.encode()) for p in pats) == am.MAX_TOTAL_PATTERN_BYTES
    a = Automaton(pats, vocab)
    assert a.lazy and a.nbytes < 16 << 20, a.nbytes
    ids = smol_tokenizer.encode(pats[3] + "xyz" + pats[3][:100])
    assert a.scan(ids)[1] == scan_ref(pats, vocab, ids)


def test_pattern_size_caps_name_the_field():
    big = "x" * (am.MAX_PATTERN_BYTES + 1)
    with pytest.raises(ValueError, match=r"^stop\[1\]: 1025 bytes"):
        cotrt.Params(stop=["ok", big])
    with pytest.raises(ValueError, match=r"^step_cues\[0\]"):
        cotrt.Params(step_cues=[big])
    with pytest.raises(ValueError, match=r"^stop and step_cues: \d+ bytes in all"):
        cotrt.Params(stop=["y" * 1000] * 5, step_cues=["z" * 1000] * 4)
    with pytest.raises(ValueError, match=r"^deer: cues\[0\]"):
        cotrt.Params(exit={"name": "deer", "cues": [big]})


def test_compile_runs_in_the_callers_thread(smol_tokenizer, monkeypatch):
    """AsyncEngine compiles a request's patterns (and tokenizes it) before it reaches the
    engine thread, so a big pattern set never stalls the running streams."""
    from cotrt.engine import intake as engine_mod
    from cotrt.async_engine import AsyncEngine

    threads = []
    real = engine_mod.compile_cached
    monkeypatch.setattr(engine_mod, "compile_cached",
                        lambda p, tok: (threads.append(threading.current_thread().name), real(p, tok))[1])
    rt = cotrt.wrap(tiny_model("llama", len(smol_tokenizer), seed=3), smol_tokenizer, max_batch=2, max_len=64)
    tokenized = []  # (thread, prompt kind) of every prompt the engine checks or tokenizes
    real_ids = rt.engine._prompt_ids
    monkeypatch.setattr(rt.engine, "_prompt_ids", lambda p: (
        tokenized.append((threading.current_thread().name, type(p).__name__)), real_ids(p))[1])

    async def main():
        async with AsyncEngine(rt) as eng:
            out = await eng.generate("Hello there", {"max_new_tokens": 4, "stop": ["never seen " * 50],
                                                     "step_cues": ["\n", "Wait"]})
            assert out.finish_reason == "length"
            with pytest.raises(ValueError, match=r"^stop\[0\]"):
                await eng.generate("Hi", {"stop": ["x" * 5000]})
            assert eng.metrics()["requests"]["invalid"] == 1

    asyncio.run(main())
    assert threads and "cotrt-engine" not in threads, threads
    assert ("cotrt-engine", "str") not in tokenized and any(k == "str" for _, k in tokenized), tokenized


def test_engine_stops_the_same_with_lazy_tables(smol_tokenizer, monkeypatch):
    """A stop string and a step cue found through lazy tables end the request where the
    dense tables end it (the engine's rows look entries up on the host either way)."""
    rt = cotrt.wrap(tiny_model("llama", len(smol_tokenizer), seed=12), smol_tokenizer, max_batch=2, max_len=96)
    prompt = [5, 17, 300, 4000, 12]
    free = rt.generate([prompt], cotrt.Params(max_new_tokens=30, ignore_eos=True))[0]
    ids = free.token_ids
    stop = smol_tokenizer.decode(ids[10:14])[1:]  # starts mid-token: matched across tokens
    params = cotrt.Params(max_new_tokens=30, ignore_eos=True, stop=[stop], step_cues=["\n\n", stop[:3]])
    dense = rt.generate([prompt], params)[0]
    monkeypatch.setattr(am, "DENSE_TABLE_BYTES", 0)
    am._COMPILED.clear()
    lazy = rt.generate([prompt], params)[0]
    am._COMPILED.clear()
    assert dense.finish_reason == "stop" and stop not in dense.text
    assert (lazy.token_ids, lazy.text, lazy.finish_reason, lazy.stats["steps"]) == \
        (dense.token_ids, dense.text, dense.finish_reason, dense.stats["steps"])
