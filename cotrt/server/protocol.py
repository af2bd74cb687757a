"""The OpenAI request protocol: parsing and validating a request body into a prompt and
:class:`~cotrt.params.Params`, before anything reaches the engine.

Every refusal is a :class:`BadRequest` naming the JSON field at fault (``param``) and the
HTTP status (400 unless said). cotrt's controls ride in a ``cotrt`` object of the request
and go straight to ``Params.from_dict``, so a control added to Params works here without
server changes.
"""
from __future__ import annotations

import json
import re

from ..params import Params

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
    from ..params import MAX_SAMPLES

    n = _typed(body, "n", "int", lo=1, hi=MAX_SAMPLES)
    stream = bool(_typed(body, "stream", "bool"))
    opts = _typed(body, "stream_options", "dict") or {}
    include_usage = bool(_typed(opts, "include_usage", "bool"))
    d: dict = {"temperature": 1.0}  # OpenAI's default
    # max_completion_tokens is the newer name; without either, generate up to max_len.
    mt = _typed(body, "max_completion_tokens", "int", lo=1, hi=max_len) or \
        _typed(body, "max_tokens", "int", lo=1, hi=max_len)  # past --max-len: refused, not clamped
    d["max_new_tokens"] = mt or max_len
    if n is not None:
        d["n"] = n  # n choices: samples sharing the prompt's KV pages
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
    from ..control.policies import POLICIES

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
