"""MCP servers for the tests, written with the official `mcp` SDK and run over stdio like any user's.

`write_config(folder)` writes the server script and an `mcpServers` config naming it; the server
appends one JSON line per call (tool and arguments) to its log file, so a test sees from the
tool's own side that it was called. Its tools: `lookup_code` (a code word per project name),
`crash` (the server process dies mid-call) and `hang` (never answers).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

CODES = {"alpha": "ZEBRA-4417", "beta": "OTTER-2093", "阿尔法": "ZEBRA-4417"}

SERVER = r'''
import json, os, sys, time
from mcp.server.mcpserver import MCPServer

LOG = sys.argv[1]
CODES = json.loads(sys.argv[2])
TOOLS = sys.argv[3].split(",")
server = MCPServer("codes")


def logged(tool, **args):
    with open(LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps({"tool": tool, "arguments": args}, ensure_ascii=False) + "\n")


def tool(description):
    def register(fn):
        return server.tool(description=description)(fn) if fn.__name__ in TOOLS else fn
    return register


@tool("Look up the secret code word of a project by its name.")
def lookup_code(project: str) -> str:
    logged("lookup_code", project=project)
    code = CODES.get(project.strip().lower())
    return f"The code word of project {project} is {code}." if code else f"No project named {project}."


@tool("Restart the build machine.")
def crash() -> str:
    logged("crash")
    os._exit(3)


@tool("Wait for the nightly report.")
def hang() -> str:
    logged("hang")
    time.sleep(3600)
    return "late"


if len(sys.argv) > 4:  # streamable HTTP on 127.0.0.1:PORT
    server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[4]))
else:
    server.run()
'''


def write_config(folder: Path, name: str = "codes", tools: str = "lookup_code") -> tuple[Path, Path]:
    """(config path, call log path) for the test server in `folder`, offering `tools` (comma-separated;
    fewer tools make shorter prompts)."""
    folder.mkdir(parents=True, exist_ok=True)
    script, log = folder / "codes_server.py", folder / "calls.jsonl"
    script.write_text(SERVER, encoding="utf-8")
    config = folder / "mcp.json"
    entry = {"command": sys.executable, "args": [str(script), str(log), json.dumps(CODES), tools]}
    if os.environ.get("PYTHONPATH"):  # an MCP server gets a clean environment: pass on where `mcp` is found
        entry["env"] = {"PYTHONPATH": os.environ["PYTHONPATH"]}
    config.write_text(json.dumps({"mcpServers": {name: entry}}), encoding="utf-8")
    return config, log


def start_http(folder: Path, tools: str = "lookup_code") -> tuple[str, Path, subprocess.Popen]:
    """The test server over streamable HTTP on a free loopback port: (its /mcp url, call log, process)."""
    folder.mkdir(parents=True, exist_ok=True)
    script, log = folder / "codes_server.py", folder / "calls.jsonl"
    script.write_text(SERVER, encoding="utf-8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(script), str(log), json.dumps(CODES), tools, str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the streamable-HTTP test server did not start")
        time.sleep(0.1)
    return f"http://127.0.0.1:{port}/mcp", log, proc


def calls(log: Path) -> list[dict]:
    """The calls the server logged, in order."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
