"""Cache-aside composition of the layers: memory (L1) -> Redis (L2) -> stored vector (L3) -> model.

:class:`EmbeddingCache` is the one cache object of a :class:`app.service.SearchService`. A lookup walks the layers
in order and stops at the first hit; whatever was found (or computed) below fills every layer above it. Only image
queries have an L3: an upload whose bytes are indexed has its embedding in the vector database already. A Redis
fault is a miss of L2 (see :mod:`app.cache.redis_layer`), so a lookup fails only when the model (or the database)
does, exactly as without a cache.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from app.cache.keys import Kind, cache_key, text_digest
from app.cache.memory import MemoryLayer, QueryCacheStats
from app.cache.redis_layer import RedisLayer, RedisLayerStats
from app.config import Settings
from app.observe import NULL_OBSERVER, Observer

Source = Literal["memory", "redis", "store", "model"]
"""Where a looked-up embedding came from."""


@dataclass(frozen=True, slots=True)
class Lookup:
    """One lookup's result: ``vector`` ``(D,)`` float32, L2-normalised (read-only when it came from a cache), and
    the layer it came from (``model``: computed now)."""

    vector: np.ndarray
    source: Source


@dataclass(frozen=True, slots=True)
class StoreLayerStats:
    """L3, the stored vector of an indexed image with the same bytes: lookups that reached it, found or not."""

    hits: int
    misses: int
    hit_rate: float


class CacheStats(BaseModel):
    """``GET /stats`` ``cache``: every layer's counters and the hit rate of the whole cache."""

    policy: Literal["lru", "lfu"] = Field(description="Eviction policy of the memory layer (CACHE_POLICY).")
    redis_state: Literal["ok", "degraded", "off"] = Field(
        description="off: no CACHE_REDIS_URL (memory only); degraded: Redis unreachable or full, memory only."
    )
    lookups: int = Field(description="Query embeddings asked for (image and text queries).")
    computed: int = Field(description="Lookups that no layer answered: decoded and embedded by the model.")
    hit_rate: float = Field(description="(lookups - computed) / lookups; 0.0 before the first lookup.")
    memory: QueryCacheStats = Field(description="L1, this process's memory (QUERY_CACHE_SIZE entries).")
    redis: RedisLayerStats | None = Field(description="L2, shared Redis; null without CACHE_REDIS_URL.")
    store: StoreLayerStats = Field(description="L3, the stored vector of an indexed image with the same bytes.")


class CacheHealth(BaseModel):
    """The cache's part of ``/health``: ``state`` and, when degraded, why."""

    state: Literal["ok", "degraded", "off"]
    problem: str | None = None


class EmbeddingCache:
    """Query embeddings of one model (``model_id``, ``dim``), by content: image bytes or query text.

    Build it with :meth:`from_settings`, :meth:`start` it (one bounded PING of Redis) and :meth:`close` it. All
    methods are thread-safe; :meth:`image` and :meth:`text` raise only what ``compute`` (or ``stored``) raises.
    """

    def __init__(
        self,
        model_id: str,
        dim: int,
        memory: MemoryLayer,
        redis_layer: RedisLayer | None = None,
        key_prefix: str = "imgsearch",
    ) -> None:
        self.model_id = model_id
        self.dim = dim
        self.memory = memory
        self.redis = redis_layer
        self.key_prefix = key_prefix
        self._lock = threading.Lock()
        self._lookups = self._computed = self._store_hits = self._store_misses = 0

    @classmethod
    def from_settings(
        cls, settings: Settings, model_id: str, dim: int, observer: Observer = NULL_OBSERVER
    ) -> EmbeddingCache:
        """The cache the settings describe: QUERY_CACHE_SIZE entries by CACHE_POLICY in memory, and Redis at
        CACHE_REDIS_URL when set (CACHE_TTL_S, CACHE_REDIS_TIMEOUT_MS, CACHE_BREAKER_FAILURES,
        CACHE_BREAKER_CONFIRM_MS, CACHE_RETRY_S).
        Connects nothing yet (see :meth:`start`). Raises ValueError for a malformed CACHE_REDIS_URL."""
        redis_layer = None
        if settings.cache_redis_url:
            redis_layer = RedisLayer(
                settings.cache_redis_url,
                dim,
                ttl_s=settings.cache_ttl_s,
                timeout_s=settings.cache_redis_timeout_ms / 1000,
                failure_threshold=settings.cache_breaker_failures,
                retry_s=settings.cache_retry_s,
                confirm_timeout_s=settings.cache_breaker_confirm_ms / 1000,
                on_redis_call=observer.observe_cache_redis,
            )
        return cls(
            model_id,
            dim,
            MemoryLayer(settings.query_cache_size, settings.cache_policy),
            redis_layer,
            settings.cache_key_prefix,
        )

    def start(self) -> None:
        """Check Redis once (bounded by its timeout); a Redis that is down leaves the cache degraded, never raises."""
        if self.redis is not None:
            self.redis.start()

    def close(self) -> None:
        """Stop the Redis layer's reconnection thread and close its connections."""
        if self.redis is not None:
            self.redis.close()

    def key(self, kind: Kind, digest: str) -> str:
        """The key of ``digest`` for this model (see :func:`app.cache.keys.cache_key`)."""
        return cache_key(self.key_prefix, kind, self.model_id, self.dim, digest)

    # --- lookups -----------------------------------------------------------------------------------------------
    def image(
        self,
        image_id: str,
        compute: Callable[[], np.ndarray],
        stored: Callable[[], np.ndarray | None] | None = None,
    ) -> Lookup:
        """The embedding of the image whose bytes have SHA-256 ``image_id``.

        Args:
            image_id: 64-hex SHA-256 of the uploaded bytes.
            compute: decode + embed the upload: ``(D,)`` float32, L2-normalised. Called only when no layer has it.
            stored: L3, the stored ``(D,)`` vector of the indexed image with these bytes, or None when not indexed.
        """
        return self._lookup("image", image_id, compute, stored)

    def text(self, text: str, compute: Callable[[], np.ndarray]) -> Lookup:
        """The embedding of the text query ``text`` (exactly as typed); ``compute`` embeds it, ``(D,)`` float32."""
        return self._lookup("text", text_digest(text), compute, None)

    def texts(self, texts: list[str], compute: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """``(N, D)`` float32 embeddings of ``texts``; the ones no layer has are embedded by one ``compute`` call
        (``list[str] -> (M, D)``) and fill the layers."""
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        found: list[np.ndarray | None] = [self._find("text", text_digest(t)) for t in texts]
        missing = [i for i, v in enumerate(found) if v is None]
        if missing:
            computed = compute([texts[i] for i in missing])
            for i, vector in zip(missing, computed, strict=True):
                self._fill(self.key("text", text_digest(texts[i])), vector)
                found[i] = vector
            with self._lock:
                self._computed += len(missing)
        return np.stack([np.asarray(v, dtype=np.float32) for v in found])

    def _lookup(
        self,
        kind: Kind,
        digest: str,
        compute: Callable[[], np.ndarray],
        stored: Callable[[], np.ndarray | None] | None,
    ) -> Lookup:
        key = self.key(kind, digest)
        with self._lock:
            self._lookups += 1
        vector = self.memory.get(key)
        if vector is not None:
            return Lookup(vector, "memory")
        if self.redis is not None:
            vector = self.redis.get(key)
            if vector is not None:
                self.memory.put(key, vector)
                return Lookup(vector, "redis")
        if stored is not None:
            vector = stored()
            with self._lock:
                if vector is None:
                    self._store_misses += 1
                else:
                    self._store_hits += 1
            if vector is not None:
                vector = np.asarray(vector, dtype=np.float32)
                self._fill(key, vector)
                return Lookup(vector, "store")
        vector = compute()
        with self._lock:
            self._computed += 1
        self._fill(key, vector)
        return Lookup(vector, "model")

    def _find(self, kind: Kind, digest: str) -> np.ndarray | None:
        key = self.key(kind, digest)
        with self._lock:
            self._lookups += 1
        vector = self.memory.get(key)
        if vector is None and self.redis is not None:
            vector = self.redis.get(key)
            if vector is not None:
                self.memory.put(key, vector)
        return vector

    def _fill(self, key: str, vector: np.ndarray) -> None:
        """Store what a lower layer (or the model) gave in every layer above it."""
        self.memory.put(key, vector)
        if self.redis is not None:
            self.redis.put(key, vector)

    # --- state -------------------------------------------------------------------------------------------------
    def health(self) -> CacheHealth:
        """``off`` without Redis, ``degraded`` while Redis is unreachable or full (memory only), else ``ok``.
        Cheap: reads the breaker, makes no Redis call."""
        if self.redis is None:
            return CacheHealth(state="off")
        problem = self.redis.problem
        return CacheHealth(state="degraded" if problem else "ok", problem=problem)

    def stats(self) -> CacheStats:
        """Counters of every layer (each layer's snapshot is consistent on its own)."""
        with self._lock:
            lookups, computed = self._lookups, self._computed
            store_hits, store_misses = self._store_hits, self._store_misses
        store_lookups = store_hits + store_misses
        return CacheStats(
            policy=self.memory.policy,
            redis_state=self.health().state,
            lookups=lookups,
            computed=computed,
            hit_rate=round((lookups - computed) / lookups, 4) if lookups else 0.0,
            memory=self.memory.stats(),
            redis=None if self.redis is None else self.redis.stats(),
            store=StoreLayerStats(
                store_hits, store_misses, round(store_hits / store_lookups, 4) if store_lookups else 0.0
            ),
        )
