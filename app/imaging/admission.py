"""Bounded decode memory: a decode starts only when the process's memory can take it, and freed memory goes back to
the OS.

A 300 KB PNG can declare 100 megapixels; decoding it takes about 0.4 GB (the raster and the decoder's buffers: 4
bytes per pixel measured for RGB, more for other modes and formats, up to 13-17 for WebP or float TIFF:
:data:`app.imaging.decode.DECODE_BYTES_PER_PIXEL_BY_MODE`), and a 1.5 MB progressive JPEG of 100 MP 0.6 GB even
when it is decoded to 1/8 of its size (:func:`app.imaging.decode.jpeg_coefficient_bytes`). Eight 100 MP PNGs at once
took the process from 2.7 GB to 8.5 GB. :class:`PixelAdmission` is the one owner of the rule (issue #27):

    a decode starts only when the process's resident memory now, plus the estimated peak of every decode already
    admitted, plus this one's, stays within ``MEMORY_LIMIT_MB``; and (a cap kept from before) the decodes in flight
    together cost at most ``MAX_DECODE_PIXELS_IN_FLIGHT`` pixels of an RGB photo.

The estimate is :func:`decode_charge`: the measured decode memory of the image's format, mode and size, read from
its header before anything is decoded (also for truncated and partial files: a decoder allocates for what the
header claims), plus the model's memory for the image when the request embeds it (:func:`embed_bytes`).
Resident memory is read at each admission, so the rule holds from any baseline (caches, model arenas, a heap grown
by indexing): what the process already holds leaves that much less for decoding. Decodes already running are counted
at their full estimate even when part of it is resident already: the bound errs on the safe side. Requests that do
not fit wait in line, first come first served, up to ``DECODE_WAIT_S``; then, or when :data:`MAX_WAITERS` requests
already wait, or when an image does not fit even with nothing else in flight, the request answers 503 with
``Retry-After`` (:class:`app.errors.ServiceBusyError`).

glibc keeps freed memory in its heaps and arenas for reuse, so after a burst of large decodes the process stayed at
6.7 GB. :func:`release_memory` (``malloc_trim(0)``, glibc only) hands it back; the admission calls it after every
large image and whenever the line empties after decoding (:data:`TRIM_AFTER_BYTES`), before the next in line is let
in. :func:`configure_malloc` caps glibc's arenas at two when the server starts (as ``MALLOC_ARENA_MAX=2`` would):
with one per thread up to eight per core, freed memory stayed spread over arenas that the trims did not empty.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from app.errors import ImageTooLargeError, ServiceBusyError
from app.imaging.decode import RGB_DECODE_BYTES_PER_PIXEL, decode_cost

log = logging.getLogger(__name__)

__all__ = [
    "EMBED_BYTES_FIXED",
    "EMBED_BYTES_PER_IMAGE",
    "MALLOC_ARENAS",
    "MAX_WAITERS",
    "TRIM_AFTER_BYTES",
    "PixelAdmission",
    "configure_malloc",
    "decode_charge",
    "embed_bytes",
    "release_memory",
    "resident_bytes",
    "to_units",
]

#: most requests waiting for decode capacity at once. Each waits on one of the web server's worker threads (anyio's
#: default limit is 40), so this leaves more than half of them to requests that decode nothing (search by vector,
#: /health, GET /image).
MAX_WAITERS = 16
#: the heap is trimmed after an image whose estimated decode memory is at least this (bytes), and when the line
#: empties after decodes of this much in all
TRIM_AFTER_BYTES = 64_000_000
#: the model's memory for a batch of n images is charged as EMBED_BYTES_FIXED + n * EMBED_BYTES_PER_IMAGE bytes
#: (:func:`embed_bytes`): ONNX Runtime's activations and the float32 input tensor of EfficientNet-Lite2 at 260 px
#: (arena off, app/embedders/onnx_model.py) peaked 21, 52, 97, 147 and 290 MB for batches of 1, 4, 8, 16 and 32
#: (RSS growth sampled every ms, docs/benchmarks.md, "Memory from any baseline"); the charge is 23, 56, 100, 188
#: and 364 MB. Charged with every decode whose request embeds the image while the admission is held.
EMBED_BYTES_FIXED = 12_000_000
EMBED_BYTES_PER_IMAGE = 11_000_000
#: how often a request at the head of the line looks at the process's memory again while it waits, seconds
_POLL_S = 0.1
#: glibc malloc arenas of the server process (:func:`configure_malloc`): over ten bursts of 32 large decodes after
#: indexing 2,000 photos, the process crept 260-310 MB above its baseline with glibc's default (8 per core) and
#: stayed within 45 MB with 2, each burst peaking 5-52 % lower (bench/hostile.py, docs/benchmarks.md, "glibc
#: arenas")
MALLOC_ARENAS = 2
#: glibc's mallopt(3) parameter number of M_ARENA_MAX (malloc.h)
_M_ARENA_MAX = -8


def _load_libc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _load_malloc_trim():
    libc = _load_libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def release_memory() -> bool:
    """Return the C heap's free memory to the operating system (glibc ``malloc_trim(0)``).

    Returns ``True`` if memory was released, ``False`` when none was or on other C libraries (musl, macOS: a
    no-op there). Takes about a millisecond per 100 MB of heap; raises nothing.
    """
    if _malloc_trim is None:
        return False
    return bool(_malloc_trim(0))


def resident_bytes() -> int | None:
    """This process's resident memory (RSS) now, bytes, from ``/proc/self/statm`` (about 10 µs); ``None`` where
    there is no such file (not Linux): the memory limit is not applied there."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def configure_malloc(arenas: int) -> bool:
    """Cap glibc's malloc arenas at ``arenas`` (``mallopt(M_ARENA_MAX)``, as the ``MALLOC_ARENA_MAX`` variable
    does), for the threads that allocate from now on; 0 leaves glibc's default (8 per core). ``True`` when set;
    ``False`` on other C libraries or when ``MALLOC_ARENA_MAX`` is already in the environment (it wins). Raises
    nothing."""
    if arenas <= 0 or "MALLOC_ARENA_MAX" in os.environ:
        return False
    libc = _load_libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, arenas))


def embed_bytes(images: int) -> int:
    """The model's memory charged for embedding ``images`` images in one batch, bytes (:data:`EMBED_BYTES_FIXED`,
    :data:`EMBED_BYTES_PER_IMAGE`); 0 for none."""
    return EMBED_BYTES_FIXED + images * EMBED_BYTES_PER_IMAGE if images > 0 else 0


def to_units(n_bytes: int) -> int:
    """``n_bytes`` in the admission's unit, pixels of an RGB photo
    (:data:`app.imaging.decode.RGB_DECODE_BYTES_PER_PIXEL` bytes each), rounded up."""
    return -int(-n_bytes // RGB_DECODE_BYTES_PER_PIXEL)


def decode_charge(
    data: bytes, *, max_pixels: int, draft_size: int | None, max_decode_mb: float, embeds: bool = False
) -> int:
    """What decoding ``data`` costs the admission, in pixels of an 8-bit RGB photo (the unit of
    MAX_DECODE_PIXELS_IN_FLIGHT; :data:`app.imaging.decode.RGB_DECODE_BYTES_PER_PIXEL` bytes each): its measured
    decode memory (:func:`app.imaging.decode.decode_cost`, by format, mode and size from the header; a progressive
    JPEG's whole-image coefficients included), plus ``embed_bytes(1)`` when ``embeds`` (the request
    runs the model on the image before it lets the admission go). JPEGs count at ``draft_size`` (the embedder's
    input size, or the thumbnail's).

    Args:
        max_pixels: ``MAX_IMAGE_PIXELS``; an image over it costs 0 (it is refused before decoding).
        draft_size: the JPEG draft target in pixels, ``None`` for full resolution.
        max_decode_mb: ``MAX_DECODE_MB``; 0 = no limit.
        embeds: whether the model's memory for the image is charged too.

    Raises :class:`app.errors.ImageTooLargeError` (413) when the decode memory is over ``max_decode_mb``.
    """
    cost = decode_cost(data, max_pixels=max_pixels, draft_size=draft_size)
    limit = max_decode_mb * 1_000_000
    if limit and cost > limit:
        raise ImageTooLargeError(
            f"Decoding this image would take about {cost / 1e6:,.0f} MB of memory, over the limit of "
            f"{max_decode_mb:g} MB (MAX_DECODE_MB); send it smaller or in another format."
        )
    if cost == 0:
        return 0  # refused before decoding: nothing to hold
    if embeds:
        cost += embed_bytes(1)
    return to_units(cost)  # rounded up: a tiny image still holds a place


class PixelAdmission:
    """A first-come-first-served gate that bounds the decode memory of all requests together (the rule: module
    docstring).

    Args:
        capacity: most cost in flight, in pixels of an RGB photo (``MAX_DECODE_PIXELS_IN_FLIGHT``), >= 1. A single
            image over it is admitted when nothing else is in flight.
        max_wait_s: longest wait in line, seconds (``DECODE_WAIT_S``), > 0.
        max_waiters: most requests waiting at once (:data:`MAX_WAITERS`).
        memory_limit_bytes: the process's memory limit (``MEMORY_LIMIT_MB``); ``None`` or 0: no such limit.
        resident: the process's resident memory now, bytes (:func:`resident_bytes`; tests pass their own).
        bytes_per_unit: bytes of one unit of cost (:data:`app.imaging.decode.RGB_DECODE_BYTES_PER_PIXEL`).

    Thread-safe. :attr:`in_flight` and :attr:`waiting` are exposed for tests and metrics.

    Raises:
        ValueError: ``capacity`` < 1, ``max_wait_s`` <= 0 or ``max_waiters`` < 1.
    """

    def __init__(
        self,
        capacity: int,
        max_wait_s: float,
        *,
        max_waiters: int = MAX_WAITERS,
        memory_limit_bytes: int | None = None,
        resident: Callable[[], int | None] = resident_bytes,
        bytes_per_unit: float = RGB_DECODE_BYTES_PER_PIXEL,
    ) -> None:
        if capacity < 1 or max_wait_s <= 0 or max_waiters < 1:
            raise ValueError(f"need capacity >= 1, max_wait_s > 0, max_waiters >= 1; got {capacity}, {max_wait_s}")
        self.capacity = int(capacity)
        self.max_wait_s = float(max_wait_s)
        self.max_waiters = int(max_waiters)
        self.memory_limit_bytes = int(memory_limit_bytes) if memory_limit_bytes else None
        self.bytes_per_unit = float(bytes_per_unit)
        self._resident = resident
        self.in_flight = 0
        self._since_trim = 0  # cost released since the heap was last trimmed
        self._line: deque[object] = deque()
        self._cond = threading.Condition()

    @property
    def waiting(self) -> int:
        """Requests waiting in line now."""
        return len(self._line)

    def _fits_capacity(self, pixels: int) -> bool:
        return self.in_flight == 0 or self.in_flight + pixels <= self.capacity

    def _memory_needed(self, pixels: int) -> tuple[int, int] | None:
        """``(resident, needed)`` bytes when admitting ``pixels`` now would pass the memory limit, else ``None``."""
        if self.memory_limit_bytes is None:
            return None
        resident = self._resident()
        if resident is None:
            return None
        needed = resident + int((self.in_flight + pixels) * self.bytes_per_unit)
        return (resident, needed) if needed > self.memory_limit_bytes else None

    def _busy(self, why: str) -> ServiceBusyError:
        limit = f", MEMORY_LIMIT_MB {self.memory_limit_bytes / 1e6:,.0f}" if self.memory_limit_bytes else ""
        return ServiceBusyError(
            f"The server is busy decoding other large images ({why}; {self.in_flight:,} pixels in flight, "
            f"MAX_DECODE_PIXELS_IN_FLIGHT {self.capacity:,}{limit}). Retry later.",
            retry_after_s=max(1.0, self.max_wait_s / 4),
        )

    def _out_of_memory(self, pixels: int, resident: int) -> ServiceBusyError:
        limit = self.memory_limit_bytes or 0
        return ServiceBusyError(
            f"Not enough memory to decode this image now: it needs about {pixels * self.bytes_per_unit / 1e6:,.0f} "
            f"MB and the server holds {resident / 1e6:,.0f} MB of its {limit / 1e6:,.0f} MB (MEMORY_LIMIT_MB). "
            "Retry later, or send it smaller.",
            retry_after_s=max(1.0, self.max_wait_s / 4),
        )

    def acquire(self, pixels: int) -> None:
        """Wait until ``pixels`` fit, then hold them; pair with :meth:`release`. ``pixels`` <= 0 passes at once.

        Raises :class:`app.errors.ServiceBusyError` (503 + Retry-After) when :attr:`max_waiters` requests already
        wait, after :attr:`max_wait_s` seconds in line, or at once when the image does not fit the memory limit even
        with nothing else in flight (after the heap was trimmed).
        """
        if pixels <= 0:
            return
        ticket = object()
        with self._cond:
            if not self._line and self._fits_capacity(pixels) and self._admit_by_memory(pixels):
                self.in_flight += pixels
                return
            if len(self._line) >= self.max_waiters:
                raise self._busy(f"{len(self._line)} requests already wait")
            self._line.append(ticket)
            deadline = time.monotonic() + self.max_wait_s
            try:
                while not (self._line[0] is ticket and self._fits_capacity(pixels) and self._admit_by_memory(pixels)):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise self._busy(f"waited {self.max_wait_s:g} s, DECODE_WAIT_S")
                    # Memory is not announced when it shrinks: the head of the line looks again now and then.
                    self._cond.wait(min(remaining, _POLL_S) if self._line[0] is ticket else remaining)
            except BaseException:
                self._line.remove(ticket)
                self._cond.notify_all()  # the next in line may fit now that this one leaves
                raise
            self._line.popleft()
            self.in_flight += pixels
            self._cond.notify_all()  # the next in line may fit as well

    def _admit_by_memory(self, pixels: int) -> bool:
        """Whether the memory limit lets ``pixels`` in now (called holding the lock). With nothing else in flight,
        an image that does not fit gets the heap trimmed first, then, if it still does not fit, a 503 at once:
        waiting would not make room."""
        over = self._memory_needed(pixels)
        if over is None:
            return True
        if self.in_flight > 0:
            return False
        release_memory()
        over = self._memory_needed(pixels)
        if over is None:
            return True
        raise self._out_of_memory(pixels, over[0])

    def release(self, pixels: int) -> None:
        """Give back what :meth:`acquire` took. The heap is trimmed (:func:`release_memory`) after a large image and
        when the line empties after decoding (:data:`TRIM_AFTER_BYTES`), before the next in line is let in."""
        if pixels <= 0:
            return
        with self._cond:
            self.in_flight -= pixels
            self._since_trim += pixels
            large = pixels * self.bytes_per_unit >= TRIM_AFTER_BYTES
            idle = self.in_flight == 0 and self._since_trim * self.bytes_per_unit >= TRIM_AFTER_BYTES
            if large or idle:
                self._since_trim = 0
        if large or idle:
            release_memory()  # outside the lock: other requests go on meanwhile
        with self._cond:
            self._cond.notify_all()

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
