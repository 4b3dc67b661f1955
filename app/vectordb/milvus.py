"""Milvus backend of :class:`~app.vectordb.base.VectorDBHandler`, through ``pymilvus.MilvusClient``.

Two deployments behind one class, chosen by the URI:

* ``http://host:19530`` (or ``https://``, ``tcp://``, ``unix:``): Milvus standalone or distributed (or Zilliz
  Cloud, with ``token``). The collection gets an HNSW index (metric ``COSINE``, ``M``/``efConstruction`` from the
  settings) and queries pass ``ef = max(ef_search, top_k)``.
* anything else is a local path: embedded **Milvus Lite** (``milvus-lite`` 3.x, pure Python, no server to run).
  The "file" is in fact a directory (WAL, Parquet segments, FAISS index files, a ``LOCK`` file); its parent
  directory is created if missing. Databases written by the older C++ milvus-lite 2.x are not readable by 3.x.

Schema of the collection (``images`` by default): ``id`` VARCHAR(64) primary key (the image's SHA-256 hex),
``embedding`` FLOAT_VECTOR(D), ``filename`` VARCHAR(4096) (Milvus counts ``max_length`` in UTF-8 bytes: the
service's 1024-character names need up to 4096), ``format`` VARCHAR(64), ``width``/``height`` INT32 (pixels),
``bytes`` INT64, ``indexed_at`` INT64 (microseconds since the Unix epoch, UTC; returned as a timezone-aware UTC
``datetime``), ``taken_at`` INT64 **nullable** (the same unit; null when the image has no EXIF time). No dynamic
fields. Which model filled the collection is stored in the collection's properties (``image_search.model_id``; also
in its description as JSON, for servers that drop unknown properties); the dimension is read from the vector field
itself, so it cannot disagree with the data.

``taken_at`` and collections created before it (issue #9): Milvus Lite 3.2 has nullable scalar fields (null fails
every comparison, as SQL's NULL) but cannot add a field to an existing collection (its gRPC server has no
``AddCollectionField``; Milvus servers can since 2.6, which this handler does not try: no server to test it against
here). So a collection created before ``taken_at`` keeps its schema: it opens, reads and writes as before,
``taken_at`` is not stored there (``get``/``scan``/``search`` return ``None``, a ``taken_after``/``taken_before``
filter matches nothing), and the handler logs a warning once. To get ``taken_at`` into such a collection, copy it
into a new one (``scripts/migrate.py``, which creates the field) and fill the times from the originals
(``scripts/fsck.py --backfill``). New collections get the nullable field.

Filters (:class:`~app.vectordb.base.SearchFilter`) become a boolean expression (:func:`filter_expr`) passed as
``filter=`` to the search, which Milvus applies inside the index search (Lite: a FAISS ``IDSelector`` over the rows
that pass). The path prefix is a string *range*, ``filename >= "p" and filename < "p0"`` for a folder ``p/``
(every string that starts with ``p/`` sorts in it, and nothing else: ``/`` + 1 is ``0``), not ``like "p/%"``:
Milvus Lite's row-wise evaluator treats ``\\%`` in a ``like`` pattern as a wildcard (escapes are "deferred" in
``milvus_lite/search/filter/eval/python_backend.py``) while its Arrow evaluator honours it, so a folder named
``50%_off`` could not be matched literally everywhere; a range has no wildcards to escape. String literals are
double-quoted with ``\\``, ``"``, newline, carriage return and tab escaped (:func:`quote`), the only escapes
Milvus Lite's lexer knows, so a value can never end its literal early. On Milvus Lite a filtered search uses
``ef * LITE_FILTER_EF_FACTOR``: its FAISS HNSW walks about ``ef`` candidates of all rows and keeps the matching
ones, so a selective filter with the ordinary ``ef`` returned ``top_k`` rows but the wrong ones (see
:meth:`MilvusHandler.search`). On every deployment, a filtered search that returned fewer than ``top_k`` rows
searches again with a wider ``ef`` until that finds no more.

Scores: Milvus' ``COSINE`` metric returns the cosine similarity itself in ``distance`` (higher is better), which
is what :class:`~app.vectordb.base.SearchHit` wants, unchanged.

Several collections per database (``scripts/reindex.py``): the active collection is the target of the alias
``image_search_active`` (none: ``images``), resolved once when a handler is built without a collection name and
switched with ``alter_alias``, one atomic step (Milvus Lite 3.2 rewrites its ``aliases.json`` with a temporary file
and a rename, checked against the installed ``milvus_lite/db.py``).

Consistency: the collection is created with consistency level ``Strong`` and every read asks for ``Strong`` too,
so a read sees every write acknowledged before it (the service upserts and immediately counts, searches, gets).

What Milvus Lite (3.2) does differently, checked against the installed code:

* **Index**: Lite accepts ``HNSW`` (also ``HNSW_SQ``, ``IVF_FLAT``, ``IVF_SQ8``, ``FLAT``, ``AUTOINDEX``) and builds
  it with FAISS (``IndexHNSWFlat`` on L2-normalised vectors, inner product = cosine) **per sealed segment**, in a
  background thread after a memtable flush. Rows still in the in-memory memtable, and segments whose index is
  not built yet, are searched exactly (brute force); results are merged globally. So on Lite, small collections
  are searched exactly and large ones approximately with the same HNSW as on a server. ``ef`` is honoured.
* Lite reads index build parameters only from a JSON ``params`` entry, while pymilvus 3 sends them flattened (as
  Milvus servers expect): sent the server way, Lite silently builds with its own defaults (M=16,
  efConstruction=200). This handler therefore nests them for Lite (detected from the server version string).
  If a server refuses HNSW, the handler falls back to ``AUTOINDEX`` (COSINE) and logs at INFO what it uses.
* **One process per database**: Lite holds an exclusive ``flock`` on ``<db>/LOCK`` while open; a second process
  (a second uvicorn worker, a CLI run beside the service) gets :class:`DatabaseUnavailableError`. Use a Milvus
  server for more than one process.
* Inside one process, the handlers of one database path share one embedded Lite server; starting, sharing and
  stopping it, the write lock per database and the flush policy live in :mod:`app.vectordb.milvus_lite_server`
  (with the import-time ``MILVUS_URI`` workaround for pymilvus).
* **Search cost grows with the collection** on Lite 3.2, whatever the index: for every query its search executor
  (``milvus_lite/search/executor_indexed.py``) first loops in Python over every stored row twice (the newest copy
  of each primary key across segments, then a per-segment validity mask), before FAISS searches each segment.
  Measured with this handler (``bench/search_scale.py``): about 0.8 ms per 1,000 rows, independent of the
  dimension and of ``ef`` (see docs/backends.md for the figures and when to move to a Milvus server).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np

from app.errors import CollectionMismatchError, DatabaseTimeoutError, DatabaseUnavailableError
from app.ids import from_epoch_us, is_valid_image_id, to_epoch_us
from app.vectordb.base import (
    DEFAULT_COLLECTION,
    CollectionInfo,
    ImageMetadata,
    ImageRecord,
    SearchFilter,
    SearchHit,
    VectorDBHandler,
    checked_vector,
    validate_collection_name,
)
from app.vectordb.milvus_lite_server import (
    DataType,
    LiteServer,
    MilvusClient,
    MilvusException,
    acquire_lite,
    release_lite,
)

if TYPE_CHECKING:
    from app.config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

VECTOR_FIELD = "embedding"
_META_FIELDS = ["filename", "format", "width", "height", "bytes", "indexed_at"]
TAKEN_FIELD = "taken_at"  # nullable INT64; absent from collections created before issue #9
# Filtered searches on Milvus Lite use ef times this (see search); measured in docs/benchmarks.md, "Filtered search".
LITE_FILTER_EF_FACTOR = 16
# A filtered search that returned fewer than top_k rows searches again with ef times this, up to _MAX_EF (Milvus'
# largest HNSW ef), until a wider walk finds no more rows.
_RETRY_EF_FACTOR = 8
_MAX_EF = 32_768
_PROP_MODEL = "image_search.model_id"
_PROP_DIM = "image_search.dim"
#: the alias naming the active collection (see the module docstring)
ACTIVE_ALIAS = "image_search_active"
_FILENAME_MAX_BYTES = 4096
_FORMAT_MAX_BYTES = 64
_MAX_DIM = 32768  # Milvus' maximum FLOAT_VECTOR dimension
# Rows per `id in [...]` query: the API asks about at most 1000 ids at once, so that is one query per call.
_IDS_PER_QUERY = 1000
# Most rows per Milvus Lite scan page: past a few thousand rows a page costs more time, not fewer passes (see scan).
LITE_SCAN_PAGE_ROWS = 8192
# Vector components per Lite scan page: pymilvus returns each vector as a list of Python floats (about 32 bytes per
# component), so 2**22 components keep a page near 130 MB: 8,192 rows of 512-d, 3,276 of 1280-d.
LITE_SCAN_PAGE_FLOATS = 2**22
# Loading a large collection (reading its index into memory) can take much longer than an ordinary request.
_LOAD_TIMEOUT_S = 600.0
#: extra deadline an upsert gets per row, seconds (as pgvector's ``UPSERT_ROW_ALLOWANCE_S``): batch writes of
#: scripts/migrate.py and bulk indexing (1,000 rows: +10 s) are not cut by the request deadline.
UPSERT_ROW_ALLOWANCE_S = 0.01


def _is_deadline(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a gRPC deadline that passed: the server did not answer in time."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, grpc.FutureTimeoutError):
            return True
        if isinstance(e, grpc.RpcError) and callable(getattr(e, "code", None)):
            with contextlib.suppress(Exception):
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    return True
        text = str(getattr(e, "message", "") or e)
        if "DEADLINE_EXCEEDED" in text or "Deadline Exceeded" in text or "Retry timeout" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def _ids_filter(ids: Sequence[str]) -> str:
    """``id in ["…", …]`` for ids that passed :func:`app.ids.is_valid_image_id` (hex digits need no escaping)."""
    if not all(is_valid_image_id(i) for i in ids):  # a programming error: callers drop invalid ids first
        raise ValueError("only validated ids may be put into a filter expression")
    return "id in [" + ", ".join(f'"{i}"' for i in ids) + "]"


def quote(value: str) -> str:
    """``value`` as a double-quoted Milvus expression string literal.

    Escapes ``\\``, ``"``, newline, carriage return and tab (Milvus Lite's lexer rejects a raw newline and knows
    no other escapes; a Milvus server reads the same escapes), so the literal always ends where it should.
    """
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + escaped.replace("\t", "\\t") + '"'


def filter_expr(filters: SearchFilter, *, has_taken_at: bool = True) -> str | None:
    """The Milvus boolean expression meaning :meth:`SearchFilter.matches`; ``""`` for an empty filter.

    ``None`` when nothing can match: a ``taken_*`` filter on a collection without the ``taken_at`` field
    (``has_taken_at=False``, see the module docstring). Strings go through :func:`quote`, numbers are ``int``.
    Formats compare exactly with ``format in [...]`` (Milvus expressions have no ``upper()``): the service stores the
    decoder's upper-case names, which is what :meth:`SearchFilter.create` normalises the filter to.
    """
    parts: list[str] = []
    if filters.path_prefix is not None:
        prefix = filters.path_prefix  # ends in "/" (SearchFilter.create): its successor ends in "0"
        parts.append(f"filename >= {quote(prefix)} and filename < {quote(prefix[:-1] + chr(ord(prefix[-1]) + 1))}")
    if filters.formats is not None:
        parts.append("format in [" + ", ".join(quote(f) for f in filters.formats) + "]")
    if filters.indexed_after is not None:
        parts.append(f"indexed_at >= {to_epoch_us(filters.indexed_after)}")
    if filters.indexed_before is not None:
        parts.append(f"indexed_at < {to_epoch_us(filters.indexed_before)}")
    if filters.taken_after is not None or filters.taken_before is not None:
        if not has_taken_at:
            return None
        if filters.taken_after is not None:
            parts.append(f"{TAKEN_FIELD} >= {to_epoch_us(filters.taken_after)}")
        if filters.taken_before is not None:
            parts.append(f"{TAKEN_FIELD} < {to_epoch_us(filters.taken_before)}")
    if filters.min_width is not None:
        parts.append(f"width >= {int(filters.min_width)}")
    if filters.min_height is not None:
        parts.append(f"height >= {int(filters.min_height)}")
    return " and ".join(f"({p})" for p in parts)


def _metadata(entity: dict) -> ImageMetadata:
    taken = entity.get(TAKEN_FIELD)
    return ImageMetadata(
        filename=entity["filename"],
        format=entity["format"],
        width=int(entity["width"]),
        height=int(entity["height"]),
        bytes=int(entity["bytes"]),
        indexed_at=from_epoch_us(entity["indexed_at"]),
        taken_at=None if taken is None else from_epoch_us(taken),
    )


def _record(row: dict) -> ImageRecord:
    return ImageRecord(row["id"], np.asarray(row[VECTOR_FIELD], dtype=np.float32), _metadata(row))


# --- the handler -----------------------------------------------------------------------------------------------
class MilvusHandler(VectorDBHandler):
    """Images in one Milvus collection with an HNSW cosine index (see the module docstring for Milvus Lite).

    Args:
        uri: ``http://host:19530`` for a Milvus server, or a local path for embedded Milvus Lite.
        token: Milvus credentials (``user:password`` or an API key); ignored by Milvus Lite.
        collection: collection name; ``None``: the active one (the target of :data:`ACTIVE_ALIAS`, else
            ``images``), read once, here.
        hnsw_m, hnsw_ef_construction: HNSW build parameters (graph degree and build beam width).
        ef_search: HNSW query beam width; each query uses ``max(ef_search, top_k)`` because HNSW returns at most
            ``ef`` results.
        timeout_s: seconds to connect, and per call of the long operations (creating collections and indexes,
            listing, switching and dropping collections, a server's scan pages, an explicit flush) before
            :class:`DatabaseUnavailableError`.
        request_timeout_s: deadline, seconds, of each call a request makes (search, get, exists, count, upsert,
            delete, the health probe, a flush on a request's path); ``None`` or 0: ``timeout_s``. It is the gRPC
            deadline itself (upserts: plus ``UPSERT_ROW_ALLOWANCE_S`` per row): Milvus has no statement timeout of
            its own to wait for, unlike pgvector, whose client waits 0.5 s longer than the server's. A call
            cut by it raises :class:`DatabaseTimeoutError` (a :class:`DatabaseUnavailableError`, HTTP 503): a write's
            outcome is then unknown (a hung server may apply it when it resumes).

    Raises :class:`DatabaseUnavailableError` when the server cannot be reached or the Lite database cannot be
    opened (e.g. another process holds it).
    """

    backend_name = "milvus"

    def __init__(
        self,
        uri: str,
        *,
        token: str | None = None,
        collection: str | None = None,
        hnsw_m: int = 16,
        hnsw_ef_construction: int = 64,
        ef_search: int = 40,
        timeout_s: float = 10.0,
        request_timeout_s: float | None = None,
    ) -> None:
        self._collection = DEFAULT_COLLECTION if collection is None else collection  # None: resolved below
        self._uri, self._token = uri, token  # for open_collection
        self._hnsw_m = int(hnsw_m)
        self._hnsw_ef_construction = int(hnsw_ef_construction)
        self._ef_search = int(ef_search)
        self._timeout_s = float(timeout_s)
        self._request_timeout_s = float(request_timeout_s or 0) or None  # for open_collection
        #: gRPC deadline of a request's calls, seconds
        self._req_s = self._request_timeout_s or self._timeout_s
        self._dim: int | None = None
        self._has_taken_at = True  # False for a collection created before taken_at (see the module docstring)
        self._closed = False
        self._lite: LiteServer | None = None
        self._schema_lock = threading.Lock()
        self._client: MilvusClient | None = None

        if not uri.strip():
            raise ValueError("uri must be a Milvus URL or a Milvus Lite database path, got an empty string")
        if "://" in uri or uri.startswith("unix:"):  # a URL (pymilvus rejects schemes it does not know)
            client_uri, where = uri, uri
        else:
            path = os.path.abspath(os.path.expanduser(uri))
            self._lite = acquire_lite(path)
            client_uri, where, token = self._lite.uri, f"Milvus Lite database {path}", None
        self._where = where
        try:
            # dedicated: a channel of its own, closed by close(). pymilvus' shared connections are never closed and
            # are keyed by address, and a later Lite server may get the same port with other collections behind it.
            self._client = MilvusClient(uri=client_uri, token=token or "", timeout=self._timeout_s, dedicated=True)
            version = str(self._client.get_server_version(timeout=self._timeout_s))
        except BaseException as exc:
            if self._client is not None:
                with contextlib.suppress(Exception):
                    self._client.close()
            self._release_lite()
            if isinstance(exc, MilvusException):
                raise DatabaseUnavailableError(f"Cannot connect to Milvus at {where}: {exc.message}") from exc
            raise
        # A Lite server may also be reached over http (`milvus-lite server`): it matters for the index parameters.
        self._is_lite = self._lite is not None or version.startswith("milvus_lite")
        # Writes are serialised per Lite database (no concurrent writers there, see _locked); a server needs no lock.
        log.info("Connected to %s (server version %s)", where, version)
        if collection is None:
            try:
                self._collection = self._run("read the active collection", self._read_active)
            except BaseException:
                self.close()
                raise
        self.collection_name = self._collection

        # An existing collection is loaded now, so that a handler used without ensure_collection (the source of
        # scripts/migrate.py) can read it. Milvus cannot load a collection without a vector index: that one waits
        # for ensure_collection, which creates the index.
        try:
            info = self.collection_info()
            if info is not None:
                self._dim = info.dim
                self._run("load the collection", self._load_if_indexed)
        except BaseException:
            self.close()  # do not leave the client open, nor the Lite database locked
            raise

    @classmethod
    def from_settings(cls, settings: Settings) -> MilvusHandler:
        """Build from :class:`app.config.Settings`: ``MILVUS_URI`` (default ``DATA_DIR/milvus.db``, Milvus Lite),
        ``MILVUS_TOKEN``, the ``HNSW_*`` settings, ``DB_CONNECT_TIMEOUT_S`` (connecting, long operations) and
        ``DB_STATEMENT_TIMEOUT_S`` (the deadline of a request's calls)."""
        return cls(
            settings.resolved_milvus_uri,
            token=settings.milvus_token,
            hnsw_m=settings.hnsw_m,
            hnsw_ef_construction=settings.hnsw_ef_construction,
            ef_search=settings.hnsw_ef_search,
            timeout_s=settings.db_connect_timeout_s,
            request_timeout_s=settings.db_statement_timeout_s,
        )

    # --- plumbing -------------------------------------------------------------------------------------------
    def _run(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn()``, mapping Milvus and gRPC failures to :class:`DatabaseUnavailableError` (HTTP 503).

        A gRPC deadline that passed raises :class:`DatabaseTimeoutError` (the server did not answer: the outcome of
        a write is unknown).
        """
        if self._closed:
            raise DatabaseUnavailableError("The Milvus handler is closed.")
        try:
            return fn()
        except (MilvusException, grpc.RpcError, grpc.FutureTimeoutError) as exc:
            # pymilvus does not wrap every gRPC failure (e.g. a deadline hit while the channel reconnects).
            detail = exc.message if isinstance(exc, MilvusException) else str(exc)
            if _is_deadline(exc):
                raise DatabaseTimeoutError(
                    f"Milvus did not answer in time to {what} ({self._where}): {detail}"
                ) from exc
            raise DatabaseUnavailableError(f"Milvus could not {what} ({self._where}): {detail}") from exc

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the Lite write lock (a Milvus server needs none), waiting at most ``timeout_s`` seconds for it.

        Not the request deadline: embedded Lite runs in this process, so the lock is never held by a hung server,
        only by other writes (a bulk batch may take seconds), and a request waiting its turn is not a failure.
        Raises :class:`DatabaseUnavailableError` when another write holds it longer; nothing was sent then.
        """
        if self._lite is None:
            yield
            return
        lock = self._lite.write_lock
        if not lock.acquire(timeout=self._timeout_s):
            raise DatabaseUnavailableError(
                f"Milvus: another write held the lock of {self._where} for {self._timeout_s:.1f} s"
            )
        try:
            yield
        finally:
            lock.release()

    def _release_lite(self) -> None:
        if self._lite is not None:
            lite, self._lite = self._lite, None
            release_lite(lite)

    def _query(self, filter_: str, output_fields: list[str], **kwargs) -> list[dict]:
        return self._client.query(
            self._collection,
            filter=filter_,
            output_fields=output_fields,
            consistency_level="Strong",
            timeout=self._req_s,
            **kwargs,
        )

    def _load(self) -> None:
        self._client.load_collection(self._collection, timeout=max(self._timeout_s, _LOAD_TIMEOUT_S))

    def _load_if_indexed(self) -> None:
        if self._client.list_indexes(self._collection, field_name=VECTOR_FIELD, timeout=self._timeout_s):
            self._load()

    # --- collection -----------------------------------------------------------------------------------------
    def _describe(self) -> dict | None:
        if not self._client.has_collection(self._collection, timeout=self._timeout_s):
            return None
        return self._client.describe_collection(self._collection, timeout=self._timeout_s)

    @staticmethod
    def _info_from_description(desc: dict) -> CollectionInfo:
        dim = next(
            (int(f["params"]["dim"]) for f in desc.get("fields", []) if f.get("name") == VECTOR_FIELD),
            None,
        )
        props = desc.get("properties") or {}
        model_id = props.get(_PROP_MODEL)
        if model_id is None:  # servers that keep the description but not custom properties
            try:
                model_id = json.loads(desc.get("description") or "{}").get("model_id")
            except (ValueError, AttributeError):
                model_id = None
        if dim is None:
            dim = int(props.get(_PROP_DIM, 0))
        # A collection of this name that this service did not create: report it so ensure_collection refuses it.
        return CollectionInfo(model_id if model_id is not None else "<unknown: not created by this service>", dim)

    def collection_info(self) -> CollectionInfo | None:
        desc = self._run("describe the collection", self._describe)
        if desc is None:
            return None
        has_taken_at = any(f.get("name") == TAKEN_FIELD for f in desc.get("fields", []))
        if not has_taken_at and self._has_taken_at:
            log.warning(
                "Milvus collection %r was created before taken_at: it keeps working, but EXIF times are not stored "
                "there and taken_after/taken_before filters match nothing; copy it into a new collection "
                "(scripts/migrate.py) and run scripts/fsck.py --backfill to add them",
                self._collection,
            )
        self._has_taken_at = has_taken_at
        return self._info_from_description(desc)

    @property
    def _meta_fields(self) -> list[str]:
        return [*_META_FIELDS, TAKEN_FIELD] if self._has_taken_at else _META_FIELDS

    def ensure_collection(self, model_id: str, dim: int) -> CollectionInfo:
        dim = int(dim)
        if not 0 < dim <= _MAX_DIM:
            raise ValueError(f"dimension must be in 1..{_MAX_DIM}, got {dim}")
        with self._schema_lock:
            stored = self.collection_info()
            if stored is None:
                log.info("Creating Milvus collection %r for %s (dim %d)", self._collection, model_id, dim)
                try:
                    self._run("create the collection", lambda: self._create_collection(model_id, dim))
                except DatabaseUnavailableError:
                    # Another process may have created it between our check and our create: compare with that.
                    stored = self.collection_info()
                    if stored is None:
                        raise
            if stored is not None and (stored.model_id, stored.dim) != (model_id, dim):
                raise CollectionMismatchError(stored.model_id, stored.dim, model_id, dim)
            self._run("create the vector index", self._ensure_index)
            self._run("load the collection", self._load)
            self._dim = dim
        return CollectionInfo(model_id, dim)

    def _create_collection(self, model_id: str, dim: int) -> None:
        schema = MilvusClient.create_schema(
            auto_id=False,
            enable_dynamic_field=False,
            description=json.dumps({"model_id": model_id, "dim": dim}),
        )
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("filename", DataType.VARCHAR, max_length=_FILENAME_MAX_BYTES)
        schema.add_field("format", DataType.VARCHAR, max_length=_FORMAT_MAX_BYTES)
        schema.add_field("width", DataType.INT32)
        schema.add_field("height", DataType.INT32)
        schema.add_field("bytes", DataType.INT64)
        schema.add_field("indexed_at", DataType.INT64)
        schema.add_field(TAKEN_FIELD, DataType.INT64, nullable=True)
        # The index is created separately (see _ensure_index) so that a refused HNSW can fall back.
        self._client.create_collection(
            self._collection,
            schema=schema,
            consistency_level="Strong",
            properties={_PROP_MODEL: model_id, _PROP_DIM: str(dim)},
            timeout=self._timeout_s,
        )
        self._has_taken_at = True

    def _index_params(self, index_type: str):
        params: dict[str, Any] = {}
        if index_type == "HNSW":
            params = {"M": self._hnsw_m, "efConstruction": self._hnsw_ef_construction}
            if self._is_lite:
                params = {"params": params}  # see the module docstring: Lite ignores flattened build params
        index_params = self._client.prepare_index_params()
        index_params.add_index(
            field_name=VECTOR_FIELD, index_name=VECTOR_FIELD, index_type=index_type, metric_type="COSINE", params=params
        )
        return index_params

    def _ensure_index(self) -> None:
        """Create the HNSW cosine index if the vector field has none (falling back to AUTOINDEX if refused)."""
        if self._client.list_indexes(self._collection, field_name=VECTOR_FIELD, timeout=self._timeout_s):
            return
        # sync=False: pymilvus would poll the build state with 0.5 s sleeps; the collection is new (empty) here, and
        # load_collection, which follows, waits for whatever loading needs.
        try:
            self._client.create_index(self._collection, self._index_params("HNSW"), timeout=self._timeout_s, sync=False)
        except MilvusException as exc:
            log.info("Milvus refused an HNSW index (%s); using AUTOINDEX with metric COSINE instead", exc.message)
            self._client.create_index(
                self._collection, self._index_params("AUTOINDEX"), timeout=self._timeout_s, sync=False
            )
        desc = self._client.describe_index(self._collection, VECTOR_FIELD, timeout=self._timeout_s)
        log.info(
            "Milvus index on %s.%s: %s, metric %s, params %s%s",
            self._collection,
            VECTOR_FIELD,
            desc.get("index_type"),
            desc.get("metric_type"),
            desc.get("params", {k: v for k, v in desc.items() if k in ("M", "efConstruction")}),
            " (Milvus Lite: FAISS index per sealed segment, unflushed rows searched exactly)" if self._is_lite else "",
        )

    def index_description(self) -> dict:
        """What the server reports for the vector index: ``index_type``, ``metric_type``, build params."""
        return self._run(
            "describe the index",
            lambda: self._client.describe_index(self._collection, VECTOR_FIELD, timeout=self._timeout_s),
        )

    # --- writes ---------------------------------------------------------------------------------------------
    def upsert(self, records: Sequence[ImageRecord]) -> None:
        if not records:
            return
        rows = []
        # Validate the whole batch before writing anything, so a bad record leaves the collection unchanged.
        for r in records:
            if not is_valid_image_id(r.id):
                raise ValueError(f"image id must be 64 lower-case hex characters, got {r.id!r}")
            m = r.metadata
            if len(m.filename.encode()) > _FILENAME_MAX_BYTES:
                raise ValueError(f"filename longer than {_FILENAME_MAX_BYTES} UTF-8 bytes")
            if len(m.format.encode()) > _FORMAT_MAX_BYTES:
                raise ValueError(f"format longer than {_FORMAT_MAX_BYTES} UTF-8 bytes")
            row = {
                "id": r.id,
                VECTOR_FIELD: checked_vector(r.vector, self._dim),
                "filename": m.filename,
                "format": m.format,
                "width": int(m.width),
                "height": int(m.height),
                "bytes": int(m.bytes),
                "indexed_at": to_epoch_us(m.indexed_at),
            }
            if self._has_taken_at:  # an older collection has no such field (see the module docstring)
                row[TAKEN_FIELD] = None if m.taken_at is None else to_epoch_us(m.taken_at)
            rows.append(row)

        deadline_s = self._req_s + (UPSERT_ROW_ALLOWANCE_S * len(rows) if self._request_timeout_s else 0.0)

        def _write() -> None:
            with self._locked():
                self._client.upsert(self._collection, rows, timeout=deadline_s)
                if self._lite is not None and self._lite.note_write(len(rows)):
                    try:
                        self._flush_lite(self._req_s)
                    except (MilvusException, grpc.RpcError, grpc.FutureTimeoutError) as exc:
                        # The rows are written (Lite's WAL): a failed flush must not fail the upsert, whose caller
                        # would then drop the originals of stored rows. The next write or idle search flushes again.
                        log.warning("Milvus Lite flush after an upsert failed (retried later): %s", exc)

        self._run("upsert", _write)

    def _flush_lite(self, timeout_s: float) -> None:
        """Seal Lite's memtable into a segment (caller holds the write lock); Lite then builds its HNSW index."""
        self._client.flush(self._collection, timeout=timeout_s)
        self._lite.unflushed_rows = 0

    def delete(self, image_id: str) -> bool:
        if not is_valid_image_id(image_id):
            return False  # never stored (upsert refuses such ids), and never put into a filter expression
        expr = _ids_filter([image_id])

        def _delete() -> bool:
            # Milvus' delete reports the keys it was given, not the rows it removed: look first, under the lock.
            with self._locked():
                if not self._query(expr, ["id"]):
                    return False
                self._client.delete(self._collection, filter=expr, timeout=self._req_s)
                return True

        return self._run("delete", _delete)

    # --- reads ----------------------------------------------------------------------------------------------
    def search(
        self, vector: np.ndarray, top_k: int, filters: SearchFilter | None = None, *, ef_search: int | None = None
    ) -> list[SearchHit]:
        """See :meth:`VectorDBHandler.search`; filters as in the module docstring."""
        v = checked_vector(vector, self._dim)
        top_k = int(top_k)
        if top_k <= 0:
            return []
        expr = "" if filters is None else filter_expr(filters, has_taken_at=self._has_taken_at)
        if expr is None:
            return []  # nothing can match (a taken_* filter on a collection without taken_at)
        lite = self._lite
        if lite is not None and lite.idle_with_unflushed_rows():
            # Lite scans unflushed rows one by one (about 70 us per 1280-d row here) but searches sealed segments
            # through FAISS HNSW: once writes pause, seal them so searches stop paying for the scan.
            # Not waiting for a write in progress (which may hang with its server): the next search flushes.
            if lite.write_lock.acquire(blocking=False):
                try:
                    if lite.unflushed_rows:
                        self._run("flush", lambda: self._flush_lite(self._req_s))
                finally:
                    lite.write_lock.release()
        ef = max(self._ef_search if ef_search is None else int(ef_search), top_k)
        if not expr:
            return self._ann(v, top_k, ef, expr)
        # Filtered. Milvus Lite's FAISS HNSW walks about ef candidates of *all* rows and keeps the matching ones,
        # so with the ordinary ef a selective filter returns top_k rows but not the nearest ones (bench/search_scale.py,
        # 2 % of 20,000 512-d rows: recall@10 0.65 at ef 40, 0.94 at ef 160; with ef * 16 at 100,000 rows: 0.99 and
        # 1.0; docs/benchmarks.md, "Filtered search"): Lite searches with ef * LITE_FILTER_EF_FACTOR. Counting the
        # matching rows first would tell the selectivity, but Lite's filtered count materialises every matching row
        # in Python (a one-off timing here: about 1 s for 10,000 matching rows), dearer than the wider walk. A Milvus
        # server's own filtered HNSW is not measured here: it gets the ordinary ef, and the retry below.
        if self._is_lite:
            ef = min(_MAX_EF, ef * LITE_FILTER_EF_FACTOR)
        hits = self._ann(v, top_k, ef, expr)
        while len(hits) < top_k and ef < _MAX_EF:
            # Fewer than top_k: either fewer rows match, or the walk ended before it found them: walk wider.
            ef = min(_MAX_EF, ef * _RETRY_EF_FACTOR)
            wider = self._ann(v, top_k, ef, expr)
            if len(wider) <= len(hits):
                break  # nothing more to find
            hits = wider
        return hits

    def _ann(self, v: np.ndarray, top_k: int, ef: int, expr: str) -> list[SearchHit]:
        """One HNSW search with ``ef`` candidates, ``expr`` applied inside it (``""``: no filter)."""
        results = self._run(
            "search",
            lambda: self._client.search(
                self._collection,
                data=[v],
                anns_field=VECTOR_FIELD,
                filter=expr,
                limit=top_k,
                output_fields=self._meta_fields,
                search_params={"metric_type": "COSINE", "params": {"ef": ef}},
                consistency_level="Strong",
                timeout=self._req_s,
            ),
        )
        return [SearchHit(hit["id"], float(hit["distance"]), _metadata(hit["entity"])) for hit in results[0]]

    def get(self, image_id: str) -> ImageRecord | None:
        if not is_valid_image_id(image_id):
            return None
        rows = self._run("get", lambda: self._query(_ids_filter([image_id]), ["id", VECTOR_FIELD, *self._meta_fields]))
        return _record(rows[0]) if rows else None

    def existing_ids(self, ids: Iterable[str]) -> set[str]:
        wanted = sorted({i for i in ids if is_valid_image_id(i)})
        found: set[str] = set()
        for start in range(0, len(wanted), _IDS_PER_QUERY):
            chunk = wanted[start : start + _IDS_PER_QUERY]
            rows = self._run("look ids up", lambda chunk=chunk: self._query(_ids_filter(chunk), ["id"]))
            found.update(r["id"] for r in rows)
        return found

    def scan(self, batch_size: int = 1000) -> Iterator[list[ImageRecord]]:
        """Every record in batches of at most ``batch_size``, ordered by id.

        Milvus' query has no ORDER BY, but its query iterator pages with a primary-key cursor (``id > last``) and
        the server returns iterator pages in primary-key order (Milvus Lite since 3.2.x, milvus-lite#367). The
        order is checked here anyway: a violation raises :class:`DatabaseUnavailableError` rather than silently
        skipping rows.

        On Milvus Lite each page costs a pass over the whole collection (its query gathers every row, filters
        ``id > last`` and sorts the survivors by primary key in Python: ``milvus_lite/engine/collection.py``,
        ``query(order_by_pk=True)``), so a scan is quadratic in the number of pages: 200,000 rows in pages of 1,000
        took 149 s (issue #12). Lite is therefore read in pages of up to ``LITE_SCAN_PAGE_FLOATS / D`` rows (at
        most 8,192), cut into ``batch_size`` batches here, and each page may take up to ``_LOAD_TIMEOUT_S``: measured
        with 50,000 8-d rows on a loaded 2-core machine, pages of 1,000 / 4,000 / 16,384 rows read everything in
        37.7 / 14.9 / 13.4 s, but one 16,384-row page took over 10 s, the ordinary request timeout.
        """
        batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        page_size = batch_size
        if self._is_lite and self._dim:
            page_size = max(batch_size, min(LITE_SCAN_PAGE_ROWS, LITE_SCAN_PAGE_FLOATS // self._dim))
        iterator = self._run(
            "scan",
            lambda: self._client.query_iterator(
                self._collection,
                batch_size=page_size,
                filter="",
                output_fields=["id", VECTOR_FIELD, *self._meta_fields],
                consistency_level="Strong",
                timeout=max(self._timeout_s, _LOAD_TIMEOUT_S) if self._is_lite else self._timeout_s,
            ),
        )
        last = ""
        try:
            while True:
                rows = self._run("scan", iterator.next)
                if not rows:
                    return
                page = [_record(r) for r in rows]
                ids = [r.id for r in page]
                if ids[0] <= last or any(a >= b for a, b in zip(ids, ids[1:], strict=False)):
                    raise DatabaseUnavailableError("Milvus returned scan pages out of primary-key order")
                last = ids[-1]
                for start in range(0, len(page), batch_size):
                    yield page[start : start + batch_size]
        finally:
            with contextlib.suppress(Exception):
                iterator.close()

    def count(self) -> int:
        # count(*) under Strong consistency is exact; the collection statistics' row count is lazy.
        rows = self._run("count", lambda: self._query("", ["count(*)"]))
        return int(rows[0]["count(*)"])

    def health(self) -> bool:
        if self._closed:
            return False
        try:
            self._client.has_collection(self._collection, timeout=self._req_s)
            return True
        except Exception:  # health must report, never raise
            return False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._client is not None:
                self._client.close()
        except Exception:  # closing must not fail: the server may already be gone
            log.debug("Closing the Milvus client failed", exc_info=True)
        finally:
            self._release_lite()

    # --- several collections (see the module docstring) -------------------------------------------------------
    def _read_active(self) -> str:
        # list_aliases first: describe_alias of a missing alias logs an ERROR in pymilvus before it raises.
        listed = self._client.list_aliases(timeout=self._timeout_s)
        aliases = listed.get("aliases", []) if isinstance(listed, dict) else listed
        if ACTIVE_ALIAS not in aliases:
            return DEFAULT_COLLECTION
        desc = self._client.describe_alias(ACTIVE_ALIAS, timeout=self._timeout_s)
        return desc.get("collection_name") or desc["collection"]

    def active_collection(self) -> str:
        return self._run("read the active collection", self._read_active)

    def open_collection(self, name: str) -> MilvusHandler:
        return MilvusHandler(
            self._uri,
            token=self._token,
            collection=validate_collection_name(name),
            hnsw_m=self._hnsw_m,
            hnsw_ef_construction=self._hnsw_ef_construction,
            ef_search=self._ef_search,
            timeout_s=self._timeout_s,
            request_timeout_s=self._request_timeout_s,
        )

    def activate_collection(self, name: str) -> None:
        validate_collection_name(name)
        if self.list_collections().get(name) is None:
            raise ValueError(f"there is no collection {name!r} to switch to")

        def _switch() -> None:
            listed = self._client.list_aliases(timeout=self._timeout_s)
            aliases = listed.get("aliases", []) if isinstance(listed, dict) else listed
            if ACTIVE_ALIAS in aliases:
                self._client.alter_alias(name, ACTIVE_ALIAS, timeout=self._timeout_s)
            else:
                self._client.create_alias(name, ACTIVE_ALIAS, timeout=self._timeout_s)

        self._run("switch the active collection", _switch)

    def list_collections(self) -> dict[str, CollectionInfo]:
        def _list() -> dict[str, CollectionInfo]:
            found = {}
            for name in sorted(self._client.list_collections(timeout=self._timeout_s)):
                info = self._info_from_description(self._client.describe_collection(name, timeout=self._timeout_s))
                if not info.model_id.startswith("<unknown"):  # only the collections this service created
                    found[name] = info
            return found

        return self._run("list the collections", _list)

    def drop_collection(self, name: str) -> bool:
        validate_collection_name(name)
        if self.active_collection() == name:
            raise ValueError(f"{name!r} is the active collection; switch to another one before dropping it")

        def _drop() -> bool:
            if not self._client.has_collection(name, timeout=self._timeout_s):
                return False
            self._client.drop_collection(name, timeout=self._timeout_s)
            return True

        return self._run("drop the collection", _drop)
