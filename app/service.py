"""The data path in one place: upload -> decode -> embed -> store -> search.

:class:`SearchService` is created by the FastAPI lifespan and shared by the REST API and the Gradio UI, so both
behave the same. It is thread-safe: FastAPI runs the sync endpoints in a thread pool, torch inference and the
connection pool both allow concurrent callers.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from app.config import Settings
from app.decoding import decode_image
from app.embedders.base import Embedder
from app.errors import ImageNotFoundError, ImageTooLargeError
from app.storage import ImageStore, image_id_for, is_valid_image_id
from app.vectordb.base import ImageMetadata, ImageRecord, SearchHit, VectorDBHandler

log = logging.getLogger(__name__)

MAX_FILENAME_CHARS = 1024


@dataclass(frozen=True, slots=True)
class IndexResult:
    """Outcome of indexing one upload: ``status`` is ``indexed`` (new) or ``exists`` (same bytes already stored)."""

    id: str
    status: Literal["indexed", "exists"]


@dataclass(frozen=True, slots=True)
class ServiceStats:
    """Collection size and the model and backend serving it."""

    count: int
    model: str
    dimension: int
    backend: str
    device: str
    supports_text: bool


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

    def __init__(self, settings: Settings, embedder: Embedder, db: VectorDBHandler, store: ImageStore) -> None:
        self.settings = settings
        self.embedder = embedder
        self.db = db
        self.store = store

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
        decoded = decode_image(data, max_pixels=self.settings.max_image_pixels)
        vector = self.embedder.embed_images([decoded.image])[0]
        metadata = ImageMetadata(
            filename=clean_filename(filename),
            format=decoded.format,
            width=decoded.width,
            height=decoded.height,
            bytes=len(data),
            indexed_at=datetime.now(UTC),
        )
        created = self.store.save(image_id, data, decoded.extension)
        try:
            self.db.upsert([ImageRecord(image_id, vector, metadata)])
        except BaseException:
            if created:  # leave nothing half-written: no file without its row
                self.store.delete(image_id)
            raise
        return IndexResult(image_id, "indexed")

    def existing_ids(self, ids: Iterable[str]) -> set[str]:
        """Which of these ids are indexed (invalid ids are never indexed)."""
        return self.db.existing_ids([i for i in ids if is_valid_image_id(i)])

    # --- search -------------------------------------------------------------------------------------------
    def search_image(self, data: bytes, top_k: int) -> list[SearchHit]:
        """The ``top_k`` most similar indexed images to the uploaded one, best first (cosine similarity).

        An upload whose bytes are already indexed reuses its stored embedding instead of running the model.
        Raises the decoding errors for bad input.
        """
        self._check_size(data)
        stored = self.db.get(image_id_for(data))
        if stored is not None and stored.vector is not None:
            vector = stored.vector
        else:
            decoded = decode_image(data, max_pixels=self.settings.max_image_pixels)
            vector = self.embedder.embed_images([decoded.image])[0]
        return self.db.search(vector, top_k)

    def search_text(self, query: str, top_k: int) -> list[SearchHit]:
        """The ``top_k`` images that best match a text description (CLIP models only).

        Raises :class:`app.errors.NoTextTowerError` when the model has no text encoder.
        """
        vector = self.embedder.embed_texts([query])[0]
        return self.db.search(vector, top_k)

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
        decoded = decode_image(self.image_file(image_id).read_bytes(), max_pixels=self.settings.max_image_pixels)
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
        )
