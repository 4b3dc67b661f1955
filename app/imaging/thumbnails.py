"""Thumbnails of stored images, kept in memory so that a repeated request does not decode the original again.

A results page asks for the same thumbnails over and over (every search, every scroll, every client), and each one
decoded its original under the decode admission: a 100 MP PNG costs about 0.8 GB and a second or more per request
(docs/benchmarks.md, "Decode cost"). Originals are stored by content hash, so a thumbnail of ``(id, size)`` never
changes: entries need no invalidation, only a bound. :class:`ThumbnailCache` is an LRU over the JPEG bytes
(``cachetools.LRUCache`` sized by ``len``), at most ``THUMBNAIL_CACHE_MB``; the service still checks that the original
exists before answering from it, so a deleted image's thumbnail is a 404 at once.
"""

from __future__ import annotations

import io
import threading

from cachetools import LRUCache

from app.imaging.decode import decode_image

__all__ = ["JPEG_QUALITY", "ThumbnailCache", "render_thumbnail"]

#: JPEG quality of thumbnails and previews
JPEG_QUALITY = 85


def render_thumbnail(data: bytes, size: int, *, max_pixels: int) -> bytes:
    """A JPEG of the image ``data``, at most ``size`` x ``size`` pixels, EXIF orientation applied.

    The whole encoded image must be in memory: decoders need it (a TIFF's strips, a HEIC's tiles, a PNG's zlib
    stream); decoded pixels are bounded by the caller's admission (MAX_DECODE_PIXELS_IN_FLIGHT, MAX_DECODE_MB).
    Draft mode decodes a large JPEG straight to about the thumbnail's size instead of its full resolution.

    Raises :class:`app.errors.ImageDecodeError` (unknown format, corrupt, over ``max_pixels``).
    """
    image = decode_image(data, max_pixels=max_pixels, draft_size=size).image
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


class ThumbnailCache:
    """LRU map ``(image id, size in pixels)`` -> JPEG bytes, bounded by their total size.

    Args:
        max_bytes: most bytes of JPEG held (THUMBNAIL_CACHE_MB x 10^6); 0 disables the cache. A thumbnail larger
            than the whole cache is not kept.

    Thread-safe (one lock); :attr:`hits` and :attr:`misses` count lookups.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._cache: LRUCache = LRUCache(maxsize=max(1, self.max_bytes), getsizeof=len)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, image_id: str, size: int) -> bytes | None:
        """The cached JPEG, or ``None``."""
        if not self.max_bytes:
            return None
        with self._lock:
            jpeg = self._cache.get((image_id, size))
            if jpeg is None:
                self.misses += 1
            else:
                self.hits += 1
            return jpeg

    def put(self, image_id: str, size: int, jpeg: bytes) -> None:
        """Keep ``jpeg`` (evicting the least recently used entries to make room)."""
        if not self.max_bytes or len(jpeg) > self.max_bytes:
            return
        with self._lock:
            self._cache[(image_id, size)] = jpeg

    def forget(self, image_id: str) -> None:
        """Drop every size of ``image_id`` (after a delete: frees the memory at once)."""
        with self._lock:
            for key in [k for k in self._cache if k[0] == image_id]:
                del self._cache[key]

    @property
    def bytes_held(self) -> int:
        """Total size of the cached JPEGs, bytes."""
        with self._lock:
            return int(self._cache.currsize)
