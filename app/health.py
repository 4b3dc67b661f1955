"""What ``GET /health`` answers and how it is found out: :class:`HealthReport` (with :class:`ModelInfo`) and
:func:`check_health`, which asks each dependency (database, image store, Redis cache, shared-state PostgreSQL) in
turn and never raises.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.cache import EmbeddingCache
from app.embedders.base import Embedder
from app.locks import PgAdvisoryLocks
from app.storage.base import ImageStore
from app.vectordb.base import VectorDBHandler
from app.vectordb.guard import GuardedHandler

__all__ = ["HealthReport", "ModelInfo", "check_health", "model_info", "shared_state"]


class ModelInfo(BaseModel):
    """The loaded model, as ``/health`` reports it."""

    id: str = Field(description="Model and weights, e.g. open_clip:ViT-B-32/laion2b_s34b_b79k.")
    dimension: int = Field(description="Embedding dimension D.")
    device: str = Field(description="Where the model runs: cpu, cuda, mps (none with EMBEDDER=none).")
    supports_text: bool = Field(description="Whether text search works.")


class HealthReport(BaseModel):
    """What ``GET /health`` answers: ``status`` is ``ok`` only when every dependency is."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "ok",
                    "database": "ok",
                    "storage": "ok",
                    "cache": "ok",
                    "shared_state": "local",
                    "problems": [],
                    "backend": "pgvector",
                    "model": {
                        "id": "efficientnet-lite2:imagenet",
                        "dimension": 1280,
                        "device": "cpu",
                        "supports_text": False,
                    },
                }
            ]
        }
    )
    status: Literal["ok", "degraded", "unavailable"] = Field(
        description="ok; degraded when storage is low (reads work, writes answer 507), the object store does not "
        "answer (searches work, writes answer 503), the Redis cache is unreachable or full (everything works, "
        "from memory only), or the shared-state PostgreSQL beside Milvus/Manticore does not answer (searches "
        "work, writes answer 503); unavailable when the database is down (HTTP 503)."
    )
    database: Literal["ok", "unavailable"]
    storage: Literal["ok", "low", "degraded"] = Field(
        "ok",
        description="low when free space under IMAGE_DIR is below MIN_FREE_MB (writes answer 507); degraded when "
        "the object store (IMAGE_STORE_URL=s3://...) does not answer (writes answer 503, searches work).",
    )
    cache: Literal["ok", "degraded", "off"] = Field(
        "off",
        description="The Redis layer of the embedding cache: off without CACHE_REDIS_URL (memory only); degraded "
        "while Redis is unreachable or full (memory only, reconnects by itself); ok.",
    )
    shared_state: Literal["ok", "unavailable", "local"] = Field(
        "local",
        description="Where the write locks, neighbour graph and job progress live: ok = in the PostgreSQL of "
        "DATABASE_URL, shared by every replica, and it answers; unavailable = that PostgreSQL does not answer "
        "(with Milvus or Manticore: searches work, writes and duplicates answer 503); local = on this machine "
        "(no DATABASE_URL with Milvus or Manticore, or the embedded PostgreSQL): one replica only.",
    )
    libraries: Literal["ok", "warning", "none"] = Field(
        "none",
        description="The photo libraries indexed in place: none = no library; warning = a library's last scan failed "
        "or found a root missing, unreadable or mostly empty and marked nothing offline (problems says which); ok.",
    )
    problems: list[str] = Field(default_factory=list, description="What is down or low, and why, in words.")
    backend: str
    model: ModelInfo


def model_info(embedder: Embedder) -> ModelInfo:
    """The embedder's identity as ``/health`` shows it."""
    return ModelInfo(
        id=embedder.model_id, dimension=embedder.dim, device=embedder.device, supports_text=embedder.supports_text
    )


def check_health(
    db: VectorDBHandler,
    store: ImageStore,
    cache: EmbeddingCache,
    embedder: Embedder,
    libraries: Callable[[], tuple[int, list[str]]] | None = None,
) -> HealthReport:
    """Whether the database answers, the store has room and the Redis cache works, the libraries' scans found their
    roots, and the loaded model; never raises.

    ``libraries()``: ``(number of libraries, problem lines)`` (:meth:`app.library.libraries.Libraries.problems`).

    The database's answer is a probe made for this call (never a cached "ok"), bounded by the guard's
    ``probe_timeout_s`` (1.5 s): a hung database reports down within it; one already known down answers at once
    (app/vectordb/guard.py). Redis's state is the cache breaker's (it never waits on a Redis that is down).
    """
    check_now = getattr(db, "check_now", None)  # a GuardedHandler; a bare handler probes itself
    db_ok = check_now() if check_now is not None else db.health()
    problems = []
    if not db_ok:
        reason = getattr(db, "down_reason", None) or "it does not answer"
        problems.append(f"database ({db.backend_name}): {reason}")
    storage = store.health()
    if storage.problem:
        problems.append(f"storage: {storage.problem}")
    cache_health = cache.health()
    if cache_health.problem:
        problems.append(f"cache (redis): {cache_health.problem}")
    shared = shared_state(store.locks, db_ok)
    if shared == "unavailable" and db_ok:
        reason = getattr(store.locks, "down_reason", None) or "it does not answer"
        problems.append(f"shared state (DATABASE_URL): {reason}")
    library_count, library_problems = libraries() if libraries is not None and db_ok else (0, [])
    problems += [f"library {line}" for line in library_problems]
    degraded = storage.state != "ok" or cache_health.state == "degraded" or shared == "unavailable"
    degraded = degraded or bool(library_problems)
    return HealthReport(
        status="unavailable" if not db_ok else "degraded" if degraded else "ok",
        database="ok" if db_ok else "unavailable",
        storage=storage.state,
        cache=cache_health.state,
        shared_state=shared,
        libraries="warning" if library_problems else "ok" if library_count else "none",
        problems=problems,
        backend=db.backend_name,
        model=model_info(embedder),
    )


def shared_state(locks: object, db_ok: bool) -> Literal["ok", "unavailable", "local"]:
    """``/health``'s ``shared_state`` for a store's write ``locks`` (:attr:`app.storage.base.ImageStore.locks`):
    their own probe beside Milvus or Manticore (a guard around :class:`app.locks.PgAdvisoryLocks`), the
    vector database's answer ``db_ok`` when they live in that same PostgreSQL, ``local`` for ``flock`` files."""
    if isinstance(locks, GuardedHandler):
        return "ok" if locks.check_now() else "unavailable"
    if isinstance(locks, PgAdvisoryLocks):
        return "ok" if db_ok else "unavailable"
    return "local"
