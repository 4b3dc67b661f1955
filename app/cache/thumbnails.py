"""Thumbnails shared by every replica: JPEG bytes in the Redis of ``CACHE_REDIS_URL``, behind each process's own
:class:`app.imaging.thumbnails.ThumbnailCache`; :class:`ThumbnailCaches` walks the two in order (memory -> Redis ->
render), as :class:`app.cache.hybrid.EmbeddingCache` does for embeddings, and :class:`ThumbnailCacheStats` is their
part of ``/stats``.

Why: with the originals in object storage, a thumbnail that is not cached costs a GET of the whole original plus a
decode: about 240 ms for a 12 MP HEIC, 260 ms for a 12 MP PNG, 30 ms for a 12 MP JPEG (draft mode), against
0.06 ms for a Redis GET of the finished JPEG (docs/benchmarks.md, "Thumbnails with originals in object storage").
Behind a load balancer, per-process caches rebuild every thumbnail once per replica; this layer makes it once.

- Key: ``{CACHE_KEY_PREFIX}:thumb:v{THUMB_VERSION}:{size}:{image_id}``. Originals are addressed by content, so a
  key's thumbnail never changes; bump :data:`THUMB_VERSION` when :func:`app.imaging.thumbnails.render_thumbnail`'s
  output changes (quality, resampling), and the old entries stop being found and expire.
- Value: :data:`MAGIC` + the JPEG's length (uint32 LE) + the JPEG; anything else under the key (foreign data,
  a truncated value, another type) is a miss, counted as ``invalid``, and overwritten by the next build.
- ``SET ... EX THUMBNAIL_REDIS_TTL_S`` (0: thumbnails are not put in Redis at all). Redis's own ``maxmemory``
  policy evicts beyond that (docker-compose.yml: ``allkeys-lfu``).
- Faults: the same bounded timeouts and circuit breaker as the embedding layer (:class:`app.cache.redis_layer.
  RedisLayer`, ``CACHE_REDIS_TIMEOUT_MS``, ``CACHE_BREAKER_FAILURES``, ``CACHE_BREAKER_CONFIRM_MS``,
  ``CACHE_RETRY_S``): a dead or slow Redis is a miss, and the thumbnail is rebuilt from the original; never an error.
- Deleted images: the service checks that the original exists before answering from any cache, so a thumbnail
  left in Redis is never served; it expires with its TTL.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from pydantic import BaseModel, Field

from app.cache.redis_layer import RedisLayer, RedisLayerStats
from app.config import Settings
from app.errors import ImageNotFoundError
from app.imaging.thumbnails import ThumbnailCache

__all__ = [
    "MAGIC",
    "THUMB_VERSION",
    "ThumbnailCacheStats",
    "ThumbnailCaches",
    "ThumbnailRedisLayer",
    "decode_thumbnail",
    "encode_thumbnail",
]

THUMB_VERSION = 1
"""Version of the thumbnail keys (rendering) and value layout; part of every key."""

MAGIC = b"IST\x01"
"""First 4 bytes of every value: format 1 of this service's thumbnails."""

_HEADER = struct.Struct("<4sI")


def encode_thumbnail(jpeg: bytes) -> bytes:
    """The stored bytes of a JPEG thumbnail."""
    return _HEADER.pack(MAGIC, len(jpeg)) + jpeg


def decode_thumbnail(raw: object) -> bytes | None:
    """The JPEG in ``raw``, or ``None`` when ``raw`` is not what :func:`encode_thumbnail` wrote: another magic, a
    length that does not match, or bytes that do not start and end like a JPEG (SOI ``FFD8FF``, EOI ``FFD9``).
    Never raises."""
    if not isinstance(raw, bytes | bytearray) or len(raw) < _HEADER.size + 5:
        return None
    magic, length = _HEADER.unpack_from(raw)
    jpeg = bytes(raw[_HEADER.size :])
    if magic != MAGIC or length != len(jpeg) or not jpeg.startswith(b"\xff\xd8\xff") or not jpeg.endswith(b"\xff\xd9"):
        return None
    return jpeg


class ThumbnailRedisLayer(RedisLayer):
    """``(image id, size) -> JPEG bytes`` in Redis; :meth:`get_thumbnail` and :meth:`put_thumbnail` never raise.

    Args:
        url: a redis-py URL (``CACHE_REDIS_URL``).
        key_prefix: ``CACHE_KEY_PREFIX``.
        ttl_s: seconds each thumbnail lives (``THUMBNAIL_REDIS_TTL_S``, >= 1).
        timeout_s, failure_threshold, retry_s: as :class:`app.cache.redis_layer.RedisLayer`.

    Call :meth:`start` once (one bounded PING) and :meth:`close` at the end; :meth:`stats` and :attr:`problem` are
    the embedding layer's.
    """

    what = "thumbnails"

    def __init__(
        self,
        url: str,
        key_prefix: str,
        *,
        ttl_s: int,
        timeout_s: float,
        failure_threshold: int,
        retry_s: float,
        confirm_timeout_s: float = 0.0,
    ) -> None:
        super().__init__(
            url,
            0,
            ttl_s=ttl_s,
            timeout_s=timeout_s,
            failure_threshold=failure_threshold,
            retry_s=retry_s,
            confirm_timeout_s=confirm_timeout_s,
        )
        self.key_prefix = key_prefix

    @classmethod
    def from_settings(cls, settings: Settings) -> ThumbnailRedisLayer | None:
        """The layer on ``CACHE_REDIS_URL``, or ``None`` without one or with ``THUMBNAIL_REDIS_TTL_S=0``. Connects
        nothing yet."""
        if not settings.cache_redis_url or not settings.thumbnail_redis_ttl_s:
            return None
        return cls(
            settings.cache_redis_url,
            settings.cache_key_prefix,
            ttl_s=settings.thumbnail_redis_ttl_s,
            timeout_s=settings.cache_redis_timeout_ms / 1000,
            failure_threshold=settings.cache_breaker_failures,
            retry_s=settings.cache_retry_s,
            confirm_timeout_s=settings.cache_breaker_confirm_ms / 1000,
        )

    def key(self, image_id: str, size: int) -> str:
        """``{prefix}:thumb:v1:{size}:{image_id}``."""
        return f"{self.key_prefix}:thumb:v{THUMB_VERSION}:{int(size)}:{image_id}"

    def get_thumbnail(self, image_id: str, size: int) -> bytes | None:
        """The JPEG, or ``None`` (not there, not ours, Redis failing or skipped)."""
        return self.get(self.key(image_id, size))

    def put_thumbnail(self, image_id: str, size: int, jpeg: bytes) -> None:
        """Keep ``jpeg`` for ``ttl_s`` seconds; a failure is counted, never raised."""
        self.put(self.key(image_id, size), jpeg)

    def _encode(self, value: bytes) -> bytes:
        return encode_thumbnail(value)

    def _decode(self, raw: bytes) -> bytes | None:
        return decode_thumbnail(raw)


class ThumbnailCacheStats(BaseModel):
    """The thumbnail caches: this process's memory (``THUMBNAIL_CACHE_MB``) and, with ``CACHE_REDIS_URL``, the
    replicas' shared layer in Redis (app/cache/thumbnails.py)."""

    bytes: int = Field(description="Bytes of JPEG held in this process's memory.")
    capacity_bytes: int = Field(description="THUMBNAIL_CACHE_MB in bytes; 0 = the memory layer is off.")
    hits: int = Field(description="Thumbnails served from memory since start.")
    misses: int = Field(description="Lookups the memory layer did not have.")
    redis: RedisLayerStats | None = Field(
        None, description="The shared layer's counters; null without CACHE_REDIS_URL or with THUMBNAIL_REDIS_TTL_S=0."
    )


class ThumbnailCaches:
    """Thumbnails of stored images by ``(image id, size)``: this process's memory, then the replicas' Redis.

    Args:
        memory: the process's LRU (``THUMBNAIL_CACHE_MB``; 0 bytes = off).
        shared: the Redis layer, ``None`` without ``CACHE_REDIS_URL`` or with ``THUMBNAIL_REDIS_TTL_S=0``.

    Build it with :meth:`from_settings`, :meth:`start` it (one bounded PING of Redis) and :meth:`close` it.
    Thread-safe; a Redis that fails is a miss, never an error.
    """

    def __init__(self, memory: ThumbnailCache, shared: ThumbnailRedisLayer | None) -> None:
        self.memory = memory
        self.shared = shared

    @classmethod
    def from_settings(cls, settings: Settings) -> ThumbnailCaches:
        """Both layers as the settings size them (``THUMBNAIL_CACHE_MB``, ``CACHE_REDIS_URL``,
        ``THUMBNAIL_REDIS_TTL_S``). Connects nothing yet."""
        return cls(
            ThumbnailCache(int(settings.thumbnail_cache_mb * 1_000_000)), ThumbnailRedisLayer.from_settings(settings)
        )

    def start(self) -> None:
        """One PING of Redis, bounded by ``CACHE_REDIS_TIMEOUT_MS``; a Redis that is down only degrades the layer."""
        if self.shared is not None:
            self.shared.start()

    def close(self) -> None:
        """Close the Redis connections (the memory layer needs nothing)."""
        if self.shared is not None:
            self.shared.close()

    def lookup(self, image_id: str, size: int, *, exists: Callable[[], bool], render: Callable[[], bytes]) -> bytes:
        """The JPEG of ``image_id`` at ``size``: from memory, else from Redis (then kept in memory too), else
        ``render()`` (then kept in both).

        A cached thumbnail is served only while ``exists()`` says its original is still stored: an image deleted
        meanwhile, perhaps through another replica, is dropped from memory and raises
        :class:`app.errors.ImageNotFoundError`. Raises whatever ``exists`` and ``render`` raise.
        """
        jpeg = self.memory.get(image_id, size)
        from_redis = False
        if jpeg is None and self.shared is not None:
            jpeg = self.shared.get_thumbnail(image_id, size)
            from_redis = jpeg is not None
        if jpeg is not None:
            if not exists():
                self.memory.forget(image_id)
                raise ImageNotFoundError(f"No image with id '{image_id}'.")
            if from_redis:
                self.memory.put(image_id, size, jpeg)
            return jpeg
        jpeg = render()
        self.memory.put(image_id, size, jpeg)
        if self.shared is not None:
            self.shared.put_thumbnail(image_id, size, jpeg)
        return jpeg

    def forget(self, image_id: str) -> None:
        """Drop every size of ``image_id`` from memory (after a delete); Redis's copies expire with their TTL and are
        never served, since :meth:`lookup` checks the original first."""
        self.memory.forget(image_id)

    def stats(self) -> ThumbnailCacheStats:
        """Both layers' counters (``/stats``, ``/metrics``); never raises, touches no server."""
        return ThumbnailCacheStats(
            bytes=self.memory.bytes_held,
            capacity_bytes=self.memory.max_bytes,
            hits=self.memory.hits,
            misses=self.memory.misses,
            redis=None if self.shared is None else self.shared.stats(),
        )
