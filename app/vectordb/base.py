"""The one interface every vector database backend implements.

Vectors are ``(D,)`` float32 and L2-normalised by the embedder; scores returned by :meth:`VectorDBHandler.search`
are cosine similarity (``1 - cosine distance``), in ``[-1, 1]``, higher is better, on every backend.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from app.ids import as_utc

DEFAULT_COLLECTION = "images"
"""Name of the collection a database holds before any re-index (pgvector: the ``public`` schema's tables)."""
# Lower-case letters, digits and "_", a letter first, at most 48 characters: a valid PostgreSQL schema, Milvus
# collection and Manticore table name on every backend (Manticore's ``<name>_meta`` stays under its 63).
_COLLECTION_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")


def validate_collection_name(name: str) -> str:
    """``name`` if it can name a collection on every backend (``^[a-z][a-z0-9_]{0,47}$``, not ``pg_*``, ``public``
    or ``information_schema``, which PostgreSQL reserves); raises ``ValueError`` otherwise."""
    if not isinstance(name, str) or not _COLLECTION_NAME_RE.fullmatch(name):
        raise ValueError(
            f"a collection name is 1-48 lower-case letters, digits or '_', starting with a letter; got {name!r}"
        )
    if name.startswith("pg_") or name in ("public", "information_schema"):
        raise ValueError(f"{name!r} is reserved by PostgreSQL; choose another collection name")
    return name


def collection_name_for(model_id: str) -> str:
    """The collection name :mod:`app.indexing.reindex` derives from a model id when no ``--target`` is given.

    ``efficientnet-lite2:imagenet`` -> ``efficientnet_lite2_imagenet``, ``open_clip:ViT-B-32/laion2b_s34b_b79k``
    -> ``open_clip_vit_b_32_laion2b_s34b_b79k``: lower-cased, every run of other characters one ``_``; longer
    than 48 characters, it is cut to 39 and ends in ``_`` + 8 hex digits of the id's SHA-256, so that two long
    ids stay apart. Always a valid name (:func:`validate_collection_name`), never :data:`DEFAULT_COLLECTION`.
    """
    name = re.sub(r"[^a-z0-9]+", "_", model_id.lower()).strip("_")
    if not name or not name[0].isalpha() or name.startswith("pg_") or name in ("public", DEFAULT_COLLECTION):
        name = f"m_{name}".rstrip("_")
    if len(name) > 48:
        name = f"{name[:39].rstrip('_')}_{hashlib.sha256(model_id.encode()).hexdigest()[:8]}"
    return validate_collection_name(name)


@dataclass(frozen=True, slots=True)
class ImageMetadata:
    """What is stored beside each vector.

    ``filename`` is the uploaded name (for bulk indexing: the path relative to the indexed folder);
    ``format`` is the decoder's format name (``JPEG``, ``PNG``, ``HEIF``...); ``width``/``height`` in pixels after
    EXIF orientation; ``bytes`` is the size of the original file; ``indexed_at`` is timezone-aware UTC;
    ``taken_at`` is the EXIF ``DateTimeOriginal`` (timezone-aware: its ``OffsetTimeOriginal`` when the file has
    one, UTC otherwise), ``None`` when the file has none.
    """

    filename: str
    format: str
    width: int
    height: int
    bytes: int
    indexed_at: datetime
    taken_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class SearchFilter:
    """Which stored images a search may return (issue #9); every field given must hold (AND), ``None`` = any.

    This class owns the meaning of each filter; every backend translates it into its own query language (pgvector
    ``WHERE`` with iterative index scans, Milvus boolean expressions, Manticore ``WHERE`` beside ``knn``) and the
    contract suite checks each against :meth:`matches`. Build it with :meth:`create`, which normalises and checks.

    Attributes:
        path_prefix: a folder of the stored relative ``filename``, normalised to end in ``/`` (``"trips/2024/"``
            matches ``trips/2024/a.jpg`` and ``trips/2024/x/b.jpg``, not ``trips/2024b/c.jpg``); case-sensitive.
        formats: decoder format names, upper-case (``("JPEG", "HEIF")``); an image matches one of them.
        indexed_after, indexed_before: ``indexed_after <= indexed_at < indexed_before``, timezone-aware.
        taken_after, taken_before: the same for ``taken_at``; an image without ``taken_at`` never matches a
            ``taken_*`` filter.
        min_width, min_height: pixels, ``width >= min_width`` / ``height >= min_height``.
    """

    path_prefix: str | None = None
    formats: tuple[str, ...] | None = None
    indexed_after: datetime | None = None
    indexed_before: datetime | None = None
    taken_after: datetime | None = None
    taken_before: datetime | None = None
    min_width: int | None = None
    min_height: int | None = None

    @classmethod
    def create(
        cls,
        *,
        path_prefix: str | None = None,
        formats: Iterable[str] | str | None = None,
        indexed_after: datetime | None = None,
        indexed_before: datetime | None = None,
        taken_after: datetime | None = None,
        taken_before: datetime | None = None,
        min_width: int | None = None,
        min_height: int | None = None,
    ) -> SearchFilter:
        """The normalised filter: ``path_prefix`` with leading ``./``//`` removed and one trailing ``/`` (an
        empty folder is no filter), ``formats`` from a list or a comma-separated string, upper-cased, empty
        entries dropped; naive datetimes read as UTC (:func:`app.ids.as_utc`).

        Raises ``ValueError`` (the API answers 422) for a negative minimum size, a range whose start is not
        before its end, or a format list with nothing in it.
        """

        if path_prefix is not None:
            folder = path_prefix.strip()
            while folder.startswith("./"):
                folder = folder[2:]
            folder = folder.strip("/")
            path_prefix = f"{folder}/" if folder else None
        if formats is not None:
            items = formats.split(",") if isinstance(formats, str) else list(formats)
            formats = tuple(sorted({f.strip().upper() for f in items if f.strip()}))
            if not formats:
                raise ValueError("formats must name at least one format, e.g. formats=JPEG,PNG")
        dates = {
            name: None if value is None else as_utc(value)
            for name, value in {
                "indexed_after": indexed_after,
                "indexed_before": indexed_before,
                "taken_after": taken_after,
                "taken_before": taken_before,
            }.items()
        }
        for kind in ("indexed", "taken"):
            start, end = dates[f"{kind}_after"], dates[f"{kind}_before"]
            if start is not None and end is not None and not start < end:
                raise ValueError(f"{kind}_after must be before {kind}_before")
        for name, value in (("min_width", min_width), ("min_height", min_height)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        return cls(path_prefix, formats, **dates, min_width=min_width, min_height=min_height)

    @property
    def empty(self) -> bool:
        """``True`` when the filter lets every image through."""
        return self == SearchFilter()

    def matches(self, m: ImageMetadata) -> bool:
        """Whether an image with metadata ``m`` passes: the reference meaning every backend must reproduce."""

        indexed_at = as_utc(m.indexed_at)
        taken_at = None if m.taken_at is None else as_utc(m.taken_at)
        if self.path_prefix is not None and not m.filename.startswith(self.path_prefix):
            return False
        if self.formats is not None and m.format.upper() not in self.formats:
            return False
        if self.indexed_after is not None and not indexed_at >= self.indexed_after:
            return False
        if self.indexed_before is not None and not indexed_at < self.indexed_before:
            return False
        if self.taken_after is not None and (taken_at is None or not taken_at >= self.taken_after):
            return False
        if self.taken_before is not None and (taken_at is None or not taken_at < self.taken_before):
            return False
        if self.min_width is not None and not m.width >= self.min_width:
            return False
        return self.min_height is None or m.height >= self.min_height


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One stored image: ``id`` (SHA-256 of the file bytes, 64 lower-case hex), its embedding and metadata.

    ``vector`` is ``(D,)`` float32, L2-normalised; it may be ``None`` where a backend's ``get`` does not return it.
    """

    id: str
    vector: np.ndarray | None
    metadata: ImageMetadata


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One search result: ``score`` is cosine similarity, higher is better."""

    id: str
    score: float
    metadata: ImageMetadata


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    """Which model filled the collection: its id (e.g. ``open_clip:ViT-B-32/laion2b_s34b_b79k``) and dimension."""

    model_id: str
    dim: int


def checked_vector(vector: np.ndarray, dim: int | None) -> np.ndarray:
    """``vector`` as ``(dim,)`` float32, for a handler whose collection has dimension ``dim``.

    Raises ``RuntimeError`` before :meth:`VectorDBHandler.ensure_collection` ran (``dim`` is ``None``) and
    ``ValueError`` for any other shape.
    """
    if dim is None:
        raise RuntimeError("ensure_collection() must run before vectors are written or searched")
    v = np.asarray(vector, dtype=np.float32)
    if v.shape != (dim,):
        raise ValueError(f"vector must have shape ({dim},), got {v.shape}")
    return v


def canonical_top_ids(hits: Sequence[SearchHit], k: int, decimals: int = 4) -> list[str]:
    """Ids of the best ``k`` hits, with scores equal to ``decimals`` places ordered by id.

    Identical images (the same photo re-encoded) tie to about 1e-6, and backends order ties differently; compare
    rankings across backends with this, on a search that asked for more than ``k`` results so a tie at rank ``k``
    is resolved the same way on both sides.
    """
    ranked = sorted(hits, key=lambda h: (-round(h.score, decimals), h.id))
    return [h.id for h in ranked[:k]]


class VectorDBHandler(ABC):
    """Abstract vector store of image embeddings with metadata, searched by cosine similarity.

    Implementations: :class:`app.vectordb.pgvector.PgVectorHandler`, :class:`app.vectordb.milvus.MilvusHandler`,
    :class:`app.vectordb.manticore.ManticoreHandler`, each built from the service's settings by its
    ``from_settings(settings)`` classmethod (:func:`app.vectordb.create_handler` picks one). Every method may raise
    :class:`app.errors.DatabaseUnavailableError` when the server cannot be reached.

    Malformed image ids (anything :func:`app.ids.is_valid_image_id` refuses) are never stored and never reach a
    query: :meth:`upsert` raises ``ValueError`` (before writing any record of the batch), :meth:`get` returns
    ``None``, :meth:`delete` returns ``False`` and :meth:`existing_ids` leaves them out of its answer.
    """

    #: short backend name shown in ``/stats`` (``pgvector``, ``milvus``, ``manticore``)
    backend_name: str = ""
    #: the collection this handler reads and writes (:data:`DEFAULT_COLLECTION` unless re-indexed)
    collection_name: str = DEFAULT_COLLECTION

    @abstractmethod
    def ensure_collection(self, model_id: str, dim: int) -> CollectionInfo:
        """Create the collection for ``model_id``/``dim`` if missing, else check it matches.

        Raises :class:`app.errors.CollectionMismatchError` when the stored collection was built with another
        model id or dimension. Idempotent.
        """

    @abstractmethod
    def collection_info(self) -> CollectionInfo | None:
        """The stored model id and dimension, or ``None`` before :meth:`ensure_collection` ran."""

    @abstractmethod
    def upsert(self, records: Sequence[ImageRecord]) -> None:
        """Insert or replace a batch of records in one round trip where the backend allows.

        Every ``record.vector`` must be ``(D,)`` float32 with the collection's ``D`` and every ``record.id`` a valid
        image id (:func:`app.ids.is_valid_image_id`); raises ``ValueError`` otherwise, before writing any record of
        the batch. Upserting the same id twice leaves one row (idempotent).
        """

    @abstractmethod
    def search(
        self, vector: np.ndarray, top_k: int, filters: SearchFilter | None = None, *, ef_search: int | None = None
    ) -> list[SearchHit]:
        """The ``top_k`` nearest stored vectors to ``vector`` (``(D,)`` float32), best first.

        Approximate (HNSW) where the backend has an index; scores are cosine similarity. With ``filters`` (not
        empty), only images that :meth:`SearchFilter.matches` are returned, and still ``top_k`` of them whenever
        at least ``top_k`` match (the filter is applied inside the index scan, not to a fixed candidate list).
        ``ef_search``: the HNSW beam width for this query instead of the handler's (``HNSW_EF_SEARCH``), still at
        least ``top_k``; a batch job that needs fewer neighbours than a user search trades a little recall for
        speed with it (``NEIGHBOURS_EF_SEARCH``).
        """

    @abstractmethod
    def get(self, image_id: str) -> ImageRecord | None:
        """The record with this id (vector included), or ``None`` (also for a malformed id)."""

    @abstractmethod
    def existing_ids(self, ids: Iterable[str]) -> set[str]:
        """The subset of ``ids`` that are stored (one query for the whole batch); malformed ids are left out."""

    @abstractmethod
    def scan(self, batch_size: int = 1000) -> Iterator[list[ImageRecord]]:
        """Every stored record exactly once, vectors included, in batches of at most ``batch_size``.

        Keyset pages on a key the backend keeps ordered and exact at any size: the image id on pgvector and Milvus,
        the numeric document id on Manticore (so the order of records differs between backends; callers must not
        rely on it). Milvus and Manticore check that the engine returned their pages in key order and raise
        :class:`app.errors.DatabaseUnavailableError` rather than skip rows. Used to migrate between backends; the
        contract suite checks completeness at 50,000 rows. Raises ``ValueError`` for ``batch_size < 1``.
        """

    @abstractmethod
    def delete(self, image_id: str) -> bool:
        """Delete one record; ``True`` if it existed (``False`` for a malformed id)."""

    @abstractmethod
    def count(self) -> int:
        """Number of stored records."""

    @abstractmethod
    def health(self) -> bool:
        """``True`` when the database answers a trivial query; never raises."""

    @abstractmethod
    def close(self) -> None:
        """Release connections (and stop an embedded server this handler started). Idempotent."""

    # --- several collections in one database (scripts/reindex.py) -----------------------------------------------
    # A database may hold several collections (one per model); one of them is the *active* one, which a handler
    # built without a collection name opens (the service, every CLI). The pointer to it is switched in one atomic
    # write, so a reader sees either the old or the new collection, never a mixture.

    def active_collection(self) -> str:
        """Name of the database's active collection (:data:`DEFAULT_COLLECTION` while no switch was made)."""
        raise NotImplementedError(f"{type(self).__name__} holds one collection only")

    def open_collection(self, name: str) -> VectorDBHandler:
        """Another handler on the same database for collection ``name`` (``ensure_collection`` creates it).

        It shares this handler's server (an embedded PostgreSQL or Milvus Lite stays owned by this handler): close
        it before this one. Raises ``ValueError`` for an invalid name (:func:`validate_collection_name`).
        """
        raise NotImplementedError(f"{type(self).__name__} holds one collection only")

    def activate_collection(self, name: str) -> None:
        """Make ``name`` the active collection in one atomic step; handlers built afterwards open it, handlers
        already open keep theirs. Raises ``ValueError`` when ``name`` holds no collection (never ensured)."""
        raise NotImplementedError(f"{type(self).__name__} holds one collection only")

    def list_collections(self) -> dict[str, CollectionInfo]:
        """Every collection of the database that this service created, by name, with its model and dimension."""
        raise NotImplementedError(f"{type(self).__name__} holds one collection only")

    def drop_collection(self, name: str) -> bool:
        """Delete collection ``name`` and everything in it; ``False`` if there was none. The originals in the image
        store are shared by every collection and stay. Raises ``ValueError`` for the active collection."""
        raise NotImplementedError(f"{type(self).__name__} holds one collection only")
