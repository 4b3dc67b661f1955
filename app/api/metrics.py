"""Prometheus metrics at ``GET /metrics`` and the recent per-route latencies of ``GET /stats``.

Each app gets its own :class:`Metrics` (own ``CollectorRegistry``, not the process-wide default one), so several
apps in one process (the tests) never clash. What is measured and where:

- requests and latency by method, route template and status: :class:`MetricsMiddleware`, for every response
  (401, 413 and 404 included; paths that match no route share the route label ``unmatched``);
- model calls (batch size, seconds), decode time and database errors inside the core: the
  :class:`app.observe.Observer` methods, which the core calls where it is given an observer (for model calls,
  :func:`app.observe.timed_embed` around the batcher's embed function); database errors that reach the API are
  also counted by ``app/api/errors.py``;
- Redis cache command times and errors: :meth:`Metrics.observe_cache_redis`, called by the cache's Redis layer;
- collection size, embedding-cache hits/misses per layer, embed queue depth: read from the service at scrape time.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings

log = logging.getLogger(__name__)

PREFIX = "image_search"
#: Requests per route kept for the p50/p95 of ``GET /stats``.
RECENT_WINDOW = 1000
#: Route label of requests that matched no route (a fixed label: scanners must not create a series per path).
UNMATCHED = "unmatched"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1) of a non-empty sorted sequence."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


class RecentLatencies:
    """The last ``window`` latencies of each route, and its total request count; thread-safe."""

    def __init__(self, window: int = RECENT_WINDOW) -> None:
        self.window = window
        self._lock = threading.Lock()
        self._samples: dict[str, deque[float]] = {}
        self._counts: dict[str, int] = {}

    def add(self, route: str, seconds: float) -> None:
        """Record one request of ``route`` (``"METHOD /template"``) that took ``seconds``."""
        with self._lock:
            samples = self._samples.get(route)
            if samples is None:
                samples = self._samples[route] = deque(maxlen=self.window)
            samples.append(seconds)
            self._counts[route] = self._counts.get(route, 0) + 1

    def summary(self, sla_p95_ms: float) -> dict[str, dict[str, Any]]:
        """Per route: ``count`` (since start), ``window`` (samples used), ``p50_ms``, ``p95_ms`` over the window,
        and ``meets_sla`` (p95 <= ``sla_p95_ms``)."""
        with self._lock:
            snapshot = {route: (sorted(s), self._counts[route]) for route, s in self._samples.items()}
        out = {}
        for route, (values, count) in sorted(snapshot.items()):
            p95_ms = _percentile(values, 0.95) * 1000
            out[route] = {
                "count": count,
                "window": len(values),
                "p50_ms": round(_percentile(values, 0.50) * 1000, 2),
                "p95_ms": round(p95_ms, 2),
                "meets_sla": p95_ms <= sla_p95_ms,
            }
        return out


class _ServiceCollector(Collector):
    """Values read from the running service at scrape time (nothing to keep in step)."""

    def __init__(self, metrics: Metrics, get_service: Callable[[], Any]) -> None:
        self.metrics = metrics
        self.get_service = get_service

    def describe(self) -> list[Metric]:
        return []  # values appear once the service runs; nothing to check for name clashes up front

    def collect(self) -> Iterator[Metric]:
        service = self.get_service()
        if service is None:  # before the lifespan has run
            return
        yield from _cache_metrics(service.cache.stats())
        yield from _thumbnail_metrics(service.thumbnail_stats())
        depth = _queue_depth(service.batcher)
        if depth is not None:
            queue = GaugeMetricFamily(f"{PREFIX}_embed_queue_depth", "Embed requests waiting for the model.")
            queue.add_metric([], depth)
            yield queue
        try:
            count = service.db.count()
        except Exception:  # noqa: BLE001 - a scrape must still answer while the database is down
            self.metrics.count_database_error("count")
            log.debug("collection size unavailable for /metrics", exc_info=True)
            return
        size = GaugeMetricFamily(f"{PREFIX}_collection_images", "Images in the collection.")
        size.add_metric([], count)
        yield size


def _thumbnail_metrics(stats: Any) -> Iterator[Metric]:
    """The thumbnail caches (:class:`app.cache.thumbnails.ThumbnailCacheStats`): hits and misses per layer
    (``memory``, and ``redis`` when the shared layer is on), bytes held in memory."""
    hits = CounterMetricFamily(
        f"{PREFIX}_thumbnail_cache_hits", "Thumbnails served from a cache, by layer (memory, redis).", labels=["layer"]
    )
    misses = CounterMetricFamily(
        f"{PREFIX}_thumbnail_cache_misses", "Thumbnail lookups a layer did not have, by layer.", labels=["layer"]
    )
    hits.add_metric(["memory"], stats.hits)
    misses.add_metric(["memory"], stats.misses)
    if stats.redis is not None:
        hits.add_metric(["redis"], stats.redis.hits)
        misses.add_metric(["redis"], stats.redis.misses)
    held = GaugeMetricFamily(f"{PREFIX}_thumbnail_cache_bytes", "Bytes of thumbnails held in this process's memory.")
    held.add_metric([], stats.bytes)
    yield from (hits, misses, held)


def _cache_metrics(stats: Any) -> Iterator[Metric]:
    """The embedding cache (:class:`app.cache.CacheStats`): hits, misses and hit rate per layer, memory entries,
    whether Redis is in use; plus the memory layer under its older names (``query_cache_*``)."""
    memory = stats.memory
    hits = CounterMetricFamily(f"{PREFIX}_query_cache_hits", "Query embeddings served from the memory layer.")
    hits.add_metric([], memory.hits)
    misses = CounterMetricFamily(f"{PREFIX}_query_cache_misses", "Query embeddings the memory layer did not have.")
    misses.add_metric([], memory.misses)
    entries = GaugeMetricFamily(f"{PREFIX}_query_cache_entries", "Embeddings held in the memory layer.")
    entries.add_metric([], memory.size)
    yield from (hits, misses, entries)
    layers = {"memory": memory, "store": stats.store}
    if stats.redis is not None:
        layers["redis"] = stats.redis
    layer_hits = CounterMetricFamily(
        f"{PREFIX}_cache_hits", "Query embeddings found, by cache layer (memory, redis, store).", labels=["layer"]
    )
    layer_misses = CounterMetricFamily(
        f"{PREFIX}_cache_misses", "Cache lookups that reached a layer and missed, by layer.", labels=["layer"]
    )
    ratio = GaugeMetricFamily(
        f"{PREFIX}_cache_hit_ratio", "Hits / lookups that reached the layer, since start.", labels=["layer"]
    )
    for name, layer in layers.items():
        layer_hits.add_metric([name], layer.hits)
        layer_misses.add_metric([name], layer.misses)
        ratio.add_metric([name], layer.hit_rate)
    computed = CounterMetricFamily(f"{PREFIX}_cache_computed", "Query embeddings no cache layer had: model calls.")
    computed.add_metric([], stats.computed)
    yield from (layer_hits, layer_misses, ratio, computed)
    if stats.redis is not None:
        up = GaugeMetricFamily(f"{PREFIX}_cache_redis_up", "1 while the Redis layer is in use, 0 while degraded.")
        up.add_metric([], 1 if stats.redis_state == "ok" else 0)
        invalid = CounterMetricFamily(f"{PREFIX}_cache_redis_invalid", "Values under our keys that were refused.")
        invalid.add_metric([], stats.redis.invalid)
        yield from (up, invalid)


def _queue_depth(batcher: Any) -> int | None:
    """Embed requests queued in the dynamic batcher, or ``None`` without one."""
    if batcher is None:
        return None
    return batcher.queue_depth()


class Metrics:
    """The metrics of one app: its registry, its instruments, and the :class:`app.observe.Observer` methods."""

    def __init__(self, sla_p95_ms: float, get_service: Callable[[], Any], window: int = RECENT_WINDOW) -> None:
        self.sla_p95_ms = sla_p95_ms
        self.registry = CollectorRegistry()
        self.recent = RecentLatencies(window)
        # Registered first, so it is collected first: a database error it meets while scraping shows in the
        # database error counter of the same scrape.
        self.registry.register(_ServiceCollector(self, get_service))
        labels = ["method", "route", "status"]
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests answered.", labels, registry=self.registry)
        self.latency = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "Time from the request's arrival to its last response byte, seconds.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.decode_seconds = Histogram(
            f"{PREFIX}_decode_seconds", "Time to decode one image, seconds.", registry=self.registry
        )
        self.embed_batch_size = Histogram(
            f"{PREFIX}_embed_batch_size", "Images per model call.", buckets=_BATCH_BUCKETS, registry=self.registry
        )
        self.embed_seconds = Histogram(
            f"{PREFIX}_embed_seconds",
            "Time of one model call, seconds.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.database_errors = Counter(
            f"{PREFIX}_database_errors", "Failed database operations.", ["operation"], registry=self.registry
        )
        self.cache_redis_seconds = Histogram(
            f"{PREFIX}_cache_redis_seconds",
            "Time of one command of the Redis cache layer, seconds (failed ones included).",
            ["operation"],
            buckets=_REDIS_BUCKETS,
            registry=self.registry,
        )
        self.cache_redis_errors = Counter(
            f"{PREFIX}_cache_redis_errors",
            "Failed commands of the Redis cache layer (timeouts, refused connections, OOM).",
            ["operation"],
            registry=self.registry,
        )

    # --- app.observe.Observer --------------------------------------------------------------------------------------
    def observe_decode(self, seconds: float) -> None:
        """One image decoded in ``seconds``."""
        self.decode_seconds.observe(seconds)

    def observe_embed(self, batch_size: int, seconds: float) -> None:
        """One model call over ``batch_size`` images in ``seconds``."""
        self.embed_batch_size.observe(batch_size)
        self.embed_seconds.observe(seconds)

    def count_database_error(self, operation: str) -> None:
        """One failed database operation."""
        self.database_errors.labels(operation=operation).inc()

    def observe_cache_redis(self, operation: str, seconds: float, failed: bool) -> None:
        """One Redis cache command (``get``, ``set``, ``ping``) in ``seconds``, failed or not."""
        self.cache_redis_seconds.labels(operation=operation).observe(seconds)
        if failed:
            self.cache_redis_errors.labels(operation=operation).inc()

    # --- helpers ---------------------------------------------------------------------------------------------------
    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """One answered request (called by :class:`MetricsMiddleware`)."""
        self.requests.labels(method=method, route=route, status=str(status)).inc()
        self.latency.labels(method=method, route=route, status=str(status)).observe(seconds)
        if route != UNMATCHED:
            self.recent.add(f"{method} {route}", seconds)

    def route_stats(self) -> dict[str, dict[str, Any]]:
        """The per-route view of ``GET /stats`` (see :meth:`RecentLatencies.summary`)."""
        return self.recent.summary(self.sla_p95_ms)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


def _route_label(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return path
    # The web UI's static files are a mounted app: one label for all of them.
    if scope.get("path", "").startswith("/ui"):
        return "/ui"
    return UNMATCHED


class MetricsMiddleware:
    """Count and time every HTTP request by method, route template and status (pure ASGI, so it sees the 401s and
    413s answered by the other middlewares too)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client gets if the app fails before answering

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self.metrics.observe_request(scope["method"], _route_label(scope), status, time.perf_counter() - start)


router = APIRouter()


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."}},
    summary="Prometheus metrics",
)
def metrics(request: Request) -> Response:
    """Request counts and latencies by route and status, decode and model times, embed batch sizes, queue depth,
    embedding-cache hits and misses per layer, Redis cache latency and errors, collection size and database errors,
    in the Prometheus text format."""
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def install_metrics(app: FastAPI, settings: Settings) -> Metrics:
    """Create the app's :class:`Metrics` (``app.state.metrics``), time every request and serve ``GET /metrics``.

    Call last among the middleware installers, so that the timing includes them.
    """
    instance = Metrics(settings.sla_p95_ms, lambda: getattr(app.state, "service", None))
    app.state.metrics = instance
    app.add_middleware(MetricsMiddleware, metrics=instance)
    app.include_router(router)
    return instance
