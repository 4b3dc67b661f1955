"""The data path in one place: upload -> decode -> embed -> store -> search.

:class:`SearchService` is created by the FastAPI lifespan and shared by the REST API and the Gradio UI, so both
behave the same. It is thread-safe: FastAPI runs the sync endpoints in a thread pool, torch inference and the
connection pool both allow concurrent callers.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from app.batching import DynamicBatcher
from app.config import Settings
from app.decoding import decode_image
from app.embedders.base import Embedder
from app.errors import ImageDecodeError, ImageNotFoundError, ImageTooLargeError, InvalidVectorError
from app.ids import image_id_for, is_valid_image_id
from app.ingest import PreparedImage, draft_size_for, fit_size_for, prepare_bytes, write_batch
from app.query_cache import QueryCacheStats, QueryEmbeddingCache
from app.storage import ImageStore
from app.vectordb.base import SearchHit, VectorDBHandler

log = logging.getLogger(__name__)

MAX_FILENAME_CHARS = 1024


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


@dataclass(frozen=True, slots=True)
class ServiceStats:
    """Collection size and the model and backend serving it."""

    count: int
    model: str
    dimension: int
    backend: str
    device: str
    supports_text: bool
    query_cache: QueryCacheStats


def clean_filename(name: str | None) -> str:
    """The client's file name made safe to store: NUL and control characters dropped, at most 1024 characters.

    It is metadata only and never used as a path.
    """
    name = "".join(ch for ch in (name or "") if ch.isprintable())
    return name[:MAX_FILENAME_CHARS] or "upload"


class SearchService:
    """Index and search images with one embedder, one vector database and one image store.

    The collection must already be ensured for ``embedder.model_id``/``embedder.dim`` (the lifespan does it).
    """

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        db: VectorDBHandler,
        store: ImageStore,
        batcher: DynamicBatcher | None = None,
    ) -> None:
        """``batcher``: gathers concurrent embed calls into one model call (the lifespan passes one and closes
        it); ``None`` calls the embedder directly."""
        self.settings = settings
        self.embedder = embedder
        self.db = db
        self.store = store
        self.batcher = batcher
        # JPEGs are decoded in draft mode at about the model's input size: same embedding, a fraction of the work.
        self.draft_size = draft_size_for(embedder)
        # Batch uploads are also fitted to the model's input in the request threads, off the batcher's thread.
        self.fit_size = fit_size_for(embedder)
        # Embeddings of un-indexed query uploads by content hash. One service = one model for its lifetime, so the
        # cached vectors can never belong to another model and need no invalidation.
        self.query_cache = QueryEmbeddingCache(settings.query_cache_size)

    def _embed(self, images: list[Image.Image]) -> np.ndarray:
        """``(N, D)`` float32 embeddings, through the dynamic batcher when there is one."""
        if self.batcher is not None:
            return self.batcher.embed(images)
        return self.embedder.embed_images(images)

    @property
    def supports_text(self) -> bool:
        """Whether :meth:`search_text` works with the loaded model."""
        return self.embedder.supports_text

    def _check_size(self, data: bytes) -> None:
        if len(data) > self.settings.max_upload_bytes:
            raise ImageTooLargeError(
                f"The upload is {len(data) / 1e6:.1f} MB; the limit is {self.settings.max_upload_mb:g} MB "
                "(MAX_UPLOAD_MB)."
            )

    # --- index --------------------------------------------------------------------------------------------
    def index_image(self, data: bytes, filename: str | None) -> IndexResult:
        """Decode, embed and store one image; idempotent by content hash.

        Raises the :class:`app.errors.ImageDecodeError` subclasses for bad input (nothing is stored then) and
        :class:`app.errors.DatabaseUnavailableError`; a failed database write removes the file it just saved.
        """
        self._check_size(data)
        image_id = image_id_for(data)
        if self.db.existing_ids([image_id]):
            return IndexResult(image_id, "exists")
        prepared = self._prepare(data, filename, image_id, fit_size=None)
        # write_batch saves the original, then the row, and removes the file again if the row fails.
        write_batch(self.db, self.store, [prepared], self._embed([prepared.image]))
        return IndexResult(image_id, "indexed")

    def _prepare(self, data: bytes, filename: str | None, image_id: str, fit_size: int | None) -> PreparedImage:
        return prepare_bytes(
            data,
            clean_filename(filename),
            max_pixels=self.settings.max_image_pixels,
            max_bytes=self.settings.max_upload_bytes,
            draft_size=self.draft_size,
            fit_size=fit_size,
            image_id=image_id,
        )

    def index_images(self, uploads: list[tuple[bytes, str | None]]) -> list[BatchItemResult]:
        """Index several uploads with one model call and one database write; one result per upload, in order.

        Each upload is ``(bytes, filename)``. A file the decoder refuses (or over MAX_UPLOAD_MB) gets ``error`` and
        does not affect the others; the same bytes twice in one batch are stored once (the later ones ``exists``).
        Raises :class:`app.errors.DatabaseUnavailableError` (or another store/database error) for the whole batch,
        after removing the originals it had saved: nothing is half-written.
        """
        results: list[BatchItemResult | None] = [None] * len(uploads)
        ids = [image_id_for(data) for data, _ in uploads]
        have = self.db.existing_ids(set(ids))
        todo: list[tuple[int, PreparedImage]] = []
        first_in_batch: set[str] = set()
        for i, ((data, filename), image_id) in enumerate(zip(uploads, ids, strict=True)):
            name = clean_filename(filename)
            if image_id in have or image_id in first_in_batch:
                results[i] = BatchItemResult(name, image_id, "exists")
                continue
            try:
                prepared = self._prepare(data, filename, image_id, fit_size=self.fit_size)
            except ImageDecodeError as exc:
                results[i] = BatchItemResult(name, image_id, "error", exc)
                continue
            first_in_batch.add(image_id)
            todo.append((i, prepared))
        if todo:
            vectors = self._embed([p.image for _, p in todo])
            write_batch(self.db, self.store, [p for _, p in todo], vectors)
            for i, prepared in todo:
                results[i] = BatchItemResult(prepared.name, prepared.image_id, "indexed")
        return [r for r in results if r is not None]

    def existing_ids(self, ids: Iterable[str]) -> set[str]:
        """Which of these ids are indexed (invalid ids are never indexed)."""
        return self.db.existing_ids([i for i in ids if is_valid_image_id(i)])

    # --- search -------------------------------------------------------------------------------------------
    def search_image(self, data: bytes, top_k: int) -> list[SearchHit]:
        """The ``top_k`` most similar indexed images to the uploaded one, best first (cosine similarity).

        An upload whose bytes are already indexed reuses its stored embedding instead of running the model; other
        uploads go through :attr:`query_cache` (QUERY_CACHE_SIZE), so repeating a search skips decode + model.
        Raises the decoding errors for bad input (nothing is cached then).
        """
        self._check_size(data)
        image_id = image_id_for(data)
        stored = self.db.get(image_id)
        if stored is not None and stored.vector is not None:
            vector = stored.vector
        else:
            vector = self.query_cache.get(image_id)
            if vector is None:
                decoded = decode_image(data, max_pixels=self.settings.max_image_pixels, draft_size=self.draft_size)
                vector = self._embed([decoded.image])[0]
                self.query_cache.put(image_id, vector)
        return self.db.search(vector, top_k)

    def search_text(self, query: str, top_k: int) -> list[SearchHit]:
        """The ``top_k`` images that best match a text description (CLIP models only).

        Raises :class:`app.errors.NoTextTowerError` when the model has no text encoder.
        """
        vector = self.embedder.embed_texts([query])[0]
        return self.db.search(vector, top_k)

    def search_vector(self, values: Sequence[float], top_k: int) -> list[SearchHit]:
        """The ``top_k`` images nearest to an embedding computed elsewhere (same model as the collection).

        ``values`` must have ``D`` (the collection's dimension) finite values, not all zero; they are L2-normalised
        here (as float32), so any scale works. Raises :class:`app.errors.InvalidVectorError` otherwise.
        """
        vector = np.asarray(values, dtype=np.float64)
        dim = self.embedder.dim
        if vector.shape != (dim,):
            raise InvalidVectorError(
                f"The vector must have {dim} values (the dimension of model '{self.embedder.model_id}'), "
                f"got {vector.size}."
            )
        # float32 is what is stored: values beyond its range would turn into inf there.
        if not np.all(np.isfinite(vector)) or np.abs(vector).max() > np.finfo(np.float32).max:
            raise InvalidVectorError("The vector must contain finite float32 values only (no NaN or infinity).")
        norm = float(np.linalg.norm(vector))
        if norm == 0.0 or not np.isfinite(norm):
            raise InvalidVectorError("The vector must not be all zeros: cosine similarity is undefined for it.")
        return self.db.search((vector / norm).astype(np.float32), top_k)

    # --- stored images ------------------------------------------------------------------------------------
    def image_file(self, image_id: str) -> Path:
        """Path of the stored original; raises :class:`ImageNotFoundError` for unknown or malformed ids."""
        path = self.store.find(image_id)
        if path is None:
            raise ImageNotFoundError(f"No image with id '{image_id[:80]}'.")
        return path

    def thumbnail(self, image_id: str, size: int = 256) -> bytes:
        """A JPEG of the stored image, at most ``size`` x ``size`` pixels, for browsers that cannot show HEIC/TIFF.

        Raises :class:`ImageNotFoundError`.
        """
        # Draft mode decodes a large JPEG straight to about the thumbnail's size instead of its full resolution.
        decoded = decode_image(
            self.image_file(image_id).read_bytes(), max_pixels=self.settings.max_image_pixels, draft_size=size
        )
        image = decoded.image
        image.thumbnail((size, size))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
        return out.getvalue()

    def delete_image(self, image_id: str) -> None:
        """Remove the vector and the original; raises :class:`ImageNotFoundError` if neither existed."""
        if not is_valid_image_id(image_id):
            raise ImageNotFoundError(f"No image with id '{image_id[:80]}'.")
        removed_row = self.db.delete(image_id)
        removed_file = self.store.delete(image_id)
        if not (removed_row or removed_file):
            raise ImageNotFoundError(f"No image with id '{image_id}'.")

    def stats(self) -> ServiceStats:
        """Counts and model facts for ``/stats``."""
        return ServiceStats(
            count=self.db.count(),
            model=self.embedder.model_id,
            dimension=self.embedder.dim,
            backend=self.db.backend_name,
            device=self.embedder.device,
            supports_text=self.embedder.supports_text,
            query_cache=self.query_cache.stats(),
        )
