"""The in-process layer (L1): a bounded map key -> embedding with an LRU or LFU eviction policy.

The policies are cachetools' ``LRUCache`` and ``LFUCache`` (both O(1) per operation; LFU keeps per-frequency
buckets and evicts the least recently used key of the lowest count). cachetools is not thread-safe, so every call
takes this layer's one lock. Measured against each other on a Zipf query stream by ``bench/cache.py``
(docs/benchmarks.md, "Embedding cache").
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np
from cachetools import Cache, LFUCache, LRUCache

Policy = Literal["lru", "lfu"]


@dataclass(frozen=True, slots=True)
class QueryCacheStats:
    """The memory layer as ``GET /stats`` has shown it since before the Redis layer (``query_cache``): ``size``
    entries held of ``capacity``; ``hit_rate`` = hits / (hits + misses), 0.0 before the first lookup."""

    size: int
    capacity: int
    hits: int
    misses: int
    hit_rate: float


class MemoryLayer:
    """Thread-safe map ``key -> (D,) float32`` read-only embedding, at most ``capacity`` entries.

    ``capacity == 0`` disables it: :meth:`get` misses without counting and :meth:`put` stores nothing. Hits and
    misses are counted here (``/stats`` ``query_cache`` and ``cache.memory``).
    """

    name = "memory"

    def __init__(self, capacity: int, policy: Policy = "lru") -> None:
        """Raises ValueError for a negative capacity or an unknown policy."""
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if policy not in ("lru", "lfu"):
            raise ValueError(f"policy must be lru or lfu, got {policy!r}")
        self.capacity = int(capacity)
        self.policy: Policy = policy
        self._entries: Cache = (LRUCache if policy == "lru" else LFUCache)(maxsize=max(1, self.capacity))
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    @property
    def enabled(self) -> bool:
        """Whether it holds anything at all (capacity > 0)."""
        return self.capacity > 0

    def get(self, key: str) -> np.ndarray | None:
        """The cached embedding (its use recorded for the policy), or None. Counts a hit or a miss when enabled."""
        if not self.enabled:
            return None
        with self._lock:
            vector = self._entries.get(key)
            if vector is None:
                self._misses += 1
            else:
                self._hits += 1
            return vector

    def put(self, key: str, vector: np.ndarray) -> None:
        """Store a read-only float32 copy of ``vector`` (no caller can alter a cached query later), evicting by the
        policy when full."""
        if not self.enabled:
            return
        stored = np.array(vector, dtype=np.float32, copy=True)
        stored.setflags(write=False)
        with self._lock:
            self._entries[key] = stored

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """Membership without touching the policy's bookkeeping or the counters."""
        with self._lock:
            return key in self._entries

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
