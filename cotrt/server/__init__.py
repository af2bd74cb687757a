"""The OpenAI-compatible server: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
``/health``, ``/metrics`` over an ``AsyncEngine``.

Reasoning is returned apart from the answer, as ``reasoning_content`` (the field reasoning
clients read): in the message for a whole response, in the deltas for a stream.

- ``protocol``: request parsing and validation (``parse_params``, ``BadRequest``);
- ``reasoning``: the streamed reasoning / content split (``ReasoningSplitter``);
- ``responses``: response bodies, SSE, ``prometheus``;
- ``guard``: the Host / API key / content-type middleware, ``LOOPBACK_HOSTS``;
- ``app``: ``Routes`` (each route's logic) and ``create_app``;
- ``serve``: ``cotrt serve`` (``add_serve_arguments``, ``run_serve``, ``header_timeout_protocol``).

FastAPI and uvicorn (the ``serve`` extra) are imported only when an app is built or run.
"""
from .app import Routes, create_app
from .guard import LOOPBACK_HOSTS
from .protocol import BadRequest, parse_params, parse_request
from .reasoning import ReasoningSplitter
from .responses import prometheus
from .serve import add_serve_arguments, header_timeout_protocol, run_serve

__all__ = ["create_app", "add_serve_arguments", "run_serve", "ReasoningSplitter", "parse_params", "prometheus",
           "header_timeout_protocol", "LOOPBACK_HOSTS", "BadRequest", "Routes", "parse_request"]
