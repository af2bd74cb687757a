"""Response bodies: OpenAI's error object, a whole (non-streaming) response, server-sent
events, and the Prometheus exposition of ``AsyncEngine.metrics()``."""
from __future__ import annotations

import json
import time


def error_response(status: int, message: str, param: str | None = None, headers=None, code: str | None = None):
    from fastapi.responses import JSONResponse

    kind = {429: "rate_limit_error", 503: "service_unavailable"}
    body = {"error": {"message": message,
                      "type": kind.get(status, "invalid_request_error" if status < 500 else "server_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def usage(outs) -> dict:
    """OpenAI's usage of one request's outputs (n samples: the prompt counted once)."""
    s = outs[0].stats or {}
    prompt = s.get("prompt_tokens", 0)
    completion = sum(len(o.token_ids) for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "completion_tokens_details": {"reasoning_tokens": sum((o.stats or {}).get("think_tokens", 0)
                                                                  for o in outs)}}


def whole_response(outs, rid: str, chat: bool, model_name: str) -> dict:
    """The non-streaming response body of a finished request: one choice per sample."""
    choices = []
    for i, out in enumerate(outs):
        if not chat:
            choices.append({"index": i, "text": out.text, "finish_reason": out.finish_reason, "logprobs": None})
        else:
            # The engine's split (Output): a plain model's reply is all answer unless a
            # control forced the answer cue, and then the text before the cue is reasoning.
            message = {"role": "assistant", "content": out.answer, "reasoning_content": out.reasoning or None}
            choices.append({"index": i, "message": message, "finish_reason": out.finish_reason, "logprobs": None})
    ext = {"stats": outs[0].stats} if len(outs) == 1 else {"stats": [o.stats for o in outs]}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model_name, "choices": choices, "usage": usage(outs), "cotrt": ext}


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
    metric("slots_total", "gauge", "Batch lanes (max_batch).", [("", m["slots_total"])])
    kv = m.get("kv") or {}
    if kv:
        metric("kv_page_size", "gauge", "Tokens per KV-cache page.", [("", kv["page_size"])])
        for name, help_ in (("pages_total", "KV-cache pages."),
                            ("pages_used", "KV-cache pages held by requests."),
                            ("pages_shared", "KV-cache pages held by several requests (shared prefixes)."),
                            ("pages_cached", "KV-cache pages holding a cached prefix nobody holds (reusable)."),
                            ("pages_free", "KV-cache pages free.")):
            metric(f"kv_{name}", "gauge", help_, [("", kv[name])])
        metric("cached_prompt_tokens_total", "counter", "Prompt tokens taken from the prefix cache.",
               [("", kv["cached_prompt_tokens"])])
        metric("preemptions_total", "counter", "Requests preempted when the KV cache was full.",
               [("", kv["preempted"])])
    return "\n".join(lines) + "\n"
