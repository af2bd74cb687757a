"""The server's routes driven alone (cotrt.server.app.Routes): a fake backend and request,
no FastAPI app, no socket, no model."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")

from cotrt.control.think import ThinkFormat  # noqa: E402
from cotrt.output import Output  # noqa: E402
from cotrt.server import Routes  # noqa: E402


class FakeRequest:
    """A request as the engine hands it back: events, then ``output``."""

    def __init__(self, texts, output, thinking=True):
        self.texts, self.output_when_done, self.thinking = texts, output, thinking
        self.output, self.outputs, self.aborted = None, [], False
        self.params = SimpleNamespace(n=1)

    def __aiter__(self):
        return self._events()

    def index(self, ev):
        return 0

    async def _events(self):
        for i, t in enumerate(self.texts):
            last = i == len(self.texts) - 1
            if last:
                self.output = self.output_when_done
                self.outputs = [self.output]
            yield SimpleNamespace(text=t, finished=last, output=self.output if last else None, request_id=0)

    def abort(self):
        self.aborted = True


class FakeBackend:
    think_format = ThinkFormat()
    max_len = 64
    running = True

    def __init__(self, texts=("<think>", "so", "</think>", " 4")):
        self.texts, self.submitted = list(texts), []

    def metrics(self):
        return {"requests": {"finished": 1}, "tokens": {"prompt": 3}, "steps": 2, "queue_depth": 0, "running": 0,
                "slots_used": 0, "slots_total": 1}

    async def submit(self, prompt, params, ctk):
        self.submitted.append((prompt, params))
        text = "".join(self.texts)
        out = Output(0, [1], [5] * len(self.texts), text, "so", "4", "stop", {"prompt_tokens": 1})
        return FakeRequest(self.texts, out)


class FakeHTTPRequest:
    def __init__(self, body: bytes):
        self.body, self.headers, self.client = body, {"content-length": str(len(body))}, None

    async def stream(self):
        yield self.body

    async def receive(self):
        await asyncio.sleep(3600)


def run(coro):
    return asyncio.run(coro)


def test_models_and_metrics_need_no_app():
    routes = Routes(FakeBackend(), "tiny", aliases=("tiny-alias",))
    models = run(routes.models())
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["data"][0]["max_model_len"] == 64
    routes.invalid = 2
    text = run(routes.metrics()).body.decode()
    assert 'cotrt_requests_total{outcome="invalid"} 2' in text


def test_a_bad_body_is_counted_and_never_submitted():
    backend = FakeBackend()
    routes = Routes(backend, "tiny")
    resp = run(routes.serve(FakeHTTPRequest(b"{not json"), chat=True))
    assert resp.status_code == 400 and routes.invalid == 1 and backend.submitted == []
    resp = run(routes.serve(FakeHTTPRequest(json.dumps({"model": "other", "prompt": "x"}).encode()), chat=False))
    assert resp.status_code == 404 and routes.invalid == 2


def test_a_whole_chat_response_splits_reasoning():
    backend = FakeBackend()
    routes = Routes(backend, "tiny")
    body = {"messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 8}
    resp = run(routes.serve(FakeHTTPRequest(json.dumps(body).encode()), chat=True))
    msg = json.loads(resp.body)["choices"][0]["message"]
    assert resp.status_code == 200 and msg == {"role": "assistant", "content": "4", "reasoning_content": "so"}
    assert backend.submitted[0][1].max_new_tokens == 8


def test_a_chat_stream_ends_with_done():
    routes = Routes(FakeBackend(), "tiny")

    async def collect():
        req = await routes.backend.submit("p", None, None)
        return [line async for line in routes.chat_stream(req, "id", False)]

    lines = run(collect())
    deltas = [json.loads(x[6:])["choices"][0]["delta"] for x in lines[:-1]]
    assert lines[-1] == "data: [DONE]\n\n"
    assert {"reasoning_content": "so"} in deltas and {"content": "4"} in deltas


def test_shutdown_refuses_new_requests():
    routes = Routes(FakeBackend(), "tiny")
    routes.backend.running = False  # nothing to stop
    run(routes.begin_shutdown())
    body = {"prompt": "x"}
    resp = run(routes.serve(FakeHTTPRequest(json.dumps(body).encode()), chat=False))
    assert resp.status_code == 503
