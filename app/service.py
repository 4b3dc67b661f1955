"""The data path in one place: upload -> decode -> embed -> store -> search.

:class:`SearchService` is the one front door of the service: the FastAPI lifespan opens it
(:meth:`SearchService.open`) and closes it, and the REST API (and through it the web UI) calls only its methods,
so every client gets the same behaviour. It is thread-safe: FastAPI runs the sync endpoints in a thread pool, and
the model runtime and the connection pool both allow concurrent callers.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from app.batching import DynamicBatcher
from app.cache import EmbeddingCache
from app.cache.thumbnails import ThumbnailCaches, ThumbnailCacheStats, ThumbnailRedisLayer
from app.config import Settings
from app.embedders.base import Embedder
from app.errors import ImageDecodeError, ImageNotFoundError, ImageTooLargeError, InvalidParameterError
from app.health import HealthReport, check_health
from app.ids import image_id_for, is_valid_image_id
from app.imaging.admission import PixelAdmission
from app.imaging.decode import RGB_DECODE_BYTES_PER_PIXEL, decode_cost, decode_image
from app.imaging.prepare import PreparedImage, check_upload_size, clean_filename, prepare_bytes
from app.imaging.thumbnails import ThumbnailCache, render_thumbnail
from app.indexing.fsck import start_sweep
from app.indexing.write import write_batch
from app.neighbours.jobs import NeighbourJobs
from app.observe import NULL_OBSERVER, Observer, timed_embed
from app.search.paging import SearchOptions, search_page
from app.search.query import QueryTerm, combined_query, unit_vector
from app.stats import ServiceStats, collect_stats
from app.storage import from_settings as store_from_settings
from app.storage.base import ImageStore, ObjectInfo, ObjectStream
from app.storage.originals import Originals
from app.vectordb.base import SearchHit, VectorDBHandler
from app.vectordb.guard import GuardedHandler

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
        # Query embeddings by content: memory -> Redis -> stored vector -> model (app/cache/). Keys carry the model id
        # and dimension, so a shared Redis never hands one model's vectors to another.
        self.cache = EmbeddingCache.from_settings(settings, embedder.model_id, embedder.dim, observer)
        # Decoded pixels held by all requests together (MAX_DECODE_PIXELS_IN_FLIGHT): bounds decode memory.
        self.admission = PixelAdmission(settings.max_decode_pixels_in_flight, settings.decode_wait_s)
        # Thumbnails of stored images: this process's memory (THUMBNAIL_CACHE_MB), then the replicas' shared Redis
        # (CACHE_REDIS_URL, THUMBNAIL_REDIS_TTL_S), so a repeated request does not decode the original again.
        self.thumbnail_caches = ThumbnailCaches.from_settings(settings)
        self.originals = Originals(store, settings.data_dir / "cache" / "originals")
        self._sweep_stop = threading.Event()
        self.sweep_thread: threading.Thread | None = None
        # The neighbour graph, near-duplicates and DBA (app/neighbours/): its job thread is stopped by close().
        self.neighbours = NeighbourJobs(settings, db)

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

        db = GuardedHandler(create_handler(settings))  # fail fast (503 + Retry-After) while the database is down
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
        store = store_from_settings(settings)  # contacts nothing: start-up works while an object store is down
        remote_vectors = settings.vector_db == "manticore" or (
            settings.vector_db == "milvus" and "://" in settings.resolved_milvus_uri
        )
        if remote_vectors and store.url.startswith("s3://") and not settings.shared_state_url:
            # The set-up of several replicas, minus what makes them safe: say so once, loudly.
            log.warning(
                "Originals in object storage and %s on a server, but no DATABASE_URL: the write locks and the "
                "neighbour graph stay on this machine, so run ONE replica, or set DATABASE_URL to a PostgreSQL "
                "every replica reaches (README: Running on several machines).",
                settings.vector_db,
            )
        service = cls(settings, embedder, db, store, batcher, observer)
        service.cache.start()  # one PING bounded by CACHE_REDIS_TIMEOUT_MS; a Redis that is down only degrades it
        service.thumbnail_caches.start()
        # What a kill -9 during a write left behind, removed in the background (app/indexing/fsck.py).
        service.sweep_thread = start_sweep(db, store, settings.orphan_grace_s, service._sweep_stop)
        service.neighbours.resume_interrupted()  # a graph job a restart or kill -9 cut short goes on
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
        :class:`app.errors.StorageFullError` (nothing stored) when the disk is full or under ``MIN_FREE_MB``;
        :class:`app.errors.ServiceBusyError` when decode capacity stays taken for ``DECODE_WAIT_S``.
        """
        self._check_size(data)
        self.store.ensure_space()
        image_id = image_id_for(data)
        if self._indexed({image_id}):
            return IndexResult(image_id, "exists")
        with self.admission.admit(self._pixels(data)):
            written = self._index_one(data, filename, image_id)  # the decoded image dies inside, before admission ends
        # Not written: a simultaneous upload of the same bytes stored it while this one decoded (write_batch).
        return IndexResult(image_id, "indexed" if written else "exists")

    def _index_one(self, data: bytes, filename: str | None, image_id: str) -> bool:
        """Whether this call wrote the image (``False``: it was stored meanwhile by another request)."""
        prepared = self._prepare(data, filename, image_id, fit_size=None)
        # write_batch saves the original, then the row, and removes the file again if the row fails.
        return image_id in write_batch(self.db, self.store, [prepared], self._embed([prepared.image]))

    def _indexed(self, ids: set[str]) -> set[str]:
        # A row counts only with its original: a row whose file is gone is indexed again, which restores the file.
        return self.store.existing(self.db.existing_ids(ids))

    def _pixels(self, data: bytes, draft_size: int | None = None) -> int:
        """What decoding ``data`` costs the admission, in pixels of an 8-bit RGB photo (the unit of
        MAX_DECODE_PIXELS_IN_FLIGHT): its measured decode memory (:func:`app.imaging.decode.decode_cost`, by format
        and mode, from the header) over :data:`RGB_DECODE_BYTES_PER_PIXEL`. A WebP with alpha or a float TIFF counts
        about 2.1 times its pixels, a palette GIF about 0.6 times; JPEGs count at the embedder's draft scale.

        Raises :class:`ImageTooLargeError` (413) when that cost is over ``MAX_DECODE_MB``."""
        cost = decode_cost(
            data, max_pixels=self.settings.max_image_pixels, draft_size=draft_size or self.embedder.draft_size
        )
        limit = self.settings.max_decode_mb * 1_000_000
        if limit and cost > limit:
            raise ImageTooLargeError(
                f"Decoding this image would take about {cost / 1e6:,.0f} MB of memory, over the limit of "
                f"{self.settings.max_decode_mb:g} MB (MAX_DECODE_MB); send it smaller or in another format."
            )
        return -int(-cost // RGB_DECODE_BYTES_PER_PIXEL)

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

    def index_images(self, uploads: list[tuple[bytes, str | None]]) -> list[BatchItemResult]:
        """Index several uploads with one model call and one database write; one result per upload, in order.

        Each upload is ``(bytes, filename)``. A file the decoder refuses (or over MAX_UPLOAD_MB) gets ``error`` and
        does not affect the others; the same bytes twice in one batch are stored once (the later ones ``exists``).
        Raises :class:`app.errors.DatabaseUnavailableError` (or another store/database error) for the whole batch,
        after removing the originals it had saved: nothing is half-written.
        """
        self.store.ensure_space()
        results: list[BatchItemResult | None] = [None] * len(uploads)
        ids = [image_id_for(data) for data, _ in uploads]
        have = self._indexed(set(ids))
        todo: list[tuple[int, PreparedImage]] = []
        first_in_batch: set[str] = set()
        for i, ((data, filename), image_id) in enumerate(zip(uploads, ids, strict=True)):
            name = clean_filename(filename)
            if image_id in have or image_id in first_in_batch:
                results[i] = BatchItemResult(name, image_id, "exists")
                continue
            try:
                # Fitted to the model right after decoding, so only one full-size raster exists at a time.
                with self.admission.admit(self._pixels(data)):
                    prepared = self._prepare(data, filename, image_id, fit_size=self.embedder.fit_size)
            except ImageDecodeError as exc:
                results[i] = BatchItemResult(name, image_id, "error", exc)
                continue
            first_in_batch.add(image_id)
            todo.append((i, prepared))
        if todo:
            vectors = self._embed([p.image for _, p in todo])
            written = write_batch(self.db, self.store, [p for _, p in todo], vectors)
            for i, prepared in todo:
                status = "indexed" if prepared.image_id in written else "exists"  # else stored meanwhile by another
                results[i] = BatchItemResult(prepared.name, prepared.image_id, status)
        return [r for r in results if r is not None]

    def existing_ids(self, ids: Iterable[str]) -> set[str]:
        """Which of these ids are indexed with their original (invalid ids are never indexed)."""
        return self._indexed({i for i in ids if is_valid_image_id(i)})

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
            dba=self.neighbours.dba_rerank(),
        )

    def search_image(self, data: bytes, top_k: int, options: SearchOptions | None = None) -> list[SearchHit]:
        """The ``top_k`` most similar indexed images to the uploaded one, best first (cosine similarity).

        The upload's embedding comes from :attr:`cache` (memory, then Redis, then the stored vector of an indexed
        image with the same bytes), and only then from decode + model. The upload counts as a query image: when
        its bytes are indexed it is left out of the results unless ``options.exclude_self`` is false (so it takes
        one place of the MAX_SEARCH_WINDOW of a page, indexed or not).
        Raises the decoding errors for bad input (nothing is cached then) and :class:`InvalidParameterError`.
        """
        self._check_size(data)
        image_id = image_id_for(data)
        return self._page(self.embed_query_image(data, image_id), top_k, options, query_ids=[image_id])

    def embed_query_image(self, data: bytes, image_id: str | None = None) -> np.ndarray:
        """The ``(D,)`` float32, L2-normalised embedding of uploaded image bytes through the embedding cache (memory,
        Redis, the stored vector of the same bytes, then the model); nothing is stored. ``image_id``: the bytes'
        SHA-256 if known.

        The web UI's combined search ("like this photo but not these words") uses it for a photo that is not
        indexed. Raises the decoding errors (nothing is cached then) and :class:`ServiceBusyError`.
        """
        self._check_size(data)
        image_id = image_id or image_id_for(data)

        def stored() -> np.ndarray | None:
            record = self.db.get(image_id)
            return None if record is None else record.vector

        def compute() -> np.ndarray:
            with self.admission.admit(self._pixels(data)):
                return self._embed_upload(data)  # the decoded image dies inside, before the admission ends

        return self.cache.image(image_id, compute, stored).vector

    def _embed_upload(self, data: bytes) -> np.ndarray:
        with self._timed_decode():
            image = decode_image(
                data, max_pixels=self.settings.max_image_pixels, draft_size=self.embedder.draft_size
            ).image
        return self._embed([image])[0]

    def search_text(self, query: str, top_k: int, options: SearchOptions | None = None) -> list[SearchHit]:
        """The ``top_k`` images that best match a text description (CLIP models only).

        The text's embedding is cached like an image's (by the exact string). Raises
        :class:`app.errors.NoTextTowerError` when the model has no text encoder.
        """
        if not self.embedder.supports_text:
            self.embedder.embed_texts([query])  # raises NoTextTowerError / NoModelError, without a cache lookup
        vector = self.cache.text(query, lambda: self.embedder.embed_texts([query])[0]).vector
        return self._page(vector, top_k, options)

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
        embed_texts = self.embedder.embed_texts
        if self.embedder.supports_text:
            embed_texts = partial(self.cache.texts, compute=self.embedder.embed_texts)
        vector, query_ids = combined_query(positive, negative, self.db, self.embedder, embed_texts)
        return self._page(vector, top_k, options, query_ids=query_ids)

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
        self._check_size(data)
        return self._thumbnail(data, size)

    def _thumbnail(self, data: bytes, size: int) -> bytes:
        """The JPEG of :meth:`thumbnail` and :meth:`preview`, decoded under the pixel admission."""
        with self.admission.admit(self._pixels(data, draft_size=size)):
            return render_thumbnail(data, size, max_pixels=self.settings.max_image_pixels)

    def delete_image(self, image_id: str) -> None:
        """Remove the vector and the original; raises :class:`ImageNotFoundError` if neither existed."""
        if not is_valid_image_id(image_id):
            raise ImageNotFoundError(f"No image with id '{image_id[:80]}'.")
        with self.store.locks.hold([image_id]):  # never between another writer's original and its row
            self.store.head(image_id)  # an object store that is down answers 503 here, before anything changes
            removed_row = self.db.delete(image_id)
            removed_file = self.store.delete(image_id)
        self.thumbnail_caches.forget(image_id)
        if not (removed_row or removed_file):
            raise ImageNotFoundError(f"No image with id '{image_id}'.")

    # --- health and stats (app/health.py, app/stats.py) ----------------------------------------------------
    def health(self) -> HealthReport:
        """Whether the database answers, the store has room and the Redis cache works, and the loaded model; never
        raises, waits at most the database guard's probe timeout (:func:`app.health.check_health`)."""
        return check_health(self.db, self.store, self.cache, self.embedder)

    def stats(self) -> ServiceStats:
        """Counts and model facts for ``/stats``; raises :class:`app.errors.DatabaseUnavailableError`."""
        return collect_stats(self.db, self.embedder, self.cache, self.thumbnail_stats())

    def thumbnail_stats(self) -> ThumbnailCacheStats:
        """The thumbnail caches' counters (``/stats``, ``/metrics``); never raises, touches no server."""
        return self.thumbnail_caches.stats()
