"""Refuse requests a web page on another site could make through the user's browser.

- DNS rebinding: a page on evil.example re-points its name at 127.0.0.1 and then talks to the app as
  "same origin". Its requests carry `Host: evil.example`, so on a loopback address only loopback names
  (and names allowed with --allow-host) are answered.
- Cross-site requests: a foreign page can POST to 127.0.0.1 (a form, or fetch without reading the
  answer); CORS hides the reply but the request still runs. A state-changing request whose `Origin` is not
  this server (or one allowed with --allow-origin) is refused. Requests without an Origin (curl, scripts,
  gradio_client) are not from a web page and pass.
"""
from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def host_name(host: str) -> str:
    """'127.0.0.1:7860' -> '127.0.0.1', '[::1]:7860' -> '::1', lower-cased."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    name = host_name(host)
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class RequestGuard:
    """ASGI middleware. `check_host`: answer only loopback names and `allowed_hosts` (on for a loopback
    server; with --listen the address is the user's choice and a login protects it)."""

    def __init__(self, app, check_host: bool = True, allowed_hosts: tuple[str, ...] = (),
                 allowed_origins: tuple[str, ...] = ()):
        self.app = app
        self.check_host = check_host
        self.allowed_hosts = {h.lower() for h in allowed_hosts}
        self.allowed_origins = {o.rstrip("/").lower() for o in allowed_origins}

    def host_ok(self, host: str) -> bool:
        return not self.check_host or is_loopback(host) or host_name(host) in self.allowed_hosts

    def origin_ok(self, origin: str, host: str) -> bool:
        origin = origin.rstrip("/").lower()
        if origin in self.allowed_origins:
            return True
        parts = urlsplit(origin)
        # Same origin: the page was served by this server under the name the browser used for it.
        return parts.scheme in ("http", "https") and parts.netloc == host.lower() and self.host_ok(parts.netloc)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host, origin = headers.get("host", ""), headers.get("origin")
        method = scope.get("method", "GET") if scope["type"] == "http" else "WEBSOCKET"
        if not self.host_ok(host):
            return await self._refuse(scope, receive, send, f"Host {host!r} refused: LoRA Studio answers only to "
                                      "localhost names (a guard against DNS rebinding); start it with --allow-host "
                                      "NAME to allow another name")
        if origin is not None and method not in SAFE_METHODS and not self.origin_ok(origin, host):
            return await self._refuse(scope, receive, send, f"request from {origin!r} refused: only pages served by "
                                      "this LoRA Studio may change things; start it with --allow-origin URL to allow "
                                      "another site")
        return await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope, receive, send, message: str):
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = message.encode("utf-8")
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
