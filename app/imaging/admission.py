"""Bounded decode memory: requests are admitted by decoded pixels in flight, and freed memory goes back to the OS.

A 300 KB PNG can declare 100 megapixels; decoding it takes about 0.8 GB (the RGB raster, a copy and the decoder's
buffers: 8 bytes per pixel measured, more for other modes and formats, up to 17 for WebP with alpha or float TIFF:
:data:`app.imaging.decode.DECODE_BYTES_PER_PIXEL_BY_MODE`). Eight of them at once took the process from 2.7 GB to
8.5 GB. :class:`PixelAdmission` lets a request decode only while the cost held by all requests stays within
``MAX_DECODE_PIXELS_IN_FLIGHT``; the service charges each image its measured decode cost in pixels of an RGB photo
(:func:`decode_charge`, from the image header, before anything is decoded). Others wait in line, first
come first served, up to ``DECODE_WAIT_S``; then, or when :data:`MAX_WAITERS` requests already wait, the request
answers 503 with ``Retry-After`` (:class:`app.errors.ServiceBusyError`).

glibc keeps freed memory in its heaps and arenas for reuse, so after a burst of large decodes the process stayed at
6.7 GB. :func:`release_memory` (``malloc_trim(0)``, glibc only) hands it back; the admission calls it after every
large image (:data:`TRIM_AFTER_PIXELS`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from app.errors import ImageTooLargeError, ServiceBusyError
from app.imaging.decode import RGB_DECODE_BYTES_PER_PIXEL, decode_cost

log = logging.getLogger(__name__)

__all__ = ["MAX_WAITERS", "TRIM_AFTER_PIXELS", "PixelAdmission", "decode_charge", "release_memory"]

#: most requests waiting for decode capacity at once. Each waits on one of the web server's worker threads (anyio's
#: default limit is 40), so this leaves more than half of them to requests that decode nothing (search by vector,
#: /health, GET /image).
MAX_WAITERS = 16
#: images of at least this many pixels (48 MB as RGB) trim the heap when their request finishes
TRIM_AFTER_PIXELS = 16_000_000


def _load_malloc_trim():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()


def release_memory() -> bool:
    """Return the C heap's free memory to the operating system (glibc ``malloc_trim(0)``).

    Returns ``True`` if memory was released, ``False`` when none was or on other C libraries (musl, macOS: a
    no-op there). Takes about a millisecond per 100 MB of heap; raises nothing.
    """
    if _malloc_trim is None:
        return False
    return bool(_malloc_trim(0))


def decode_charge(data: bytes, *, max_pixels: int, draft_size: int | None, max_decode_mb: float) -> int:
    """What decoding ``data`` costs the admission, in pixels of an 8-bit RGB photo (the unit of
    MAX_DECODE_PIXELS_IN_FLIGHT): its measured decode memory (:func:`app.imaging.decode.decode_cost`, by format and
    mode, from the header) over :data:`app.imaging.decode.RGB_DECODE_BYTES_PER_PIXEL`. A WebP with alpha or a float
    TIFF counts about 2.1 times its pixels, a palette GIF about 0.6 times; JPEGs count at ``draft_size`` (the
    embedder's input size, or the thumbnail's).

    Args:
        max_pixels: ``MAX_IMAGE_PIXELS``; an image over it costs 0 (it is refused before decoding).
        draft_size: the JPEG draft target in pixels, ``None`` for full resolution.
        max_decode_mb: ``MAX_DECODE_MB``; 0 = no limit.

    Raises :class:`app.errors.ImageTooLargeError` (413) when the decode memory is over ``max_decode_mb``.
    """
    cost = decode_cost(data, max_pixels=max_pixels, draft_size=draft_size)
    limit = max_decode_mb * 1_000_000
    if limit and cost > limit:
        raise ImageTooLargeError(
            f"Decoding this image would take about {cost / 1e6:,.0f} MB of memory, over the limit of "
            f"{max_decode_mb:g} MB (MAX_DECODE_MB); send it smaller or in another format."
        )
    return -int(-cost // RGB_DECODE_BYTES_PER_PIXEL)  # rounded up: a tiny image still holds a place


class PixelAdmission:
    """A first-come-first-served gate that bounds the decoded pixels held by all requests together.

    Args:
        capacity: most pixels in flight (``MAX_DECODE_PIXELS_IN_FLIGHT``), >= 1. A single image over it is admitted
            when nothing else is in flight, so no configuration can refuse an image the size limit accepts.
        max_wait_s: longest wait in line, seconds (``DECODE_WAIT_S``), > 0.
        max_waiters: most requests waiting at once (:data:`MAX_WAITERS`).

    Thread-safe. :attr:`in_flight` and :attr:`waiting` are exposed for tests and metrics.

    Raises:
        ValueError: ``capacity`` < 1, ``max_wait_s`` <= 0 or ``max_waiters`` < 1.
    """

    def __init__(self, capacity: int, max_wait_s: float, *, max_waiters: int = MAX_WAITERS) -> None:
        if capacity < 1 or max_wait_s <= 0 or max_waiters < 1:
            raise ValueError(f"need capacity >= 1, max_wait_s > 0, max_waiters >= 1; got {capacity}, {max_wait_s}")
        self.capacity = int(capacity)
        self.max_wait_s = float(max_wait_s)
        self.max_waiters = int(max_waiters)
        self.in_flight = 0
        self._line: deque[object] = deque()
        self._cond = threading.Condition()

    @property
    def waiting(self) -> int:
        """Requests waiting in line now."""
        return len(self._line)

    def _fits(self, pixels: int) -> bool:
        return self.in_flight == 0 or self.in_flight + pixels <= self.capacity

    def _busy(self, why: str) -> ServiceBusyError:
        return ServiceBusyError(
            f"The server is busy decoding other large images ({why}; {self.in_flight:,} pixels in flight, "
            f"MAX_DECODE_PIXELS_IN_FLIGHT {self.capacity:,}). Retry later.",
            retry_after_s=max(1.0, self.max_wait_s / 4),
        )

    def acquire(self, pixels: int) -> None:
        """Wait until ``pixels`` fit, then hold them; pair with :meth:`release`. ``pixels`` <= 0 passes at once.

        Raises :class:`app.errors.ServiceBusyError` (503 + Retry-After) when :attr:`max_waiters` requests already
        wait, or after :attr:`max_wait_s` seconds in line.
        """
        if pixels <= 0:
            return
        ticket = object()
        with self._cond:
            if not self._line and self._fits(pixels):
                self.in_flight += pixels
                return
            if len(self._line) >= self.max_waiters:
                raise self._busy(f"{len(self._line)} requests already wait")
            self._line.append(ticket)
            deadline = time.monotonic() + self.max_wait_s
            while not (self._line[0] is ticket and self._fits(pixels)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._line.remove(ticket)
                    self._cond.notify_all()  # the next in line may fit now that this one leaves
                    raise self._busy(f"waited {self.max_wait_s:g} s, DECODE_WAIT_S")
                self._cond.wait(remaining)
            self._line.popleft()
            self.in_flight += pixels
            self._cond.notify_all()  # the next in line may fit as well

    def release(self, pixels: int) -> None:
        """Give back what :meth:`acquire` took; trims the heap after a large image (:data:`TRIM_AFTER_PIXELS`)."""
        if pixels <= 0:
            return
        with self._cond:
            self.in_flight -= pixels
            self._cond.notify_all()
        if pixels >= TRIM_AFTER_PIXELS:
            release_memory()

    @contextmanager
    def admit(self, pixels: int) -> Iterator[None]:
        """``acquire(pixels)`` for the block, ``release(pixels)`` after it (exceptions included).

        Let every reference to the decoded image die inside the block (decode in a helper function), or the
        memory the trim should return is still in use.
        """
        self.acquire(pixels)
        try:
            yield
        finally:
            self.release(pixels)
