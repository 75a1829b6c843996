"""What the server refuses before any endpoint runs: foreign Host and Origin headers, ambiguous framing.

A server without a key on 127.0.0.1 is still reachable from every web page the user opens: a
page can POST a `text/plain` body (no CORS preflight) and, through DNS rebinding (a name of the
attacker's that resolves to 127.0.0.1), read the answers. As Ollama and Jupyter do, the guard
accepts only Host headers that name the loopback interface or the address the server is bound
to (plus `--allowed-host` names), and refuses a request whose Origin is neither the server's
own (a same-origin page) nor a `--cors-origin`. Requests without Origin (curl, SDKs) pass.

A request with both Content-Length and Transfer-Encoding is refused with 400 and the connection
is closed (RFC 9112 section 6.1), so nothing hidden after its chunked body is ever served.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from .api_errors import error_body
from .protocol import send_error

LOOPBACK_NAMES = ("localhost",)


def _split_host(value: str) -> str:
    """The host part of a Host header value ("[::1]:8000" -> "::1", "LocalHost:80" -> "localhost")."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def _is_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _netloc(value: str, default_port: int) -> tuple[str, int]:
    host = _split_host(value)
    port = default_port
    tail = value.strip().rsplit("]", 1)[-1] if value.strip().startswith("[") else value.strip()
    if tail.count(":") == 1 and tail.rsplit(":", 1)[1].isdigit():
        port = int(tail.rsplit(":", 1)[1])
    return host, port


class HostOriginGuard:
    """ASGI middleware: 403 for a foreign Host or Origin, 400 + close for Content-Length with Transfer-Encoding.

    `bind_host` is the address the server listens on; `allowed_hosts` adds names ("*": any Host);
    `cors_origins` are the origins whose pages may call the API ("*": any).
    """

    def __init__(self, app: Any, bind_host: str = "127.0.0.1", allowed_hosts: Iterable[str] = (),
                 cors_origins: Iterable[str] = ()):
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.names = {_split_host(h) for h in allowed_hosts if h != "*"} | set(LOOPBACK_NAMES)
        bound = _split_host(bind_host)
        ip = _is_ip(bound)
        # Bound to every interface: any IP literal names this machine (a rebinding attack needs a name).
        self.any_ip = ip is not None and ip.is_unspecified
        if ip is None:
            self.names.add(bound)
        self.bound_ip = ip
        self.origins = {o.rstrip("/").lower() for o in cors_origins}

    def host_allowed(self, host: str) -> bool:
        """Whether a Host header's host part names this server."""
        if self.any_host or host in self.names or host.endswith(".localhost"):
            return True
        ip = _is_ip(host)
        return ip is not None and (ip.is_loopback or self.any_ip or ip == self.bound_ip)

    def origin_allowed(self, origin: str, host_header: str, scheme: str) -> bool:
        """Whether a page of `origin` may call: a --cors-origin, or the server's own origin."""
        origin = origin.strip().rstrip("/").lower()
        if "*" in self.origins or origin in self.origins:
            return True
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False  # "null" (a file:// page, a sandboxed frame) and anything else unknown
        default = 443 if parts.scheme == "https" else 80
        return _netloc(parts.netloc, default) == _netloc(host_header, 443 if scheme == "https" else default)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[bytes, list[bytes]] = {}
        for k, v in scope.get("headers", []):
            headers.setdefault(k, []).append(v)
        if b"transfer-encoding" in headers and b"content-length" in headers:
            return await send_error(send, 400, error_body(
                "the request has both Content-Length and Transfer-Encoding, which makes its end ambiguous "
                "(RFC 9112 section 6.1); send one of them. The connection is closed.", code="ambiguous_framing"),
                close=True, scope=scope)
        host_header = headers.get(b"host", [b""])[0].decode("latin-1")
        host = _split_host(host_header)
        if host_header and not self.host_allowed(host):
            return await send_error(send, 403, error_body(
                f"Host {host[:64]!r} is not one this server answers to (DNS-rebinding protection); use "
                "http://127.0.0.1 or http://localhost, or start the server with --allowed-host NAME",
                code="host_not_allowed"), scope=scope)
        origin = headers.get(b"origin", [None])[0]
        if origin is not None:
            text = origin.decode("latin-1")
            if not self.origin_allowed(text, host_header, scope.get("scheme", "http")):
                return await send_error(send, 403, error_body(
                    f"requests from web pages of origin {text[:80]!r} are refused (a page on another site must "
                    "not drive this server); start the server with --cors-origin ORIGIN to allow that page",
                    code="origin_not_allowed"), scope=scope)
        await self.app(scope, receive, send)


READ_TIMEOUT_S = 10.0  # a request's head and body must arrive within this, from its first byte (or the connection's start)
KEEP_ALIVE_S = 5.0  # an idle keep-alive connection is closed after this (uvicorn's timeout_keep_alive)
MAX_HEADER_BYTES = 16 * 1024  # h11_max_incomplete_event_size: a larger request head is a plain 400


def guarded_h11(read_timeout: float = READ_TIMEOUT_S) -> type:
    """uvicorn's h11 protocol with the read timeout uvicorn lacks: a connection that sends nothing, or
    trickles its head or body, is answered 408 and closed `read_timeout` seconds after it began."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = b'{"error": {"message": "the request did not arrive within %d s (idle or too slow); send it at once", ' \
           b'"type": "invalid_request_error", "param": null, "code": "request_timeout"}}' % int(read_timeout)
    answer = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
              b"content-length: %d\r\n\r\n" % len(body)) + body

    class GuardedH11Protocol(H11Protocol):
        _read_timer = None

        def _reading(self) -> bool:
            return self.conn.their_state in (h11.IDLE, h11.SEND_BODY)

        def _arm(self) -> None:
            if self._read_timer is None:
                self._read_timer = self.loop.call_later(read_timeout, self._read_timed_out)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._reading():
                self._arm()  # the first bytes of a (next) request start its clock
            super().data_received(data)
            if not self._reading():
                self._disarm()  # the whole request is in

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _read_timed_out(self) -> None:
            self._read_timer = None
            if self.transport.is_closing() or not self._reading():
                return
            if self.conn.their_state is h11.IDLE and self.cycle is not None and self.cycle.response_complete:
                return  # between keep-alive requests: uvicorn's keep-alive timeout closes it
            if self.cycle is None or not self.cycle.response_started:
                self.transport.write(answer)
            self.transport.close()

    return GuardedH11Protocol


def log_accept_errors_once(loop: Any) -> None:
    """Make asyncio's "socket.accept() out of system resource" (EMFILE: out of file descriptors) one
    warning per minute instead of a traceback per retry (it retries every second, for every listener)."""
    import logging
    import time

    previous = loop.get_exception_handler()
    last = [0.0]

    def handler(lp: Any, context: dict[str, Any]) -> None:
        if str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            now = time.monotonic()
            if now - last[0] >= 60:
                last[0] = now
                logging.getLogger("edge_qwen.serve").warning(
                    "cannot accept connections: %s (open-file limit reached; idle connections are closed after "
                    "--read-timeout; raise `ulimit -n` for more). Logged once a minute.", context.get("exception"))
            return
        if previous is not None:
            previous(lp, context)
        else:
            lp.default_exception_handler(context)

    loop.set_exception_handler(handler)


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The start-up warning for a server other machines can reach with no API key (None when there is none)."""
    if api_key:
        return None
    ip = _is_ip(_split_host(host)) if host else None
    if host in ("", "localhost") or (ip is not None and ip.is_loopback):
        return None
    return (f"--host {host} without an API key: anyone who can reach this machine on the network can use the "
            "models, fill the queue, and see the model paths; add --api-key-file FILE (or set EDGE_QWEN_API_KEY)")


def read_api_key_file(path: str) -> str:
    """The API key in `path` (first line, stripped), so it stays out of `ps` output and shell history."""
    from ..errors import RequestError
    from ..files import check_input_file

    p = check_input_file(path, "API key file (--api-key-file)", "give a file that holds the key on its first line")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise RequestError(f"API key file {p} is not UTF-8 text; write the key as plain text", param="api_key") from None
    key = lines[0].strip() if lines else ""
    if not key:
        raise RequestError(f"API key file {p} is empty; write the key on its first line", param="api_key")
    return key
