"""MCP tools on the server (`serve --mcp CONFIG`): who may use them, the tool loop per request, /v1/mcp/*.

MCP tools run code on the server's machine, so they are used only when a request asks for them
(`mcp_servers: ["name", ...]` on /v1/chat/completions and /v1/messages, or a Responses `mcp`
tool naming a configured `server_label`), and never for a client that is neither on the loopback
interface nor holding the server's API key: a server without a key refuses them to other hosts
(403), and `serve --mcp` on an address other than loopback needs `--api-key`.

GET /v1/mcp/tools lists the servers and their tools (the web page shows them). With
`serve --mcp-confirm` each call waits for POST /v1/mcp/confirm {"id", "allow"} from the page (or
any client) before it runs; unanswered, it is declined after the call timeout.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from ..errors import EdgeQwenError, RequestError


class MCPForbiddenError(EdgeQwenError):
    """MCP tools asked for by a client that may not use them."""

    status = 403
    code = "mcp_not_allowed"


def _loopback(host: str | None) -> bool:
    if host in ("localhost", "testclient"):
        return True
    try:
        return ipaddress.ip_address((host or "").strip("[]")).is_loopback
    except ValueError:
        return False


def check_mcp_host(mcp: Any, host: str, api_key: str | None) -> None:
    """`serve --mcp` on a non-loopback address without an API key: refused (anyone reaching it could run tools)."""
    if mcp is not None and not api_key and not _loopback(host):
        raise RequestError(f"--mcp with --host {host} (reachable from other machines) needs --api-key: MCP tools run "
                           "code on this machine; set a key, or serve on 127.0.0.1", param="mcp")


def _hub(request: Request) -> Any:
    hub = getattr(request.app.state, "mcp", None)
    if hub is None:
        raise RequestError("this server runs no MCP servers; start it with `edge-qwen serve --mcp CONFIG` to use "
                           "MCP tools, or leave mcp_servers out", param="mcp_servers")
    client = request.client.host if request.client else None
    if not getattr(request.app.state, "api_key_set", False) and not _loopback(client):
        raise MCPForbiddenError("MCP tools are offered only to clients on this machine or holding the server's API "
                                "key; start the server with --api-key and send the key", param="mcp_servers")
    return hub


class Confirmations:
    """Calls waiting for a yes or no (serve --mcp-confirm): id -> (event, answer)."""

    def __init__(self) -> None:
        self.waiting: dict[str, list[Any]] = {}
        self.lock = threading.Lock()

    def ask(self, call_id: str, timeout: float) -> bool:
        ev = threading.Event()
        with self.lock:
            self.waiting[call_id] = [ev, False]
        try:
            ev.wait(timeout)
            return bool(self.waiting[call_id][1])
        finally:
            with self.lock:
                self.waiting.pop(call_id, None)

    def answer(self, call_id: str, allow: bool) -> bool:
        with self.lock:
            entry = self.waiting.get(call_id)
            if entry is None:
                return False
            entry[1] = allow
            entry[0].set()
            return True


def mcp_runner(request: Request, names: Any) -> Callable[..., Any]:
    """The tool loop for this request's `mcp_servers`: run(llm, messages, stream=..., cancel=..., **chat_kwargs).

    RequestError / MCPForbiddenError (answered 400 / 403) when the request may not have them.
    """
    from ..mcp.loop import DEFAULT_MAX_ROUNDS, mcp_chat

    hub = _hub(request)
    servers = hub.check_servers(names)
    opts = getattr(request.app.state, "mcp_options", None) or {}
    rounds = int(opts.get("max_rounds") or DEFAULT_MAX_ROUNDS)
    timeout = opts.get("timeout")
    confirm = None
    if opts.get("confirm"):
        pending: Confirmations = request.app.state.mcp_confirmations
        limit = float(timeout or hub.call_timeout)

        def confirm(server: str, tool: str, args: dict[str, Any], call_id: str) -> bool:
            return pending.ask(call_id, limit)

    def run(llm: Any, messages: list[dict[str, Any]], **kw: Any) -> Any:
        if kw.get("n", 1) != 1:
            raise RequestError("mcp_servers cannot be combined with n > 1", param="n")
        return mcp_chat(llm, hub, messages, servers=servers, max_rounds=rounds, timeout=timeout, confirm=confirm,
                        **kw)

    return run


class ConfirmBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str
    allow: bool


def install(app: Any, hub: Any, options: dict[str, Any] | None) -> None:
    """Keep the hub and its options on the app (create_app calls this)."""
    app.state.mcp = hub
    app.state.mcp_options = dict(options or {})
    app.state.mcp_confirmations = Confirmations()


def router() -> APIRouter:
    """GET /v1/mcp/tools and POST /v1/mcp/confirm."""
    r = APIRouter(tags=["mcp"])

    @r.get("/v1/mcp/tools", summary="The MCP servers of `serve --mcp` and their tools")
    async def tools(request: Request) -> dict[str, Any]:
        hub = getattr(request.app.state, "mcp", None)
        if hub is None:
            return {"servers": {}, "confirm": False}
        _hub(request)
        return {"servers": hub.describe(), "confirm": bool((request.app.state.mcp_options or {}).get("confirm"))}

    @r.post("/v1/mcp/confirm", summary="Allow or decline a waiting MCP call (serve --mcp-confirm)")
    async def confirm(request: Request, body: ConfirmBody) -> dict[str, Any]:
        _hub(request)
        if not request.app.state.mcp_confirmations.answer(body.id, body.allow):
            raise RequestError(f"no MCP call {body.id[:60]!r} is waiting for confirmation (answered already, or "
                               "timed out)", param="id")
        return {"id": body.id, "allow": body.allow}

    return r
