"""Hostile and malformed requests against ``cotrt serve``'s app, and a load with cancels.

    python bench/bench_hardening.py [--tiny] [--clients 48] [--rounds 3] [--max-tokens 48]

Three parts, printed as markdown for bench/RESULTS.md:

1. every class of bad input in ``CASES`` -> the status and ``param`` the server answered
   (a streaming request keeps running meanwhile; 500s must be 0);
2. the memory of the largest pattern set a request may carry (8 stop strings of 1,024
   bytes: ``MAX_TOTAL_PATTERN_BYTES``): the automaton's bytes and the process RSS delta;
3. load: ``--clients`` concurrent streaming clients, a quarter of them hanging up mid-stream,
   for ``--rounds`` rounds: statuses, errors, RSS before and after, slots left in use.

The server is the real app under uvicorn on loopback, in this process, with the embedded
SmolLM2-135M (``--tiny``: a random 2-layer Llama over its tokenizer, for a quick run).
``tests/test_server_hardening.py`` runs ``CASES`` against a tiny model.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cotrt  # noqa: E402
from cotrt.server import LOOPBACK_HOSTS, create_app  # noqa: E402

API_KEY = "bench-key"
MAX_BODY = 64 * 1024
_MSG = [{"role": "user", "content": "Count to three."}]
_OK = {"model": "m", "messages": _MSG, "max_tokens": 4}


def _nest(n: int) -> bytes:
    return b'{"model": "m", "messages": ' + b"[" * n + b"]" * n + b"}"


def _x(**kw) -> dict:
    return {**_OK, **kw}


def _c(**kw) -> dict:
    return {**_OK, "cotrt": kw}


# (class, body (dict = JSON, bytes = raw), extra headers, expected status, expected param).
# Headers: "auth": None drops the API key; other keys are sent as given.
CASES = [
    ("invalid JSON", b"{not json", {}, 400, "body"),
    ("JSON nested 20,000 deep", _nest(20_000), {}, 400, "body"),
    ("JSON nested 40 deep", _nest(40), {}, 400, "body"),
    ("NaN literal", b'{"model": "m", "messages": [], "temperature": NaN}', {}, 400, "body"),
    ("body not an object", b"[1, 2]", {}, 400, "body"),
    ("body past --max-body-bytes", _x(messages=[{"role": "user", "content": "a" * (MAX_BODY + 10)}]), {}, 413, "body"),
    ("text/plain content type", _OK, {"content-type": "text/plain"}, 415, "content-type"),
    ("form content type", _OK, {"content-type": "application/x-www-form-urlencoded"}, 415, "content-type"),
    ("no API key", _OK, {"auth": None}, 401, None),
    ("wrong API key", _OK, {"authorization": "Bearer nope"}, 401, None),
    ("foreign Host header", _OK, {"host": "evil.example:8000"}, 403, None),
    ("unknown top-level field", _x(max_token=5), {}, 400, "max_token"),
    ("unknown model", _x(model="gpt-4o"), {}, 404, "model"),
    ("response_format json_object", _x(response_format={"type": "json_object"}), {}, 400, "response_format"),
    ("tools", _x(tools=[{"type": "function", "function": {"name": "f"}}]), {}, 400, "tools"),
    ("tool_choice", _x(tool_choice="auto"), {}, 400, "tool_choice"),
    ("unknown role", _x(messages=[{"role": "tool", "content": "x"}]), {}, 400, "messages[0].role"),
    ("messages not a list", _x(messages="hi"), {}, 400, "messages"),
    ("max_tokens past --max-len", _x(max_tokens=10**6), {}, 400, "max_tokens"),
    ("max_tokens a string", _x(max_tokens="10"), {}, 400, "max_tokens"),
    ("temperature 1e999 (inf)", b'{"model": "m", "messages": [{"role": "user", "content": "x"}], '
                                b'"temperature": 1e999}', {}, 400, "temperature"),
    ("temperature a string", _x(temperature="hot"), {}, 400, "temperature"),
    ("top_p 0", _x(top_p=0), {}, 400, "top_p"),
    ("logit_bias key ' 5 '", _x(logit_bias={" 5 ": 1}), {}, 400, "logit_bias"),
    ("logit_bias key Arabic digit", _x(logit_bias={"\u0665": 1}), {}, 400, "logit_bias"),
    ("logit_bias key '1_0'", _x(logit_bias={"1_0": 1}), {}, 400, "logit_bias"),
    ("logit_bias value 1e9", _x(logit_bias={"5": 1e9}), {}, 400, "logit_bias"),
    ("stop string of 3,000 chars", _x(stop=["x" * 3000]), {}, 400, "stop"),
    ("48 stop strings of 1,000 chars", _x(stop=["y" * 1000] * 48), {}, 400, "stop"),
    ("step cue of 2,000 chars", _c(step_cues=["z" * 2000]), {}, 400, "cotrt.step_cues"),
    ("deer cue of 2,000 chars", _c(exit={"name": "deer", "cues": ["w" * 2000]}), {}, 400, "cotrt.exit"),
    ("dynasor max_tokens 'x'", _c(exit={"name": "dynasor", "max_tokens": "x"}), {}, 400, "cotrt.exit"),
    ("dynasor max_tokens -1", _c(exit={"name": "dynasor", "max_tokens": -1}), {}, 400, "cotrt.exit"),
    ("eat every 'x'", _c(exit={"name": "eat", "every": "x"}), {}, 400, "cotrt.exit"),
    ("eat threshold 'x'", _c(exit={"name": "eat", "threshold": "x"}), {}, 400, "cotrt.exit"),
    ("eat min_probes 'x'", _c(exit={"name": "eat", "min_probes": "x"}), {}, 400, "cotrt.exit"),
    ("eat end_text 5", _c(exit={"name": "eat", "end_text": 5}), {}, 400, "cotrt.exit"),
    ("nowait words [1, 2]", _c(exit={"name": "nowait", "words": [1, 2]}), {}, 400, "cotrt.exit"),
    ("valve_schedule unknown valve", _c(exit={"name": "valve_schedule", "valve": "nope", "budget": 8}), {}, 400,
     "cotrt.exit"),
    ("valve_schedule start 'nan'", _c(exit={"name": "valve_schedule", "valve": "v", "budget": 8, "start": "nan"}),
     {}, 400, "cotrt.exit"),
    ("deer profile 5", _c(exit={"name": "deer", "profile": 5}), {}, 400, "cotrt.exit"),
    ("deer profile {}", _c(exit={"name": "deer", "profile": {}}), {}, 400, "cotrt.exit"),
    ("deer max_tokens -5", _c(exit={"name": "deer", "max_tokens": -5}), {}, 400, "cotrt.exit"),
    ("deer max_probes 'x'", _c(exit={"name": "deer", "max_probes": "x"}), {}, 400, "cotrt.exit"),
    ("deer bad setting, streaming", {**_c(exit={"name": "deer", "max_probes": "x"}), "stream": True}, {}, 400,
     "cotrt.exit"),
    ("exit name not a string", _c(exit={"name": 5}), {}, 400, "cotrt.exit"),
    ("unknown cotrt key", _c(bogus=1), {}, 400, "cotrt.bogus"),
    ("cotrt think_budget -1", _c(think_budget=-1), {}, 400, "cotrt.think_budget"),
    ("thinking_budget -5", _x(thinking_budget=-5), {}, 400, "thinking_budget"),
    ("unknown valve", _c(valve={"nope": 0.5}), {}, 400, "cotrt.valve"),
    ("latent not an object", _c(latent=5), {}, 400, "cotrt.latent"),
    ("prompt past --max-len", _x(messages=[{"role": "user", "content": "word " * 3000}]), {}, 400, "messages"),
    ("n = 0", _x(n=0), {}, 400, "n"),
    ("n past the sample limit", _x(n=1000), {}, 400, "n"),
    ("voting n past max_batch", _x(n=64, cotrt={"consistency": {}}), {}, 400, "n"),
    ("logprobs", _x(logprobs=True), {}, 400, "logprobs"),
]


def post(client, case):
    """Send one case with httpx ``client`` (JSON, the API key, unless the case says otherwise)."""
    _, body, extra, _, _ = case
    headers = {"content-type": "application/json", "authorization": f"Bearer {API_KEY}"}
    for k, v in extra.items():
        if k == "auth":
            headers.pop("authorization")
        else:
            headers[k] = v
    import json

    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/v1/chat/completions", content=raw, headers=headers)


def make_app(engine, max_len_name="m"):
    return create_app(engine, max_len_name, api_key=API_KEY, allowed_hosts=LOOPBACK_HOSTS, max_body_bytes=MAX_BODY)


def rss_mb() -> float:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def run_cases(url) -> list[tuple]:
    import httpx

    rows = []
    with httpx.Client(base_url=url, timeout=60) as cl:
        for case in CASES:
            r = post(cl, case)
            param = r.json().get("error", {}).get("param") if r.headers.get("content-type", "").startswith(
                "application/json") else None
            rows.append((case[0], r.status_code, param, case[3], case[4]))
    return rows


def pattern_memory(tok) -> tuple[int, float, float]:
    """(automaton bytes, RSS delta MB, compile s) of the largest allowed pattern set."""
    from cotrt.control import automaton as am

    am.token_bytes(tok)
    rng = random.Random(0)
    words = ["the", " cat", " sat", "\n\n", " Wait", ",", " on", " mat", "."]
    pats = [("".join(rng.choice(words) for _ in range(400)))[:am.MAX_PATTERN_BYTES] for _ in range(8)]
    gc.collect()
    before = rss_mb()
    t0 = time.perf_counter()
    a = am.Automaton(pats, am.token_bytes(tok))
    dt = time.perf_counter() - t0
    a.scan(tok.encode(" ".join(pats)[:20000]))  # fill the memo as a long request would
    return a.nbytes, rss_mb() - before, dt


async def load(url, clients, rounds, max_tokens) -> dict:
    import httpx

    stats = {"sent": 0, "ok": 0, "cancelled": 0, "429": 0, "errors": 0, "500": 0}
    rng = random.Random(1)

    async def one(cl, i, cancel):
        body = {"model": "m", "messages": [{"role": "user", "content": f"Tell me about item {i}."}],
                "max_tokens": max_tokens, "stream": True, "temperature": 0.8, "seed": i,
                "cotrt": {"ignore_eos": True}}
        stats["sent"] += 1
        async with cl.stream("POST", "/v1/chat/completions", json=body,
                             headers={"authorization": f"Bearer {API_KEY}"}) as r:
            if r.status_code != 200:
                stats["429" if r.status_code == 429 else "500" if r.status_code >= 500 else "errors"] += 1
                return
            n = 0
            async for line in r.aiter_lines():
                if line.startswith("data: {\"error\""):
                    stats["errors"] += 1
                n += 1
                if cancel and n >= 4:
                    stats["cancelled"] += 1
                    return  # leaving the block closes the connection mid-stream
            stats["ok"] += 1

    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=clients + 8)) as cl:
        for r in range(rounds):
            await asyncio.gather(*(one(cl, r * clients + i, rng.random() < 0.25) for i in range(clients)))
            gc.collect()
            stats.setdefault("rss_mb_after_round", []).append(round(rss_mb()))
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a random 2-layer model instead of SmolLM2-135M")
    ap.add_argument("--clients", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-batch", type=int, default=16)
    args = ap.parse_args()

    import torch
    from bench_serve import serve_in_thread

    from cotrt.async_engine import AsyncEngine
    from cotrt.models import load_model, load_tokenizer

    if args.tiny:
        from cotrt.testing import tiny_model

        tok = load_tokenizer("default", quiet=True)
        model = tiny_model("llama", len(tok), seed=1)
    else:
        model, tok = load_model("default")
    rt = cotrt.wrap(model, tok, max_batch=args.max_batch, max_len=512)
    engine = AsyncEngine(rt, max_queue=64)
    server, th, url = serve_in_thread(make_app(engine))
    print(f"# bench_hardening: {'tiny llama' if args.tiny else 'SmolLM2-135M'}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, max_batch {args.max_batch}")

    rows = run_cases(url)
    print("\n| bad input | status | param | expected |\n|---|---|---|---|")
    for name, status, param, want_s, want_p in rows:
        flag = "" if (status, param) == (want_s, want_p) else " **MISMATCH**"
        print(f"| {name} | {status} | {param or '-'} | {want_s} {want_p or '-'}{flag} |")
    n500 = sum(s >= 500 for _, s, *_ in rows)
    print(f"\n{len(rows)} classes, 500s: {n500}, mismatches: {sum((s, p) != (ws, wp) for _, s, p, ws, wp in rows)}")

    nbytes, drss, dt = pattern_memory(tok)
    print(f"\nlargest allowed pattern set (8 x 1,024 bytes): automaton {nbytes / 2**20:.1f} MB "
          f"(memo filled by a 20k-char scan), RSS +{drss:.1f} MB, built in {dt * 1e3:.0f} ms; "
          f"dense tables would be {12 * 8193 * len(tok) / 2**30:.1f} GB")

    gc.collect()
    before = rss_mb()
    t0 = time.perf_counter()
    stats = asyncio.run(load(url, args.clients, args.rounds, args.max_tokens))
    wall = time.perf_counter() - t0
    time.sleep(0.5)
    gc.collect()
    m = engine.metrics()
    print(f"\nload: {args.clients} streaming clients x {args.rounds} rounds, max_tokens {args.max_tokens}, "
          f"~25% hang up after 4 events: {stats}; {wall:.1f} s; RSS {before:.0f} -> {rss_mb():.0f} MB; "
          f"slots in use after: {m['slots_used']}, running {m['running']}, queued {m['queue_depth']}")
    server.should_exit = True
    th.join(10)
    return 1 if n500 or stats["500"] else 0


if __name__ == "__main__":
    sys.exit(main())
