"""Who may call the server and how much one request may send, checked before any other work: Host,
Origin, the API key, the body's size.

A web page may send requests to any address, this machine's loopback included. It cannot read a
cross-origin answer without CORS headers, but a "simple" request (a POST of text/plain needs no
preflight) still arrives and would still set the model to work. So a request whose `Origin` names a site
not allowed is refused whatever it holds. A page can also reach a loopback server under a name of its own
that it points at 127.0.0.1 (DNS rebinding): the browser then takes the server for that page's own site
and sends no Origin of another, but its `Host` header is that name, so a `Host` that is none of the
server's names is refused too. Requests without `Origin` (curl, the openai client, scripts) come from no
page; a request whose `Origin` is its own `Host` (an allowed one) comes from the server's own chat page
(chat_page.py), under whatever address it was reached by. An IP address as `Host` cannot be rebound
(rebinding needs a name); a server listening on every interface takes any of them, since it cannot know
all the addresses it is reached by.

The body is counted as it arrives and refused past `max_request_bytes` (at once when its Content-Length
says so), before anything parses it; it is read only once the rest of the request is accepted.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.responses import JSONResponse

from .chat_page import FILES as PAGE_FILES
from .protocol import ApiError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ANY = "*"
PREFLIGHT_SECONDS = 600  # how long a browser may keep a preflight's answer
# Served without the API key: the health check, and the chat page's files (which ask for the key).
OPEN_PATHS = frozenset(["/health", *PAGE_FILES])


def request_limit(max_media_bytes: int) -> int:
    """The default body limit: four media at the media limit, base64-encoded (4 bytes for 3), and a
    megabyte of text around them."""
    return 4 * (4 * -(-max_media_bytes // 3)) + 10**6


@dataclass(frozen=True)
class Access:
    """`origins`: web origins allowed besides the loopback ones and the listening address's (e.g.
    "https://chat.example.com"; "*" any); `hosts`: names the server answers to besides those ("*" any);
    `bound`: the address it listens on; `max_request_bytes`: the largest body (None: `request_limit`
    of the media limit)."""

    origins: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    bound: str = "127.0.0.1"
    max_request_bytes: int | None = None

    def host_allowed(self, host: str) -> bool:
        return ANY in self.hosts or self._own(host)

    def _own(self, host: str) -> bool:
        """A Host that names this server itself: a loopback name, the listening address, a listed name,
        or (listening everywhere) any IP address; not merely any name ("*")."""
        name = _name(host)
        if name in (*LOOPBACK_NAMES, _name(self.bound), *map(_name, self.hosts)):
            return True
        return _unspecified(self.bound) and _ip(name)

    def origin_allowed(self, origin: str, host: str | None = None) -> bool:
        """`host`: the request's Host header; an origin that is that host, when the host names this server
        itself, is the server's own page (with --allowed-hosts "*", a rebound name would pass)."""
        origin = origin.lower().rstrip("/")
        if ANY in self.origins or origin in (o.lower().rstrip("/") for o in self.origins):
            return True
        parts = urlsplit(origin)
        same = host is not None and parts.netloc == host.strip().lower() and self._own(host)
        if same and parts.scheme in ("http", "https"):
            return True
        try:
            parts.port  # noqa: B018  (a malformed port is refused, not an error)
        except ValueError:
            return False
        local = (*LOOPBACK_NAMES, *(() if _unspecified(self.bound) else (_name(self.bound),)))
        return parts.scheme in ("http", "https") and (parts.hostname or "") in local


def _name(host: str) -> str:
    """A Host header's (or an address's) name: lower case, without its port, brackets or final dot."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _unspecified(address: str) -> bool:
    return address in ("", "0.0.0.0", "::")


class Guard:
    """ASGI middleware, outermost: Host, then Origin (a preflight answered here: it never carries the
    API key), then the API key (on every route but `OPEN_PATHS`), then the body's size; CORS headers on the
    answers to allowed origins. The body is read here, after the key: a refused request's never is."""

    def __init__(self, app, access: Access, max_request_bytes: int, api_key: str | None = None):
        self.app, self.access, self.limit, self.api_key = app, access, max_request_bytes, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host, origin = headers.get("host"), headers.get("origin")
        if host is not None and not self.access.host_allowed(host):
            message = f"Host {_name(host)!r:.80} is not a name of this server (see --allowed-hosts)"
            return await _refuse(403, message, scope, receive, send)
        if origin is not None and not self.access.origin_allowed(origin, host):
            message = f"requests from the web origin {origin!r:.80} are not allowed (see --allowed-origins)"
            return await _refuse(403, message, scope, receive, send)
        cors = _cors(origin) if origin is not None else []
        if scope["method"] == "OPTIONS" and origin is not None and "access-control-request-method" in headers:
            requested = headers.get("access-control-request-headers", "")
            return await _preflight(cors, requested, send)
        if self.api_key and scope["path"] not in OPEN_PATHS and not _key_matches(headers, self.api_key):
            message = "missing or wrong API key (Authorization: Bearer ...)"
            return await _refuse(401, message, scope, receive, send, cors)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            return await _refuse(413, self._too_large(), scope, receive, send, cors)
        body = bytearray()
        more = True
        while more:  # counted as it comes: a body without a length is refused as soon as it is too long
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await _refuse(413, self._too_large(), scope, receive, send, cors)
        return await self.app(scope, _replay(bytes(body), receive), _with_headers(send, cors))

    def _too_large(self) -> str:
        return f"the request body is over the limit of {self.limit:,} bytes (see --max-request-bytes)"


def _key_matches(headers: dict, api_key: str) -> bool:
    given = headers.get("authorization", "").encode("latin-1")
    return hmac.compare_digest(given, f"Bearer {api_key}".encode())  # in a time that tells nothing


def _replay(body: bytes, receive):
    """The body read here given to the app as one message, then the connection's own messages (a
    client's disconnect, which a stream watches for)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _cors(origin: str) -> list[tuple[bytes, bytes]]:
    return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]


async def _refuse(status, message, scope, receive, send, headers=()):
    response = JSONResponse(ApiError(status, message).body(), status_code=status)
    response.raw_headers.extend(headers)
    await response(scope, receive, send)


async def _preflight(cors, requested: str, send) -> None:
    headers = cors + [
        (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
        (b"access-control-allow-headers", requested.encode("latin-1") or b"Authorization, Content-Type"),
        (b"access-control-max-age", str(PREFLIGHT_SECONDS).encode()),
    ]
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def _with_headers(send, headers):
    if not headers:
        return send

    async def sending(message):
        if message["type"] == "http.response.start":
            message = message | {"headers": [*message.get("headers", []), *headers]}
        await send(message)

    return sending
