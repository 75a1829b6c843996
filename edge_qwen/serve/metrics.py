"""GET /metrics: Prometheus text format, through the prometheus-client library.

Per request: a counter by route and status and a latency histogram (an ASGI middleware that
sees every answer). Per model, read at scrape time from the served slots: requests finished
and cancelled, requests generating and waiting, parallel slots. Each app has its own registry,
so two servers in one process (tests, desktop apps) do not share figures.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response


def install(app: FastAPI) -> None:
    """Add the /metrics route and the middleware that counts requests."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    registry = CollectorRegistry()
    requests = Counter("edge_qwen_http_requests", "HTTP requests answered", ["method", "route", "status"],
                       registry=registry)
    latency = Histogram("edge_qwen_http_request_duration_seconds", "Time to the end of the answer", ["route"],
                        registry=registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))

    class Slots:
        def collect(self) -> Any:
            done = CounterMetricFamily("edge_qwen_generations", "Generations finished", labels=["model"])
            cancelled = CounterMetricFamily("edge_qwen_generations_cancelled", "Generations cancelled",
                                            labels=["model"])
            running = GaugeMetricFamily("edge_qwen_generations_running", "Generations running", labels=["model"])
            waiting = GaugeMetricFamily("edge_qwen_requests_waiting", "Requests queued", labels=["model"])
            for name, slot in app.state.models.slots.items():
                d = slot.describe()
                done.add_metric([name], d.get("requests", 0))
                cancelled.add_metric([name], d.get("cancelled", 0))
                running.add_metric([name], d.get("busy", int(bool(d.get("generating")))))
                waiting.add_metric([name], d.get("waiting", 0))
            yield from (done, cancelled, running, waiting)

    registry.register(Slots())

    class Count:
        """Pure ASGI (not BaseHTTPMiddleware): streams and disconnect detection pass through untouched."""

        def __init__(self, inner: Any):
            self.inner = inner

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            start, status = time.perf_counter(), [500]

            async def tracked(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                await self.inner(scope, receive, tracked)
            finally:
                path = getattr(scope.get("route"), "path", None) or _route_of(app, scope)
                requests.labels(scope.get("method", ""), path, str(status[0])).inc()
                latency.labels(path).observe(time.perf_counter() - start)

    app.add_middleware(Count)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _route_of(app: FastAPI, scope: Any) -> str:
    """The route template a request matched (an inner middleware may have copied the scope it was set in)."""
    from starlette.routing import Match

    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            # Included routers match as a whole: their request's own path is the label then.
            path = getattr(route, "path", None)
            return path if isinstance(path, str) else str(scope.get("path", "unmatched"))[:100]
    return "unmatched"
