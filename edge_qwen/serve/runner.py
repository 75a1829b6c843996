"""One generation per request, for the API-family routers (Ollama, completions, responses, embeddings).

The routers depend only on this small interface over the app's state: `app.state.models.get(name)`
gives a served model's slot (`.name`, `.model()` the EdgeQwen, `.acquire()` a place in its
queue, `.release(tokens, cancelled)`), and `run()` / `stream()` here take a place, run a
synchronous generation function in a worker thread (the event loop never waits on llama.cpp),
cancel it when the client disconnects, and give the place back however it ends.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from fastapi import Request

from ..errors import EdgeQwenError

log = logging.getLogger("edge_qwen.serve.app")


def options(request: Request) -> dict[str, Any]:
    """The server's generation settings (max_tokens_limit, prompt_cache) as create_app stored them."""
    return getattr(request.app.state, "serve_options", {}) or {}


def slot_for(request: Request, name: str | None) -> Any:
    """The served model `name` (None or "": the default); ModelNotFoundError names the choices.

    Ollama-style tags are accepted: "qwen2.5:latest" is "qwen2.5".
    """
    registry = request.app.state.models
    if name and name.endswith(":latest") and name not in registry.slots:
        name = name[: -len(":latest")]
    return registry.get(name)


async def _watch(request: Request, cancel: threading.Event) -> None:
    while not cancel.is_set():
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return


async def run(request: Request, slot: Any, work: Callable[[Any, threading.Event], Any]) -> Any:
    """Run `work(llm, cancel)` to completion in a worker thread, holding a place in the model's queue.

    `llm` is the EdgeQwen, or for an embedding model or reranker slot its pooled model (`slot.pooled()`)."""
    import anyio

    cancel = threading.Event()
    await slot.acquire()
    watcher = asyncio.create_task(_watch(request, cancel))
    try:
        # a pooled slot (embedding model, reranker) hands `work` its pooled model instead
        load = slot.model if getattr(slot, "kind", "chat") == "chat" else slot.pooled
        return await anyio.to_thread.run_sync(lambda: work(load(), cancel))
    finally:
        watcher.cancel()
        slot.release(0, cancel.is_set())


def in_thread(name: str, cancel: threading.Event, work: Callable[[], Iterator[Any]],
              finish: Callable[[], None]) -> asyncio.Queue:
    """Run the generator `work()` in a worker thread; what it yields arrives on the returned queue.

    The queue gets ("item", x) per item, ("error", exc) if it raises, then ("end", None); `finish()`
    runs on the event loop once the thread is done. The whole generator lives in that one thread:
    it may hold locks that must be released by the thread that took them. If the loop is gone
    (server shutting down), `cancel` is set so the generation stops.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(kind: str, item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, item))
        except RuntimeError:  # the loop is gone
            cancel.set()

    def produce() -> None:
        try:
            gen = work()
            try:
                for item in gen:
                    put("item", item)
            finally:
                close = getattr(gen, "close", None)
                if close:
                    close()
        except Exception as e:  # every failure reaches the client as an error
            if not is_user_error(e):
                log.error("generation failed", exc_info=e)
            put("error", e)
        finally:
            put("end", None)
            try:
                loop.call_soon_threadsafe(finish)
            except RuntimeError:
                pass

    threading.Thread(target=produce, name=f"edge-qwen-{name}", daemon=True).start()
    return queue


async def stream(request: Request, slot: Any, work: Callable[[Any, threading.Event], Iterator[Any]]) -> Any:
    """Items of the generator `work(llm, cancel)`, produced in a worker thread, as an async iterator.

    An error before the first item is raised here (so the caller can answer a plain HTTP error);
    later ones come through as the exception object itself, for the family's own error event.
    The first item is awaited before this returns.
    """
    cancel = threading.Event()
    await slot.acquire()

    def items_until_cancelled() -> Iterator[Any]:
        gen = work(slot.model(), cancel)
        try:
            for item in gen:
                yield item
                if cancel.is_set():
                    return
        finally:
            close = getattr(gen, "close", None)
            if close:
                close()

    queue = in_thread(slot.name, cancel, items_until_cancelled, lambda: slot.release(0, cancel.is_set()))
    kind, first = await queue.get()
    if kind == "error":
        await _drain(queue)
        raise first
    watcher = asyncio.create_task(_watch(request, cancel))

    async def items() -> AsyncIterator[Any]:
        try:
            k, item = kind, first
            while k != "end":
                yield item
                k, item = await queue.get()
        finally:
            cancel.set()
            watcher.cancel()

    return items()


async def _drain(queue: asyncio.Queue) -> None:
    while True:
        kind, _ = await queue.get()
        if kind == "end":
            return


def is_user_error(exc: BaseException) -> bool:
    """Whether `exc` is a problem the client can fix (answered 4xx) rather than a server fault."""
    return isinstance(exc, EdgeQwenError) and exc.status < 500
