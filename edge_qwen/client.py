"""QwenClient: the Qwen cloud SDK call shape, against an edge-qwen server or in-process.

    client = QwenClient(base_url="http://localhost:8000")      # over HTTP (httpx)
    client = QwenClient(model_path="model.gguf")                # in-process, no server
    r = client.chat(model="qwen2.5", messages=[...], temperature=0.2, max_tokens=512)
    r["choices"][0]["message"]["content"]

Both modes return the same OpenAI-shaped dict (chunk dicts when streaming) and raise one
exception type, QwenAPIError, carrying the HTTP status and the error body. Importing this
module is cheap: httpx and the runtime are imported on first use.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_BASE_URL = "http://localhost:8000"
DEFAULT_MODEL_NAME = "qwen2.5"  # the name the server gives the model it serves first
NO_RESPONSE = 0  # QwenAPIError.status when no HTTP answer came back (connection refused, timeout)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """An OpenAI-shaped error body: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_body_of(exc: Exception) -> dict[str, Any]:
    """The error body for an EdgeQwenError (its message, type, param and code)."""
    return error_body(getattr(exc, "message", str(exc)), getattr(exc, "type", "server_error"),
                      getattr(exc, "param", None), getattr(exc, "code", None))


class QwenAPIError(Exception):
    """Any failed call: `status` is the HTTP status (0 when no answer came), `body` the error body."""

    def __init__(self, status: int, body: dict[str, Any], message: str | None = None):
        err = body.get("error") if isinstance(body, dict) else None
        if message is None:
            message = err.get("message") if isinstance(err, dict) else str(body)
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.body = body
        self.message = message

    @property
    def code(self) -> str | None:
        err = self.body.get("error") if isinstance(self.body, dict) else None
        return err.get("code") if isinstance(err, dict) else None


class QwenClient:
    """Chat with Qwen2.5 over an edge-qwen server (`base_url`) or in-process (`model_path`).

    `api_key` defaults to $EDGE_QWEN_API_KEY; it is sent as `Authorization: Bearer KEY`.
    In-process mode loads the GGUF once (EdgeQwen) and answers the model names the server
    would: "qwen2.5", "default", the file stem, or None.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 600.0, *,
                 model_path: str | os.PathLike | None = None, n_ctx: int = 4096, **llm_options: Any):
        if base_url is not None and model_path is not None:
            raise ValueError("give base_url (a server) or model_path (in-process), not both")
        self.timeout = timeout
        self._llm = None
        self._http = None
        if model_path is not None:
            from .errors import EdgeQwenError
            from .runtime import EdgeQwen
            from .store import resolve_model

            try:
                path = resolve_model(None if str(model_path) in ("", "default") else model_path)
                self._llm = EdgeQwen(path, n_ctx=n_ctx, **llm_options)
            except EdgeQwenError as e:
                raise QwenAPIError(e.status, error_body_of(e)) from None
            self._names = {DEFAULT_MODEL_NAME, "default", Path(path).stem}
            self.base_url = None
        else:
            self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
            self.api_key = api_key if api_key is not None else os.environ.get("EDGE_QWEN_API_KEY")

    # -- public API -------------------------------------------------------------------------

    def chat(self, model: str | None = DEFAULT_MODEL_NAME, messages: list[dict[str, Any]] | None = None,
             temperature: float = 0.7, max_tokens: int = 1024, top_p: float = 0.9, stream: bool = False,
             stop: str | list[str] | None = None, response_format: dict[str, Any] | None = None,
             seed: int | None = None) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """One chat completion: the OpenAI-shaped dict, or an iterator of chunk dicts if `stream`.

        Raises QwenAPIError (status + error body) for every failure, in both modes. Closing a
        stream early (break out of the loop) stops the generation.
        """
        if messages is None:
            raise QwenAPIError(400, error_body("messages is required", param="messages", code="invalid_request"))
        payload: dict[str, Any] = {"model": model, "messages": messages, "temperature": temperature,
                                   "max_tokens": max_tokens, "top_p": top_p, "stream": stream}
        if stop is not None:
            payload["stop"] = stop
        if response_format is not None:
            payload["response_format"] = response_format
        if seed is not None:
            payload["seed"] = seed
        if self._llm is not None:
            return self._local(payload)
        if stream:
            return self._stream("/v1/chat/completions", payload)
        return self._request("POST", "/v1/chat/completions", payload)

    def models(self) -> list[str]:
        """Names of the models the server (or this in-process client) answers to."""
        if self._llm is not None:
            return sorted(self._names)
        return [m["id"] for m in self._request("GET", "/v1/models")["data"]]

    def health(self) -> dict[str, Any]:
        """The server's /health body (in-process: {"status": "ok"})."""
        if self._llm is not None:
            return {"status": "ok", "models": sorted(self._names)}
        return self._request("GET", "/health")

    def close(self) -> None:
        """Close the HTTP connection pool and free an in-process model."""
        if self._http is not None:
            self._http.close()
            self._http = None
        if self._llm is not None:
            close = getattr(self._llm, "close", None)
            if close:
                close()
            self._llm = None

    def __enter__(self) -> QwenClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- in-process ------------------------------------------------------------------------

    def _local(self, payload: dict[str, Any]) -> Any:
        from .errors import EdgeQwenError, ModelNotFoundError

        model = payload.pop("model")
        stream = payload.pop("stream")
        try:
            if model is not None and model not in self._names:
                raise ModelNotFoundError(f"model {model!r} is not loaded here; available: {', '.join(sorted(self._names))}",
                                         param="model")
            name = model or DEFAULT_MODEL_NAME
            messages = payload.pop("messages")
            result = self._llm.chat(messages, stream=stream, **payload)
        except EdgeQwenError as e:
            raise QwenAPIError(e.status, error_body_of(e)) from None
        if not stream:
            result["model"] = name
            return result
        return self._local_stream(result, name)

    @staticmethod
    def _local_stream(chunks: Iterator[dict[str, Any]], name: str) -> Iterator[dict[str, Any]]:
        from .errors import EdgeQwenError

        try:
            for chunk in chunks:
                chunk["model"] = name
                yield chunk
        except EdgeQwenError as e:
            raise QwenAPIError(e.status, error_body_of(e)) from None
        finally:
            close = getattr(chunks, "close", None)
            if close:
                close()

    # -- over HTTP -------------------------------------------------------------------------

    def _client(self):
        if self._http is None:
            import httpx

            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=self.timeout)
        return self._http

    def _transport_error(self, e: Exception) -> QwenAPIError:
        return QwenAPIError(NO_RESPONSE, error_body(f"no answer from {self.base_url}: {type(e).__name__}: {e}; "
                                                    "is `edge-qwen serve` running there?", type="connection_error",
                                                    code="connection_error"))

    @staticmethod
    def _error_of(status: int, raw: bytes) -> QwenAPIError:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not (isinstance(body, dict) and isinstance(body.get("error"), dict)):
            body = error_body(raw.decode("utf-8", "replace")[:500] or f"HTTP {status}", type="http_error")
        return QwenAPIError(status, body)

    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        import httpx

        try:
            r = self._client().request(method, path, json=payload)
        except httpx.HTTPError as e:
            raise self._transport_error(e) from None
        if r.status_code >= 400:
            raise self._error_of(r.status_code, r.content)
        return r.json()

    def _stream(self, path: str, payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
        import httpx

        # Open the connection now so an HTTP error surfaces at the call, not at the first next().
        try:
            cm = self._client().stream("POST", path, json=payload)
            r = cm.__enter__()
        except httpx.HTTPError as e:
            raise self._transport_error(e) from None
        if r.status_code >= 400:
            raw = r.read()
            cm.__exit__(None, None, None)
            raise self._error_of(r.status_code, raw)
        return self._events(cm, r)

    def _events(self, cm: Any, r: Any) -> Iterator[dict[str, Any]]:
        import httpx

        try:
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:  # an error after the stream began: the server adds its status
                    raise QwenAPIError(int(event.pop("status", 500)), event)
                yield event
        except httpx.HTTPError as e:
            raise self._transport_error(e) from None
        finally:
            cm.__exit__(None, None, None)  # closing the response tells the server to stop generating
