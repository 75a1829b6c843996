"""The MCP config file: `{"mcpServers": {NAME: {"command", "args", "env", "cwd"} | {"url", "headers"}}}`.

The format Claude Desktop, Cursor and LM Studio read. Every problem is named with the file and
the server it is in: a file that is not JSON, a server with neither a command nor a url, a
command that is not on PATH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgeQwenError

_SERVER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


class MCPConfigError(EdgeQwenError):
    """An MCP config that cannot be used, or an MCP server that cannot be started."""

    code = "invalid_mcp_config"


@dataclass(frozen=True)
class ServerSpec:
    """One MCP server: a command run over stdio, or a streamable-HTTP url."""

    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _strings(value: Any, what: str) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value) if what == "list" else \
        isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def load_config(source: str | Path | dict[str, Any]) -> dict[str, ServerSpec]:
    """The servers of an MCP config (a file path or the parsed dict), checked; MCPConfigError names any problem."""
    where = "the MCP config"
    if not isinstance(source, (str, Path)):
        data: Any = source
    else:
        path = Path(source).expanduser()
        where = f"MCP config {path}"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise MCPConfigError(f"{where} does not exist; give the path of a JSON file like "
                                 '{"mcpServers": {"name": {"command": "...", "args": [...]}}}', param="mcp") from None
        except (OSError, UnicodeDecodeError) as e:
            raise MCPConfigError(f"cannot read {where} ({getattr(e, 'strerror', None) or e}); give a readable "
                                 "UTF-8 JSON file", param="mcp") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MCPConfigError(f"{where} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}; fix the "
                                 'file (it holds {"mcpServers": {...}})', param="mcp") from None
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict) or not servers:
        raise MCPConfigError(f'{where} has no "mcpServers" object naming at least one server; write it as '
                             '{"mcpServers": {"name": {"command": "...", "args": [...]}}}', param="mcp")
    out: dict[str, ServerSpec] = {}
    for name, entry in servers.items():
        at = f'{where}: server "{name}"'
        if not _SERVER_NAME.match(name):
            raise MCPConfigError(f"{at}: a server name is 1-40 letters, digits, _ or -; rename it", param="mcp")
        if not isinstance(entry, dict):
            raise MCPConfigError(f'{at} must be an object with "command" (and "args", "env") or "url"', param="mcp")
        if entry.get("disabled") is True:
            continue
        command, url = entry.get("command"), entry.get("url")
        if (command is None) == (url is None):
            raise MCPConfigError(f'{at} needs either "command" (a program run over stdio) or "url" (streamable '
                                 "HTTP), not both nor neither", param="mcp")
        if url is not None:
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise MCPConfigError(f'{at}: "url" must be an http(s) URL', param="mcp")
            headers = entry.get("headers", {})
            if not _strings(headers, "dict"):
                raise MCPConfigError(f'{at}: "headers" must map names to strings', param="mcp")
            out[name] = ServerSpec(name, url=url, headers=dict(headers))
            continue
        args, env, cwd = entry.get("args", []), entry.get("env", {}), entry.get("cwd")
        if not isinstance(command, str) or not command.strip():
            raise MCPConfigError(f'{at}: "command" must be a non-empty string', param="mcp")
        if not _strings(args, "list"):
            raise MCPConfigError(f'{at}: "args" must be a list of strings', param="mcp")
        if not _strings(env, "dict"):
            raise MCPConfigError(f'{at}: "env" must map names to strings', param="mcp")
        if cwd is not None and (not isinstance(cwd, str) or not Path(cwd).is_dir()):
            raise MCPConfigError(f'{at}: "cwd" {cwd!r} is not a folder', param="mcp")
        search = (env.get("PATH") or os.environ.get("PATH")) if os.sep not in command else None
        if shutil.which(command, path=search) is None:
            raise MCPConfigError(f'{at}: command {command!r} is not found{"" if os.sep in command else " on PATH"}; '
                                 "install it or give its full path", param="mcp")
        out[name] = ServerSpec(name, command=command, args=tuple(args), env=dict(env), cwd=cwd)
    if not out:
        raise MCPConfigError(f"{where}: every server is disabled; enable one", param="mcp")
    return out
