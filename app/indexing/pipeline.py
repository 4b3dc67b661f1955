"""Bulk ingest that keeps the model busy: decode in worker processes, embed in batches, write in batches, overlapped.

::

    files --> [ProcessPoolExecutor: read + SHA-256 + decode (JPEG draft mode)] --> main thread: embed batches of
    EMBED_BATCH_SIZE --> [writer thread: save originals + one upsert per batch] --> on_result callback

The pieces are shared with the server: :func:`app.imaging.prepare.prepare_bytes` is the decode step of
``POST /index_images`` (run here inside :func:`app.indexing.worker.prepare_file`) and
:func:`app.indexing.write.write_batch` its write step, so ``scripts/bulk_index.py --direct`` and the API store
exactly the same thing.

Crash safety (``kill -9`` at any moment) is :func:`app.indexing.write.write_batch`'s: originals before rows, rows
as idempotent upserts keyed by the SHA-256 of the bytes, so a re-run resumes and every image ends up exactly once.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from app.embedders.base import Embedder
from app.imaging.prepare import PreparedImage
from app.indexing.worker import FailedItem, prepare_data, prepare_file, worker_init
from app.indexing.write import write_batch
from app.storage.base import ImageStore
from app.vectordb.base import VectorDBHandler

log = logging.getLogger(__name__)

__all__ = ["IngestItem", "IngestPipeline"]


@dataclass(frozen=True, slots=True)
class IngestItem:
    """One file to ingest: its path (or, for an original read from an object store, its ``data``) and the filename
    to store."""

    path: Path | None
    name: str
    data: bytes | None = None


ResultCallback = Callable[[str, str, str | None], None]
"""``on_result(name, status, reason)``: status ``indexed``, ``exists`` (same bytes earlier in this run) or
``failed`` (then ``reason`` says why)."""


class IngestPipeline:
    """Decode in ``workers`` processes, embed on the calling thread in batches, write on a writer thread.

    Args:
        embedder: the loaded model. db: the vector database, its collection ensured for ``embedder``.
        store: the image store (``IMAGE_DIR`` or ``IMAGE_STORE_URL``).
        workers: decode processes (>= 1). batch_size: images per model call and per upsert (>= 1).
        max_pixels, max_bytes: the service's limits (``MAX_IMAGE_PIXELS``, ``MAX_UPLOAD_MB`` in bytes).
        on_result: called once per file, from the writer thread (``indexed``) or the calling thread (``failed``);
            calls are serialised by a lock, so the callback need not be thread-safe.
        write: ``write(db, store, prepared_images, vectors)``, run on the writer thread for each embedded batch;
            default :func:`app.indexing.write.write_batch`. ``scripts/reindex.py`` passes one that keeps each
            image's stored metadata.

    Memory is bounded: at most ``2 * batch_size + 2 * workers`` files are decoded ahead of the model, and at most
    two embedded batches wait for the writer.
    """

    def __init__(
        self,
        embedder: Embedder,
        db: VectorDBHandler,
        store: ImageStore,
        *,
        workers: int,
        batch_size: int,
        max_pixels: int,
        max_bytes: int,
        on_result: ResultCallback,
        write: Callable[[VectorDBHandler, ImageStore, list[PreparedImage], object], None] = write_batch,
    ) -> None:
        if workers < 1 or batch_size < 1:
            raise ValueError(f"need workers >= 1 and batch_size >= 1, got {workers}, {batch_size}")
        self.embedder, self.db, self.store = embedder, db, store
        self.workers, self.batch_size = workers, batch_size
        self.max_pixels, self.max_bytes = max_pixels, max_bytes
        self.draft_size = embedder.draft_size
        self.fit_size = embedder.fit_size
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._on_result = on_result
        self._write = write

    def _report(self, name: str, status: str, reason: str | None = None) -> None:
        with self._lock:
            self._on_result(name, status, reason)

    def start(self) -> None:
        """Start the decode processes now and wait until each has imported its modules (about 1-2 s).

        Optional: :meth:`run` starts them otherwise. Lets a caller overlap that start-up with loading the model or
        keep it out of a throughput measurement. Idempotent.
        """
        if self._pool is not None:
            return
        # spawn, not fork: the parent has torch's thread pools running, which a forked child must never touch.
        context = multiprocessing.get_context("spawn")
        self._pool = ProcessPoolExecutor(
            max_workers=self.workers, mp_context=context, initializer=worker_init, initargs=(os.getpid(),)
        )
        # One task per worker, each holding its worker a moment, so that every process gets started.
        for future in [self._pool.submit(time.sleep, 0.2) for _ in range(self.workers)]:
            future.result()

    def _take_pool(self) -> ProcessPoolExecutor:
        self.start()
        pool, self._pool = self._pool, None
        assert pool is not None
        return pool

    def run(self, items: Iterable[IngestItem]) -> None:
        """Ingest every item; returns when all are written or reported failed.

        Duplicate contents in ``items`` are embedded and written once each (the caller should pass distinct ids;
        a duplicate that slips through is an idempotent upsert). Raises the writer's error (database down) after
        stopping the workers; what was written before stays written, and a re-run resumes.
        """
        writes: queue.Queue = queue.Queue(maxsize=2)
        writer_error: list[BaseException] = []

        def writer() -> None:
            while (job := writes.get()) is not None:
                if writer_error:
                    continue  # drain without writing once a write failed
                batch, vectors = job
                try:
                    self._write(self.db, self.store, batch, vectors)
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which re-raises it
                    writer_error.append(exc)
                    continue
                for item in batch:
                    self._report(item.name, "indexed")

        writer_thread = threading.Thread(target=writer, name="ingest-writer", daemon=True)
        writer_thread.start()
        seen: set[str] = set()
        batch: list[PreparedImage] = []

        def flush() -> None:
            if not batch:
                return
            if writer_error:
                raise writer_error[0]
            vectors = self.embedder.embed_images([p.image for p in batch])
            writes.put((list(batch), vectors))
            batch.clear()

        try:
            with self._take_pool() as pool:
                pending: deque[Future] = deque()
                ahead = 2 * self.batch_size + 2 * self.workers
                source = iter(items)
                exhausted = False
                while True:
                    while not exhausted and len(pending) < ahead:
                        item = next(source, None)
                        if item is None:
                            exhausted = True
                            break
                        pending.append(
                            pool.submit(
                                prepare_file if item.data is None else prepare_data,
                                str(item.path) if item.data is None else item.data,
                                item.name,
                                self.max_pixels,
                                self.max_bytes,
                                self.draft_size,
                                self.fit_size,
                            )
                        )
                    if not pending:
                        break
                    result = pending.popleft().result()  # in submission order: stable progress and batches
                    if isinstance(result, FailedItem):
                        self._report(result.name, "failed", result.reason)
                        continue
                    if result.image_id in seen:
                        self._report(result.name, "exists")
                        continue
                    seen.add(result.image_id)
                    batch.append(result)
                    if len(batch) >= self.batch_size:
                        flush()
                flush()
        finally:
            writes.put(None)
            writer_thread.join()
        if writer_error:
            raise writer_error[0]
