"""MCP (Model Context Protocol) client: tool servers a user chose, offered to the model, and the tool loop.

`config` reads the `{"mcpServers": {...}}` file Claude Desktop and Cursor use; `hub.MCPHub` starts
the servers it names (stdio or streamable HTTP, through the official `mcp` SDK) and calls their
tools; `loop.mcp_chat` runs the loop (the model calls, the result goes back as a tool message,
the model continues) within a number of rounds and a per-call timeout. The CLI's `chat --mcp`,
`serve --mcp` and `EdgeQwen(mcp=...)` use these.
"""

from .config import MCPConfigError, ServerSpec, load_config
from .hub import MCPHub, ToolResult
from .loop import DEFAULT_MAX_ROUNDS, DEFAULT_TIMEOUT_S, mcp_chat

__all__ = ["DEFAULT_MAX_ROUNDS", "DEFAULT_TIMEOUT_S", "MCPConfigError", "MCPHub", "ServerSpec", "ToolResult",
           "load_config", "mcp_chat"]
