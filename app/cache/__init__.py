"""The embedding cache: query embeddings looked up memory (L1) -> Redis (L2) -> stored vector (L3) -> model.

One object, :class:`app.cache.hybrid.EmbeddingCache`, is all :class:`app.service.SearchService` sees. Its parts:

- :mod:`app.cache.keys`: the key namespace (model id + dimension + format version) and the value codec that
  refuses foreign or corrupt data;
- :mod:`app.cache.memory`: the in-process layer, LRU or LFU (``CACHE_POLICY``);
- :mod:`app.cache.redis_layer`: the shared layer on Redis (``CACHE_REDIS_URL``), bounded by redis-py's socket
  timeouts and a :class:`app.cache.breaker.CircuitBreaker`, so a dead, slow or full Redis never fails a request.

Thumbnails have caches of the same shape beside it: :mod:`app.cache.thumbnails` (this process's memory, then the
replicas' Redis, behind :class:`app.cache.thumbnails.ThumbnailCaches`).
"""

from app.cache.hybrid import CacheHealth, CacheStats, EmbeddingCache, Lookup

__all__ = ["CacheHealth", "CacheStats", "EmbeddingCache", "Lookup"]
