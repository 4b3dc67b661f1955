"""Uploads through the data path: size check -> decode (under the pixel admission) -> embed -> store.

:class:`UploadIndexer` indexes what the REST API and the web UI upload, one image (``POST /index_image``) or a batch
with one model call and one database write (``POST /index_images``), and embeds a query image without storing it
(the search path's last resort behind the embedding cache). :class:`IndexResult` and :class:`BatchItemResult` are
what it answers. Writing is :func:`app.indexing.write.write_batch`'s job (originals first, then rows, all or
nothing); the bulk indexer of folders is :mod:`app.indexing.pipeline`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from app.config import Settings
from app.embedders.base import Embedder
from app.errors import ImageDecodeError
from app.ids import image_id_for
from app.imaging.admission import PixelAdmission, decode_charge, embed_bytes, to_units
from app.imaging.decode import decode_image
from app.imaging.prepare import PreparedImage, check_upload_size, clean_filename, prepare_bytes
from app.indexing.write import write_batch
from app.observe import Observer
from app.storage.base import ImageStore
from app.vectordb.base import VectorDBHandler

__all__ = ["BatchItemResult", "IndexResult", "UploadIndexer"]


@dataclass(frozen=True, slots=True)
class IndexResult:
    """Outcome of indexing one upload: ``status`` is ``indexed`` (new) or ``exists`` (same bytes already stored)."""

    id: str
    status: Literal["indexed", "exists"]


@dataclass(frozen=True, slots=True)
class BatchItemResult:
    """Outcome of one file of a batch upload.

    ``status`` is ``indexed``, ``exists`` or ``error``; ``id`` is the SHA-256 of the bytes (also for errors);
    ``error`` is the domain error that refused the file (``None`` unless ``status == "error"``).
    """

    filename: str
    id: str
    status: Literal["indexed", "exists", "error"]
    error: ImageDecodeError | None = None


class UploadIndexer:
    """Decode, embed and store uploaded bytes with one embedder, one vector database and one image store.

    Args:
        settings: the limits (``MAX_UPLOAD_MB``, ``MAX_IMAGE_PIXELS``, ``MAX_DECODE_MB``).
        embedder: the model; its ``draft_size`` and ``fit_size`` shape the decode.
        embed: ``(N images) -> (N, D)`` float32 embeddings; the dynamic batcher's, or the embedder's own.
        db, store: where rows and originals go.
        admission: the decode gate shared with the other decoders of the process (thumbnails, previews).
        observer: receives each decode's wall time (``/metrics``).

    Thread-safe, as its parts are; owns nothing it must close.
    """

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        embed: Callable[[list[Image.Image]], np.ndarray],
        db: VectorDBHandler,
        store: ImageStore,
        admission: PixelAdmission,
        observer: Observer,
    ) -> None:
        self.settings = settings
        self.embedder = embedder
        self.embed = embed
        self.db = db
        self.store = store
        self.admission = admission
        self.observer = observer

    def pixels(self, data: bytes, draft_size: int | None = None, *, embeds: bool = False) -> int:
        """What decoding ``data`` costs the admission (:func:`app.imaging.admission.decode_charge`), JPEGs at
        ``draft_size`` or else the embedder's draft size; ``embeds``: the model runs on the image inside the
        admission, so its memory is charged too. Raises :class:`app.errors.ImageTooLargeError` over
        ``MAX_DECODE_MB``."""
        return decode_charge(
            data,
            max_pixels=self.settings.max_image_pixels,
            draft_size=draft_size or self.embedder.draft_size,
            max_decode_mb=self.settings.max_decode_mb,
            embeds=embeds,
        )

    def indexed(self, ids: set[str]) -> set[str]:
        """Which of ``ids`` have a row and their original."""
        # A row counts only with its original: a row whose file is gone is indexed again, which restores the file.
        return self.store.existing(self.db.existing_ids(ids))

    def index_one(self, data: bytes, filename: str | None) -> IndexResult:
        """Decode, embed and store one image; idempotent by content hash.

        Raises the :class:`app.errors.ImageDecodeError` subclasses for bad input (nothing is stored then) and
        :class:`app.errors.DatabaseUnavailableError`; a failed database write removes the file it just saved.
        :class:`app.errors.StorageFullError` (nothing stored) when the disk is full or under ``MIN_FREE_MB``;
        :class:`app.errors.ServiceBusyError` when decode capacity stays taken for ``DECODE_WAIT_S``.
        """
        check_upload_size(len(data), self.settings.max_upload_bytes)
        self.store.ensure_space()
        image_id = image_id_for(data)
        if self.indexed({image_id}):
            return IndexResult(image_id, "exists")
        with self.admission.admit(self.pixels(data, embeds=True)):
            written = self._write_one(data, filename, image_id)  # the decoded image dies inside, before admission ends
        # Not written: a simultaneous upload of the same bytes stored it while this one decoded (write_batch).
        return IndexResult(image_id, "indexed" if written else "exists")

    def _write_one(self, data: bytes, filename: str | None, image_id: str) -> bool:
        """Whether this call wrote the image (``False``: it was stored meanwhile by another request)."""
        prepared = self._prepare(data, filename, image_id, fit_size=None)
        # write_batch saves the original, then the row, and removes the file again if the row fails.
        return image_id in write_batch(self.db, self.store, [prepared], self.embed([prepared.image]))

    def index_many(self, uploads: list[tuple[bytes, str | None]]) -> list[BatchItemResult]:
        """Index several uploads with one model call and one database write; one result per upload, in order.

        Each upload is ``(bytes, filename)``. A file the decoder refuses (or over MAX_UPLOAD_MB) gets ``error`` and
        does not affect the others; the same bytes twice in one batch are stored once (the later ones ``exists``).
        Raises :class:`app.errors.DatabaseUnavailableError` (or another store/database error) for the whole batch,
        after removing the originals it had saved: nothing is half-written; :class:`app.errors.ServiceBusyError`
        (nothing written) when a decode, or the model's memory for the batch, is not admitted within
        ``DECODE_WAIT_S`` or does not fit ``MEMORY_LIMIT_MB``.
        """
        self.store.ensure_space()
        results: list[BatchItemResult | None] = [None] * len(uploads)
        ids = [image_id_for(data) for data, _ in uploads]
        have = self.indexed(set(ids))
        todo: list[tuple[int, PreparedImage]] = []
        first_in_batch: set[str] = set()
        for i, ((data, filename), image_id) in enumerate(zip(uploads, ids, strict=True)):
            name = clean_filename(filename)
            if image_id in have or image_id in first_in_batch:
                results[i] = BatchItemResult(name, image_id, "exists")
                continue
            try:
                # Fitted to the model right after decoding, so only one full-size raster exists at a time.
                with self.admission.admit(self.pixels(data)):
                    prepared = self._prepare(data, filename, image_id, fit_size=self.embedder.fit_size)
            except ImageDecodeError as exc:
                results[i] = BatchItemResult(name, image_id, "error", exc)
                continue
            first_in_batch.add(image_id)
            todo.append((i, prepared))
        if todo:
            # The model's memory for the batch (its images are fitted already, their decodes done) is admitted like
            # a decode; ONNX Runtime runs EMBED_BATCH_SIZE images at a time, so that many are charged at most.
            batch = min(len(todo), self.settings.embed_batch_size)
            with self.admission.admit(to_units(embed_bytes(batch))):
                vectors = self.embed([p.image for _, p in todo])
            written = write_batch(self.db, self.store, [p for _, p in todo], vectors)
            for i, prepared in todo:
                status = "indexed" if prepared.image_id in written else "exists"  # else stored meanwhile by another
                results[i] = BatchItemResult(prepared.name, prepared.image_id, status)
        return [r for r in results if r is not None]

    def embed_upload(self, data: bytes) -> np.ndarray:
        """The ``(D,)`` float32, L2-normalised embedding of uploaded bytes, decoded under the admission; nothing is
        stored. Raises the decoding errors and :class:`app.errors.ServiceBusyError`."""
        with self.admission.admit(self.pixels(data, embeds=True)):
            return self._embed_decoded(data)  # the decoded image dies inside, before the admission ends

    def _embed_decoded(self, data: bytes) -> np.ndarray:
        with self._timed_decode():
            image = decode_image(
                data, max_pixels=self.settings.max_image_pixels, draft_size=self.embedder.draft_size
            ).image
        return self.embed([image])[0]

    def _prepare(self, data: bytes, filename: str | None, image_id: str, fit_size: int | None) -> PreparedImage:
        # JPEGs are decoded in draft mode at about the model's input size: same embedding, a fraction of the work.
        with self._timed_decode():
            return prepare_bytes(
                data,
                filename,
                max_pixels=self.settings.max_image_pixels,
                max_bytes=self.settings.max_upload_bytes,
                draft_size=self.embedder.draft_size,
                fit_size=fit_size,
                image_id=image_id,
            )

    @contextlib.contextmanager
    def _timed_decode(self) -> Iterator[None]:
        """Report the wall time of the decode inside to the observer (``/metrics``), whether it succeeds or not."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observer.observe_decode(time.perf_counter() - start)
