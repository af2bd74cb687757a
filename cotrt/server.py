"""The OpenAI-compatible server: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
``/health``, ``/metrics`` over an ``AsyncEngine``.

Reasoning is returned apart from the answer, as ``reasoning_content`` (the field reasoning
clients read): in the message for a whole response, in the deltas for a stream. cotrt's
controls ride in a ``cotrt`` object of the request and go straight to ``Params.from_dict``,
so a control added to Params works here without server changes.

The app talks to its backend through a small protocol (``submit`` -> an async iterable of
``Event`` with ``.output``, ``.abort()``, ``.thinking``; ``running``; ``metrics()``;
``think_format``; ``max_len``; ``start()``/``shutdown()``), which ``AsyncEngine`` implements and
bench/bench_serve.py's one-at-a-time HF ``generate`` baseline imitates.
"""

import asyncio
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager

from .params import Params

log = logging.getLogger("cotrt.server")

# Aliases other servers use for the thinking budget (vLLM/SGLang-style top-level fields).
THINK_BUDGET_ALIASES = ("thinking_budget", "max_thinking_tokens")
# OpenAI fields we cannot honour: accepted only at their "off" value, so a client never
# silently gets something other than what it asked for.
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
               "best_of": (None, 1), "suffix": (None, ""), "tools": (None, []),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0)}
# apply_chat_template's own arguments: a client may set template variables
# (enable_thinking=...), not swap the template or how it tokenizes.
RESERVED_TEMPLATE_KWARGS = {"conversation", "tools", "documents", "chat_template", "add_generation_prompt",
                            "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                            "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}
_KIND_NAMES = {"int": "an integer", "number": "a number", "bool": "a boolean", "dict": "an object"}


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# -- request parsing -----------------------------------------------------------------------------

def _typed(body: dict, name: str, kind: str, lo=None, hi=None):
    """body[name] checked against ``kind`` ("int", "number", "bool", "dict"); None if absent."""
    v = body.get(name)
    if v is None:
        return None
    ok = {"int": isinstance(v, int) and not isinstance(v, bool),
          "number": isinstance(v, (int, float)) and not isinstance(v, bool),
          "bool": isinstance(v, bool), "dict": isinstance(v, dict)}[kind]
    if not ok:
        raise BadRequest(f"{name} must be {_KIND_NAMES[kind]}, got {json.dumps(v)}", name)
    if lo is not None and v < lo:
        raise BadRequest(f"{name} must be >= {lo}, got {v}", name)
    if hi is not None and v > hi:
        raise BadRequest(f"{name} must be <= {hi}, got {v}", name)
    return v


def parse_params(body: dict, max_len: int) -> tuple[Params, bool, bool]:
    """(Params, stream, include_usage) from an OpenAI request body."""
    for name, off in UNSUPPORTED.items():
        if name in body and body[name] not in off:
            raise BadRequest(f"{name} is not supported by this server", name)
    if _typed(body, "n", "int", lo=1) not in (None, 1):
        raise BadRequest("n: only n=1 is supported", "n")
    stream = bool(_typed(body, "stream", "bool"))
    opts = _typed(body, "stream_options", "dict") or {}
    include_usage = bool(_typed(opts, "include_usage", "bool"))
    d: dict = {"temperature": 1.0}  # OpenAI's default
    # max_completion_tokens is the newer name; without either, generate up to max_len.
    mt = _typed(body, "max_completion_tokens", "int", lo=1) or _typed(body, "max_tokens", "int", lo=1)
    d["max_new_tokens"] = mt or max_len
    for name, kind in (("temperature", "number"), ("top_p", "number"), ("seed", "int"), ("top_k", "int")):
        v = _typed(body, name, kind)
        if v is not None:
            d[name] = 0 if name == "top_k" and v == -1 else v  # vLLM's -1 = off
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise BadRequest("stop must be a string or a list of strings", "stop")
        d["stop"] = tuple(s for s in stop if s)
    bias = _typed(body, "logit_bias", "dict")
    if bias:
        try:
            d["logit_bias"] = {int(k): v for k, v in bias.items()}
        except ValueError:
            raise BadRequest("logit_bias keys must be token ids", "logit_bias") from None
    for alias in THINK_BUDGET_ALIASES:
        v = _typed(body, alias, "int", lo=0)
        if v is not None:
            d["think_budget"] = v
    thinking = _typed(body, "thinking", "dict")  # {"type": "enabled", "budget_tokens": N}
    if thinking and thinking.get("budget_tokens") is not None:
        d["think_budget"] = _typed(thinking, "budget_tokens", "int", lo=0)
    ext = _typed(body, "cotrt", "dict")
    if ext:
        d.update(ext)  # cotrt's own names win over the OpenAI spellings
    try:
        return Params.from_dict(d), stream, include_usage
    except (ValueError, TypeError) as e:
        raise BadRequest(str(e), _param_of(str(e))) from None


_FIELD = re.compile(r"^(?:unknown parameter\(s\): )?([A-Za-z_]\w*)")


def _param_of(message: str) -> str | None:
    m = _FIELD.match(message)
    return m.group(1) if m else None


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string role", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def parse_prompt(body: dict):
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str) and p:
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return p
    raise BadRequest("prompt must be a non-empty string or list of token ids (one prompt per request)",
                     "prompt")


def parse_request(body, chat: bool, max_len: int):
    """(prompt, Params, stream, include_usage, chat_template_kwargs) of a request body."""
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object", "body")
    params, stream, include_usage = parse_params(body, max_len)
    prompt = parse_messages(body) if chat else parse_prompt(body)
    ctk = _typed(body, "chat_template_kwargs", "dict") if chat else None
    if ctk and RESERVED_TEMPLATE_KWARGS & set(ctk):
        bad = sorted(RESERVED_TEMPLATE_KWARGS & set(ctk))[0]
        raise BadRequest(f"chat_template_kwargs: {bad} cannot be set by a request", "chat_template_kwargs")
    return prompt, params, stream, include_usage, ctk


# -- reasoning / content split of a stream ---------------------------------------------------------

def _partial(buf: str, marker: str) -> int:
    """Length of the longest end of ``buf`` that begins ``marker`` (a marker split over events)."""
    for k in range(min(len(marker) - 1, len(buf)), 0, -1):
        if buf.endswith(marker[:k]):
            return k
    return 0


class ReasoningSplitter:
    """Splits streamed text into ("reasoning_content" | "content", text) parts by the think
    format's markers, so that the parts add up to ``Output.reasoning`` / ``Output.answer``
    (markers dropped, each part stripped). A marker split across events is held back until
    it is complete; so is trailing whitespace, which ``strip()`` would remove at the end.
    Text before an opening marker streams as content (``Output`` drops it: it cannot be
    held until we know whether a marker follows)."""

    def __init__(self, fmt, thinking: bool):
        self.start = None if fmt.plain else fmt.start
        self.end = fmt.end
        self.drop_end = not fmt.plain  # a second end marker carries nothing (engine._drop)
        self.phase = "think" if thinking else "pre"
        self.buf, self.pending, self.fresh = "", "", True
        self.out: list[list[str]] = []

    def _markers(self) -> list[str]:
        if self.phase == "think":
            return [self.end]
        ms = [self.start] if self.phase == "pre" and self.start else []
        return ms + ([self.end] if self.drop_end else [])

    def feed(self, text: str) -> list[list[str]]:
        self.out = []
        self.buf += text
        while True:
            marks = self._markers()
            hits = sorted((self.buf.find(m), m) for m in marks if m in self.buf)
            if not hits:
                break
            i, m = hits[0]
            self._emit(self.buf[:i])
            self.buf = self.buf[i + len(m):]
            if self.phase == "pre" and m == self.start:
                self._section("think")
            elif self.phase == "think":
                self._section("answer")
        keep = max((_partial(self.buf, m) for m in self._markers()), default=0)
        self._emit(self.buf[:len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep:]
        return self.out

    def flush(self) -> list[list[str]]:
        self.out = []
        self._emit(self.buf)
        self.buf = self.pending = ""
        return self.out

    def _section(self, phase: str) -> None:
        self.phase, self.pending, self.fresh = phase, "", True

    def _emit(self, s: str) -> None:
        if self.fresh:
            s = s.lstrip()
            if not s:
                return
            self.fresh = False
        body = s.rstrip()
        if not body:
            self.pending += s
            return
        kind = "reasoning_content" if self.phase == "think" else "content"
        text = self.pending + body
        self.pending = s[len(body):]
        if self.out and self.out[-1][0] == kind:
            self.out[-1][1] += text
        else:
            self.out.append([kind, text])


# -- responses -------------------------------------------------------------------------------------

def error_response(status: int, message: str, param: str | None = None, headers=None):
    from fastapi.responses import JSONResponse

    kind = {400: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}
    body = {"error": {"message": message, "type": kind.get(status, "server_error"), "param": param,
                      "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def _usage(out, split: bool) -> dict:
    s = out.stats or {}
    prompt, completion = s.get("prompt_tokens", 0), len(out.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "completion_tokens_details": {"reasoning_tokens": s.get("think_tokens", 0)}}


def whole_response(out, rid: str, chat: bool, split: bool, model_name: str) -> dict:
    """The non-streaming response body of a finished request."""
    if not chat:
        choice = {"index": 0, "text": out.text, "finish_reason": out.finish_reason, "logprobs": None}
    else:
        # The engine's split (Output): a plain model's reply is all answer unless a control
        # forced the answer cue, and then the text before the cue is reasoning.
        message = {"role": "assistant", "content": out.answer, "reasoning_content": out.reasoning or None}
        choice = {"index": 0, "message": message, "finish_reason": out.finish_reason, "logprobs": None}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model_name, "choices": [choice], "usage": _usage(out, split), "cotrt": {"stats": out.stats}}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, default=str)}\n\n"


def prometheus(m: dict, prefix: str = "cotrt") -> str:
    """Prometheus text exposition of ``AsyncEngine.metrics()``."""
    lines = []

    def metric(name, kind, help_, samples):
        lines.append(f"# HELP {prefix}_{name} {help_}")
        lines.append(f"# TYPE {prefix}_{name} {kind}")
        for labels, v in samples:
            lines.append(f"{prefix}_{name}{labels} {v}")

    metric("requests_total", "counter", "Requests by outcome.",
           [(f'{{outcome="{k}"}}', v) for k, v in m["requests"].items()])
    metric("tokens_total", "counter", "Tokens by phase (prompt, think, answer).",
           [(f'{{phase="{k}"}}', v) for k, v in m["tokens"].items() if k != "probe"])
    metric("probe_tokens_total", "counter", "Tokens decoded by early-exit probes (rolled back).",
           [("", m["tokens"].get("probe", 0))])
    metric("engine_steps_total", "counter", "Engine steps.", [("", m["steps"])])
    metric("queue_depth", "gauge", "Requests waiting for a slot.", [("", m["queue_depth"])])
    metric("running_requests", "gauge", "Requests decoding in a slot.", [("", m["running"])])
    metric("slots_used", "gauge", "KV-cache slots in use.", [("", m["slots_used"])])
    metric("slots_total", "gauge", "KV-cache slots (max_batch).", [("", m["slots_total"])])
    return "\n".join(lines) + "\n"


# -- the app ---------------------------------------------------------------------------------------

def create_app(async_engine, model_name: str, split_plain: bool = False):
    """A FastAPI app serving ``async_engine`` as ``model_name``.

    The app starts the engine on startup if it is not running (and then shuts it down on
    exit). ``split_plain``: for a model without think markers, split its output at the
    answer cue into reasoning_content / content; by default such output is all content.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

    from .async_engine import QueueFull

    backend = async_engine
    fmt = backend.think_format
    split = not fmt.plain or split_plain
    created = int(time.time())
    invalid = [0]  # 400s answered here, before the engine saw the request

    @asynccontextmanager
    async def lifespan(app):
        owned = not backend.running
        if owned:
            backend.start()
        yield
        if owned:
            await asyncio.get_running_loop().run_in_executor(None, backend.shutdown)

    app = FastAPI(title="cotrt", lifespan=lifespan)

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

    @app.exception_handler(Exception)
    async def _internal(request, exc):  # noqa: ARG001
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}")

    @app.get("/health")
    async def health():
        if not backend.running:
            return JSONResponse({"status": "down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "cotrt", "max_model_len": backend.max_len}]}

    @app.get("/metrics")
    async def metrics():
        m = backend.metrics()
        m["requests"]["invalid"] = m["requests"].get("invalid", 0) + invalid[0]
        return PlainTextResponse(prometheus(m), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _serve(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _serve(request, chat=False)

    async def _serve(request, chat: bool):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            invalid[0] += 1
            return error_response(400, f"body: invalid JSON ({e})", "body")
        try:
            prompt, params, stream, include_usage, ctk = parse_request(body, chat, backend.max_len)
        except BadRequest as e:
            invalid[0] += 1
            return error_response(400, str(e), e.param)
        try:
            req = await backend.submit(prompt, params, ctk)
        except QueueFull as e:
            return error_response(429, str(e), headers={"Retry-After": str(e.retry_after)})
        except ValueError as e:
            msg = str(e)
            if chat and msg.startswith("prompt"):  # the prompt came from the messages
                msg = "messages (templated prompt)" + msg[len("prompt"):]
            return error_response(400, msg, _param_of(msg))
        except RuntimeError as e:  # engine not running
            return error_response(503, str(e))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if stream:
            gen = _chat_stream if chat else _text_stream
            return SSEResponse(gen(req, rid, include_usage), req)
        watcher = asyncio.ensure_future(_abort_on_disconnect(request, req))
        try:
            async for _ in req:
                pass
        finally:
            watcher.cancel()
        out = req.output
        if out.finish_reason == "error":
            return error_response(500, f"generation failed: {out.error}")
        body = whole_response(out, rid, chat, split, model_name)
        return Response(json.dumps(body, default=str), media_type="application/json")

    def _chunk(rid, obj, choice, include_usage):
        c = {"id": rid, "object": obj, "created": int(time.time()), "model": model_name, "choices": [choice]}
        if include_usage:
            c["usage"] = None
        return c

    async def _chat_stream(req, rid, include_usage):
        obj = "chat.completion.chunk"
        # A plain model streams as content (stripped as Output.answer is): a stream cannot
        # take back the text sent before a budget forces the answer cue.
        splitter = ReasoningSplitter(fmt, req.thinking if split else False)
        yield _sse(_chunk(rid, obj, {"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": None}, include_usage))
        async for ev in req:
            parts = splitter.feed(ev.text) + (splitter.flush() if ev.finished else [])
            for kind, text in parts:
                yield _sse(_chunk(rid, obj, {"index": 0, "delta": {kind: text}, "finish_reason": None},
                                  include_usage))
        async for line in _finish(req, rid, obj, include_usage, {"index": 0, "delta": {}}):
            yield line

    async def _text_stream(req, rid, include_usage):
        obj = "text_completion"
        async for ev in req:
            if ev.text:
                yield _sse(_chunk(rid, obj, {"index": 0, "text": ev.text, "finish_reason": None,
                                             "logprobs": None}, include_usage))
        async for line in _finish(req, rid, obj, include_usage, {"index": 0, "text": "", "logprobs": None}):
            yield line

    async def _finish(req, rid, obj, include_usage, last):
        out = req.output
        if out.finish_reason == "error":
            yield _sse({"error": {"message": f"generation failed: {out.error}", "type": "server_error",
                                  "param": None, "code": None}})
        else:
            chunk = _chunk(rid, obj, {**last, "finish_reason": out.finish_reason}, include_usage)
            chunk["cotrt"] = {"stats": out.stats}
            yield _sse(chunk)
            if include_usage:
                yield _sse({"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
                            "choices": [], "usage": _usage(out, split)})
        yield "data: [DONE]\n\n"

    return app


async def _abort_on_disconnect(request, req) -> None:
    """A non-streaming request whose client hangs up is aborted (uvicorn does not cancel
    the handler): wait on the connection's receive channel for http.disconnect."""
    while True:
        msg = await request.receive()
        if msg.get("type") == "http.disconnect":
            req.abort()
            return


# -- `cotrt serve` ---------------------------------------------------------------------------------

def add_serve_arguments(p) -> None:
    p.add_argument("--model", default="default", help="local HF checkpoint directory, or 'default' (SmolLM2)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: from --model)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (KV slots)")
    p.add_argument("--max-len", type=int, default=2048, help="prompt + output tokens per request")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond max-batch; then 429")
    p.add_argument("--split-plain-reasoning", action="store_true",
                   help="for a model without think markers, stream its text as reasoning_content until the answer "
                        "cue (without it, content; a whole response always splits at a forced cue)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level")


def run_serve(args) -> int:
    """Load the model and serve until interrupted; 2 on bad arguments."""
    import sys

    import uvicorn

    from .api import wrap
    from .async_engine import AsyncEngine
    from .models import DEFAULT_MODEL, load_model

    try:
        model, tok = load_model(args.model)
        engine = AsyncEngine(wrap(model, tok, max_batch=args.max_batch, max_len=args.max_len),
                             max_queue=args.max_queue)
    except ValueError as e:
        print(f"cotrt serve: {e}", file=sys.stderr)
        return 2
    name = args.served_model_name or (DEFAULT_MODEL if args.model == "default" else args.model.rstrip("/"))
    app = create_app(engine, name, split_plain=args.split_plain_reasoning)
    print(f"[cotrt] serving {name} on http://{args.host}:{args.port}/v1 (think format: {engine.think_format})",
          file=sys.stderr, flush=True)
    # Open streams get 5 s to finish on shutdown; then they are cut (and their requests aborted).
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


__all__ = ["create_app", "add_serve_arguments", "run_serve", "ReasoningSplitter", "parse_params", "prometheus"]
