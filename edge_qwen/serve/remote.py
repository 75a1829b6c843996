"""Talking to a running `edge-qwen serve` from another process: what it has loaded, and unloading.

`loaded_models` reads GET /api/ps; `unload_model` sends Ollama's unload request (POST /api/generate
with `keep_alive: 0` and no prompt), as `ollama ps` and `ollama stop` do, so the same two
commands also work against Ollama itself. `edge-qwen ps` and `stop` are thin shells over these.
"""

from __future__ import annotations

from typing import Any

from ..errors import EdgeQwenError, ModelNotFoundError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


class ServerError(EdgeQwenError):
    """No server answered, or it answered with an error."""

    status = 502


def base_url(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}"


def _call(method: str, url: str, path: str, api_key: str | None, body: dict[str, Any] | None = None,
          timeout: float = 60.0) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.request(method, url + path, json=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        raise ServerError(f"no edge-qwen server answered at {url} ({type(e).__name__}: {e}); start one with "
                          "`edge-qwen serve`, or give its --host and --port") from None
    try:
        data = r.json()
    except ValueError:
        data = None
    if r.status_code == 401:
        raise ServerError(f"the server at {url} needs an API key: pass --api-key or set EDGE_QWEN_API_KEY")
    if r.status_code == 404 and isinstance(data, dict) and isinstance(data.get("error"), str):
        raise ModelNotFoundError(data["error"])
    if r.status_code >= 400 or not isinstance(data, dict):
        message = data.get("error") if isinstance(data, dict) else None
        if isinstance(message, dict):
            message = message.get("message")
        raise ServerError(f"{method} {url}{path} answered {r.status_code}"
                          + (f": {message}" if message else " with something that is not an edge-qwen answer"))
    return data


def loaded_models(url: str, api_key: str | None = None) -> list[dict[str, Any]]:
    """The models the server at `url` has loaded (Ollama's /api/ps entries: name, size, details, context_length)."""
    models = _call("GET", url, "/api/ps", api_key).get("models")
    if not isinstance(models, list):
        raise ServerError(f"GET {url}/api/ps did not list models; is that an edge-qwen (or Ollama) server?")
    return models


def unload_model(url: str, model: str, api_key: str | None = None) -> dict[str, Any]:
    """Ask the server at `url` to unload `model` (it loads again on its next request)."""
    return _call("POST", url, "/api/generate", api_key, {"model": model, "keep_alive": 0})
