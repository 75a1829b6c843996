"""QwenClient: the Qwen cloud SDK call shape, against an edge-qwen server or in-process.

    client = QwenClient(base_url="http://localhost:8000")      # over HTTP (httpx)
    client = QwenClient(model_path="model.gguf")                # in-process, no server
    r = client.chat(model="qwen2.5", messages=[...], temperature=0.2, max_tokens=512)
    r["choices"][0]["message"]["content"]

The two modes behave the same. Both first check that the request can be sent as JSON (no NaN,
no lone surrogate, no object JSON cannot carry). The in-process mode then validates the
JSON-decoded request with the server's own request schema (edge_qwen.serve.protocol), so it
accepts and refuses exactly what `edge-qwen serve` accepts and refuses. It answers the same
model names and returns the same dicts (chunk dicts when streaming), with the same `models()`
list and the same `health()` shape as a server that serves one model as "qwen2.5".

Every failure raises QwenAPIError, carrying an HTTP status and an OpenAI-shaped error body:
400/401/404/413/503 for a refused request, 500 for an internal error (in-process: any unexpected
exception from the runtime, chained as the cause), 0 when no HTTP answer came back or the client
was closed. An answer that is not an edge-qwen server's answer (another web server on that port)
raises code "bad_response" with the status it came with. Importing this module is cheap: httpx,
pydantic and the runtime are imported on first use.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .serve.api_errors import QwenAPIError, api_key_problem, encode_request, error_body, error_body_of

DEFAULT_BASE_URL = "http://localhost:8000"
DEFAULT_MODEL_NAME = "qwen2.5"  # the name the server gives the model it serves first
NO_RESPONSE = 0  # QwenAPIError.status when no HTTP answer came back (connection refused, timeout, closed client)

__all__ = ["QwenClient", "QwenAPIError", "error_body", "error_body_of", "DEFAULT_BASE_URL", "DEFAULT_MODEL_NAME"]


@contextmanager
def _runtime_errors() -> Iterator[None]:
    """Turn what the in-process runtime raises into QwenAPIError, as the server turns it into a status."""
    from .errors import EdgeQwenError

    try:
        yield
    except QwenAPIError:
        raise
    except EdgeQwenError as e:
        raise QwenAPIError(e.status, error_body_of(e)) from None
    except Exception as e:  # a bug, not a bad request: 500 as the server answers it, with the cause chained
        raise QwenAPIError(500, error_body(
            f"internal error in the in-process runtime ({type(e).__name__}: {e}); this is an edge-qwen bug, "
            "please report it with the request that caused it", type="server_error", code="internal_error")) from e


class QwenClient:
    """Chat with Qwen2.5 over an edge-qwen server (`base_url`) or in-process (`model_path`).

    `api_key` defaults to $EDGE_QWEN_API_KEY; it is sent as `Authorization: Bearer KEY`.
    In-process mode loads the GGUF once (EdgeQwen) and acts as `edge-qwen serve` serving that
    file: models() is ["qwen2.5"], chat() also answers to "default", the file stem and None
    (answers name the model "qwen2.5"), and health() has the server's /health shape. After
    close(), every call raises QwenAPIError with code "client_closed".
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 600.0, *,
                 model_path: str | os.PathLike | None = None, n_ctx: int = 4096, prompt_cache: bool = True,
                 **llm_options: Any):
        if base_url is not None and model_path is not None:
            raise ValueError("give base_url (a server) or model_path (in-process), not both")
        self.timeout = timeout
        self._llm: Any = None
        self._http: Any = None
        self._closed = False
        self.base_url: str | None = None
        self.api_key: str | None = None
        self._prompt_cache = prompt_cache  # in-process: as `edge-qwen serve` does (seeded requests afresh)
        if model_path is not None:
            from .runtime import EdgeQwen
            from .store import resolve_model

            with _runtime_errors():
                path = resolve_model(None if str(model_path) in ("", "default") else model_path)
                self._llm = EdgeQwen(path, n_ctx=n_ctx, **llm_options)
            # The names the server's first model also answers to, in the server's order.
            self._aliases = tuple(dict.fromkeys(a for a in ("default", Path(path).stem) if a != DEFAULT_MODEL_NAME))
            # What the server's /health reports per model (see server._Slot.describe).
            self._pending = 0  # generating + waiting
            self._stats = {"requests": 0, "cancelled": 0, "last_completion_tokens": 0}
            self._stats_lock = threading.Lock()
        else:
            self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
            self.api_key = api_key if api_key is not None else os.environ.get("EDGE_QWEN_API_KEY")
            if self.api_key and api_key_problem(self.api_key):
                raise QwenAPIError(400, error_body(f"api_key: {api_key_problem(self.api_key)}", param="api_key",
                                                   code="invalid_request"))

    # -- public API -------------------------------------------------------------------------

    def chat(self, model: str | None = DEFAULT_MODEL_NAME, messages: list[dict[str, Any]] | None = None,
             temperature: float = 0.7, max_tokens: int = 1024, top_p: float = 0.9, stream: bool = False,
             stop: str | list[str] | None = None, response_format: dict[str, Any] | None = None,
             seed: int | None = None) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """One chat completion: the OpenAI-shaped dict, or an iterator of chunk dicts if `stream`.

        The request is what POST /v1/chat/completions takes, validated the same way in both
        modes (values take their JSON type: "0.5" is not a number, 2.0 is not an integer).
        Raises QwenAPIError (status + error body) for every failure, in both modes; with
        `stream`, a failure before the first chunk is raised here, at the call. Closing a
        stream (break out of the loop, then close it or drop it) stops the generation.
        """
        self._check_open()
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
        body = encode_request(payload)
        if self._llm is not None:
            return self._local(json.loads(body))  # what the server would decode, e.g. tuples become lists
        if stream:
            gen = self._events("/v1/chat/completions", body)
            next(gen)  # opens the stream: an HTTP error surfaces here, not at the first next()
            return gen
        return self._request("POST", "/v1/chat/completions", body, expect="choices")

    def models(self) -> list[str]:
        """Names of the models the server lists at /v1/models (in-process: ["qwen2.5"])."""
        self._check_open()
        if self._llm is not None:
            return [DEFAULT_MODEL_NAME]
        data = self._request("GET", "/v1/models", expect="data")["data"]
        if not (isinstance(data, list) and all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data)):
            raise self._bad_response(200, "GET /v1/models", "has no list of models with ids")
        return [m["id"] for m in data]

    def health(self) -> dict[str, Any]:
        """The server's /health body: {"status", "version", "time", "models": {name: state}}.

        In-process, the one model is "qwen2.5" and its state has the server's keys: path,
        loaded, generating, slots, busy, free, waiting, requests, cancelled, last_completion_tokens,
        kv_cache and engine_steps.
        """
        self._check_open()
        if self._llm is None:
            return self._request("GET", "/health", expect="status")
        from . import __version__

        parallel = int(getattr(self._llm, "parallel", 1))
        with self._stats_lock:
            busy = min(self._pending, parallel)
            state = {"path": str(self._llm.model_path), "loaded": True, "generating": self._pending > 0,
                     "slots": parallel, "busy": busy, "free": parallel - busy,
                     "waiting": max(self._pending - parallel, 0), **self._stats}
        if hasattr(self._llm, "engine_health"):  # the same engine figures as the server's /health
            state.update(self._llm.engine_health())
        return {"status": "ok", "version": __version__, "time": time.time(), "models": {DEFAULT_MODEL_NAME: state}}

    def close(self) -> None:
        """Close the HTTP connection pool or free the in-process model; later calls raise "client_closed".

        Closing twice is harmless. In-process, a stream still open in this thread must be closed
        first (QwenAPIError 503 otherwise, and the client stays open).
        """
        if self._llm is not None:
            close = getattr(self._llm, "close", None)
            if close:
                with _runtime_errors():
                    close()
            self._llm = None
        if self._http is not None:
            self._http.close()
            self._http = None
        self._closed = True

    def __enter__(self) -> QwenClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise QwenAPIError(NO_RESPONSE, error_body(
                "this QwenClient was closed (close() or the end of its `with` block); create a new QwenClient "
                "to make more calls", code="client_closed"))

    # -- in-process ------------------------------------------------------------------------

    def _local(self, payload: dict[str, Any]) -> Any:
        from pydantic import ValidationError

        from .serve.protocol import ChatRequest, validation_error_body

        try:
            body = ChatRequest.model_validate(payload)
        except ValidationError as e:
            raise QwenAPIError(400, validation_error_body(e.errors())) from None
        with _runtime_errors():
            self._check_model(body.model)
            kwargs = body.runtime_kwargs()
        messages = kwargs.pop("messages")
        kwargs["reuse_prefix"] = self._prompt_cache and body.seed is None
        if body.stream:
            gen = self._local_stream(messages, kwargs)
            next(gen)  # runs to the first chunk, so a failure is raised at the call, as over HTTP
            return gen
        tokens = 0
        self._begin()
        try:
            with _runtime_errors():
                result = self._llm.chat(messages, stream=False, **kwargs)
            tokens = int(result["usage"]["completion_tokens"])
        finally:
            self._end(tokens, False)
        result["model"] = DEFAULT_MODEL_NAME
        return result

    def _check_model(self, name: str | None) -> None:
        from .errors import ModelNotFoundError

        if name not in (None, "", DEFAULT_MODEL_NAME) and name not in self._aliases:
            raise ModelNotFoundError(
                f"model {name!r} is not served here; available models: {DEFAULT_MODEL_NAME} "
                f"(which also answers to {', '.join(repr(a) for a in self._aliases)})", param="model")

    def _local_stream(self, messages: list[dict[str, str]], kwargs: dict[str, Any]) -> Iterator[Any]:
        # Yields None once the first chunk is in hand, then the chunks. Being started, the
        # generator runs its `finally` (which frees the model) even if it is dropped unread.
        tokens, cancelled, chunks = 0, False, None
        self._begin()
        try:
            with _runtime_errors():
                chunks = self._llm.chat(messages, stream=True, **kwargs)
                chunk = next(chunks, None)
            yield None
            while chunk is not None:
                chunk["model"] = DEFAULT_MODEL_NAME
                usage = chunk.get("usage")
                if usage:
                    tokens = int(usage.get("completion_tokens", tokens))
                elif chunk["choices"][0]["delta"].get("content"):
                    tokens += 1  # a lower bound, kept in case the stream is closed before its usage comes
                yield chunk
                with _runtime_errors():
                    chunk = next(chunks, None)
        except GeneratorExit:
            cancelled = True
            raise
        finally:
            close = getattr(chunks, "close", None)
            if close:
                close()
            self._end(tokens, cancelled)

    def _begin(self) -> None:
        with self._stats_lock:
            self._pending += 1

    def _end(self, tokens: int, cancelled: bool) -> None:
        with self._stats_lock:
            self._pending -= 1
            self._stats["requests"] += 1
            self._stats["cancelled"] += int(cancelled)
            self._stats["last_completion_tokens"] = tokens

    # -- over HTTP -------------------------------------------------------------------------

    def _client(self) -> Any:
        if self._http is None:
            import httpx

            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=self.timeout)
        return self._http

    @staticmethod
    def _httpx_errors() -> tuple[type[Exception], ...]:
        import httpx

        return httpx.HTTPError, httpx.InvalidURL, httpx.StreamError

    def _transport_error(self, e: Exception) -> QwenAPIError:
        return QwenAPIError(NO_RESPONSE, error_body(f"no answer from {self.base_url}: {type(e).__name__}: {e}; "
                                                    "is `edge-qwen serve` running there?", type="connection_error",
                                                    code="connection_error"))

    def _bad_response(self, status: int, what: str, problem: str) -> QwenAPIError:
        return QwenAPIError(status, error_body(
            f"{what} on {self.base_url} answered HTTP {status} with a body that {problem}: this is not an "
            "edge-qwen server; check base_url", type="http_error", code="bad_response"))

    @staticmethod
    def _error_of(status: int, raw: bytes) -> QwenAPIError:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not (isinstance(body, dict) and isinstance(body.get("error"), dict)):
            body = error_body(raw.decode("utf-8", "replace")[:500] or f"HTTP {status}", type="http_error")
        return QwenAPIError(status, body)

    def _request(self, method: str, path: str, body: bytes | None = None, *, expect: str) -> dict[str, Any]:
        """The JSON object answered to `method path`; it must have the key `expect`."""
        headers = {"Content-Type": "application/json"} if body is not None else None
        try:
            r = self._client().request(method, path, content=body, headers=headers)
        except self._httpx_errors() as e:
            raise self._transport_error(e) from None
        if r.status_code >= 400:
            raise self._error_of(r.status_code, r.content)
        try:
            data = json.loads(r.content)
        except ValueError:  # also a body that is not UTF-8
            raise self._bad_response(r.status_code, f"{method} {path}", "is not JSON") from None
        if not (isinstance(data, dict) and expect in data):
            raise self._bad_response(r.status_code, f"{method} {path}", f"is not a JSON object with {expect!r}")
        return data

    def _events(self, path: str, body: bytes) -> Iterator[Any]:
        # Yields None once the response has started (an HTTP error or a non-SSE answer is raised
        # before that), then the chunk dicts. Closing the response tells the server to stop generating.
        errors = self._httpx_errors()
        what = f"POST {path}"
        try:
            cm = self._client().stream("POST", path, content=body, headers={"Content-Type": "application/json"})
            r = cm.__enter__()
        except errors as e:
            raise self._transport_error(e) from None
        try:
            if r.status_code >= 400:
                raise self._error_of(r.status_code, r.read())
            if not r.headers.get("content-type", "").startswith("text/event-stream"):
                raise self._bad_response(r.status_code, what, "is not an event stream (text/event-stream)")
            yield None
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    event = json.loads(data)
                except ValueError:
                    raise self._bad_response(r.status_code, what, f"has an event that is not JSON ({data[:80]!r})") \
                        from None
                if isinstance(event, dict) and isinstance(event.get("error"), dict):
                    # An error after the stream began: the server adds its status.
                    status = event.pop("status", 500)
                    raise QwenAPIError(status if isinstance(status, int) else 500, event)
                if not (isinstance(event, dict) and "choices" in event):
                    raise self._bad_response(r.status_code, what, f"has an event that is not a chunk ({data[:80]!r})")
                yield event
            raise QwenAPIError(NO_RESPONSE, error_body(
                f"{what} on {self.base_url}: the event stream ended before [DONE] (the server closed the "
                "connection mid-answer); retry the request", type="connection_error", code="incomplete_stream"))
        except errors as e:
            raise self._transport_error(e) from None
        finally:
            cm.__exit__(None, None, None)
