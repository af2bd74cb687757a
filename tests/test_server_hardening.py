"""Hostile and malformed requests against the server (issue 13): every bad-input class of
bench/bench_hardening.py gets its status and names its field (no 500) while a good stream
runs; access checks; slow clients; client hang-ups mid-body; shutdown with open streams."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

import cotrt
from cotrt.testing import tiny_model
from cotrt.async_engine import AsyncEngine
from cotrt.server import header_timeout_protocol


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_hardening.py"
    spec = importlib.util.spec_from_file_location("bench_hardening", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


B = _bench()
AUTH = {"authorization": f"Bearer {B.API_KEY}"}


@contextmanager
def serve(app, header_timeout=10.0):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    cfg = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2,
                         http=header_timeout_protocol(header_timeout))
    server = uvicorn.Server(cfg)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        assert thread.is_alive() and time.monotonic() - t0 < 30
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def served(smol_tokenizer):
    rt = cotrt.wrap(tiny_model("llama", len(smol_tokenizer), seed=21), smol_tokenizer, max_batch=4, max_len=512)
    engine = AsyncEngine(rt, max_queue=16)
    app = B.create_app(engine, "m", api_key=B.API_KEY, allowed_hosts=B.LOOPBACK_HOSTS,
                       max_body_bytes=B.MAX_BODY, body_timeout=1.0)
    with serve(app, header_timeout=0.5) as (url, port):
        yield url, port, engine


def test_every_bad_input_class_gets_its_status_and_field(served):
    url, _, engine = served
    good = {"model": "m", "messages": B._MSG, "max_tokens": 40, "stream": True, "temperature": 0,
            "cotrt": {"ignore_eos": True}}
    with httpx.Client(base_url=url, timeout=60) as cl:
        with cl.stream("POST", "/v1/chat/completions", json=good, headers=AUTH) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data:")  # the good request is running
            got = []
            for case in B.CASES:
                resp = B.post(cl, case)
                err = resp.json()["error"]
                got.append((case[0], resp.status_code, err["param"]))
                assert err["type"] == ("invalid_request_error" if resp.status_code < 500 else "x"), err
            rest = [ln for ln in lines if ln.startswith("data:")]
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length" and rest[-1] == "data: [DONE]"
        ok = cl.post("/v1/chat/completions", json={"model": "m", "messages": B._MSG, "max_tokens": 3}, headers=AUTH)
        assert ok.status_code == 200, ok.text
    want = [(c[0], c[3], c[4]) for c in B.CASES]
    assert [g for g, w in zip(got, want) if g != w] == [], [w for g, w in zip(got, want) if g != w]
    assert engine.metrics()["requests"]["error"] == 0


def test_model_names_aliases_and_max_tokens(served):
    url, _, _ = served
    with httpx.Client(base_url=url, timeout=60, headers=AUTH) as cl:
        r = cl.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": B._MSG})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = cl.post("/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 512})
        assert r.status_code == 200  # --max-len itself is allowed (the prompt's room caps it)
        r = cl.post("/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 1,
                                              "temperature": 1e-300, "response_format": {"type": "text"}})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_tiny_temperature_is_greedy(served):
    url, _, _ = served
    body = {"model": "m", "prompt": "Once upon", "max_tokens": 8, "cotrt": {"ignore_eos": True}}
    with httpx.Client(base_url=url, timeout=60, headers=AUTH) as cl:
        texts = [cl.post("/v1/completions", json={**body, "temperature": t, "seed": 3}).json()["choices"][0]["text"]
                 for t in (0, 1e-300, 9e-6)]
    assert texts[0] == texts[1] == texts[2]


def test_access_api_key_health_docs(served):
    url, _, _ = served
    assert httpx.get(url + "/health").json() == {"status": "ok"}  # open
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/v1/models", headers=AUTH).json()["data"][0]["id"] == "m"
    assert httpx.get(url + "/metrics", headers={"authorization": "Bearer x"}).status_code == 401
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert httpx.get(url + path, headers=AUTH).status_code == 404
    assert httpx.get(url + "/health", headers={"host": "attacker.example"}).status_code == 403
    assert httpx.get(url.replace("127.0.0.1", "localhost") + "/health").status_code == 200


def test_slow_headers_are_cut_and_slow_bodies_get_408(served):
    _, port, engine = served
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
    s.settimeout(5)
    t0 = time.monotonic()
    assert s.recv(100) == b""  # closed by the server
    assert time.monotonic() - t0 < 3
    s.close()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Authorization: Bearer " + B.API_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"model\"")
    s.settimeout(5)
    assert s.recv(100).startswith(b"HTTP/1.1 408")
    s.close()


def test_hangup_mid_body_logs_one_line(served, caplog):
    _, port, _ = served
    caplog.set_level(logging.INFO)
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Authorization: Bearer " + B.API_KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{\"model\"")
    time.sleep(0.2)
    s.close()
    time.sleep(0.5)
    mine = [r for r in caplog.records if r.name.startswith(("cotrt", "uvicorn"))]
    assert [r.getMessage() for r in mine if r.levelno >= logging.INFO and "disconnected" in r.getMessage()]
    assert not [r for r in mine if r.exc_info], [r.getMessage() for r in mine]


def test_shutdown_ends_streams_with_an_error_and_refuses_new_requests(smol_tokenizer):
    rt = cotrt.wrap(tiny_model("llama", len(smol_tokenizer), seed=22), smol_tokenizer, max_batch=1, max_len=512)
    real = rt.engine.step
    rt.engine.step = lambda: (time.sleep(0.005), real())[1]
    engine = AsyncEngine(rt, max_queue=4)
    app = B.create_app(engine, "m")
    long = {"model": "m", "prompt": "Hi", "max_tokens": 400, "stream": True, "cotrt": {"ignore_eos": True}}
    with serve(app) as (url, _), httpx.Client(base_url=url, timeout=30) as cl:
        with cl.stream("POST", "/v1/completions", json=long) as a, \
                cl.stream("POST", "/v1/completions", json=long) as b:  # running, queued
            la = a.iter_lines()
            assert next(la).startswith("data:")
            assert b.status_code == 200
            asyncio.run(app.state.begin_shutdown())
            for lines in (la, b.iter_lines()):
                data = [ln for ln in lines if ln.startswith("data:")]
                assert data[-1] == "data: [DONE]"
                assert json.loads(data[-2][6:])["error"]["type"] == "service_unavailable"
        r = cl.post("/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 503
