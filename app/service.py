"""The data path in one place: upload -> decode -> embed -> store -> search.

:class:`SearchService` is the one front door of the service: the FastAPI lifespan opens it
(:meth:`SearchService.open`) and closes it, and the REST API and the Gradio UI call only its methods, so both behave
the same. It is thread-safe: FastAPI runs the sync endpoints in a thread pool, and the model runtime and the
connection pool both allow concurrent callers.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from app.batching import DynamicBatcher
from app.config import Settings
from app.embedders.base import Embedder
from app.errors import ImageDecodeError, ImageNotFoundError, InvalidParameterError
from app.ids import image_id_for, is_valid_image_id
from app.imaging.decode import decode_image
from app.imaging.prepare import PreparedImage, check_upload_size, clean_filename, prepare_bytes
from app.indexing.store import ImageStore
from app.indexing.write import write_batch
from app.observe import NULL_OBSERVER, Observer, timed_embed
from app.query_cache import QueryCacheStats, QueryEmbeddingCache
from app.search.paging import SearchOptions, search_page
from app.search.query import QueryTerm, combined_query, unit_vector
from app.vectordb.base import SearchHit, VectorDBHandler

log = logging.getLogger(__name__)


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


class ModelInfo(BaseModel):
    """The loaded model, as ``/health`` reports it."""

    id: str = Field(description="Model and weights, e.g. open_clip:ViT-B-32/laion2b_s34b_b79k.")
    dimension: int = Field(description="Embedding dimension D.")
    device: str = Field(description="Where the model runs: cpu, cuda, mps (none with EMBEDDER=none).")
    supports_text: bool = Field(description="Whether text search works.")


class HealthReport(BaseModel):
    """What ``GET /health`` answers: ``status`` is ``ok`` only when every dependency is."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "ok",
                    "database": "ok",
                    "backend": "pgvector",
                    "model": {
                        "id": "efficientnet-lite2:imagenet",
                        "dimension": 1280,
                        "device": "cpu",
                        "supports_text": False,
                    },
                }
            ]
        }
    )
    status: Literal["ok", "unavailable"]
    database: Literal["ok", "unavailable"]
    backend: str
    model: ModelInfo


class ServiceStats(BaseModel):
    """What ``GET /stats`` answers: collection size, the model and backend serving it, the query-embedding cache."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "count": 273,
                    "model": "efficientnet-lite2:imagenet",
                    "dimension": 1280,
                    "backend": "pgvector",
                    "device": "cpu",
                    "supports_text": False,
                    "query_cache": {"size": 12, "capacity": 1024, "hits": 30, "misses": 12, "hit_rate": 0.7143},
                }
            ]
        }
    )
    count: int = Field(description="Images indexed.")
    model: str = Field(description="Model id that filled the collection.")
    dimension: int = Field(description="Embedding dimension D.")
    backend: str = Field(description="VECTOR_DB: pgvector, milvus or manticore.")
    device: str = Field(description="Where the model runs.")
    supports_text: bool = Field(description="Whether text search works.")
    query_cache: QueryCacheStats = Field(
        description="The in-memory cache of query-image embeddings (QUERY_CACHE_SIZE; capacity 0 = disabled)."
    )


class SearchService:
    """Index and search images with one embedder, one vector database and one image store.

    Build it with :meth:`open` (loads the model, connects the database, checks they match), or from parts whose
    collection is already ensured for ``embedder.model_id`` / ``embedder.dim``. :meth:`close` releases everything
    it was given.
    """

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        db: VectorDBHandler,
        store: ImageStore,
        batcher: DynamicBatcher | None = None,
        observer: Observer = NULL_OBSERVER,
    ) -> None:
        """``batcher``: gathers concurrent embed calls into one model call (closed by :meth:`close`); ``None``
        calls the embedder directly. ``observer``: receives decode times (``/metrics``)."""
        self.settings = settings
        self.observer = observer
        self.embedder = embedder
        self.db = db
        self.store = store
        self.batcher = batcher
        # Embeddings of un-indexed query uploads by content hash. One service = one model for its lifetime, so the
        # cached vectors can never belong to another model and need no invalidation.
        self.query_cache = QueryEmbeddingCache(settings.query_cache_size)

    @classmethod
    def open(
        cls, settings: Settings, embedder: Embedder | None = None, observer: Observer = NULL_OBSERVER
    ) -> SearchService:
        """Load the model, connect the database, ensure the collection, start the dynamic batcher. Blocking.

        Args:
            settings: the service's settings.
            embedder: an already loaded model to use instead of the one the settings name (tests share one).
            observer: receives decode times and each model call's batch size and time (``/metrics``).

        Raises:
            app.errors.CollectionMismatchError: the collection was filled by another model or dimension.
            app.errors.DatabaseUnavailableError: the database cannot be reached.
            RuntimeError: ``EMBEDDER=none`` with no collection yet, or the model cannot be loaded.
        """
        from app.embedders import load_embedder
        from app.vectordb import create_handler

        db = create_handler(settings)
        try:
            if embedder is None:
                info = db.collection_info()
                embedder = load_embedder(settings, collection_model=None if info is None else info.model_id)
                if embedder is None:  # EMBEDDER=none: stand in for whichever model filled the collection
                    from app.embedders.none import VectorOnlyEmbedder

                    if info is None:
                        raise RuntimeError(
                            "EMBEDDER=none serves an existing collection, but the database has none yet: index "
                            "images first with a model (EMBEDDER=auto, clip or efficientnet)."
                        )
                    embedder = VectorOnlyEmbedder(info.model_id, info.dim)
            db.ensure_collection(embedder.model_id, embedder.dim)
        except BaseException:
            db.close()
            raise
        batcher = DynamicBatcher(
            timed_embed(embedder.embed_images, observer),
            max_batch=settings.embed_batch_size,
            max_wait_s=settings.batch_wait_ms / 1000,
        )
        service = cls(settings, embedder, db, ImageStore(settings.resolved_image_dir), batcher, observer)
        log.info(
            "Ready: model %s (dim %d, %s), backend %s, %d images",
            embedder.model_id,
            embedder.dim,
            embedder.device,
            db.backend_name,
            db.count(),
        )
        return service

    def close(self) -> None:
        """Finish the embed calls already queued, then close the database (and its embedded server, if any)."""
        if self.batcher is not None:
            self.batcher.close()
        self.db.close()

    def _embed(self, images: list[Image.Image]) -> np.ndarray:
        """``(N, D)`` float32 embeddings, through the dynamic batcher when there is one."""
        if self.batcher is not None:
            return self.batcher.embed(images)
        return self.embedder.embed_images(images)

    @property
    def supports_text(self) -> bool:
        """Whether :meth:`search_text` works with the loaded model."""
        return self.embedder.supports_text

    def resolve_top_k(self, top_k: int | None) -> int:
        """``top_k``, or ``DEFAULT_TOP_K`` when ``None``; raises :class:`InvalidParameterError` outside
        ``1..MAX_TOP_K``."""
        k = self.settings.default_top_k if top_k is None else top_k
        if not 1 <= k <= self.settings.max_top_k:
            raise InvalidParameterError(f"top_k must be between 1 and {self.settings.max_top_k} (MAX_TOP_K), got {k}.")
        return k

    def _check_size(self, data: bytes) -> None:
        check_upload_size(len(data), self.settings.max_upload_bytes)

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
        # JPEGs are decoded in draft mode at about the model's input size: same embedding, a fraction of the work.
        start = time.perf_counter()
        try:
            return prepare_bytes(
                data,
                filename,
                max_pixels=self.settings.max_image_pixels,
                max_bytes=self.settings.max_upload_bytes,
                draft_size=self.embedder.draft_size,
                fit_size=fit_size,
                image_id=image_id,
            )
        finally:
            self.observer.observe_decode(time.perf_counter() - start)

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
                prepared = self._prepare(data, filename, image_id, fit_size=self.embedder.fit_size)
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
    # Every search takes ``options`` (offset, min_score, exclude_self, expand: app/search/paging.py) and returns
    # one page of hits, best first, scored by cosine similarity to the query searched.
    def _page(
        self, vector: np.ndarray, top_k: int, options: SearchOptions | None, query_ids: Iterable[str] = ()
    ) -> list[SearchHit]:
        return search_page(
            self.db,
            vector,
            top_k,
            options or SearchOptions(),
            query_ids=frozenset(query_ids),
            expand_n=self.settings.expand_n,
            expand_alpha=self.settings.expand_alpha,
        )

    def search_image(self, data: bytes, top_k: int, options: SearchOptions | None = None) -> list[SearchHit]:
        """The ``top_k`` most similar indexed images to the uploaded one, best first (cosine similarity).

        An upload whose bytes are already indexed reuses its stored embedding instead of running the model (and is
        left out of the results unless ``options.exclude_self`` is false); other uploads go through
        :attr:`query_cache` (QUERY_CACHE_SIZE), so repeating a search skips decode + model.
        Raises the decoding errors for bad input (nothing is cached then) and :class:`InvalidParameterError`.
        """
        self._check_size(data)
        image_id = image_id_for(data)
        stored = self.db.get(image_id)
        if stored is not None and stored.vector is not None:
            return self._page(stored.vector, top_k, options, query_ids=[image_id])
        vector = self.query_cache.get(image_id)
        if vector is None:
            start = time.perf_counter()
            try:
                decoded = decode_image(
                    data, max_pixels=self.settings.max_image_pixels, draft_size=self.embedder.draft_size
                )
            finally:
                self.observer.observe_decode(time.perf_counter() - start)
            vector = self._embed([decoded.image])[0]
            self.query_cache.put(image_id, vector)
        return self._page(vector, top_k, options)

    def search_text(self, query: str, top_k: int, options: SearchOptions | None = None) -> list[SearchHit]:
        """The ``top_k`` images that best match a text description (CLIP models only).

        Raises :class:`app.errors.NoTextTowerError` when the model has no text encoder.
        """
        return self._page(self.embedder.embed_texts([query])[0], top_k, options)

    def search_vector(
        self, values: Sequence[float], top_k: int, options: SearchOptions | None = None
    ) -> list[SearchHit]:
        """The ``top_k`` images nearest to an embedding computed elsewhere (same model as the collection).

        ``values`` must have ``D`` (the collection's dimension) finite values, not all zero; they are L2-normalised
        here (as float32), so any scale works. Raises :class:`app.errors.InvalidVectorError` otherwise.
        """
        return self._page(unit_vector(values, self.embedder.dim, self.embedder.model_id), top_k, options)

    def similar(self, image_id: str, top_k: int, options: SearchOptions | None = None) -> list[SearchHit]:
        """More like this: the neighbours of a stored image by its stored vector, the image itself left out.

        Raises :class:`ImageNotFoundError` for an unknown or malformed id.
        """
        stored = self.db.get(image_id) if is_valid_image_id(image_id) else None
        if stored is None or stored.vector is None:
            raise ImageNotFoundError(f"No image with id '{image_id[:80]}'.")
        options = replace(options or SearchOptions(), exclude_self=True)
        return self._page(stored.vector, top_k, options, query_ids=[image_id])

    def search_combined(
        self,
        positive: Sequence[QueryTerm],
        negative: Sequence[QueryTerm],
        top_k: int,
        options: SearchOptions | None = None,
    ) -> list[SearchHit]:
        """Search by weighted images, texts and vectors minus weighted negative ones (:mod:`app.search.query`).

        The positive ``image_id`` terms are the query images ``exclude_self`` leaves out. Raises
        :class:`ImageNotFoundError`, :class:`app.errors.NoTextTowerError`, :class:`InvalidParameterError` and
        :class:`app.errors.InvalidVectorError` (see :func:`app.search.query.combined_query`).
        """
        vector, query_ids = combined_query(positive, negative, self.db, self.embedder)
        return self._page(vector, top_k, options, query_ids=query_ids)

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

    def health(self) -> HealthReport:
        """Whether the database answers, and the loaded model; never raises."""
        db_ok = self.db.health()
        return HealthReport(
            status="ok" if db_ok else "unavailable",
            database="ok" if db_ok else "unavailable",
            backend=self.db.backend_name,
            model=ModelInfo(
                id=self.embedder.model_id,
                dimension=self.embedder.dim,
                device=self.embedder.device,
                supports_text=self.embedder.supports_text,
            ),
        )

    def stats(self) -> ServiceStats:
        """Counts and model facts for ``/stats``; raises :class:`app.errors.DatabaseUnavailableError`."""
        return ServiceStats(
            count=self.db.count(),
            model=self.embedder.model_id,
            dimension=self.embedder.dim,
            backend=self.db.backend_name,
            device=self.embedder.device,
            supports_text=self.embedder.supports_text,
            query_cache=self.query_cache.stats(),
        )
