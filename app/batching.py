"""Dynamic batching: concurrent embed requests from many HTTP handlers become one model call.

On a GPU (and, less so, on CPU) one forward pass over 32 images costs far less than 32 passes over one image each.
:class:`DynamicBatcher` queues the images of every caller, waits at most ``max_wait_s`` for more to arrive after the
first one (or until ``max_batch`` images are queued), runs ONE ``embed_fn`` call on its own worker thread and hands
each caller its rows. It is created by the FastAPI lifespan (``app.main``) and closed on shutdown; nothing is global.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

__all__ = ["BatcherClosedError", "DynamicBatcher"]


class BatcherClosedError(RuntimeError):
    """The batcher was closed (the service is shutting down) before this request ran."""


@dataclass(slots=True)
class _Request:
    images: Sequence[Image.Image]
    future: Future = field(default_factory=Future)


_STOP = object()


class DynamicBatcher:
    """Gathers embed requests for up to ``max_wait_s`` or ``max_batch`` images and runs them as one model call.

    Thread-safe: :meth:`embed` may be called from any number of threads. Requests are served in arrival order; a
    request is never split, so one caller with more than ``max_batch`` images gets one call of its own (the
    embedder still splits it into its own batch size).

    Args:
        embed_fn: ``Embedder.embed_images``: RGB PIL images -> ``(N, D)`` float32, L2-normalised rows.
        max_batch: most images gathered into one call (``EMBED_BATCH_SIZE``), >= 1.
        max_wait_s: longest wait, in seconds, for more requests after the first one of a batch (``BATCH_WAIT_MS``
            / 1000), >= 0. With 0, requests already queued are still combined but nothing is waited for.

    Raises:
        ValueError: ``max_batch`` < 1 or ``max_wait_s`` < 0.
    """

    def __init__(
        self, embed_fn: Callable[[Sequence[Image.Image]], np.ndarray], *, max_batch: int, max_wait_s: float
    ) -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"need max_batch >= 1 and max_wait_s >= 0, got {max_batch}, {max_wait_s}")
        self._embed_fn = embed_fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()  # orders close() against put() so no request is stranded in the queue
        self.calls = 0  # model calls made, for tests and logs
        self._thread = threading.Thread(target=self._run, name="embed-batcher", daemon=True)
        self._thread.start()

    def submit(self, images: Sequence[Image.Image]) -> Future:
        """Queue ``images``; the future resolves to their ``(len(images), D)`` float32 embeddings.

        Raises :class:`BatcherClosedError` after :meth:`close`.
        """
        request = _Request(list(images))
        with self._lock:
            if self._closed:
                raise BatcherClosedError("the embedding batcher is closed")
            self._queue.put(request)
        return request.future

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Blocking :meth:`submit`: ``(N, D)`` float32 rows for ``images``; re-raises the model's exception."""
        if not images:
            return self._embed_fn([])
        return self.submit(images).result()

    def queue_depth(self) -> int:
        """Embed requests waiting for the model now (``/metrics``)."""
        return self._queue.qsize()

    def close(self) -> None:
        """Stop the worker after the requests already queued; later :meth:`submit` calls raise. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout=60)

    def _gather(self, first: _Request) -> tuple[list[_Request], bool]:
        batch, count = [first], len(first.images)
        deadline = time.monotonic() + self.max_wait_s
        while count < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
            count += len(item.images)
        return batch, False

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                break
            batch, stop = self._gather(first)
            images = [im for request in batch for im in request.images]
            try:
                vectors = self._embed_fn(images)
            except BaseException as exc:  # noqa: BLE001 - every waiting caller must learn of the failure
                for request in batch:
                    request.future.set_exception(exc)
                del first, batch, images, request
                continue
            self.calls += 1
            start = 0
            for request in batch:
                request.future.set_result(vectors[start : start + len(request.images)])
                start += len(request.images)
            # Drop this batch's images (and the loop's last request) now, not when the next batch arrives: one may be a
            # 100 MP raster that would stay in memory while the service idles.
            del first, batch, images, request
