"""What ``GET /stats`` answers: :class:`ServiceStats` (collection size, the model and backend serving it, the
embedding and thumbnail caches' counters) and :func:`collect_stats`, which gathers it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.cache import CacheStats, EmbeddingCache
from app.cache.memory import QueryCacheStats
from app.cache.thumbnails import ThumbnailCacheStats
from app.embedders.base import Embedder
from app.vectordb.base import VectorDBHandler

__all__ = ["ServiceStats", "collect_stats"]


class ServiceStats(BaseModel):
    """What ``GET /stats`` answers: collection size, the model and backend serving it, the query-embedding cache."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "count": 273,
                    "model": "efficientnet-lite2:imagenet",
                    "dimension": 1280,
                    "backend": "pgvector",
                    "device": "cpu",
                    "supports_text": False,
                    "query_cache": {"size": 12, "capacity": 1024, "hits": 30, "misses": 12, "hit_rate": 0.7143},
                    "cache": {
                        "policy": "lru",
                        "redis_state": "ok",
                        "lookups": 42,
                        "computed": 5,
                        "hit_rate": 0.881,
                        "memory": {"size": 12, "capacity": 1024, "hits": 30, "misses": 12, "hit_rate": 0.7143},
                        "redis": {
                            "state": "ok",
                            "hits": 6,
                            "misses": 6,
                            "hit_rate": 0.5,
                            "skipped": 0,
                            "invalid": 0,
                            "errors": 0,
                            "writes": 6,
                            "p50_ms": 0.21,
                            "p95_ms": 0.48,
                        },
                        "store": {"hits": 1, "misses": 5, "hit_rate": 0.1667},
                    },
                }
            ]
        }
    )
    count: int = Field(description="Images indexed.")
    model: str = Field(description="Model id that filled the collection.")
    dimension: int = Field(description="Embedding dimension D.")
    backend: str = Field(description="VECTOR_DB: pgvector, milvus or manticore.")
    device: str = Field(description="Where the model runs.")
    supports_text: bool = Field(description="Whether text search works.")
    query_cache: QueryCacheStats = Field(
        description="The memory layer of the embedding cache (QUERY_CACHE_SIZE; capacity 0 = disabled), as in "
        "cache.memory; kept for the clients that read it here."
    )
    cache: CacheStats = Field(description="The embedding cache: hits and misses of every layer (app/cache/).")
    thumbnail_cache: ThumbnailCacheStats = Field(description="The thumbnail caches, memory and shared (Redis).")


def collect_stats(
    db: VectorDBHandler, embedder: Embedder, cache: EmbeddingCache, thumbnails: ThumbnailCacheStats
) -> ServiceStats:
    """Counts and model facts for ``/stats``; ``thumbnails`` is the thumbnail caches' snapshot. Raises
    :class:`app.errors.DatabaseUnavailableError` (the count is the one call that reaches the database)."""
    return ServiceStats(
        count=db.count(),
        model=embedder.model_id,
        dimension=embedder.dim,
        backend=db.backend_name,
        device=embedder.device,
        supports_text=embedder.supports_text,
        query_cache=cache.memory.stats(),
        cache=cache.stats(),
        thumbnail_cache=thumbnails,
    )
