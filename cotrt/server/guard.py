"""The ASGI middleware in front of every route (Host check, API key, JSON content type)."""
from __future__ import annotations

from .responses import error_response

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


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
