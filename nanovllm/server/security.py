"""What guards the server's surface: who may call it, from where, and for how long.

A model server on a laptop is reachable by more than its user: every web page
the user opens can send requests to `http://127.0.0.1:8000`, and a page whose
domain is re-pointed at 127.0.0.1 (DNS rebinding) can even read the answers.
These ASGI middlewares close those doors, outermost first:

1. `HostCheckMiddleware`: the `Host` header must name the server (the bound
   address or `--allowed-hosts`); a rebinding page's host does not (400).
2. `OriginMiddleware`: a browser request from another origin is refused (403)
   unless `--allowed-origins` lists it; then it gets CORS headers, preflight
   included. No origin is allowed by default.
3. `ApiKeyMiddleware`: with `--api-key`, every route but `/health` needs
   `Authorization: Bearer <key>` (the scheme in any case), compared in constant
   time (401 otherwise).
4. `BodyTimeoutMiddleware`: the body must arrive within `--body-timeout`
   seconds of the request head (408 and the connection closed otherwise).
5. `JsonContentTypeMiddleware`: a POST must say `Content-Type:
   application/json` (415 otherwise). A page can send a cross-origin
   `text/plain` POST without asking first; a JSON one needs a CORS preflight,
   which (2) refuses.

Connections that never finish their request head (idle, or sending headers a
byte at a time) are closed after `--header-timeout` seconds by the HTTP
protocol itself (`timed_http_protocol`), and idle keep-alive connections after
`--keep-alive-timeout`. The body size limit (413) lives with the app.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from nanovllm.server.protocol import ErrorInfo, ErrorResponse

# Paths open without the API key: a load balancer's liveness probe carries none.
OPEN_PATHS = frozenset({"/health"})
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")


@dataclass
class SecurityConfig:
    """The guards' settings beside the API key (the defaults are the safe ones)."""
    allowed_hosts: list[str] | None = None     # Host header values accepted ("*": any); None: no check
    allowed_origins: list[str] = field(default_factory=list)   # cross-origin browser callers ("*": any)
    header_timeout: float = 10.0               # seconds for a connection to send a whole request head
    body_timeout: float = 30.0                 # seconds for the body to arrive after the head
    keep_alive_timeout: float = 5.0            # seconds an idle keep-alive connection stays open

    def __post_init__(self) -> None:
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def default_allowed_hosts(bind_host: str) -> list[str]:
    """The Host values that name a server bound to `bind_host`: the loopback names for a loopback
    address, the address itself for another one, any host for a wildcard bind (0.0.0.0, ::)."""
    if bind_host in WILDCARD_BINDS:
        return ["*"]
    if bind_host == "localhost" or _is_loopback_address(bind_host):
        return list(dict.fromkeys([*LOOPBACK_HOSTS, bind_host]))
    return [bind_host]


def add_security_arguments(group: argparse._ArgumentGroup) -> None:
    defaults = SecurityConfig()
    group.add_argument("--allowed-hosts", default=None,
                       help="comma-separated Host header values to accept, '*' for any (default: the names "
                            "of the bound address; any host when bound to 0.0.0.0)")
    group.add_argument("--allowed-origins", default="",
                       help="comma-separated browser origins allowed to call the API (CORS), '*' for any "
                            "(default: none)")
    group.add_argument("--header-timeout", type=float, default=defaults.header_timeout,
                       help="seconds a connection may take to send a request's headers")
    group.add_argument("--body-timeout", type=float, default=defaults.body_timeout,
                       help="seconds a request's body may take to arrive after its headers")
    group.add_argument("--keep-alive-timeout", type=float, default=defaults.keep_alive_timeout,
                       help="seconds an idle keep-alive connection stays open")


def security_config_from_args(args: argparse.Namespace) -> SecurityConfig:
    hosts = _split(args.allowed_hosts) if args.allowed_hosts is not None else default_allowed_hosts(args.host)
    return SecurityConfig(allowed_hosts=hosts, allowed_origins=_split(args.allowed_origins),
                          header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                          keep_alive_timeout=args.keep_alive_timeout)


def add_security_middleware(app: Any, config: SecurityConfig, api_key: str | None) -> None:
    """Register guards 1-4 on a Starlette/FastAPI app, outside every middleware added before (the
    middleware added last runs first); the app adds `JsonContentTypeMiddleware` innermost itself."""
    app.add_middleware(BodyTimeoutMiddleware, timeout=config.body_timeout)
    if api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(OriginMiddleware, allowed_origins=config.allowed_origins)
    if config.allowed_hosts is not None and "*" not in config.allowed_hosts:
        app.add_middleware(HostCheckMiddleware, allowed_hosts=config.allowed_hosts)


def uvicorn_settings(config: SecurityConfig) -> dict[str, Any]:
    """uvicorn.Config keyword arguments that enforce the connection timeouts."""
    return dict(http=timed_http_protocol(config.header_timeout), timeout_keep_alive=config.keep_alive_timeout)


def error_response(status_code: int, message: str, code: str | None = None,
                   headers: dict[str, str] | None = None, type: str = "invalid_request_error",
                   param: str | None = None) -> JSONResponse:
    """OpenAI's error body ({"error": {message, type, param, code}}, protocol.ErrorResponse) and status."""
    error = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(error.model_dump(), status_code=status_code, headers=headers)


class HostCheckMiddleware:
    """400 unless the Host header (its port aside) is one of `allowed_hosts`."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str]):
        self.app = app
        self.allowed = {host.lower().strip("[]") for host in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = _host_name(Headers(scope=scope).get("host", ""))
            if host not in self.allowed:
                message = (f"the Host header {host!r} does not name this server; call it by one of "
                           f"{sorted(self.allowed)} or start it with --allowed-hosts")
                await error_response(400, message, code="invalid_host")(scope, receive, send)
                return
        await self.app(scope, receive, send)


class OriginMiddleware:
    """Browser requests from another origin: 403 unless allowed; allowed ones get CORS headers
    (and preflights an answer). Requests without an Origin, or from the server's own origin, pass."""

    def __init__(self, app: ASGIApp, allowed_origins: list[str]):
        self.app = app
        self.allow_any = "*" in allowed_origins
        self.allowed = {origin.rstrip("/").lower() for origin in allowed_origins}
        self.cors = CORSMiddleware(app, allow_origins=allowed_origins, allow_methods=["GET", "POST"],
                                   allow_headers=["Authorization", "Content-Type"]) if allowed_origins else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is None or _is_same_origin(origin, headers.get("host", "")):
            await self.app(scope, receive, send)
            return
        if not (self.allow_any or origin.rstrip("/").lower() in self.allowed):
            message = (f"requests from the web origin {origin!r} are not allowed; start the server with "
                       "--allowed-origins to allow it")
            await error_response(403, message, code="origin_not_allowed")(scope, receive, send)
            return
        await self.cors(scope, receive, send)


class ApiKeyMiddleware:
    """Every route but /health needs `Authorization: Bearer <key>` (401 otherwise). The scheme may be
    written in any case; the key is compared in time that does not depend on where it first differs."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path", "") not in OPEN_PATHS:
            given = Headers(scope=scope).get("authorization", "").encode("latin-1")
            scheme, _, key = given.partition(b" ")
            if not (hmac.compare_digest(key.strip(), self.expected) and scheme.lower() == b"bearer"):
                message = ("Incorrect API key provided" if given else
                           "No API key provided; send it as `Authorization: Bearer <key>`")
                await error_response(401, message, code="invalid_api_key",
                                     headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyTimeoutMiddleware:
    """The whole body must arrive within `timeout` seconds of the request head; otherwise the app
    sees a disconnect and the client gets 408 on a connection that is then closed."""

    def __init__(self, app: ASGIApp, timeout: float):
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout
        body_done = False
        timed_out = False
        response_started = False

        async def timed_receive() -> Message:
            nonlocal body_done, timed_out
            if body_done:
                return await receive()   # after the body: waits for the disconnect, untimed
            try:
                message = await asyncio.wait_for(receive(), max(deadline - asyncio.get_running_loop().time(), 0))
            except asyncio.TimeoutError:
                timed_out = True
                return {"type": "http.disconnect"}
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, timed_receive, watched_send)
        if timed_out and not response_started:
            message = f"the request body did not arrive within {self.timeout:g} seconds (the server's --body-timeout)"
            await error_response(408, message, code="request_timeout",
                                 headers={"Connection": "close"})(scope, receive, send)


class JsonContentTypeMiddleware:
    """A POST must carry `Content-Type: application/json` (parameters such as charset allowed): 415 otherwise."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            content_type = Headers(scope=scope).get("content-type", "")
            if content_type.split(";", 1)[0].strip().lower() != "application/json":
                message = (f"the request body must be JSON sent with `Content-Type: application/json`, "
                           f"got {content_type or 'no Content-Type'!r}")
                await error_response(415, message, code="unsupported_media_type")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def timed_http_protocol(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol with a deadline on the request head: a connection that has not sent
    a complete head within `header_timeout` seconds of opening (or of its last response) is closed."""

    class TimedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._cancel_head_timer()   # a whole head arrived: the request runs

        def on_response_complete(self) -> None:
            self._arm_head_timer()          # the next request's head is due in time too
            super().on_response_complete()

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return TimedH11Protocol


def _split(values: str) -> list[str]:
    return [value.strip() for value in values.split(",") if value.strip()]


def _host_name(host_header: str) -> str:
    """The host of a Host header, without its port or IPv6 brackets, lower-case."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_same_origin(origin: str, host_header: str) -> bool:
    """Whether `origin` (scheme://host[:port]) names the host and port the request was sent to."""
    scheme, _, rest = origin.partition("://")
    return bool(rest) and scheme.lower() in ("http", "https") and rest.rstrip("/").lower() == host_header.lower()


def _is_loopback_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
