"""The FastAPI app: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/health``,
``/metrics`` over an ``AsyncEngine``.

The routes' logic is :class:`Routes`, a plain object over the backend (no FastAPI in its
constructor), so each route can be driven alone with a fake backend and request;
:func:`create_app` only wires it into a FastAPI app behind the guard middleware.

The app talks to its backend through a small protocol (``submit`` -> an async iterable of
``Event`` with ``.output``, ``.abort()``, ``.thinking``; ``running``; ``metrics()``;
``think_format``; ``max_len``; ``start()``/``shutdown()``), which ``AsyncEngine`` implements and
bench/bench_serve.py's one-at-a-time HF ``generate`` baseline imitates.
"""
# No ``from __future__ import annotations``: FastAPI reads the routes' ``Request`` annotation.
import asyncio
import functools
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from .guard import _Guard
from .protocol import BODY_TIMEOUT_S, MAX_BODY_BYTES, BadRequest, param_of, parse_json, parse_request
from .reasoning import ReasoningSplitter
from .responses import _sse, error_response, prometheus, usage, whole_response

log = logging.getLogger("cotrt.server")


@functools.lru_cache(maxsize=None)
def _sse_response_class():
    """``SSEResponse``, built on first use (fastapi is the ``serve`` extra)."""
    from fastapi.responses import StreamingResponse

    class SSEResponse(StreamingResponse):
        """Aborts its request however the response ends (client gone, send failed, the
        generator never started)."""

        def __init__(self, content, req):
            super().__init__(content, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self.req = req

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                if self.req.output is None:
                    self.req.abort()

    return SSEResponse


class Routes:
    """What each route does, for one backend served as ``model_name`` (see :func:`create_app`
    for the arguments). State: ``closing`` (set by :meth:`begin_shutdown`: new requests get
    503) and ``invalid`` (400s answered here, before the engine saw the request)."""

    def __init__(self, backend, model_name: str, split_plain: bool = False, *, aliases=(),
                 max_body_bytes: int = MAX_BODY_BYTES, body_timeout: float = BODY_TIMEOUT_S):
        self.backend = backend
        self.fmt = backend.think_format
        self.split = not self.fmt.plain or split_plain
        self.model_name = model_name
        self.names = {model_name, *aliases}
        self.created = int(time.time())
        self.max_body_bytes, self.body_timeout = max_body_bytes, body_timeout
        self.invalid = 0
        self.closing = False

    async def begin_shutdown(self) -> None:
        self.closing = True
        if self.backend.running:
            await asyncio.get_running_loop().run_in_executor(None, self.backend.shutdown)

    # -- GET routes ---------------------------------------------------------------------------

    async def health(self):
        from fastapi.responses import JSONResponse

        if not self.backend.running:
            return JSONResponse({"status": "down"}, status_code=503)
        return {"status": "ok"}

    async def models(self):
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "cotrt", "max_model_len": self.backend.max_len}]}

    async def metrics(self):
        from fastapi.responses import PlainTextResponse

        m = self.backend.metrics()
        m["requests"]["invalid"] = m["requests"].get("invalid", 0) + self.invalid
        return PlainTextResponse(prometheus(m), media_type="text/plain; version=0.0.4")

    # -- POST routes: a completion, whole or streamed ----------------------------------------

    async def read_body(self, request) -> bytes | None:
        """The body, at most ``max_body_bytes`` within ``body_timeout``; None when the
        client hung up mid-body (logged in one line: nobody is left to answer)."""
        from starlette.requests import ClientDisconnect

        limit = self.max_body_bytes
        n = request.headers.get("content-length", "")
        if n.isdigit() and int(n) > limit:
            raise BadRequest(f"body: {n} bytes, at most {limit}", "body", status=413)
        chunks, size = [], 0

        async def read():
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BadRequest(f"body: more than {limit} bytes", "body", status=413)
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.body_timeout)
        except asyncio.TimeoutError:
            raise BadRequest(f"body: not received within {self.body_timeout:g} s", "body", status=408) from None
        except ClientDisconnect:
            client = request.client
            log.info("client %s disconnected before its request body was complete",
                     f"{client.host}:{client.port}" if client else "?")
            return None
        return b"".join(chunks)

    async def serve(self, request, chat: bool):
        """``/v1/chat/completions`` (``chat``) or ``/v1/completions``."""
        from fastapi.responses import Response

        from ..async_engine import QueueFull

        backend = self.backend
        body = None
        try:
            raw = await self.read_body(request)
            if raw is None:
                return Response(status_code=400)
            body = parse_json(raw)
            if isinstance(body, dict) and "model" in body and body["model"] not in self.names:
                raise BadRequest(f"model: {json.dumps(body['model'])} is not served here (this is "
                                 f"{self.model_name!r})", "model", status=404, code="model_not_found")
            prompt, params, stream, include_usage, ctk = parse_request(body, chat, backend.max_len)
        except BadRequest as e:
            self.invalid += 1
            return error_response(e.status, str(e), e.param, code=e.code)
        if self.closing:
            return error_response(503, "the server is shutting down")
        try:
            req = await backend.submit(prompt, params, ctk)
        except QueueFull as e:
            return error_response(429, str(e), headers={"Retry-After": str(e.retry_after)})
        except ValueError as e:
            msg = str(e)
            param = param_of(msg, body, chat)
            if chat and msg.startswith("prompt"):  # the prompt came from the messages
                msg = "messages (templated prompt)" + msg[len("prompt"):]
            return error_response(400, msg, param)
        except RuntimeError as e:  # engine not running (or shutting down)
            return error_response(503, str(e))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if stream:
            gen = self.chat_stream if chat else self.text_stream
            return _sse_response_class()(gen(req, rid, include_usage), req)
        watcher = asyncio.ensure_future(_abort_on_disconnect(request, req))
        try:
            async for _ in req:
                pass
        finally:
            watcher.cancel()
        outs = req.outputs or [req.output]
        failed = next((o for o in outs if o.finish_reason == "error"), None)
        if failed is not None:
            return error_response(500, f"generation failed: {failed.error}")
        if self.closing and any(o.finish_reason == "abort" for o in outs):
            return error_response(503, "the server shut down before the request finished")
        body = whole_response(outs, rid, chat, self.model_name)
        return Response(json.dumps(body, default=str), media_type="application/json")

    def chunk(self, rid, obj, choice, include_usage) -> dict:
        c = {"id": rid, "object": obj, "created": int(time.time()), "model": self.model_name, "choices": [choice]}
        if include_usage:
            c["usage"] = None
        return c

    async def chat_stream(self, req, rid, include_usage):
        obj = "chat.completion.chunk"
        # A plain model streams as content (stripped as Output.answer is): a stream cannot
        # take back the text sent before a budget forces the answer cue.
        n = req.params.n
        splitters = [ReasoningSplitter(self.fmt, req.thinking if self.split else False) for _ in range(n)]
        for i in range(n):
            yield _sse(self.chunk(rid, obj, {"index": i, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}, include_usage))
        async for ev in req:
            i = req.index(ev)
            parts = splitters[i].feed(ev.text) + (splitters[i].flush() if ev.finished else [])
            for kind, text in parts:
                yield _sse(self.chunk(rid, obj, {"index": i, "delta": {kind: text}, "finish_reason": None},
                                      include_usage))
            if ev.finished:
                for line in self.finish_choice(ev.output, rid, obj, include_usage, {"index": i, "delta": {}}):
                    yield line
        for line in self.finish(req, rid, obj, include_usage):
            yield line

    async def text_stream(self, req, rid, include_usage):
        obj = "text_completion"
        async for ev in req:
            i = req.index(ev)
            if ev.text:
                yield _sse(self.chunk(rid, obj, {"index": i, "text": ev.text, "finish_reason": None,
                                                 "logprobs": None}, include_usage))
            if ev.finished:
                last = {"index": i, "text": "", "logprobs": None}
                for line in self.finish_choice(ev.output, rid, obj, include_usage, last):
                    yield line
        for line in self.finish(req, rid, obj, include_usage):
            yield line

    def finish_choice(self, out, rid, obj, include_usage, last):
        """One choice's last event: its finish reason and stats (or an error event)."""
        if out.finish_reason == "error":
            yield _sse({"error": {"message": f"generation failed: {out.error}", "type": "server_error",
                                  "param": None, "code": None}})
        elif out.finish_reason == "abort" and self.closing:
            yield _sse({"error": {"message": "the server shut down before the request finished",
                                  "type": "service_unavailable", "param": None, "code": None}})
        else:
            chunk = self.chunk(rid, obj, {**last, "finish_reason": out.finish_reason}, include_usage)
            chunk["cotrt"] = {"stats": out.stats}
            yield _sse(chunk)

    def finish(self, req, rid, obj, include_usage):
        """A stream's last events: usage (when asked, and every choice ended normally), ``[DONE]``."""
        outs = req.outputs or [req.output]
        ok = all(o.finish_reason != "error" and not (o.finish_reason == "abort" and self.closing) for o in outs)
        if include_usage and ok:
            yield _sse({"id": rid, "object": obj, "created": int(time.time()), "model": self.model_name,
                        "choices": [], "usage": usage(outs)})
        yield "data: [DONE]\n\n"


async def _abort_on_disconnect(request, req) -> None:
    """A non-streaming request whose client hangs up is aborted (uvicorn does not cancel
    the handler): wait on the connection's receive channel for http.disconnect."""
    while True:
        msg = await request.receive()
        if msg.get("type") == "http.disconnect":
            req.abort()
            return


def create_app(async_engine, model_name: str, split_plain: bool = False, *, aliases=(), api_key: str | None = None,
               allowed_hosts=None, max_body_bytes: int = MAX_BODY_BYTES, body_timeout: float = BODY_TIMEOUT_S,
               docs: bool = False):
    """A FastAPI app serving ``async_engine`` as ``model_name``.

    The app starts the engine on startup if it is not running (and then shuts it down on
    exit). ``split_plain``: for a model without think markers, split its output at the
    answer cue into reasoning_content / content; by default such output is all content.
    ``aliases``: other ``model`` values accepted (any other is a 404 model_not_found).
    ``api_key``: required as ``Authorization: Bearer`` on every route but /health.
    ``allowed_hosts``: the ``Host`` names accepted (None: any; ``LOOPBACK_HOSTS`` when
    bound to loopback). ``max_body_bytes``: larger bodies get 413; ``body_timeout``: a body
    not received within it gets 408. ``docs``: serve /docs and /openapi.json.

    ``app.state.begin_shutdown()`` (async) stops the engine: open streams end with an error
    event and ``[DONE]``, requests waiting get 503; ``cotrt serve`` calls it first thing on
    shutdown, before uvicorn waits for the connections. ``app.state.routes`` is the
    :class:`Routes` object behind the app.
    """
    from fastapi import FastAPI, Request

    routes = Routes(async_engine, model_name, split_plain, aliases=aliases, max_body_bytes=max_body_bytes,
                    body_timeout=body_timeout)
    backend = async_engine

    @asynccontextmanager
    async def lifespan(app):
        owned = not backend.running
        if owned:
            backend.start()
        yield
        if owned:
            routes.closing = True
            await asyncio.get_running_loop().run_in_executor(None, backend.shutdown)

    off = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="cotrt", lifespan=lifespan, **off)
    app.add_middleware(_Guard, api_key=api_key, allowed_hosts=allowed_hosts)
    app.state.begin_shutdown = routes.begin_shutdown
    app.state.routes = routes

    @app.exception_handler(Exception)
    async def _internal(request, exc):  # noqa: ARG001
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}")

    app.get("/health")(routes.health)
    app.get("/v1/models")(routes.models)
    app.get("/metrics")(routes.metrics)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await routes.serve(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await routes.serve(request, chat=False)

    return app
