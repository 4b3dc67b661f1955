"""A small thread-safe LRU cache of query-image embeddings, keyed by the SHA-256 of the uploaded bytes.

:class:`app.service.SearchService` owns one (``QUERY_CACHE_SIZE`` entries). It serves searches with images that are
*not* indexed (an indexed image's stored embedding is reused without it), so repeating a search with the same upload
skips decoding and the model. One service runs one model for its whole life, so cached vectors never need
invalidating for a model change; a new model means a new service and an empty cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class QueryCacheStats:
    """Counters for ``/stats``: ``size`` entries held of ``capacity``; ``hit_rate`` = hits / (hits + misses), 0.0
    before the first lookup."""

    size: int
    capacity: int
    hits: int
    misses: int
    hit_rate: float


class QueryEmbeddingCache:
    """LRU map image id (64-hex SHA-256) -> read-only ``(D,)`` float32 embedding.

    ``capacity == 0`` disables it: :meth:`get` always misses without counting and :meth:`put` stores nothing.
    Every method takes one lock, so concurrent request threads may share it.
    """

    def __init__(self, capacity: int) -> None:
        """Raises ValueError for a negative capacity."""
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    def get(self, image_id: str) -> np.ndarray | None:
        """The cached embedding (now the most recently used), or None. Counts a hit or a miss when enabled."""
        if self.capacity == 0:
            return None
        with self._lock:
            vector = self._entries.get(image_id)
            if vector is None:
                self._misses += 1
                return None
            self._entries.move_to_end(image_id)
            self._hits += 1
            return vector

    def put(self, image_id: str, vector: np.ndarray) -> None:
        """Store a copy of ``vector`` (made read-only, so no caller can alter a cached query), evicting the least
        recently used entry when full."""
        if self.capacity == 0:
            return
        stored = np.array(vector, dtype=np.float32, copy=True)
        stored.setflags(write=False)
        with self._lock:
            self._entries[image_id] = stored
            self._entries.move_to_end(image_id)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, image_id: object) -> bool:
        """Membership without touching recency or the counters."""
        with self._lock:
            return image_id in self._entries

    def stats(self) -> QueryCacheStats:
        """A consistent snapshot of the counters."""
        with self._lock:
            lookups = self._hits + self._misses
            return QueryCacheStats(
                size=len(self._entries),
                capacity=self.capacity,
                hits=self._hits,
                misses=self._misses,
                hit_rate=round(self._hits / lookups, 4) if lookups else 0.0,
            )
