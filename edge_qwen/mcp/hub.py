"""MCPHub: the MCP servers of one config, connected through the official `mcp` SDK, and calls to their tools.

The servers live on one asyncio loop in a background thread (each in its own task, which holds
its connection open until `close()`), so synchronous code -- the tool loop runs beside the
engine in a worker thread -- calls tools with `call()`. A call never raises: a tool's error, a
server that crashed, a call that outran its timeout or one the user declined come back as a
ToolResult with `is_error`, which the tool loop hands the model like any result. Every call is
logged with its arguments (logger "edge_qwen.mcp").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import MCPConfigError, ServerSpec, load_config

log = logging.getLogger("edge_qwen.mcp")
START_TIMEOUT_S = 60.0
# Each call's bound unless the caller gives one (`--mcp-timeout`).
CALL_TIMEOUT_S = 60.0
MAX_RESULT_CHARS = 20_000  # a tool result beyond this is cut (and says so): it goes into the prompt


@dataclass
class ToolResult:
    """What a tool call gave back: its text, and whether it is an error (passed to the model either way)."""

    text: str
    is_error: bool = False


@dataclass
class MCPTool:
    """One tool as offered to the model: `name` (unique across servers) and where it lives."""

    name: str
    server: str
    tool: str
    description: str
    schema: dict[str, Any]

    def spec(self) -> dict[str, Any]:
        """The tool in OpenAI's function shape, as EdgeQwen.chat takes tools."""
        fn: dict[str, Any] = {"name": self.name, "parameters": self.schema}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


# confirm(server, tool, arguments, call_id) -> whether the call may run
Confirm = Callable[[str, str, dict[str, Any], str], bool]


class MCPHub:
    """Connected MCP servers and their tools. Use `MCPHub.start(config)`; `close()` stops them."""

    def __init__(self, specs: dict[str, ServerSpec], *, call_timeout: float = CALL_TIMEOUT_S,
                 confirm: Confirm | None = None, errlog: Any = None):
        self.specs = specs
        self.call_timeout = float(call_timeout)
        self.confirm = confirm
        self.errlog = errlog if errlog is not None else sys.stderr
        self.tools: dict[str, MCPTool] = {}
        self.stopped: dict[str, str] = {}  # server -> why it is no longer running
        self._clients: dict[str, Any] = {}
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._thread = threading.Thread(target=self._loop.run_forever, name="edge-qwen-mcp", daemon=True)
        self._closed = False

    @classmethod
    def start(cls, config: str | Path | dict[str, Any] | dict[str, ServerSpec], *,
              start_timeout: float = START_TIMEOUT_S, **kw: Any) -> MCPHub:
        """Read `config`, start every server it names and list their tools; MCPConfigError names a server
        that cannot be started (the others are stopped again)."""
        specs = config if isinstance(config, dict) and config and all(
            isinstance(v, ServerSpec) for v in config.values()) else load_config(config)  # type: ignore[arg-type]
        hub = cls(specs, **kw)  # type: ignore[arg-type]
        hub._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(hub._connect_all(), hub._loop).result(start_timeout)
        except concurrent.futures.TimeoutError:
            hub.close()
            raise MCPConfigError(f"the MCP servers did not start within {start_timeout:.0f} s "
                                 f"({', '.join(n for n in specs if n not in hub._clients)} still starting); check "
                                 "that each command runs an MCP server over stdio", param="mcp") from None
        except BaseException:
            hub.close()
            raise
        return hub

    # -- the loop's side ------------------------------------------------------------------------
    async def _connect_all(self) -> None:
        self._stop = asyncio.Event()
        futures = []
        for spec in self.specs.values():
            ready: asyncio.Future = self._loop.create_future()
            self._tasks.append(self._loop.create_task(self._run_server(spec, ready)))
            futures.append((spec, ready))
        for spec, ready in futures:
            try:
                listed = await ready
            except MCPConfigError:
                raise
            except Exception as e:
                raise MCPConfigError(f"MCP server {spec.name!r} ({_describe(spec)}) could not be started: "
                                     f"{_reason(e)}; check its command and arguments in the config",
                                     param="mcp") from None
            self._add_tools(spec.name, listed)

    async def _run_server(self, spec: ServerSpec, ready: asyncio.Future) -> None:
        from mcp.client import Client

        try:
            if spec.url is not None:
                target: Any = spec.url
                if spec.headers:
                    from mcp.client.streamable_http import streamable_http_client
                    from mcp.shared._httpx_utils import create_mcp_http_client

                    target = streamable_http_client(spec.url, http_client=create_mcp_http_client(headers=spec.headers))
            else:
                from mcp.client.stdio import StdioServerParameters, stdio_client

                params = StdioServerParameters(command=spec.command, args=list(spec.args), env=spec.env or None,
                                               cwd=spec.cwd)
                target = stdio_client(params, errlog=self.errlog)
            async with Client(target) as client:
                listed = await client.list_tools()
                self._clients[spec.name] = client
                ready.set_result(listed.tools)
                assert self._stop is not None
                await self._stop.wait()
        except BaseException as e:  # noqa: BLE001 -- a server's end, whatever it is, is reported, not raised
            if not ready.done():
                ready.set_exception(e if isinstance(e, Exception) else RuntimeError(str(e)))
            elif not self._closed:
                self.stopped[spec.name] = _reason(e)
                log.warning("MCP server %r stopped: %s", spec.name, _reason(e))
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            self._clients.pop(spec.name, None)

    def _add_tools(self, server: str, tools: list[Any]) -> None:
        from ..engine.tool_calls import parse_tools

        taken = {t.tool for t in self.tools.values()}
        for t in tools:
            name = t.name if t.name not in taken and t.name not in self.tools else f"{server}__{t.name}"
            tool = MCPTool(name, server, t.name, t.description or "", t.input_schema or {"type": "object"})
            try:
                parse_tools([tool.spec()])  # a schema the engine cannot enforce is named now, not mid-chat
            except Exception as e:  # noqa: BLE001
                log.warning("MCP tool %s.%s is not offered to the model: %s", server, t.name,
                            getattr(e, "message", e))
                continue
            self.tools[name] = tool

    # -- the caller's side --------------------------------------------------------------------------
    def tool_names(self, servers: list[str] | None = None) -> list[str]:
        """The offered tools' names (of `servers` only, when given)."""
        return [n for n, t in self.tools.items() if servers is None or t.server in servers]

    def specs_for(self, servers: list[str] | None = None) -> list[dict[str, Any]]:
        """The tools of `servers` (None: all) in OpenAI's function shape."""
        return [t.spec() for t in self.tools.values() if servers is None or t.server in servers]

    def describe(self) -> dict[str, Any]:
        """Each server with its tools (name, description, input schema) and whether it is running."""
        out: dict[str, Any] = {}
        for name, spec in self.specs.items():
            out[name] = {"running": name in self._clients, "transport": "http" if spec.url else "stdio",
                         "tools": [{"name": t.name, "description": t.description, "input_schema": t.schema}
                                   for t in self.tools.values() if t.server == name]}
            if name in self.stopped:
                out[name]["stopped"] = self.stopped[name]
        return out

    def check_servers(self, names: Any) -> list[str]:
        """Requested server names, checked: MCPConfigError for an unknown one (listing the configured)."""
        from ..errors import RequestError

        if not isinstance(names, list) or not names:
            raise RequestError("mcp_servers must be a non-empty list of configured MCP server names",
                               param="mcp_servers")
        out = []
        for i, n in enumerate(names):
            name = n.get("name") if isinstance(n, dict) else n
            if not isinstance(name, str) or name not in self.specs:
                raise RequestError(f"mcp_servers[{i}]: {str(name)[:60]!r} is not an MCP server of this server "
                                   f"(configured: {', '.join(self.specs)})", param=f"mcp_servers.{i}")
            out.append(name)
        return out

    def call(self, name: str, arguments: Any, *, timeout: float | None = None,
             confirm: Confirm | None = None, call_id: str = "") -> ToolResult:
        """Call the tool offered as `name`; never raises (errors come back as an error ToolResult)."""
        tool = self.tools.get(name)
        args = arguments if isinstance(arguments, dict) else {}
        shown = json.dumps(args, ensure_ascii=False)
        if tool is None:
            log.warning("MCP call to unknown tool %s %s", name, shown)
            return ToolResult(f"there is no tool named {name!r}; the tools are {', '.join(self.tools)}", True)
        log.warning("MCP call %s.%s %s", tool.server, tool.tool, shown)  # every call, with its arguments
        ask = confirm or self.confirm
        if ask is not None and not ask(tool.server, tool.tool, args, call_id):
            log.warning("MCP call %s.%s declined by the user", tool.server, tool.tool)
            return ToolResult("the user declined this tool call; do not call it again, answer without it", True)
        client = self._clients.get(tool.server)
        if client is None:
            why = self.stopped.get(tool.server, "it is not running")
            return ToolResult(f"the tool server {tool.server!r} is not running ({why}); answer without this tool",
                              True)
        limit = self.call_timeout if timeout is None else float(timeout)

        async def run() -> Any:
            return await asyncio.wait_for(client.call_tool(tool.tool, args), limit)

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        try:
            result = future.result(limit + 10)
        except (asyncio.TimeoutError, concurrent.futures.TimeoutError):
            future.cancel()
            log.warning("MCP call %s.%s timed out after %g s", tool.server, tool.tool, limit)
            return ToolResult(f"the tool {name} did not answer within {limit:g} s (timed out)", True)
        except Exception as e:  # noqa: BLE001 -- a crashed server, a protocol error: the model is told
            why = _reason(e)
            log.warning("MCP call %s.%s failed: %s", tool.server, tool.tool, why)
            if why.startswith(_CLOSED):  # the process is gone: later calls are told so at once
                self.stopped[tool.server] = why
                self._clients.pop(tool.server, None)
            return ToolResult(f"the tool {name} failed: {why}", True)
        return _result_of(result)

    def close(self) -> None:
        """Stop every server (their processes end) and the background loop."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            async def stop() -> None:
                if self._stop is not None:
                    self._stop.set()
                if self._tasks:
                    _, pending = await asyncio.wait(self._tasks, timeout=8)
                    for t in pending:
                        t.cancel()
                    if pending:
                        await asyncio.wait(pending, timeout=4)

            try:
                asyncio.run_coroutine_threadsafe(stop(), self._loop).result(15)
            except Exception:  # noqa: BLE001 -- closing: nothing left to report to
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def __enter__(self) -> MCPHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _describe(spec: ServerSpec) -> str:
    return spec.url or " ".join([spec.command or "", *spec.args])


_CLOSED = "the server closed the connection"


def _reason(exc: BaseException) -> str:
    """One line for an exception out of the SDK (exception groups unwrapped)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    if name in ("ClosedResourceError", "BrokenResourceError", "EndOfStream") or "Connection closed" in text:
        return f"{_CLOSED} (it crashed or exited){': ' + text if text else ''}"
    return f"{name}: {text}" if text else name


def _result_of(result: Any) -> ToolResult:
    parts = []
    for block in getattr(result, "content", None) or []:
        kind = getattr(block, "type", None)
        if kind == "text":
            parts.append(block.text)
        elif kind == "resource" and hasattr(getattr(block, "resource", None), "text"):
            parts.append(block.resource.text)
        else:
            parts.append(f"[{kind} content not shown to this text model]")
    if not parts and getattr(result, "structured_content", None) is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    text = "\n".join(parts)
    if len(text) > MAX_RESULT_CHARS:
        text = text[:MAX_RESULT_CHARS] + f"\n[... cut: the result had {len(text)} characters]"
    return ToolResult(text, bool(getattr(result, "is_error", False)))
