"""The data path in one place: upload -> decode -> embed -> store -> search -> respond.

:class:`SearchService` is the one front door of the service: the FastAPI lifespan opens it
(:meth:`SearchService.open`) and closes it, and the REST API (and through it the web UI) calls only its methods,
so every client gets the same behaviour. It holds the parts and hands each job to the module that owns it:

- indexing uploads (decode under the pixel admission, embed, write): :class:`app.indexing.uploads.UploadIndexer`;
  deleting: :func:`app.indexing.write.remove_image`;
- searching: :class:`app.search.searcher.Searcher`, through the embedding cache (:mod:`app.cache`);
- originals: :class:`app.storage.originals.Originals`; thumbnails: :class:`app.cache.thumbnails.ThumbnailCaches`
  over :func:`app.imaging.thumbnails.render_thumbnail`;
- ``/health`` and ``/stats``: :mod:`app.health` and :mod:`app.stats`, with their response models.

It is thread-safe: FastAPI runs the sync endpoints in a thread pool, and the model runtime and the connection pool
both allow concurrent callers.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from app.batching import DynamicBatcher
from app.cache import EmbeddingCache
from app.cache.thumbnails import ThumbnailCaches, ThumbnailCacheStats, ThumbnailRedisLayer
from app.config import Settings
from app.embedders.base import Embedder
from app.errors import ImageNotFoundError, InvalidParameterError, LibraryConflictError
from app.health import HealthReport, check_health
from app.ids import is_valid_image_id
from app.imaging.admission import PixelAdmission
from app.imaging.prepare import check_upload_size
from app.imaging.thumbnails import ThumbnailCache, render_thumbnail
from app.indexing.fsck import start_sweep
from app.indexing.uploads import BatchItemResult, IndexResult, UploadIndexer
from app.indexing.write import remove_image
from app.library.files import WithLibraries
from app.library.libraries import Libraries
from app.locks import pg_try_lease
from app.neighbours.jobs import NeighbourJobs
from app.observe import NULL_OBSERVER, Observer, timed_embed
from app.search.paging import SearchOptions
from app.search.query import QueryTerm
from app.search.searcher import Searcher
from app.stats import ServiceStats, collect_stats
from app.storage import from_settings as store_from_settings
from app.storage import warn_if_replicas_unsafe
from app.storage.base import ImageStore, ObjectInfo, ObjectStream
from app.storage.originals import Originals
from app.vectordb.base import SearchHit, VectorDBHandler
from app.vectordb.guard import GuardedHandler

log = logging.getLogger(__name__)


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
        # Photo libraries indexed in place (app/library/): their files are read where they are, so the store the
        # service reads originals from is the store of uploads with the library files beside it.
        self.uploads = store
        self.libraries = Libraries(settings, db, store, None if embedder.device == "none" else embedder)
        self.store: ImageStore = WithLibraries(store, self.libraries.files)
        store = self.store
        self.batcher = batcher
        # Query embeddings by content: memory -> Redis -> stored vector -> model (app/cache/). Keys carry the model id
        # and dimension, so a shared Redis never hands one model's vectors to another.
        self.cache = EmbeddingCache.from_settings(settings, embedder.model_id, embedder.dim, observer)
        # Decode memory of all requests together, within MEMORY_LIMIT_MB from whatever the process holds already
        # and within MAX_DECODE_PIXELS_IN_FLIGHT (app/imaging/admission.py owns the rule).
        self.admission = PixelAdmission(
            settings.max_decode_pixels_in_flight,
            settings.decode_wait_s,
            memory_limit_bytes=int(settings.memory_limit_mb * 1_000_000),
        )
        embed = batcher.embed if batcher is not None else embedder.embed_images
        self.indexer = UploadIndexer(settings, embedder, embed, db, store, self.admission, observer)
        # The neighbour graph, near-duplicates and DBA (app/neighbours/): its job thread is stopped by close().
        self.neighbours = NeighbourJobs(settings, db)
        self.searcher = Searcher(
            settings, embedder, db, self.cache, self.indexer.embed_upload, self.neighbours.dba_rerank
        )
        # Thumbnails of stored images: this process's memory (THUMBNAIL_CACHE_MB), then the replicas' shared Redis
        # (CACHE_REDIS_URL, THUMBNAIL_REDIS_TTL_S), so a repeated request does not decode the original again.
        self.thumbnail_caches = ThumbnailCaches.from_settings(settings)
        self.originals = Originals(store, settings.data_dir / "cache" / "originals")
        self._sweep_stop = threading.Event()
        self.sweep_thread: threading.Thread | None = None

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
        from app.embedders import embedder_for_collection
        from app.vectordb import create_handler

        db = GuardedHandler(create_handler(settings))  # fail fast (503 + Retry-After) while the database is down
        try:
            if embedder is None:
                embedder = embedder_for_collection(settings, db.collection_info())
            db.ensure_collection(embedder.model_id, embedder.dim)
        except BaseException:
            db.close()
            raise
        batcher = DynamicBatcher(
            timed_embed(embedder.embed_images, observer),
            max_batch=settings.embed_batch_size,
            max_wait_s=settings.batch_wait_ms / 1000,
        )
        store = store_from_settings(settings)  # contacts nothing: start-up works while an object store is down
        warn_if_replicas_unsafe(settings, store)  # several replicas, minus what makes them safe: say so once
        service = cls(settings, embedder, db, store, batcher, observer)
        service.cache.start()  # one PING bounded by CACHE_REDIS_TIMEOUT_MS; a Redis that is down only degrades it
        service.thumbnail_caches.start()
        # What a kill -9 during a write left behind, removed in the background (app/indexing/fsck.py).
        # Then every ORPHAN_SWEEP_INTERVAL_S: what a hung object store completed after the 503. Replicas sharing a
        # database take turns through a lease.
        lease = None
        if settings.shared_state_url:
            url, name = settings.shared_state_url, store.url
            lease = functools.partial(pg_try_lease, url, name, connect_timeout_s=settings.db_connect_timeout_s)
        service.sweep_thread = start_sweep(
            db,
            store,
            settings.orphan_grace_s,
            service._sweep_stop,
            interval_s=settings.orphan_sweep_interval_s,
            lease=lease,
        )
        service.neighbours.resume_interrupted()  # a graph job a restart or kill -9 cut short goes on
        service.libraries.start()  # LIBRARY_ROOTS, scans cut short, periodic scans, LIBRARY_WATCH
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
        """Stop the neighbour-graph job between two batches, finish the embed calls already queued, then close the
        database (and its embedded server, if any)."""
        self.libraries.close()
        self.neighbours.close()
        self._sweep_stop.set()
        if self.sweep_thread is not None:
            self.sweep_thread.join(timeout=30)
        if self.batcher is not None:
            self.batcher.close()
        self.store.close()
        self.cache.close()
        self.thumbnail_caches.close()
        self.db.close()

    @property
    def thumbnails(self) -> ThumbnailCache:
        """This process's thumbnail cache (``THUMBNAIL_CACHE_MB``)."""
        return self.thumbnail_caches.memory

    @property
    def shared_thumbnails(self) -> ThumbnailRedisLayer | None:
        """The replicas' thumbnail layer in Redis; ``None`` without ``CACHE_REDIS_URL`` or with
        ``THUMBNAIL_REDIS_TTL_S=0``."""
        return self.thumbnail_caches.shared

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

    def _pixels(self, data: bytes, draft_size: int | None = None) -> int:
        """What decoding ``data`` costs the pixel admission (:meth:`UploadIndexer.pixels`)."""
        return self.indexer.pixels(data, draft_size)

    # --- index --------------------------------------------------------------------------------------------
    def index_image(self, data: bytes, filename: str | None) -> IndexResult:
        """Decode, embed and store one image; idempotent by content hash (:meth:`UploadIndexer.index_one`).

        Raises the :class:`app.errors.ImageDecodeError` subclasses (nothing stored),
        :class:`app.errors.DatabaseUnavailableError`, :class:`app.errors.StorageFullError` and
        :class:`app.errors.ServiceBusyError`.
        """
        return self.indexer.index_one(data, filename)

    def index_images(self, uploads: list[tuple[bytes, str | None]]) -> list[BatchItemResult]:
        """Index ``(bytes, filename)`` uploads with one model call and one database write; one result per upload,
        in order (:meth:`UploadIndexer.index_many`). A refused file gets ``error``; a store or database error fails
        the whole batch, with nothing half-written."""
        return self.indexer.index_many(uploads)

    def existing_ids(self, ids: Iterable[str]) -> set[str]:
        """Which of these ids are indexed with their original (invalid ids are never indexed)."""
        return self.indexer.indexed({i for i in ids if is_valid_image_id(i)})

    def delete_image(self, image_id: str) -> None:
        """Remove the vector and the original; raises :class:`ImageNotFoundError` if neither existed and
        :class:`app.errors.LibraryConflictError` for a photo a library holds (its next scan would bring it back)."""
        if not is_valid_image_id(image_id):
            raise ImageNotFoundError(f"No image with id '{image_id[:80]}'.")
        holder = self.libraries.holder(image_id)
        if holder is not None:
            raise LibraryConflictError(
                f"Image '{image_id}' is the library file {holder}: delete or exclude the file in its library "
                "instead (the next scan would index it again)."
            )
        removed = remove_image(self.db, self.store, image_id)
        self.thumbnail_caches.forget(image_id)
        if not removed:
            raise ImageNotFoundError(f"No image with id '{image_id}'.")

    # --- search (app/search/searcher.py): one page of hits, best first, by cosine similarity ---------------
    def search_image(self, data: bytes, top_k: int, options: SearchOptions | None = None) -> list[SearchHit]:
        """The ``top_k`` indexed images most similar to the uploaded one, its own bytes left out
        (:meth:`Searcher.by_image`). Raises the decoding errors and :class:`InvalidParameterError`."""
        return self.searcher.by_image(data, top_k, options)

    def embed_query_image(self, data: bytes, image_id: str | None = None) -> np.ndarray:
        """The ``(D,)`` float32, L2-normalised embedding of uploaded bytes through the embedding cache; nothing is
        stored (:meth:`Searcher.embed_image`). ``image_id``: the bytes' SHA-256 if known. The web UI's combined
        search uses it for a photo that is not indexed."""
        return self.searcher.embed_image(data, image_id)

    def search_text(self, query: str, top_k: int, options: SearchOptions | None = None) -> list[SearchHit]:
        """The ``top_k`` images that best match a text description (CLIP models only; :meth:`Searcher.by_text`).
        Raises :class:`app.errors.NoTextTowerError` when the model has no text encoder."""
        return self.searcher.by_text(query, top_k, options)

    def search_vector(
        self, values: Sequence[float], top_k: int, options: SearchOptions | None = None
    ) -> list[SearchHit]:
        """The ``top_k`` images nearest to an embedding of ``D`` finite values computed elsewhere by the same model
        (:meth:`Searcher.by_vector`). Raises :class:`app.errors.InvalidVectorError`."""
        return self.searcher.by_vector(values, top_k, options)

    def similar(self, image_id: str, top_k: int, options: SearchOptions | None = None) -> list[SearchHit]:
        """More like this: the neighbours of a stored image by its stored vector, the image itself left out
        (:meth:`Searcher.similar`). Raises :class:`ImageNotFoundError` for an unknown or malformed id."""
        return self.searcher.similar(image_id, top_k, options)

    def search_combined(
        self,
        positive: Sequence[QueryTerm],
        negative: Sequence[QueryTerm],
        top_k: int,
        options: SearchOptions | None = None,
    ) -> list[SearchHit]:
        """Search by weighted images, texts and vectors minus weighted negative ones (:meth:`Searcher.combined`)."""
        return self.searcher.combined(positive, negative, top_k, options)

    # --- stored images (app/storage/originals.py): ImageNotFoundError (404), StorageUnavailableError (503) -
    def image_file(self, image_id: str) -> Path:
        """A local file with the stored original's bytes, named ``<id>.<ext>`` (:meth:`Originals.file`)."""
        return self.originals.file(image_id)

    def save_original(self, image_id: str, target: Path) -> None:
        """Put the stored original's bytes in the file ``target``, atomically (:meth:`Originals.save`)."""
        self.originals.save(image_id, target)

    def original_info(self, image_id: str) -> ObjectInfo:
        """Name (``<id>.<ext>``), size (bytes) and modification time of the stored original."""
        return self.originals.info(image_id)

    def open_original(self, image_id: str, start: int = 0, end: int | None = None) -> ObjectStream:
        """The stored original (bytes ``start``..``end``, end exclusive) as a stream of chunks, never whole in
        memory; iterate it, or ``read()`` it."""
        return self.originals.open(image_id, start, end)

    def read_original(self, image_id: str) -> tuple[bytes, str]:
        """``(bytes, filename)`` of a stored image: its original's bytes and the file name it was indexed under
        (``<id>.<ext>`` when the row has none)."""
        data = self.open_original(image_id).read()
        row = self.db.get(image_id)
        name = row.metadata.filename if row is not None and row.metadata.filename else None
        return data, name or self.original_info(image_id).name

    def thumbnail(self, image_id: str, size: int = 256) -> bytes:
        """A JPEG of the stored image, at most ``size`` x ``size`` pixels, for browsers that cannot show HEIC/TIFF:
        from the thumbnail caches (:meth:`ThumbnailCaches.lookup`), else decoded from the original under the pixel
        admission. Raises :class:`ImageNotFoundError` (also for a cached thumbnail whose original is gone)."""
        if not is_valid_image_id(image_id):
            raise ImageNotFoundError(f"No image with id '{image_id[:80]}'.")
        return self.thumbnail_caches.lookup(
            image_id,
            size,
            exists=lambda: self.store.head(image_id) is not None,
            render=lambda: self._thumbnail(self.store.read(image_id), size),
        )

    def preview(self, data: bytes, size: int = 512) -> bytes:
        """A JPEG of uploaded image bytes, at most ``size`` x ``size`` pixels, EXIF orientation applied: how the web
        UI shows a query image in any format the service decodes (HEIC, TIFF, JPEG XL... that browsers cannot).

        Nothing is stored. The decode goes through the same pixel admission as searches and thumbnails, so a burst
        of large previews cannot hold more decoded pixels in memory than MAX_DECODE_PIXELS_IN_FLIGHT.

        Raises:
            ImageDecodeError: over MAX_UPLOAD_MB, an unknown format, a corrupt file or too many pixels (413/415/422),
                or :class:`ServiceBusyError` when the decode admission waits longer than DECODE_WAIT_S (503).
        """
        check_upload_size(len(data), self.settings.max_upload_bytes)
        return self._thumbnail(data, size)

    def _thumbnail(self, data: bytes, size: int) -> bytes:
        """The JPEG of :meth:`thumbnail` and :meth:`preview`, decoded under the pixel admission."""
        with self.admission.admit(self._pixels(data, draft_size=size)):
            return render_thumbnail(data, size, max_pixels=self.settings.max_image_pixels)

    # --- health and stats (app/health.py, app/stats.py) ----------------------------------------------------
    def health(self) -> HealthReport:
        """Whether the database answers, the store has room and the Redis cache works, and the loaded model; never
        raises, waits at most the database guard's probe timeout (:func:`app.health.check_health`)."""
        return check_health(self.db, self.store, self.cache, self.embedder, self.libraries.problems)

    def stats(self) -> ServiceStats:
        """Counts and model facts for ``/stats``; raises :class:`app.errors.DatabaseUnavailableError`."""
        return collect_stats(self.db, self.embedder, self.cache, self.thumbnail_stats())

    def thumbnail_stats(self) -> ThumbnailCacheStats:
        """The thumbnail caches' counters (``/stats``, ``/metrics``); never raises, touches no server."""
        return self.thumbnail_caches.stats()
