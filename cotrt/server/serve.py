"""``cotrt serve``: its arguments, uvicorn with a deadline on request headers, and the run."""
from __future__ import annotations

import logging

from .app import create_app
from .guard import LOOPBACK_HOSTS
from .protocol import BODY_TIMEOUT_S, HEADER_TIMEOUT_S, MAX_BODY_BYTES

log = logging.getLogger("cotrt.server")


def add_serve_arguments(p) -> None:
    p.add_argument("--model", default="default", help="local HF checkpoint directory, or 'default' (SmolLM2)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: from --model)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-len", type=int, default=None,
                   help="prompt + output tokens per request (default: min(2048, the model's position limit))")
    p.add_argument("--kv-tokens", type=int, default=None,
                   help="KV-cache capacity in tokens, all requests together (default: max-batch x max-len)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV-cache page")
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
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks: the number torchrun started (torchrun --nproc-per-node N -m cotrt "
                        "serve ... --tp N); the model is sharded with transformers' tp_plan='auto'")
    p.add_argument("--tp-timeout", type=float, default=120.0,
                   help="seconds any collective may wait for the other ranks before the group fails (with --tp)")
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

    from ..api import wrap
    from ..async_engine import AsyncEngine
    from ..models import DEFAULT_MODEL, load_model

    group = driver = None
    try:
        if getattr(args, "tp", 1) > 1:  # tensor parallel under torchrun (cotrt.parallel.serve)
            from ..parallel import init

            group = init(args.tp, timeout=args.tp_timeout)
        model, tok = load_model(args.model, quiet=group is not None and group.rank > 0,
                                tp_plan="auto" if group is not None else None)
        rt = wrap(model, tok, max_batch=args.max_batch, max_len=args.max_len, kv_tokens=args.kv_tokens,
                  page_size=args.page_size)
        if group is not None:
            from ..parallel.serve import Driver, follow_serve

            if group.rank > 0:
                return follow_serve(rt, group)
            driver = Driver(rt, group)  # rt.engine now broadcasts before each step
        engine = AsyncEngine(rt, max_queue=args.max_queue)
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
    tp = f", tensor parallel over {group.size} ranks" if group is not None else ""
    print(f"[cotrt] serving {name} on http://{args.host}:{args.port}/v1 (think format: {engine.think_format}{tp})",
          file=sys.stderr, flush=True)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # Engine first: open streams get their error event and [DONE] at once, instead of
            # uvicorn waiting for them and then cutting them (a traceback each).
            await app.state.begin_shutdown()
            if driver is not None:
                driver.close()  # the engine is stopped: release the other ranks
            await super().shutdown(sockets=sockets)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5, http=header_timeout_protocol(args.header_timeout))
    server = Server(config)
    if driver is not None:
        return driver.serve(server)
    server.run()
    return 0
