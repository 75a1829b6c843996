"""MCP servers for the tests, written with the official `mcp` SDK and run over stdio like any user's.

`write_config(folder)` writes the server script and an `mcpServers` config naming it; the server
appends one JSON line per call (tool and arguments) to its log file, so a test sees from the
tool's own side that it was called. Its tools: `lookup_code` (a code word per project name),
`crash` (the server process dies mid-call) and `hang` (never answers).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

CODES = {"alpha": "ZEBRA-4417", "beta": "OTTER-2093", "阿尔法": "ZEBRA-4417"}

SERVER = r'''
import json, os, sys, time
from mcp.server.mcpserver import MCPServer

LOG = sys.argv[1]
CODES = json.loads(sys.argv[2])
server = MCPServer("codes")


def logged(tool, **args):
    with open(LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps({"tool": tool, "arguments": args}, ensure_ascii=False) + "\n")


@server.tool(description="Look up the secret code word of a project by its name.")
def lookup_code(project: str) -> str:
    logged("lookup_code", project=project)
    code = CODES.get(project.strip().lower())
    return f"The code word of project {project} is {code}." if code else f"No project named {project}."


@server.tool(description="Restart the build machine.")
def crash() -> str:
    logged("crash")
    os._exit(3)


@server.tool(description="Wait for the nightly report.")
def hang() -> str:
    logged("hang")
    time.sleep(3600)
    return "late"


server.run()
'''


def write_config(folder: Path, name: str = "codes") -> tuple[Path, Path]:
    """(config path, call log path) for the test server in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    script, log = folder / "codes_server.py", folder / "calls.jsonl"
    script.write_text(SERVER, encoding="utf-8")
    config = folder / "mcp.json"
    entry = {"command": sys.executable, "args": [str(script), str(log), json.dumps(CODES)]}
    if os.environ.get("PYTHONPATH"):  # an MCP server gets a clean environment: pass on where `mcp` is found
        entry["env"] = {"PYTHONPATH": os.environ["PYTHONPATH"]}
    config.write_text(json.dumps({"mcpServers": {name: entry}}), encoding="utf-8")
    return config, log


def calls(log: Path) -> list[dict]:
    """The calls the server logged, in order."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
