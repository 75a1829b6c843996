"""Errors on the wire: the OpenAI-shaped error body, QwenAPIError, and a request as JSON bytes.

Shared by the server (which answers error bodies), QwenClient (which raises QwenAPIError in both
of its modes) and anything else that speaks the API. Imports nothing heavy.
"""

from __future__ import annotations

import json
import math
from typing import Any


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


def not_json(value: Any, path: str, stack: set[int]) -> tuple[str, str] | None:
    """(path, problem) for the first part of `value` that json.dumps(allow_nan=False) plus UTF-8 refuses."""
    where = path or "request"
    if value is None or isinstance(value, (bool, int)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (
            where, f"{value!r} is not a JSON number (NaN and Infinity cannot be sent); send a finite number")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return where, (f"contains a lone UTF-16 surrogate ({value[e.start]!r} at index {e.start}), which is "
                           "not valid Unicode; send well-formed text")
        return None
    if not isinstance(value, (list, tuple, dict)):
        return where, (f"a value of type {type(value).__name__!r} cannot be sent as JSON; send a str, int, "
                       "float, bool, None, list or dict")
    if id(value) in stack:
        return where, "contains itself (a circular reference), which JSON cannot carry"
    stack.add(id(value))
    try:
        if isinstance(value, dict):
            for k, v in value.items():
                inner = f"{path}.{k}" if path else str(k)
                if not isinstance(k, (str, int, float, bool)) and k is not None:
                    return where, f"has a key of type {type(k).__name__}; JSON object keys must be strings"
                problem = not_json(k, inner, stack) if isinstance(k, (str, float)) else None
                if problem is None:
                    problem = not_json(v, inner, stack)
                if problem is not None:
                    return problem
            return None
        for i, v in enumerate(value):
            problem = not_json(v, f"{path}.{i}" if path else str(i), stack)
            if problem is not None:
                return problem
        return None
    finally:
        stack.discard(id(value))


def encode_request(payload: dict[str, Any]) -> bytes:
    """The request body as UTF-8 JSON, or QwenAPIError 400 naming the part that JSON cannot carry."""
    try:
        return json.dumps(payload, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        param, problem = None, "nested too deeply to be sent as JSON"
    except (ValueError, TypeError) as e:  # UnicodeEncodeError is a ValueError
        param, problem = not_json(payload, "", set()) or (None, f"cannot be sent as JSON ({e})")
    raise QwenAPIError(400, error_body(f"{param or 'request'}: {problem}", param=param, code="invalid_request"))


def api_key_problem(key: str) -> str | None:
    """Why `key` cannot be an API key (HTTP headers carry printable ASCII only), or None if it can."""
    if key and key.isascii() and key.isprintable() and key.strip() == key:
        return None
    return ("the API key must be non-empty printable ASCII without surrounding spaces (HTTP headers carry nothing "
            "else reliably)")
