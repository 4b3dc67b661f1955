"""Bulk ingest that keeps the model busy: decode in worker processes, embed in batches, write in batches, overlapped.

::

    files --> [ProcessPoolExecutor: read + SHA-256 + decode (JPEG draft mode)] --> main thread: embed batches of
    EMBED_BATCH_SIZE --> [writer thread: save originals + one upsert per batch] --> on_result callback

The pieces are shared with the server: :func:`prepare_bytes` is the decode step of ``POST /index_images`` and
:func:`write_batch` its write step, so ``scripts/bulk_index.py --direct`` and the API store exactly the same thing.

Crash safety (``kill -9`` at any moment): an original is written (atomically, temp file + rename) BEFORE its row,
and a failed upsert deletes the originals it had just created. So the only thing a crash can leave is an original
without a row, which is never visible (search and ``/images/exists`` go by rows); re-running the same ingest finds
the id missing, re-embeds it, keeps the existing file and writes the row. Rows are idempotent upserts keyed by the
SHA-256 of the bytes, so every image ends up exactly once.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from app.decode_worker import FailedItem, PreparedImage, prepare_bytes, prepare_file, worker_init
from app.embedders.base import Embedder
from app.storage import ImageStore
from app.vectordb.base import ImageMetadata, ImageRecord, VectorDBHandler

log = logging.getLogger(__name__)

__all__ = [
    "FailedItem",
    "IngestPipeline",
    "PreparedImage",
    "draft_size_for",
    "prepare_bytes",
    "prepare_file",
    "write_batch",
]

DEFAULT_DRAFT_SIZE = 320
"""JPEG draft target when the embedder does not say its input size: at least every common model input (224-288)."""


def fit_size_for(embedder: Embedder) -> int | None:
    """The size to pre-fit images to (:func:`app.decode_worker.fit_to_model`) for this embedder, or ``None``.

    Only embedders with an ``input_size`` attribute, which declares that their preprocessing is exactly "shorter
    side to input_size, bicubic, centre crop", so that a pre-fitted image gives the same embedding.
    """
    size = getattr(embedder, "input_size", None)
    return int(size) if isinstance(size, int) and size > 0 else None


def draft_size_for(embedder: Embedder) -> int:
    """Pixels each side a JPEG must keep when decoded in draft mode for this embedder.

    The embedder's ``input_size`` attribute when it has one, else :data:`DEFAULT_DRAFT_SIZE` (320 px). The model
    resizes the shorter side to its input size anyway, and draft mode never goes below the requested size, so the
    model sees (nearly) the same pixels.
    """
    size = getattr(embedder, "input_size", None)
    return int(size) if isinstance(size, int) and size > 0 else DEFAULT_DRAFT_SIZE


def write_batch(db: VectorDBHandler, store: ImageStore, items: Sequence[PreparedImage], vectors: np.ndarray) -> None:
    """Store a batch: every original first, then ONE upsert of all rows; all or nothing.

    Args:
        items: prepared images with distinct ids. vectors: ``(len(items), D)`` float32 embeddings, same order.

    Raises whatever the store or the database raises (e.g. :class:`app.errors.DatabaseUnavailableError`), after
    deleting the originals this call created, so no file is left without its row. Files that already existed (from
    an earlier, interrupted run) are kept: their rows may be the ones being written now.
    """
    if not items:
        return
    now = datetime.now(UTC)
    created: list[str] = []
    try:
        for item in items:
            if store.save(item.image_id, item.data, item.extension):
                created.append(item.image_id)
        records = [
            ImageRecord(
                item.image_id,
                np.asarray(vector, dtype=np.float32),
                ImageMetadata(
                    filename=item.name,
                    format=item.format,
                    width=item.width,
                    height=item.height,
                    bytes=len(item.data),
                    indexed_at=now,
                ),
            )
            for item, vector in zip(items, vectors, strict=True)
        ]
        db.upsert(records)
    except BaseException:
        for image_id in created:
            store.delete(image_id)
        raise


@dataclass(frozen=True, slots=True)
class IngestItem:
    """One file to ingest: its path and the filename to store."""

    path: Path
    name: str


ResultCallback = Callable[[str, str, str | None], None]
"""``on_result(name, status, reason)``: status ``indexed``, ``exists`` (same bytes earlier in this run) or
``failed`` (then ``reason`` says why)."""


class IngestPipeline:
    """Decode in ``workers`` processes, embed on the calling thread in batches, write on a writer thread.

    Args:
        embedder: the loaded model. db: the vector database, its collection ensured for ``embedder``.
        store: the image store (``IMAGE_DIR``).
        workers: decode processes (>= 1). batch_size: images per model call and per upsert (>= 1).
        max_pixels, max_bytes: the service's limits (``MAX_IMAGE_PIXELS``, ``MAX_UPLOAD_MB`` in bytes).
        on_result: called once per file, from the writer thread (``indexed``) or the calling thread (``failed``);
            calls are serialised by a lock, so the callback need not be thread-safe.

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
    ) -> None:
        if workers < 1 or batch_size < 1:
            raise ValueError(f"need workers >= 1 and batch_size >= 1, got {workers}, {batch_size}")
        self.embedder, self.db, self.store = embedder, db, store
        self.workers, self.batch_size = workers, batch_size
        self.max_pixels, self.max_bytes = max_pixels, max_bytes
        self.draft_size = draft_size_for(embedder)
        self.fit_size = fit_size_for(embedder)
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._on_result = on_result

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
                    write_batch(self.db, self.store, batch, vectors)
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
                                prepare_file,
                                str(item.path),
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
