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
# Every top-level field a request may carry; anything else is a 400 naming it (a typo such as
# "max_token" would otherwise be dropped silently).
KNOWN_FIELDS = {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                "top_k", "n", "stream", "stream_options", "stop", "seed", "logit_bias", "user",
                "response_format", "tool_choice", "parallel_tool_calls", "chat_template_kwargs", "thinking",
                "cotrt", *UNSUPPORTED, *THINK_BUDGET_ALIASES}
ROLES = ("system", "user", "assistant")
MAX_JSON_DEPTH = 32  # nesting of a request body; json.loads itself recursed past ~1,000 levels (500)
MAX_BODY_BYTES = 1 << 20  # 1 MiB: ~250k tokens of text, far past any --max-len
HEADER_TIMEOUT_S = 10.0  # a connection gets this long to send a request's headers
BODY_TIMEOUT_S = 30.0  # and this long to send its body
_DECIMAL = re.compile(r"[0-9]+")


class BadRequest(ValueError):
    """A request refused before it reaches the engine: ``status`` (400 unless said),
    ``param`` the JSON field at fault, ``code`` OpenAI's error code where it has one."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


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
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise BadRequest(f"{unknown[0]}: unknown field", unknown[0])
    rf = body.get("response_format")
    if rf is not None and rf != {"type": "text"}:
        raise BadRequest("response_format: only {\"type\": \"text\"} is supported", "response_format")
    if body.get("tool_choice") not in (None, "none"):
        raise BadRequest("tool_choice: tools are not supported by this server", "tool_choice")
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
    mt = _typed(body, "max_completion_tokens", "int", lo=1, hi=max_len) or \
        _typed(body, "max_tokens", "int", lo=1, hi=max_len)  # past --max-len: refused, not clamped
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
        bad = [k for k in bias if not _DECIMAL.fullmatch(k)]  # int() took " 5 ", "1_0" and Arabic digits
        if bad:
            raise BadRequest(f"logit_bias: keys must be token ids in decimal digits, got {json.dumps(bad[0])}",
                             "logit_bias")
        d["logit_bias"] = {int(k): v for k, v in bias.items()}
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
        raise BadRequest(str(e), param_of(str(e), body)) from None


_FIELD = re.compile(r"^(unknown parameter\(s\): )?([A-Za-z_]\w*)")


def param_of(message: str, body, chat: bool = True) -> str | None:
    """The JSON field a Params / engine error message is about (the message starts with
    the Params field, a policy's name, "prompt" ...): "max_tokens", "cotrt.exit", ..."""
    from .control.policies import POLICIES

    m = _FIELD.match(message)
    if m is None:
        return None
    name = m.group(2)
    body = body if isinstance(body, dict) else {}
    ext = body.get("cotrt") if isinstance(body.get("cotrt"), dict) else {}
    if m.group(1):  # an unknown key of the cotrt object
        return f"cotrt.{name}"
    if name in POLICIES or name == "exit":
        return "cotrt.exit"
    if name in ("prompt", "messages"):
        return "messages" if chat else "prompt"
    if name in ext:
        return f"cotrt.{name}"
    if name == "max_new_tokens":
        return "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if name == "think_budget":
        alias = next((a for a in THINK_BUDGET_ALIASES if a in body), None)
        return alias or ("thinking.budget_tokens" if "thinking" in body else "cotrt.think_budget")
    if name in body or name in ("stop", "logit_bias", "temperature", "top_p", "top_k", "seed"):
        return name
    return f"cotrt.{name}" if name in Params.__dataclass_fields__ else None


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string role", "messages")
        if m["role"] not in ROLES:  # "tool", "function", ...: nothing here can honour them
            raise BadRequest(f"messages[{i}].role: {json.dumps(m['role'])} is not one of {', '.join(ROLES)}",
                             f"messages[{i}].role")
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

def error_response(status: int, message: str, param: str | None = None, headers=None, code: str | None = None):
    from fastapi.responses import JSONResponse

    kind = {429: "rate_limit_error", 503: "service_unavailable"}
    body = {"error": {"message": message,
                      "type": kind.get(status, "invalid_request_error" if status < 500 else "server_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes):
    """A request body as JSON: 400 for bad JSON, NaN / Infinity, or nesting past MAX_JSON_DEPTH."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        msg = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise BadRequest(f"body: invalid JSON ({msg})", "body") from None
    level, depth = [body], 0
    while level:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            raise BadRequest(f"body: nested more than {MAX_JSON_DEPTH} levels", "body")
        level = [v for x in level if isinstance(x, (dict, list)) for v in (x.values() if isinstance(x, dict) else x)
                 if isinstance(v, (dict, list))]
    return body


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

class _Guard:
    """ASGI middleware in front of every route: the ``Host`` check (when bound to loopback,
    so that a web page cannot reach the server through DNS rebinding), the API key (all but
    /health) and, for POSTs, a JSON content type (a page may send ``text/plain`` bodies
    cross-origin without a preflight; it cannot send ``application/json``)."""

    def __init__(self, app, api_key: str | None, allowed_hosts):
        self.app, self.api_key = app, api_key
        self.allowed_hosts = {h.lower() for h in allowed_hosts} if allowed_hosts else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            err = self._check(scope)
            if err is not None:
                await err(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, scope):
        import hmac

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.allowed_hosts is not None:
            host = headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name.strip("[]").lower() not in self.allowed_hosts:
                return error_response(403, f"Host {host!r} is not allowed (the server is bound to loopback)")
        if self.api_key is not None and scope["path"] != "/health":
            auth = headers.get("authorization", "")
            token = auth[7:] if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return error_response(401, "invalid or missing API key (Authorization: Bearer <key>)",
                                      code="invalid_api_key")
        if scope["method"] == "POST":
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return error_response(415, f"Content-Type must be application/json, got {ctype or 'none'!r}",
                                      "content-type")
        return None


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


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
    shutdown, before uvicorn waits for the connections.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.requests import ClientDisconnect

    from .async_engine import QueueFull

    backend = async_engine
    fmt = backend.think_format
    split = not fmt.plain or split_plain
    created = int(time.time())
    invalid = [0]  # 400s answered here, before the engine saw the request
    names = {model_name, *aliases}
    closing = [False]

    async def begin_shutdown():
        closing[0] = True
        if backend.running:
            await asyncio.get_running_loop().run_in_executor(None, backend.shutdown)

    @asynccontextmanager
    async def lifespan(app):
        owned = not backend.running
        if owned:
            backend.start()
        yield
        if owned:
            closing[0] = True
            await asyncio.get_running_loop().run_in_executor(None, backend.shutdown)

    off = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="cotrt", lifespan=lifespan, **off)
    app.add_middleware(_Guard, api_key=api_key, allowed_hosts=allowed_hosts)
    app.state.begin_shutdown = begin_shutdown

    async def read_body(request) -> bytes | None:
        """The body, at most ``max_body_bytes`` within ``body_timeout``; None when the
        client hung up mid-body (logged in one line: nobody is left to answer)."""
        n = request.headers.get("content-length", "")
        if n.isdigit() and int(n) > max_body_bytes:
            raise BadRequest(f"body: {n} bytes, at most {max_body_bytes}", "body", status=413)
        chunks, size = [], 0

        async def read():
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body_bytes:
                    raise BadRequest(f"body: more than {max_body_bytes} bytes", "body", status=413)
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), body_timeout)
        except asyncio.TimeoutError:
            raise BadRequest(f"body: not received within {body_timeout:g} s", "body", status=408) from None
        except ClientDisconnect:
            client = request.client
            log.info("client %s disconnected before its request body was complete",
                     f"{client.host}:{client.port}" if client else "?")
            return None
        return b"".join(chunks)

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
        body = None
        try:
            raw = await read_body(request)
            if raw is None:
                return Response(status_code=400)
            body = parse_json(raw)
            if isinstance(body, dict) and "model" in body and body["model"] not in names:
                raise BadRequest(f"model: {json.dumps(body['model'])} is not served here (this is "
                                 f"{model_name!r})", "model", status=404, code="model_not_found")
            prompt, params, stream, include_usage, ctk = parse_request(body, chat, backend.max_len)
        except BadRequest as e:
            invalid[0] += 1
            return error_response(e.status, str(e), e.param, code=e.code)
        if closing[0]:
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
        if out.finish_reason == "abort" and closing[0]:
            return error_response(503, "the server shut down before the request finished")
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
        elif out.finish_reason == "abort" and closing[0]:
            yield _sse({"error": {"message": "the server shut down before the request finished",
                                  "type": "service_unavailable", "param": None, "code": None}})
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
    p.add_argument("--max-len", type=int, default=None,
                   help="prompt + output tokens per request (default: min(2048, the model's position limit))")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond max-batch; then 429")
    p.add_argument("--split-plain-reasoning", action="store_true",
                   help="for a model without think markers, stream its text as reasoning_content until the answer "
                        "cue (without it, content; a whole response always splits at a forced cue)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $COTRT_API_KEY)")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="larger request bodies get 413")
    p.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT_S,
                   help="seconds a connection has to send its request headers")
    p.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT_S,
                   help="seconds a request has to send its body; then 408")
    p.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level")


def header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol with a deadline for each request's headers: uvicorn has none,
    and 45 slowloris connections, each sending a header byte now and then, stayed open
    indefinitely (any byte cancels its keep-alive timer)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        _deadline = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def _arm(self):
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expired)

        def _disarm(self):
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def handle_events(self):
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # this request's headers are in

        def on_response_complete(self):
            super().on_response_complete()
            self._arm()  # the next request's headers, on a kept-alive connection

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _expired(self):
            self._deadline = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                log.info("closing a connection that sent no complete request headers in %g s", seconds)
                self.transport.close()

    return HeaderTimeoutH11


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
    import os

    name = args.served_model_name or (DEFAULT_MODEL if args.model == "default" else args.model.rstrip("/"))
    aliases = {args.model, args.model.rstrip("/")} | ({DEFAULT_MODEL} if args.model == "default" else set())
    loopback = args.host in LOOPBACK_HOSTS or args.host.startswith("127.")
    app = create_app(engine, name, split_plain=args.split_plain_reasoning, aliases=aliases,
                     api_key=args.api_key or os.environ.get("COTRT_API_KEY") or None,
                     allowed_hosts=(*LOOPBACK_HOSTS, args.host) if loopback else None,
                     max_body_bytes=args.max_body_bytes, body_timeout=args.body_timeout, docs=args.docs)
    print(f"[cotrt] serving {name} on http://{args.host}:{args.port}/v1 (think format: {engine.think_format})",
          file=sys.stderr, flush=True)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # Engine first: open streams get their error event and [DONE] at once, instead of
            # uvicorn waiting for them and then cutting them (a traceback each).
            await app.state.begin_shutdown()
            await super().shutdown(sockets=sockets)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5, http=header_timeout_protocol(args.header_timeout))
    Server(config).run()
    return 0


__all__ = ["create_app", "add_serve_arguments", "run_serve", "ReasoningSplitter", "parse_params", "prometheus",
           "header_timeout_protocol", "LOOPBACK_HOSTS"]
