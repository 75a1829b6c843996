"""The Ollama API on the same server: what desktop apps and the `ollama` Python package speak.

POST /api/chat, /api/generate (NDJSON streaming by default), /api/embed, /api/embeddings,
/api/show; GET /api/tags, /api/ps, /api/version; GET and HEAD / answer "Ollama is running" as
Ollama does (a browser, asking for text/html, gets the chat page instead). Errors are Ollama's shape, {"error": "..."},
with a 4xx status. `options` map onto our sampling: temperature, top_p, top_k, num_predict,
stop, seed, frequency_penalty, presence_penalty; num_ctx is accepted up to the server's context
window (`serve --ctx`), since one loaded model serves every request. `format` is "json" or a
JSON schema, enforced by the JSON constraint engine, with objects that list properties closed to
them as Ollama does; `tools` go through engine/tool_calls.py.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..errors import EdgeQwenError, ModelNotFoundError, RequestError
from ..engine.json_normalize import close_open_objects
from . import runner

OLLAMA_VERSION = "0.9.0"  # the Ollama API level these endpoints follow
# Ollama's own defaults, used when `options` leave a field out.
DEFAULTS = {"temperature": 0.8, "top_p": 0.9, "top_k": 40}
_OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "temperature": (int, float), "top_p": (int, float), "top_k": (int,), "num_predict": (int,), "seed": (int,),
    "stop": (list, str), "num_ctx": (int,), "frequency_penalty": (int, float), "presence_penalty": (int, float)}
# Options Ollama has that change nothing here (hardware and loading knobs) are accepted and ignored;
# anything else is refused so a client learns it has no effect.
_IGNORED = {"num_thread", "num_gpu", "main_gpu", "use_mmap", "use_mlock", "numa", "num_batch", "low_vram",
            "f16_kv", "vocab_only", "num_keep", "keep_alive"}


def error(status: int, message: str) -> JSONResponse:
    """Ollama's error answer."""
    return JSONResponse({"error": message}, status_code=status)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _fail(exc: Exception) -> JSONResponse:
    if isinstance(exc, ModelNotFoundError):
        return error(404, exc.message)
    if isinstance(exc, EdgeQwenError):
        return error(exc.status, exc.message)
    raise exc


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError as e:
        raise RequestError(f"request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    return body


def sampling(body: dict[str, Any], n_ctx: int, max_tokens_limit: int | None = None) -> dict[str, Any]:
    """EdgeQwen sampling kwargs from an Ollama request's `options` (and top-level `format`)."""
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise RequestError("options must be an object like {\"temperature\": 0.2}")
    out: dict[str, Any] = {}
    for key, value in opts.items():
        if key in _IGNORED:
            continue
        types = _OPTION_TYPES.get(key)
        if types is None:
            raise RequestError(f"option {key!r} is not supported by edge-qwen; supported: "
                               f"{', '.join(sorted(_OPTION_TYPES))}")
        if isinstance(value, bool) or not isinstance(value, types):
            raise RequestError(f"option {key!r} has the wrong type ({type(value).__name__})")
    temperature = opts.get("temperature", DEFAULTS["temperature"])
    out.update(temperature=temperature, top_p=opts.get("top_p", DEFAULTS["top_p"]),
               top_k=opts.get("top_k", DEFAULTS["top_k"]))
    for key in ("seed", "stop", "frequency_penalty", "presence_penalty"):
        if opts.get(key) is not None:
            out[key] = opts[key]
    num_predict = opts.get("num_predict")
    if num_predict is not None and num_predict > 0:
        out["max_tokens"] = num_predict if max_tokens_limit is None else min(num_predict, max_tokens_limit)
    elif num_predict is not None and num_predict not in (-1, -2, 0):
        raise RequestError(f"option num_predict={num_predict} must be positive, or -1 (until the end)")
    num_ctx = opts.get("num_ctx")
    if num_ctx is not None and num_ctx > n_ctx:
        raise RequestError(f"option num_ctx={num_ctx} is larger than this server's context window of {n_ctx} tokens "
                           "(one loaded model serves every request); lower num_ctx or restart the server with "
                           "`edge-qwen serve --ctx N`")
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        # As Ollama (llama.cpp's schema converter) reads a schema: an object that lists properties
        # and says nothing of others holds those only. Left open, the small models fill it with
        # invented keys until num_predict cuts the JSON (measured: a pydantic City(name, country)
        # schema got 8 keys and no closing brace in 60 tokens). The answer still validates
        # against the schema as sent.
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "format",
                                                                         "schema": close_open_objects(fmt)}}
    elif fmt not in (None, ""):
        raise RequestError('format must be "json" or a JSON schema object')
    return out


def _messages(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object")
        if m.get("images"):
            raise RequestError(f"messages[{i}] has images: edge-qwen serves text-only Qwen2.5 models")
        msg: dict[str, Any] = {"role": m.get("role"), "content": m.get("content") or ""}
        if m.get("tool_calls"):
            msg["tool_calls"] = m["tool_calls"]
        out.append(msg)
    return out


def _model_details(slot: Any) -> dict[str, Any]:
    from ..gguf_file import check_gguf

    md = check_gguf(slot.path).metadata
    quant = {15: "Q4_K_M", 7: "Q8_0", 1: "F16", 0: "F32", 17: "Q5_K_M", 18: "Q6_K", 2: "Q4_0", 12: "Q3_K_M",
             10: "Q2_K", 8: "Q5_0", 14: "Q4_K_S", 16: "Q5_K_S", 11: "Q3_K_S", 13: "Q3_K_L", 30: "BF16"}
    arch = md.get("general.architecture", "qwen2")
    return {"parent_model": "", "format": "gguf", "family": arch, "families": [arch],
            "parameter_size": str(md.get("general.size_label", "")),
            "quantization_level": quant.get(md.get("general.file_type"), str(md.get("general.file_type", "")))}


def _digest(slot: Any) -> str:
    st = slot.path.stat()  # hashing ~500 MB per listing would be slow: the identity of the file will do
    return hashlib.sha256(f"{slot.path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()


def _entry(name: str, slot: Any) -> dict[str, Any]:
    st = slot.path.stat()
    return {"name": name, "model": name, "modified_at": datetime.fromtimestamp(st.st_mtime, timezone.utc).isoformat(),
            "size": st.st_size, "digest": _digest(slot), "details": _model_details(slot)}


def _final(name: str, reason: str, timings: Any, start: float, key: str, extra: dict[str, Any]) -> dict[str, Any]:
    total = int((time.perf_counter() - start) * 1e9)
    out = {"model": name, "created_at": _now(), key: extra.pop(key, None), "done": True, "done_reason": reason,
           "total_duration": total, "load_duration": 0}
    if out[key] is None:
        out.pop(key)
    if timings is not None:
        out.update(prompt_eval_count=timings.prompt_tokens, prompt_eval_duration=int(timings.prompt_ms * 1e6),
                   eval_count=timings.completion_tokens, eval_duration=int(timings.gen_ms * 1e6))
    out.update(extra)
    return out


def _reason(finish: str | None) -> str:
    return {"length": "length", "cancelled": "stop"}.get(finish or "stop", "stop")


def root_router() -> APIRouter:
    """GET and HEAD /: Ollama's "Ollama is running" (clients probe it before they call the API), or the chat
    page for a browser (Accept: text/html). No API key, like the page itself: it tells nothing about the models."""
    r = APIRouter(include_in_schema=False)

    @r.api_route("/", methods=["GET", "HEAD"])
    async def root(request: Request) -> Any:
        if "text/html" in request.headers.get("accept", "").lower():
            from ..web.routes import index

            return await index(request)
        return PlainTextResponse("Ollama is running")

    return r


def router() -> APIRouter:
    """The Ollama API routes (added to the app by create_app)."""
    r = APIRouter(tags=["ollama"])

    @r.get("/api/version", summary="Ollama: API version")
    async def version() -> dict[str, str]:
        return {"version": OLLAMA_VERSION}

    @r.get("/api/tags", summary="Ollama: served models")
    async def tags(request: Request) -> dict[str, Any]:
        return {"models": [_entry(n, s) for n, s in request.app.state.models.slots.items()]}

    @r.get("/api/ps", summary="Ollama: loaded models")
    async def ps(request: Request) -> dict[str, Any]:
        out = []
        for n, s in request.app.state.models.slots.items():
            if s.llm is not None:
                out.append({**_entry(n, s), "expires_at": "2318-01-01T00:00:00Z", "size_vram": 0,
                            "context_length": getattr(s.llm, "n_ctx", 0)})
        return {"models": out}

    @r.post("/api/show", summary="Ollama: one model's details")
    async def show(request: Request) -> Any:
        try:
            body = await _body(request)
            name = body.get("model") or body.get("name")
            slot = runner.slot_for(request, name)
        except EdgeQwenError as e:
            return _fail(e)
        from ..gguf_file import check_gguf

        md = check_gguf(slot.path).metadata
        info = {k: v for k, v in md.items() if isinstance(v, (str, int, float, bool))
                and not k.startswith("tokenizer.")}
        caps = ["completion", "tools"]
        if _has_fim(md, slot):
            caps.append("insert")
        return {"modelfile": f"FROM {slot.path}\n", "parameters": "", "template": md.get("tokenizer.chat_template", ""),
                "details": _model_details(slot), "model_info": info, "capabilities": caps,
                "modified_at": _entry(slot.name, slot)["modified_at"]}

    @r.post("/api/chat", summary="Ollama: chat (NDJSON stream unless stream is false)")
    async def chat(request: Request) -> Any:
        from ..engine.tool_calls import ToolCallParser, parse_tools

        start = time.perf_counter()
        try:
            body = await _body(request)
            slot = runner.slot_for(request, body.get("model"))
            if _unload_request(body, "messages"):
                return _unload(slot)
            if body.get("think"):
                raise RequestError("think is not supported: Qwen2.5 models do not produce a thinking trace")
            llm = slot.model()
            kwargs = sampling(body, llm.n_ctx, runner.options(request).get("max_tokens_limit"))
            messages = _messages(body.get("messages"))
            tools = parse_tools(body.get("tools") or None)
            tools = tools.for_turn(messages) if tools is not None else None
            if tools is not None and tools.active and "response_format" in kwargs:
                raise RequestError("format cannot be combined with tools; send one of them")
        except EdgeQwenError as e:
            return _fail(e)
        name = slot.name
        open_id = llm.tokenize("<tool_call>")[0]

        def work(model: Any, cancel: Any):
            parser = ToolCallParser(tools, open_id)
            last = None
            for c in model.generate(messages, tools=tools, cancel=cancel, **kwargs):
                last = c
                text = "".join(ev[1] for ev in parser.feed(c.text, c.token_ids) + (
                    parser.flush() if c.finish_reason else []) if ev[0] == "content")
                if text:
                    yield {"model": name, "created_at": _now(), "message": {"role": "assistant", "content": text},
                           "done": False}
            _, calls = parser.finish()
            extra: dict[str, Any] = {"message": {"role": "assistant", "content": ""}}
            if calls:
                extra["message"]["tool_calls"] = [{"function": {"name": c.name, "arguments": c.value()}}
                                                  for c in calls]
            yield _final(name, _reason(last.finish_reason if last else None), last.timings if last else None,
                         start, "message", extra)

        return await _respond(request, slot, work, body.get("stream", True), "message")

    @r.post("/api/generate", summary="Ollama: complete a prompt (suffix: fill-in-the-middle)")
    async def generate(request: Request) -> Any:
        from .completions import FimTrim, fill_in

        start = time.perf_counter()
        try:
            body = await _body(request)
            slot = runner.slot_for(request, body.get("model"))
            if _unload_request(body, "prompt"):  # Ollama's "unload the model" request (`ollama stop`)
                return _unload(slot)
            llm = slot.model()
            prompt = body.get("prompt") or ""
            if not isinstance(prompt, str):
                raise RequestError("prompt must be a string")
            for key in ("images", "context", "template"):
                if body.get(key):
                    raise RequestError(f"{key} is not supported by edge-qwen; send the text in prompt "
                                       "(raw: true to skip the chat template)")
            if body.get("think"):
                raise RequestError("think is not supported: Qwen2.5 models do not produce a thinking trace")
            if not prompt and not body.get("suffix"):  # Ollama's "load the model" request
                return JSONResponse({"model": slot.name, "created_at": _now(), "response": "", "done": True,
                                     "done_reason": "load"})
            kwargs = sampling(body, llm.n_ctx, runner.options(request).get("max_tokens_limit"))
            suffix = body.get("suffix")
            if suffix is not None and not isinstance(suffix, str):
                raise RequestError("suffix must be a string")
            fim = None
            if suffix:
                fim = fill_in(llm, prompt, suffix)
                tokens = fim.tokens
                stops = kwargs.get("stop")
                stops = [stops] if isinstance(stops, str) else list(stops or [])
                if fim.stop:  # the middle ends where the model starts writing the suffix again
                    kwargs["stop"] = stops + [fim.stop]
                kwargs["stop_tokens"] = fim.stop_tokens
            elif body.get("raw"):
                tokens = llm.tokenize(prompt, special=False)
            else:
                msgs = ([{"role": "system", "content": body["system"]}] if body.get("system") else []) + [
                    {"role": "user", "content": prompt}]
                tokens = llm.fit_messages(msgs, kwargs.get("max_tokens"))[1]
        except EdgeQwenError as e:
            return _fail(e)
        name = slot.name

        def work(model: Any, cancel: Any):
            last = None
            trim = FimTrim(fim) if fim is not None else None
            for c in model.generate_tokens(tokens, cancel=cancel, **kwargs):
                last = c
                text = c.text
                if trim is not None:
                    text = trim.feed(text) + (trim.finish(c.stop) if c.finish_reason is not None else "")
                if text:
                    yield {"model": name, "created_at": _now(), "response": text, "done": False}
            yield _final(name, _reason(last.finish_reason if last else None), last.timings if last else None,
                         start, "response", {"response": ""})

        return await _respond(request, slot, work, body.get("stream", True), "response")

    @r.post("/api/embed", summary="Ollama: embeddings of one text or several")
    async def embed(request: Request) -> Any:
        from .embeddings import embed_texts

        start = time.perf_counter()
        try:
            body = await _body(request)
            slot = runner.slot_for(request, body.get("model"))
            inputs = body.get("input")
            texts = [inputs] if isinstance(inputs, str) else inputs
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
                raise RequestError("input must be a string or a non-empty list of strings")
            vectors, n = await runner.run(request, slot, lambda llm, cancel: embed_texts(llm, texts,
                                                                                          truncate=body.get("truncate", True)))
        except EdgeQwenError as e:
            return _fail(e)
        return {"model": slot.name, "embeddings": vectors, "total_duration": int((time.perf_counter() - start) * 1e9),
                "load_duration": 0, "prompt_eval_count": n}

    @r.post("/api/embeddings", summary="Ollama (older form): the embedding of one prompt")
    async def embeddings(request: Request) -> Any:
        from .embeddings import embed_texts

        try:
            body = await _body(request)
            slot = runner.slot_for(request, body.get("model"))
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise RequestError("prompt must be a string")
            vectors, _ = await runner.run(request, slot, lambda llm, cancel: embed_texts(llm, [prompt]))
        except EdgeQwenError as e:
            return _fail(e)
        return {"embedding": vectors[0]}

    @r.post("/api/pull", summary="Ollama: refused (models are added with `edge-qwen pull` and `serve`)")
    async def pull() -> Any:
        return error(400, "pulling models through the API is not supported; run `edge-qwen pull NAME` and serve it")

    return r


def _unload_request(body: dict[str, Any], field: str) -> bool:
    """Ollama's unload request: keep_alive 0 (or "0s", "0m") and nothing to answer."""
    return body.get("keep_alive") in (0, "0", "0s", "0m") and not body.get(field) and not body.get("suffix")


def _unload(slot: Any) -> JSONResponse:
    try:
        slot.unload()
    except EdgeQwenError as e:
        return _fail(e)
    return JSONResponse({"model": slot.name, "created_at": _now(), "response": "", "done": True,
                         "done_reason": "unload"})


def _has_fim(md: dict[str, Any], slot: Any) -> bool:
    return "coder" in f"{md.get('general.name', '')} {md.get('general.basename', '')}".lower()


async def _respond(request: Request, slot: Any, work: Any, stream: Any, key: str) -> Any:
    if stream is False:
        try:
            items = await runner.run(request, slot, lambda llm, cancel: list(work(llm, cancel)))
        except EdgeQwenError as e:
            return _fail(e)
        final = dict(items[-1])
        text = "".join((i[key]["content"] if key == "message" else i[key]) for i in items[:-1])
        if key == "message":
            final["message"] = {**final["message"], "content": text}
        else:
            final["response"] = text
        return JSONResponse(final)
    try:
        items = await runner.stream(request, slot, work)
    except EdgeQwenError as e:
        return _fail(e)

    async def lines():
        async for item in items:
            if isinstance(item, Exception):
                yield (json.dumps({"error": getattr(item, "message", str(item))}) + "\n").encode()
                return
            yield (json.dumps(item, ensure_ascii=False) + "\n").encode("utf-8")

    return StreamingResponse(lines(), media_type="application/x-ndjson")
