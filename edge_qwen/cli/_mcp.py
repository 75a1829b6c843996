"""`chat --mcp`: MCP tool servers in the terminal (the answer on stdout, each call and its result on stderr).

Not a command of its own: edge_qwen.cli._run's `chat` calls these when --mcp is given.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

SHOWN_RESULT_CHARS = 300


def start_hub(config: str, confirm: bool, timeout: float) -> Any:
    """The MCP servers of `config`, started (MCPConfigError, a one-line CLI error, names what is wrong)."""
    from ..mcp import MCPHub

    return MCPHub.start(config, call_timeout=timeout, confirm=ask_before_call if confirm else None)


def ask_before_call(server: str, tool: str, args: dict[str, Any], call_id: str) -> bool:
    """--mcp-confirm: ask on the terminal before a call runs (no answer, or not "y": declined)."""
    shown = json.dumps(args, ensure_ascii=False)
    try:
        return click.confirm(f"[mcp] run {server}.{tool} {shown}?", default=False, err=True)
    except click.Abort:
        return False


def stream_reply(llm: Any, messages: list[dict], write: Callable[[str], None], *, mcp_max_rounds: int,
                 mcp_timeout: float, **kw: Any) -> tuple[str, str]:
    """One reply through the tool loop: text through `write`, calls and results on stderr; (text, finish)."""
    parts, finish = [], "stop"
    stream = llm.mcp_chat(messages, stream=True, max_rounds=mcp_max_rounds, timeout=mcp_timeout, **kw)
    try:
        for chunk in stream:
            choice = chunk["choices"][0]
            delta = choice.get("delta") or {}
            if delta.get("content"):
                write(delta["content"])
                parts.append(delta["content"])
            call = delta.get("mcp_call")
            if call:
                click.echo(f"\n[mcp] {call['server']}.{call['name']} {json.dumps(call['arguments'], ensure_ascii=False)}",
                           err=True)
            result = delta.get("mcp_result")
            if result:
                text = result["output"]
                text = text if len(text) <= SHOWN_RESULT_CHARS else text[:SHOWN_RESULT_CHARS] + "..."
                click.echo(f"[mcp] {'error' if result['is_error'] else 'result'}: {text}", err=True)
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
    except KeyboardInterrupt:
        finish = "cancelled"
    finally:
        stream.close()
    return "".join(parts), finish
