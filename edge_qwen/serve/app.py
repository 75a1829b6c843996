"""The HTTP server: app construction, middleware, errors, models and health over EdgeQwen.

Here: GET /v1/models, GET /health, and the OpenAPI schema (/openapi.json, /docs). Each API
family is a module with its own router (see `_families`): openai_chat (POST /v1/chat/completions),
qwen (POST /api/v1/qwen/predict), completions, embeddings, responses, tokenize, ollama, rag, metrics.

How a request runs: each served model's EdgeQwen has one batched engine
(edge_qwen.engine.scheduler) that decodes up to `parallel` generations together (`serve
--parallel N`, default 4 on a CPU / 8 on a GPU, fewer if their KV cache would not fit), with a
bounded FIFO queue in front of it; a request that finds every slot busy and the queue full is
answered 503 with Retry-After. Each generation is consumed in a worker thread (the event loop
never waits on llama.cpp); streamed chunks cross to the loop through an asyncio queue and go
out as server-sent events. A client that disconnects sets the request's cancel event, and the
engine frees its slot at the next step.

The prompt cache (on unless `prompt_cache=False` / `serve --no-prompt-cache`): each engine slot
keeps the KV cache of its last request, and a new prompt evaluates only what it does not share
with the longest cached prefix (the system prompt, earlier turns), as llama.cpp's server and
vLLM do -- but only within one scope: the same bearer token and the same `cache_salt`, so no
client can learn another's prompt from `cached_tokens` or timing. llama.cpp's logits are not
bit-identical across batch shapes, so a reused prefix can tip a greedy near-tie; a request that
sets `seed` is therefore evaluated afresh, and reproduces exactly when it runs alone.

Every error is OpenAI-shaped: {"error": {"message", "type", "param", "code"}}. Request
validation failures (malformed JSON, wrong types, missing fields) are 400, not FastAPI's 422,
because OpenAI clients expect 400 for a bad request (the one 422 is a valid JSON request whose
answer failed schema validation on every retry, engine/json_retry.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .anthropic import anthropic_error_body, is_anthropic_path
from .api_errors import api_key_problem, error_body, error_body_of
from ..errors import BusyError, ContextOverflowError, EdgeQwenError, ModelNotFoundError
from ..web import router as web_router
from .openai_chat import ShuttingDownError  # noqa: F401 -- re-exported: the server's error classes live here
from .protocol import BodyLimit, ErrorBody, send_error, validation_error

log = logging.getLogger("edge_qwen.serve.app")

DEFAULT_NAME = "qwen2.5"
DEFAULT_MAX_QUEUE = 16
DEFAULT_MAX_BODY = 1_000_000
RETRY_AFTER_S = 2


class AuthError(EdgeQwenError):
    """A request without the server's API key."""

    status = 401
    code = "invalid_api_key"


class QueueFullError(BusyError):
    """Every place in a model's queue is taken."""

    code = "queue_full"


def model_table(paths: list[str] | tuple[str, ...] = (), named: list[str] | tuple[str, ...] = ()) -> dict[str, Path]:
    """Served names for `serve`'s arguments: NAME=PATH entries and bare paths (named by file stem).

    With neither, the default model is served as "qwen2.5". Raises RequestError for a
    malformed or repeated name.
    """
    from ..errors import RequestError
    from ..store import resolve_model

    table: dict[str, Path] = {}

    def add(name: str, path: str) -> None:
        if not name or not path:
            raise RequestError(f"--model {name}={path}: give it as NAME=PATH, e.g. --model qwen-0.5b=models/x.gguf")
        if name in table:
            raise RequestError(f"model name {name!r} is given twice ({table[name]} and {path}); give each a unique NAME")
        table[name] = resolve_model(path)

    for spec in named:
        if "=" not in spec:
            raise RequestError(f"--model {spec!r}: expected NAME=PATH, e.g. --model qwen-0.5b=models/x.gguf")
        name, path = spec.split("=", 1)
        add(name.strip(), path.strip())
    for path in paths:
        add(Path(path).stem, path)
    if not table:
        table[DEFAULT_NAME] = resolve_model(None)
    return table


class _Slot:
    """One served model: its EdgeQwen (whose engine runs up to `parallel` generations at once) and the
    bounded FIFO queue in front of it."""

    def __init__(self, name: str, path: Path, max_queue: int, llm_options: dict[str, Any]):
        self.name, self.path, self.max_queue = name, path, max_queue
        self.llm_options = llm_options
        self.llm: Any = None
        self.owned = True  # False for an EdgeQwen the caller handed in (not closed here)
        self.kind = "chat"  # or "embedding" / "rerank": a pooled model (engine.pooled), set by _Models
        self.pooled_model: Any = None
        self._load_lock = threading.Lock()
        self._places: asyncio.Semaphore | None = None  # one per engine slot; FIFO for waiters
        self.pending = 0  # generating + waiting
        self.running = 0
        self.stats = {"requests": 0, "cancelled": 0, "last_completion_tokens": 0}

    @property
    def parallel(self) -> int:
        """Generations that run at once: the loaded engine's slots (or what it will be loaded with)."""
        if self.llm is not None:
            return int(getattr(self.llm, "parallel", 1))
        return int(self.llm_options.get("parallel") or 1)

    def model(self) -> Any:
        """The EdgeQwen, loaded on first call (at startup when the app preloads)."""
        with self._load_lock:
            if self.llm is None:
                from ..runtime import EdgeQwen

                options = dict(self.llm_options)
                if options.get("parallel") is None:  # the default for this machine and context
                    from ..device import default_parallel, select_device
                    from ..gguf_file import check_gguf

                    device = select_device(options.get("device", "auto"), options.get("n_threads"),
                                           options.get("n_gpu_layers")).device
                    options["parallel"] = default_parallel(device, options.get("n_ctx", 4096),
                                                           check_gguf(self.path).metadata)
                self.llm = EdgeQwen(self.path, **options)
            return self.llm

    def unload(self) -> bool:
        """Free the loaded model (Ollama's keep_alive 0, `edge-qwen stop`); it loads again on the next request.

        False if it was not loaded. A model answering requests is not unloaded (BusyError). A model
        the caller handed in already loaded is let go, not closed: it belongs to the caller.
        """
        if self.pending:
            raise BusyError(f"model {self.name!r} is answering {self.pending} request"
                            f"{'s' if self.pending != 1 else ''}; stop it when they are done")
        with self._load_lock:
            if self.pooled_model is not None:  # an embedding model or reranker
                pooled, self.pooled_model = self.pooled_model, None
                pooled.close()
                return True
            if self.llm is None:
                return False
            llm, self.llm = self.llm, None
            # loaded again as it was: the same number of slots the request queue was sized for
            self.llm_options = {**self.llm_options, "parallel": int(getattr(llm, "parallel", 1))}
            if self.owned:
                llm.close()
        return True
    def pooled(self) -> Any:
        """The embedding model (rag.embed.Embedder) or reranker (engine.pooled.Reranker) this slot serves."""
        with self._load_lock:
            if self.pooled_model is None:
                threads = self.llm_options.get("n_threads")
                if self.kind == "rerank":
                    from ..engine.pooled import Reranker

                    self.pooled_model = Reranker(self.path, n_threads=threads)
                else:
                    from ..rag.embed import Embedder

                    self.pooled_model = Embedder(self.path, n_threads=threads)
            return self.pooled_model

    async def acquire(self) -> None:
        if self._places is None:
            self._places = asyncio.Semaphore(self.parallel)
        if self.pending >= self.parallel + self.max_queue:
            raise QueueFullError(
                f"model {self.name!r} is busy: {self.running} request{'s' if self.running != 1 else ''} generating "
                f"(--parallel {self.parallel}) and {self.pending - self.running} waiting, the most this server "
                f"queues (--max-queue {self.max_queue}); retry in a few seconds")
        self.pending += 1
        try:
            await self._places.acquire()
        except BaseException:
            self.pending -= 1
            raise
        self.running += 1

    def release(self, tokens: int = 0, cancelled: bool = False) -> None:
        self.stats["requests"] += 1
        self.stats["cancelled"] += int(cancelled)
        self.stats["last_completion_tokens"] = tokens
        self.pending -= 1
        self.running -= 1
        assert self._places is not None
        self._places.release()

    def describe(self) -> dict[str, Any]:
        """/health's entry: slots busy/free, requests waiting, and the engine's KV cache."""
        out = {"path": str(self.path), "loaded": self.llm is not None, "generating": self.running > 0,
               "slots": self.parallel, "busy": self.running, "free": self.parallel - self.running,
               "waiting": max(self.pending - self.running, 0), **self.stats}
        if hasattr(self.llm, "engine_health"):
            out.update(self.llm.engine_health())
        return out


class _Models:
    """Served names -> slots. The first model also answers to "qwen2.5", "default" and no name."""

    def __init__(self, table: Mapping[str, Any], max_queue: int, llm_options: dict[str, Any],
                 aliases: Mapping[str, str] | None = None):
        from ..gguf_file import check_gguf

        if not table:
            raise ValueError("create_app needs at least one model")
        self.slots: dict[str, _Slot] = {}
        for name, model in table.items():
            if hasattr(model, "chat") and hasattr(model, "model_path"):  # an EdgeQwen already loaded
                self.slots[name] = _Slot(name, Path(model.model_path), max_queue, llm_options)
                self.slots[name].llm = model
                self.slots[name].owned = False
                continue
            info = check_gguf(model)  # a bad file fails here with a clear message, before llama.cpp sees it
            self.slots[name] = _Slot(name, Path(model), max_queue, llm_options)
            from ..engine.pooled import model_kind

            self.slots[name].kind = model_kind(info.metadata, info.architecture)
        first = next(iter(self.slots.values()))
        self.aliases = {a: first for a in (DEFAULT_NAME, "default", first.path.stem) if a not in self.slots}
        # `serve --alias PATTERN=NAME`: other names (fnmatch patterns, e.g. "claude-*") for a served model.
        self.patterns: dict[str, _Slot] = {}
        for pattern, target in (aliases or {}).items():
            slot = self.slots.get(target) or self.aliases.get(target)
            if slot is None:
                from ..errors import RequestError

                raise RequestError(f"--alias {pattern}={target}: {target!r} is not a served model; serve it or "
                                   f"name one of {', '.join(self.slots)}", param="alias")
            self.patterns[pattern] = slot

    def get(self, name: str | None) -> _Slot:
        if name is None or name == "":
            return next(iter(self.slots.values()))
        slot = self.slots.get(name) or self.aliases.get(name) or self.patterns.get(name)
        if slot is None:
            from fnmatch import fnmatchcase

            slot = next((s for p, s in self.patterns.items() if fnmatchcase(name, p)), None)
        if slot is None:
            hint = (f"; names mapped by --alias: {', '.join(self.patterns)}" if self.patterns else
                    "; to answer a client that asks for another model's name, start the server with "
                    f"--alias '{_cut(name.split('-')[0], 32)}-*={next(iter(self.slots))}'")
            raise ModelNotFoundError(
                f"model {_cut(name)!r} is not served here; available models: {', '.join(self.slots)} "
                f"(the first also answers to {', '.join(repr(a) for a in self.aliases)}){hint}", param="model")
        return slot


def _cut(text: str, limit: int = 64) -> str:
    """A client's value as an error message may echo it: at most `limit` characters (a 500 KB name
    must not come back as a 500 KB error)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class _InternalErrors:
    """ASGI middleware: an unexpected exception becomes an OpenAI-shaped 500 answered here.

    Starlette's own 500 handler re-raises after answering, which makes uvicorn drop the
    keep-alive connection, so a client's next request on it would fail. Answered here, the
    connection stays usable. (Once a response has started it cannot be replaced: the stream ends.)
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await send_error(send, 500, error_body(f"internal server error ({type(exc).__name__}); see the "
                                                       "server log", type="server_error", code="internal_error"),
                                 scope=scope)


def create_app(models: Mapping[str, Any] | None = None, *, api_key: str | None = None,
               max_queue: int = DEFAULT_MAX_QUEUE, max_body_bytes: int = DEFAULT_MAX_BODY, n_ctx: int = 4096,
               max_tokens_limit: int | None = None, preload: bool = True, prompt_cache: bool = True,
               cors_origins: list[str] | tuple[str, ...] = (), allowed_hosts: list[str] | tuple[str, ...] = (),
               bind_host: str = "127.0.0.1", aliases: Mapping[str, str] | None = None, mcp: Any = None,
               mcp_options: dict[str, Any] | None = None, **llm_options: Any) -> FastAPI:
    """The FastAPI app serving `models` ({name: GGUF path or loaded EdgeQwen}; None: the default model
    as "qwen2.5"). A loaded EdgeQwen is used as it is (and not closed by the server).

    Every path is checked (check_gguf) here. With `preload` the models are loaded now, so the
    first request is fast; otherwise on first use. `parallel` (an EdgeQwen option; None: the
    machine's default, device.default_parallel) generations run at once per model and
    `max_queue` more may wait behind them; `max_tokens_limit` caps what any request may ask for;
    `api_key` makes every endpoint but /health and the docs demand `Authorization: Bearer KEY`.
    `prompt_cache` reuses the KV cache of a prefix shared with the previous request, except for
    requests with a `seed` (see the module docstring). `cors_origins` lets web pages from those
    origins ("*" for any) call the API from a browser; a page of any other origin is refused (403), and so
    is a Host header that names neither the loopback interface, `bind_host` nor one of `allowed_hosts`
    ("*": any), see serve/security.py. `aliases` ({pattern: served name}, fnmatch patterns) lets a client
    ask for other names (a Claude model's, for the Anthropic API). `mcp` (an edge_qwen.mcp.MCPHub or a
    config file) offers MCP servers' tools to requests that name them (serve/mcp_routes.py), with
    `mcp_options` {max_rounds, timeout, confirm}. Extra
    keyword arguments go to EdgeQwen.
    """
    if api_key is not None and api_key_problem(api_key):
        from ..errors import RequestError

        raise RequestError(f"{api_key_problem(api_key)}; choose another key", param="api_key")
    table = dict(models) if models else model_table()
    registry = _Models(table, max_queue, {"n_ctx": n_ctx, **llm_options}, aliases)
    if preload:
        for slot in registry.slots.values():
            slot.model() if slot.kind == "chat" else slot.pooled()
    from .openai_chat import ChatRequests

    chats = ChatRequests()  # chat requests in flight: stopped and turned away when the server shuts down
    begin_shutdown = chats.begin_shutdown

    async def lifespan(app: FastAPI):
        yield
        begin_shutdown()

    app = FastAPI(title="edge-qwen", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible and Qwen-shaped chat API over a local quantized Qwen2.5 (llama.cpp). "
                              "Errors are {\"error\": {message, type, param, code}}; invalid requests are 400.",
                  responses={400: {"model": ErrorBody}, 401: {"model": ErrorBody}, 403: {"model": ErrorBody},
                             404: {"model": ErrorBody},
                             413: {"model": ErrorBody}, 503: {"model": ErrorBody}})
    app.state.models = registry
    app.state.api_key_set = api_key is not None
    if mcp is not None and not hasattr(mcp, "call"):
        from ..mcp import MCPHub

        mcp = MCPHub.start(mcp)
    from .mcp_routes import install

    install(app, mcp, mcp_options)
    app.state.chat_requests = chats
    app.state.begin_shutdown = begin_shutdown
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(_InternalErrors)  # outside BodyLimit: covers it too
    if cors_origins:  # outermost: every answer, errors included, carries the CORS headers
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "HEAD"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    from .security import HostOriginGuard

    # Outermost: a foreign Host or Origin, or ambiguous framing, is refused before anything else runs.
    app.add_middleware(HostOriginGuard, bind_host=bind_host, allowed_hosts=tuple(allowed_hosts),
                       cors_origins=tuple(cors_origins))
    bearer = HTTPBearer(auto_error=False, description="Required when the server runs with --api-key.")

    async def check_key(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if api_key is None:
            return
        given = creds.credentials if creds is not None else request.headers.get("x-api-key")  # Anthropic's header
        if given is None or not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), api_key.encode()):
            raise AuthError("missing or wrong API key: send the header `Authorization: Bearer <key>` (or "
                            "`x-api-key: <key>`) with the key the server was started with (--api-key / "
                            "EDGE_QWEN_API_KEY)")

    @app.exception_handler(EdgeQwenError)
    async def _edge_error(request: Request, exc: EdgeQwenError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if isinstance(exc, BusyError) else None
        if isinstance(exc, AuthError):
            headers = {"WWW-Authenticate": "Bearer"}
        body = error_body_of(exc)
        sizes = getattr(exc, "sizes", None)
        if isinstance(exc, ContextOverflowError) and sizes:  # advice an HTTP client can act on
            prompt, wanted, n_ctx, n_train = sizes
            what = (f"the prompt alone is {prompt} tokens, which leaves no room in this server's context window of "
                    f"{n_ctx} tokens; shorten the messages" if wanted is None else
                    f"the prompt is {prompt} tokens and max_tokens is {wanted}: {prompt + wanted} > this server's "
                    f"context window of {n_ctx} tokens; shorten the messages or lower max_tokens")
            body["error"]["message"] = (f"{what} (the server can be started with a larger window, "
                                        f"`edge-qwen serve --ctx N`, up to {n_train})")
        return JSONResponse(_shaped(request, body, exc.status), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        answer = validation_error(exc)
        if is_anthropic_path(request.url.path):
            return JSONResponse(anthropic_error_body(400, json.loads(answer.body)), status_code=400)
        return answer

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"{request.method} {_cut(request.url.path, 200)}: {exc.detail}"
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):
            # FastAPI's JSON parser gave up: nesting too deep or a number too long.
            kind = "invalid_json"
            message = ("request body could not be read as JSON (nested too deeply or a number too long); "
                       "send a plain JSON object")
        if exc.status_code == 404:
            message += ("; endpoints: POST /v1/chat/completions, POST /v1/messages, POST /api/v1/qwen/predict, "
                        "GET /v1/models, GET /health")
        return JSONResponse(_shaped(request, error_body(message, code=kind), exc.status_code),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    def openapi() -> dict[str, Any]:
        # Validation failures are answered 400 (above), so FastAPI's generated 422 entries would lie.
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):  # only the dropped 422s used them
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    deps = [Depends(check_key)]

    def card(name: str, slot: _Slot) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": int(slot.path.stat().st_mtime), "owned_by": "edge-qwen",
                **({"kind": slot.kind} if slot.kind != "chat" else {})}

    @app.get("/v1/models", dependencies=deps, summary="Served models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [card(name, slot) for name, slot in registry.slots.items()]}

    @app.get("/v1/models/{model_id:path}", dependencies=deps, summary="One served model (aliases included)")
    async def get_model(model_id: str) -> dict[str, Any]:
        if not model_id:  # "/v1/models/" names no model (the default answers only where a name is optional)
            raise ModelNotFoundError("no model id given: GET /v1/models lists the served models, "
                                     "GET /v1/models/{id} shows one", param="model")
        return card(model_id, registry.get(model_id))

    _docs_page(app)
    from .ollama import root_router

    app.include_router(root_router())  # GET / : "Ollama is running", or the chat page for a browser
    app.include_router(web_router)  # the chat page at / and /web/ (edge_qwen/web)
    _families(app, deps, max_tokens_limit=max_tokens_limit, prompt_cache=prompt_cache)

    @app.head("/health", include_in_schema=False)  # uptime probes often use HEAD
    @app.get("/health", summary="Liveness (no API key needed); with the key, per-model paths and queue state")
    async def health(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict[str, Any]:
        # Without the key only liveness: model paths and activity counters are for the key's holder.
        if api_key is not None and (creds is None or not hmac.compare_digest(creds.credentials.encode(),
                                                                             api_key.encode())):
            return {"status": "ok", "version": __version__}
        return {"status": "ok", "version": __version__, "time": time.time(),
                "models": {name: slot.describe() for name, slot in registry.slots.items()}}

    return app


def _shaped(request: Request, body: dict[str, Any], status: int) -> dict[str, Any]:
    """An error body in the shape of the API the request called (Anthropic's on /v1/messages)."""
    return anthropic_error_body(status, body) if is_anthropic_path(request.url.path) else body


def _families(app: FastAPI, deps: list[Any], **serve_options: Any) -> None:
    """The API families, one module each: OpenAI chat, the Qwen shape, completions, embeddings, responses,
    tokenize, Ollama, RAG, /metrics."""
    from . import (anthropic, completions, embeddings, mcp_routes, metrics, ollama, openai_chat, qwen, rag, rerank,
                   responses, tokenize)

    app.state.serve_options = serve_options  # what edge_qwen.serve.runner hands the family routers
    for family in (openai_chat, qwen, completions, embeddings, rerank, responses, tokenize, ollama, rag, anthropic,
                   mcp_routes):
        app.include_router(family.router(), dependencies=deps)
    metrics.install(app)


def _docs_page(app: FastAPI) -> None:
    """/docs: Swagger UI 5 for /openapi.json (OpenAPI 3.1), its files from the fastapi-offline package: no CDN."""
    try:
        from importlib.resources import files

        static = files("fastapi_offline") / "static"
    except ImportError:  # the schema itself is still served
        return
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    app.mount("/docs-assets", StaticFiles(directory=str(static)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Any:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="edge-qwen API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon.png")


def _uvicorn_server(config: Any) -> Any:
    """A uvicorn.Server that stops our generations as soon as it starts shutting down."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            from .security import log_accept_errors_once

            log_accept_errors_once(asyncio.get_running_loop())
            await super().startup(sockets=sockets)

        async def shutdown(self, sockets: Any = None) -> None:
            hook = getattr(getattr(self.config.app, "state", None), "begin_shutdown", None)
            if hook is not None:
                hook()
            await super().shutdown(sockets=sockets)

    return Server(config)


def _check_port(host: str, port: int) -> None:
    import socket

    from ..errors import RequestError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise RequestError(f"--host {host!r} cannot be resolved ({e}); use an address like 127.0.0.1") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise RequestError(f"cannot listen on {host}:{port} ({e.strerror}); is another server running there? "
                               "pick another --port") from None


def serve(models: Mapping[str, str | Path] | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE, max_body_bytes: int = DEFAULT_MAX_BODY,
          n_ctx: int = 4096, max_tokens_limit: int | None = None, quiet: bool = False, prompt_cache: bool = True,
          cors_origins: list[str] | tuple[str, ...] = (), allowed_hosts: list[str] | tuple[str, ...] = (),
          read_timeout: float | None = None, max_connections: int | None = None,
          aliases: Mapping[str, str] | None = None, mcp: Any = None, mcp_options: dict[str, Any] | None = None,
          **llm_options: Any) -> None:
    """Check every model, load them, then serve on host:port until Ctrl-C (which returns normally).

    `read_timeout` (default security.READ_TIMEOUT_S) bounds how long a request may take to arrive;
    `max_connections` (default: what the open-file limit leaves room for) caps open connections.

    Binds 127.0.0.1 unless told otherwise. Bad model paths and a busy port fail here with a
    clear message before anything listens. `mcp` (a config file) starts its MCP servers; on an
    address other than loopback it needs an `api_key`, since their tools run code on this machine.
    """
    import sys

    import uvicorn

    from .mcp_routes import check_mcp_host

    check_mcp_host(mcp, host, api_key)
    _check_port(host, port)
    hub = None
    if mcp is not None:
        from ..mcp import MCPHub

        timeout = (mcp_options or {}).get("timeout")
        # A bad config or a missing command fails here, before anything listens.
        hub = MCPHub.start(mcp, **({"call_timeout": timeout} if timeout else {}))
    try:
        app = create_app(models, api_key=api_key, max_queue=max_queue, max_body_bytes=max_body_bytes, n_ctx=n_ctx,
                         max_tokens_limit=max_tokens_limit, preload=True, prompt_cache=prompt_cache,
                         cors_origins=cors_origins, allowed_hosts=allowed_hosts, bind_host=host, aliases=aliases,
                         mcp=hub, mcp_options=mcp_options, **llm_options)
    except BaseException:
        if hub is not None:
            hub.close()
        raise
    names = ", ".join(f"{name} ({slot.path})" for name, slot in app.state.models.slots.items())
    shown = f"[{host}]" if ":" in host else host
    for name, slot in app.state.models.slots.items():
        llm = slot.llm
        if slot.kind != "chat":  # an embedding model or reranker: no chat, no KV cache to speak of
            route = "/v1/rerank" if slot.kind == "rerank" else "/v1/embeddings"
            print(f"edge-qwen: {name}: {slot.kind} model, {slot.pooled().n_ctx} tokens per input ({route})",
                  file=sys.stderr, flush=True)
            continue
        print(f"edge-qwen: {name}: {slot.parallel} parallel slot{'s' if slot.parallel != 1 else ''} x {llm.n_ctx} "
              f"tokens, KV cache {getattr(llm, 'kv_cache_bytes', 0) / 2**20:.0f} MiB ({llm.engine.kv_cells} cells), "
              f"host prompt cache up to {llm.engine.host_cache_bytes >> 20} MiB",
              file=sys.stderr, flush=True)
    print(f"edge-qwen: serving {names}\n  on http://{shown}:{port}  (POST /v1/chat/completions, POST /v1/messages, "
          f"POST /api/v1/qwen/predict, GET /v1/models, /health, /docs){'  API key required' if api_key else ''}\n"
          "  Ctrl-C to stop", file=sys.stderr, flush=True)
    if hub is not None:
        print(f"edge-qwen: MCP tools: {', '.join(hub.tool_names()) or '(none)'} -- used only by requests that name "
              "their servers (mcp_servers)", file=sys.stderr, flush=True)
    # lifespan off: _uvicorn_server's shutdown already stops generations, and a lifespan task
    # would print a traceback on a forced second Ctrl-C.
    from .security import KEEP_ALIVE_S, MAX_HEADER_BYTES, READ_TIMEOUT_S, guarded_h11

    if max_connections is None:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        # Keep file descriptors free for the models, logs and the answer uvicorn sends past the limit.
        max_connections = max(16, min(1000, (soft if soft > 0 else 1024) - 128))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning" if quiet else "info",
                            timeout_graceful_shutdown=3, access_log=not quiet, lifespan="off",
                            http=guarded_h11(READ_TIMEOUT_S if read_timeout is None else read_timeout),
                            timeout_keep_alive=KEEP_ALIVE_S, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                            limit_concurrency=max_connections)
    try:
        _uvicorn_server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, after a clean shutdown
        pass
    finally:
        if hub is not None:
            hub.close()
    print("edge-qwen: server stopped", file=sys.stderr, flush=True)


class ServerThread:
    """Run an app under uvicorn in a background thread (for desktop apps embedding the server, and tests).

        with ServerThread(create_app(...)) as url:   # "http://127.0.0.1:<free port>"
            ...
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))  # port 0: the OS picks a free port, no race with other tests
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=3, lifespan="off")
        self.server = _uvicorn_server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="edge-qwen-uvicorn", daemon=True)

    def start(self, timeout: float = 30.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server thread did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
