"""The Host / Origin allow-list: DNS-rebinding protection for the server (an ASGI middleware).

A web page on another site can make a browser send requests to a server on 127.0.0.1 by
pointing its own domain name at 127.0.0.1 (DNS rebinding): the request then carries
`Host: evil.example`, and the page can read the answer as same-origin. So every HTTP request
must name an allowed host:

- `Host` (required; port ignored): localhost, any name under .localhost, any IP address
  literal (127.0.0.1, [::1], 10.0.0.5: a rebinding page's requests name its domain, never a
  bare address), the bound host, and the `--allowed-hosts` entries: a name, `.example.com`
  (that domain and every name under it), or `*` (any host: the check is off);
- `Origin`, when a browser sends one: its host must be allowed the same way (`null` is not).

Otherwise the answer is 400 (no or malformed Host) or 403, in OpenAI's error JSON.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from starlette.responses import JSONResponse

from jaxgpt.serve.schemas import APIError

LOCAL_NAMES = ("localhost",)


def host_name(value: str) -> str | None:
    """The host of a Host header value ("name[:port]", "[v6]:port"), lowercased, or None if it
    is not one."""
    value = value.strip().lower()
    if not value or any(c.isspace() or c in "/@?#\\" for c in value):
        return None
    if value.startswith("["):
        end = value.find("]")
        host, rest = value[1:end], value[end + 1:]
        if end < 0 or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
        return host if _is_ip(host) else None
    host, sep, port = value.rpartition(":") if ":" in value else (value, "", "")
    if sep and not port.isdigit():
        return None
    return host.rstrip(".") or None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class HostAllowList:
    """Which hosts a request may name: `extra` entries (names, ".domain", "*") beside the
    local ones and IP literals."""

    def __init__(self, extra=()):
        entries = [e.strip().lower().strip("[]") for e in extra if e and e.strip()]
        self.any = "*" in entries
        self.names = set(LOCAL_NAMES) | {e.rstrip(".") for e in entries if not e.startswith(".")}
        self.domains = tuple(e.rstrip(".") for e in entries if e.startswith(".") and len(e) > 1)

    def allows(self, host: str) -> bool:
        return (self.any or host in self.names or host.endswith(".localhost") or _is_ip(host)
                or any(host == d[1:] or host.endswith(d) for d in self.domains))


class HostFilter:
    """ASGI middleware answering 400 / 403 to HTTP requests whose Host or Origin is not allowed."""

    def __init__(self, app, allowed: HostAllowList):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.allowed.any:
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope.get("headers", ()):
            headers.setdefault(k.lower(), v)
        err = self._check(headers)
        if err is not None:
            return await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)
        return await self.app(scope, receive, send)

    def _check(self, headers: dict) -> APIError | None:
        raw = headers.get(b"host")
        if raw is None:
            return APIError("the request has no Host header", None, code="invalid_host")
        host = host_name(raw.decode("latin-1"))
        if host is None:
            return APIError("the request's Host header is malformed", None, code="invalid_host")
        if not self.allowed.allows(host):
            return APIError(f"the host '{host}' is not allowed (DNS-rebinding protection); start the "
                            f"server with --allowed-hosts {host} to serve it", None, status=403,
                            code="host_not_allowed")
        origin = headers.get(b"origin")
        if origin is not None:
            o = origin.decode("latin-1").strip()
            try:
                parts = urlsplit(o)
                oh = parts.hostname if parts.scheme in ("http", "https") else None
            except ValueError:
                oh = None
            if oh is None or not self.allowed.allows(oh.rstrip(".")):
                return APIError(f"the origin '{o[:100]}' is not allowed (DNS-rebinding protection); "
                                "start the server with --allowed-hosts HOST to serve it", None,
                                status=403, code="origin_not_allowed")
        return None
