"""Manticore Search backend of :class:`~app.vectordb.base.VectorDBHandler`, over the MySQL protocol (``pymysql``).

This module holds the handler and its connection pool; the table layout, document ids, the SQL it sends and why
that SQL is safe, and the decoding of rows are in :mod:`app.vectordb.manticore_sql`.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pymysql
import pymysql.err

from app.errors import CollectionMismatchError, DatabaseTimeoutError, DatabaseUnavailableError
from app.ids import is_valid_image_id
from app.vectordb.base import (
    DEFAULT_COLLECTION,
    CollectionInfo,
    ImageRecord,
    SearchFilter,
    SearchHit,
    VectorDBHandler,
    validate_collection_name,
)
from app.vectordb.manticore_sql import (
    ACTIVE_TABLE,
    FILTER_RETRY_FACTOR,
    IN_BATCH,
    MAX_DIM,
    MAX_TOP_K,
    META_SUFFIX,
    REQUIRED_COLUMNS,
    TAKEN_COLUMNS,
    UPSERT_BATCH,
    DocumentIdCollisionError,
    add_column_sql,
    checked_int,
    clean_text,
    count_sql,
    create_active_table_sql,
    create_meta_table_sql,
    create_table_sql,
    delete_sql,
    describe_sql,
    doc_id_for,
    drop_table_sql,
    get_sql,
    insert_meta_sql,
    knn_search_sql,
    lookup_doc_ids_sql,
    meta_table_name,
    metadata_from_row,
    record_from_row,
    replace_active_sql,
    replace_sql,
    scan_sql,
    select_active_sql,
    select_meta_sql,
    show_create_table_sql,
    show_meta_tables_sql,
    show_tables_sql,
    text,
    validate_image_id,
    validate_table_name,
)

__all__ = ["DocumentIdCollisionError", "ManticoreHandler"]

log = logging.getLogger(__name__)

# pymysql client-side error codes that mean the connection itself failed (not the statement).
_CONNECTION_ERROR_CODES = frozenset({2002, 2003, 2005, 2006, 2012, 2013, 2014, 2055})
#: upserts of more rows than this (bulk indexing, scripts/migrate.py) are long operations: a connection of their own
#: with the long read/write timeout; a request indexes a few images
REQUEST_UPSERT_ROWS = 64


def _is_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a socket read/write timeout: the server did not answer in time."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, TimeoutError) or "timed out" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, (pymysql.err.InterfaceError, OSError)):
        return True
    return isinstance(exc, pymysql.err.OperationalError) and bool(exc.args) and exc.args[0] in _CONNECTION_ERROR_CODES


class ManticoreHandler(VectorDBHandler):
    """Images in a Manticore Search real-time table with an HNSW COSINE ``float_vector``; see the module docstring.

    Args:
        host, port: Manticore's MySQL-protocol listener (``searchd`` default 9306).
        table: images table name (``^[a-z_][a-z0-9_]{0,62}$``); ``<table>_meta`` holds the model id and dimension.
            ``None``: the active collection's (``image_search_active``, else ``images``), read once, here.
        hnsw_m, hnsw_ef_construction: HNSW build parameters written into the table definition (pgvector-like
            defaults 16 and 64; Manticore's own default ef_construction is 200).
        ef_search: HNSW query beam width; each query uses ``max(ef_search, top_k)``.
        timeout_s: seconds to connect; the long operations' reads and writes (creating and switching tables,
            scans, upserts of over :data:`REQUEST_UPSERT_ROWS` rows), each on a connection of its own, may take
            ``max(60, 6 * timeout_s)`` seconds.
        request_timeout_s: deadline, seconds, of a request's statements (search, get, exists, count, small upserts,
            delete, the health probe): the read/write timeout of the pooled connections (the handler sets no
            server-side query limit, so there is no server cancel to wait for). ``None`` or 0: the long timeout.
            A statement cut by it raises :class:`DatabaseTimeoutError` (HTTP 503; a write's outcome is then unknown)
            and is not retried.
        max_idle: connections kept open for reuse; more are opened on demand and closed after use.

    Thread-safe: a lock-protected pool of idle connections; a connection that failed is dropped, and a stale pooled
    one is retried once on a fresh connection. Raises :class:`DatabaseUnavailableError` when Manticore cannot be
    reached (also from the constructor, which reads the collection's bookkeeping).
    """

    backend_name = "manticore"

    def __init__(
        self,
        host: str,
        port: int = 9306,
        *,
        table: str | None = None,
        hnsw_m: int = 16,
        hnsw_ef_construction: int = 64,
        ef_search: int = 40,
        timeout_s: float = 10.0,
        request_timeout_s: float | None = None,
        max_idle: int = 4,
    ) -> None:
        self._host = str(host)
        self._port = checked_int(port, "port", 1, 65535)
        self._table = validate_table_name(DEFAULT_COLLECTION if table is None else table)
        self._hnsw_m = checked_int(hnsw_m, "hnsw_m", 2, 1000)
        self._hnsw_ef_construction = checked_int(hnsw_ef_construction, "hnsw_ef_construction", 1, 100_000)
        self._ef_search = checked_int(ef_search, "ef_search", 1, 10_000_000)
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self._timeout_s = float(timeout_s)
        self._request_timeout_s = float(request_timeout_s or 0) or None
        self._long_io_s = max(60.0, 6 * self._timeout_s)
        #: read/write timeout, seconds, of the pooled (request) connections
        self._request_io_s = self._request_timeout_s or self._long_io_s
        self._max_idle = max(0, int(max_idle))
        self._idle: list[pymysql.connections.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._dim: int | None = None
        # Whether the table has the taken_at columns (see manticore_sql): None until checked, on first use.
        self._taken: bool | None = None
        if table is None:
            self._table = self._run(self._read_active)
        self._meta = meta_table_name(self._table)
        validate_table_name(self._meta)
        self.collection_name = self._table
        info = self.collection_info()
        self._dim = info.dim if info else None

    @classmethod
    def from_settings(cls, settings) -> ManticoreHandler:
        """Build from :class:`app.config.Settings` (``MANTICORE_HOST``/``MANTICORE_PORT``, ``HNSW_*``,
        ``DB_CONNECT_TIMEOUT_S``, ``DB_STATEMENT_TIMEOUT_S``)."""
        return cls(
            settings.manticore_host,
            settings.manticore_port,
            hnsw_m=settings.hnsw_m,
            hnsw_ef_construction=settings.hnsw_ef_construction,
            ef_search=settings.hnsw_ef_search,
            timeout_s=settings.db_connect_timeout_s,
            request_timeout_s=settings.db_statement_timeout_s,
        )

    # --- connections ----------------------------------------------------------------------------------------------
    def _connect(self, io_timeout_s: float | None = None) -> pymysql.connections.Connection:
        """A new connection whose reads and writes time out after ``io_timeout_s`` (default: a request's)."""
        io_s = self._request_io_s if io_timeout_s is None else io_timeout_s
        try:
            return pymysql.connect(
                host=self._host,
                port=self._port,
                connect_timeout=min(self._timeout_s, io_s),
                read_timeout=io_s,
                write_timeout=io_s,
                autocommit=True,
                charset="utf8mb4",
            )
        except (pymysql.err.Error, OSError) as exc:
            raise DatabaseUnavailableError(
                f"Cannot reach Manticore Search at {self._host}:{self._port} within {self._timeout_s:g} s "
                f"(MANTICORE_HOST/MANTICORE_PORT): {exc}"
            ) from exc

    def _acquire(self) -> tuple[pymysql.connections.Connection, bool]:
        with self._lock:
            if self._closed:
                raise DatabaseUnavailableError("The Manticore handler is closed.")
            if self._idle:
                return self._idle.pop(), True
        return self._connect(), False

    def _release(self, conn) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        self._discard(conn)

    @staticmethod
    def _discard(conn) -> None:
        try:
            conn.close()
        except Exception:  # already broken; nothing to release
            pass

    def _run(self, fn, *, retry: bool = True, long: bool = False):
        """Run ``fn(cursor)`` on a pooled connection; connection failures become DatabaseUnavailableError.

        ``long``: a long operation, on a connection of its own with the long read/write timeout (closed after);
        otherwise a pooled request connection, whose reads and writes time out after ``request_timeout_s``: a timeout
        raises :class:`DatabaseTimeoutError`, never retried. A pooled connection may have gone stale (server
        restart, idle timeout): then, if ``retry``, the call runs once more on a fresh connection. Statements
        Manticore rejects also raise DatabaseUnavailableError (the request failed), with Manticore's message.
        """
        for attempt in (0, 1):
            if long:
                with self._lock:
                    if self._closed:
                        raise DatabaseUnavailableError("The Manticore handler is closed.")
                conn, pooled = self._connect(self._long_io_s), False
            else:
                conn, pooled = self._acquire()
            try:
                with conn.cursor() as cur:
                    result = fn(cur)
            except (pymysql.err.Error, OSError) as exc:
                if _is_connection_error(exc):
                    self._discard(conn)
                    if _is_timeout(exc):
                        raise DatabaseTimeoutError(
                            f"Manticore Search at {self._host}:{self._port} did not answer within "
                            f"{self._long_io_s if long else self._request_io_s:g} s: {exc}"
                        ) from exc
                    if pooled and retry and attempt == 0:
                        continue
                    raise DatabaseUnavailableError(
                        f"Lost the connection to Manticore Search at {self._host}:{self._port}: {exc}"
                    ) from exc
                if long:
                    self._discard(conn)
                else:
                    self._release(conn)
                raise DatabaseUnavailableError(f"Manticore Search rejected the request: {exc}") from exc
            except BaseException:
                if long:
                    self._discard(conn)
                else:
                    self._release(conn)  # our own exception (mismatch, ValueError): the connection is fine
                raise
            if long:
                self._discard(conn)
            else:
                self._release(conn)
            return result
        raise AssertionError("unreachable")

    # --- collection -----------------------------------------------------------------------------------------------
    @staticmethod
    def _table_exists(cur, name: str) -> bool:
        cur.execute(*show_tables_sql(name))
        return any(text(row[0]) == name for row in cur.fetchall())

    def _read_meta(self, cur) -> CollectionInfo | None:
        if not self._table_exists(cur, self._meta):
            return None
        cur.execute(select_meta_sql(self._table))
        row = cur.fetchone()
        return CollectionInfo(text(row[0]), int(row[1])) if row else None

    def collection_info(self) -> CollectionInfo | None:
        return self._run(self._read_meta)

    def ensure_collection(self, model_id: str, dim: int) -> CollectionInfo:
        dim = checked_int(dim, "dim", 1, MAX_DIM)
        if not isinstance(model_id, str) or not model_id:
            raise ValueError("model_id must be a non-empty string")
        wanted = CollectionInfo(clean_text(model_id), dim)

        def _ensure(cur) -> CollectionInfo:
            cur.execute(create_meta_table_sql(self._table))
            stored = self._read_meta(cur)
            if stored is None:
                # INSERT, not REPLACE: if two processes race, the second INSERT fails on the duplicate id and
                # re-reads the winner's row instead of overwriting it (Manticore has no advisory locks).
                try:
                    cur.execute(*insert_meta_sql(self._table, wanted.model_id, dim))
                    log.info("Creating Manticore table %s for %s (dim %d)", self._table, wanted.model_id, dim)
                except pymysql.err.Error as exc:
                    if _is_connection_error(exc):
                        raise
                    stored = self._read_meta(cur)
                    if stored is None:
                        raise
            if stored is not None and (stored.model_id, stored.dim) != (wanted.model_id, dim):
                raise CollectionMismatchError(stored.model_id, stored.dim, wanted.model_id, dim)
            cur.execute(create_table_sql(self._table, dim, self._hnsw_m, self._hnsw_ef_construction))
            self._check_table(cur, wanted)
            self._taken = self._add_taken_columns(cur)
            return wanted

        info = self._run(_ensure, long=True)
        self._dim = info.dim
        return info

    def _check_table(self, cur, wanted: CollectionInfo) -> None:
        """Refuse an existing ``table`` that is not ours or was built for another dimension."""
        cur.execute(describe_sql(self._table))
        fields = {text(row[0]) for row in cur.fetchall()}
        missing = [c for c in REQUIRED_COLUMNS if c not in fields]
        if missing:
            raise RuntimeError(f"Manticore table {self._table!r} exists but lacks columns {missing}")
        cur.execute(show_create_table_sql(self._table))
        row = cur.fetchone()
        found = re.search(r"knn_dims='(\d+)'", text(row[-1])) if row else None
        if found and int(found.group(1)) != wanted.dim:
            raise CollectionMismatchError(wanted.model_id, int(found.group(1)), wanted.model_id, wanted.dim)

    def _add_taken_columns(self, cur) -> bool:
        """Add the ``taken_at`` columns to a table created before them; ``True`` when the table has them.

        Another process may add them at the same time: a refused ALTER is followed by a second look. If the engine
        refuses them for good, the handler keeps working without (``taken_at`` not stored) and says so once.
        """

        def columns() -> set[str]:
            cur.execute(describe_sql(self._table))
            return {text(row[0]) for row in cur.fetchall()}

        present = columns()
        for column, _type in TAKEN_COLUMNS:
            if column in present:
                continue
            try:
                cur.execute(add_column_sql(self._table, column))
                log.info("Added column %s to Manticore table %s (taken_at, issue #9)", column, self._table)
            except pymysql.err.Error as exc:
                if _is_connection_error(exc):
                    raise
                present = columns()
                if column not in present:
                    log.warning(
                        "Manticore refused to add column %s to table %s (%s): taken_at is not stored there and "
                        "taken_after/taken_before filters match nothing",
                        column,
                        self._table,
                        exc,
                    )
                    return False
        return True

    def _ready(self) -> bool:
        """True once the collection exists (another process may have created it since this handler started); on
        first use also brings an older table up to date (:meth:`_add_taken_columns`)."""
        if self._dim is None:
            info = self.collection_info()
            self._dim = info.dim if info else None
        if self._dim is not None and self._taken is None:
            self._taken = self._run(self._add_taken_columns, long=True)
        return self._dim is not None

    def _require_dim(self) -> int:
        if not self._ready():
            raise RuntimeError("ensure_collection() must run before vectors are written or searched")
        return self._dim

    # --- writes ---------------------------------------------------------------------------------------------------
    def upsert(self, records: Sequence[ImageRecord]) -> None:
        if not records:
            return
        dim = self._require_dim()
        # The last record wins for a repeated id, as a second upsert would; validate everything before writing.
        latest = {validate_image_id(r.id): r for r in records}
        batches = []
        batch = list(latest.values())
        for start in range(0, len(batch), UPSERT_BATCH):
            chunk = batch[start : start + UPSERT_BATCH]
            batches.append((chunk, replace_sql(self._table, chunk, dim, taken=self._taken)))
        by_doc: dict[int, str] = {}
        for image_id in latest:
            other = by_doc.setdefault(doc_id_for(image_id), image_id)
            if other != image_id:
                raise DocumentIdCollisionError(f"images {other} and {image_id} share a Manticore document id")

        def _write(cur) -> None:
            for chunk, (sql, params) in batches:
                self._check_collisions(cur, [r.id for r in chunk])
                cur.execute(sql, params)

        self._run(_write, long=len(latest) > REQUEST_UPSERT_ROWS)

    def _check_collisions(self, cur, image_ids: Sequence[str]) -> None:
        wanted = {doc_id_for(i): i for i in image_ids}
        cur.execute(lookup_doc_ids_sql(self._table, list(wanted)))
        for doc_id, stored in cur.fetchall():
            stored = text(stored)
            if stored != wanted.get(int(doc_id), stored):
                raise DocumentIdCollisionError(
                    f"image {wanted[int(doc_id)]} would overwrite stored image {stored} (same Manticore document id)"
                )

    def delete(self, image_id: str) -> bool:
        if not is_valid_image_id(image_id) or not self._ready():  # malformed: never stored, never put into SQL
            return False

        def _delete(cur) -> bool:
            return cur.execute(*delete_sql(self._table, image_id)) > 0

        # No retry: a DELETE whose reply was lost may have happened, and a second one would then report False.
        return self._run(_delete, retry=False)

    # --- reads ----------------------------------------------------------------------------------------------------
    def search(
        self, vector: np.ndarray, top_k: int, filters: SearchFilter | None = None, *, ef_search: int | None = None
    ) -> list[SearchHit]:
        """See :meth:`VectorDBHandler.search`; filters in the same ``WHERE`` as ``knn()`` (module docstring of
        :mod:`app.vectordb.manticore_sql`): with fewer than ``top_k`` rows back, once more with a larger ``k``/``ef``
        for engines that filter after the KNN step."""
        dim = self._require_dim()
        top_k = checked_int(top_k, "top_k", 1, MAX_TOP_K)
        filters = None if filters is None or filters.empty else filters
        ef = max(self._ef_search if ef_search is None else int(ef_search), top_k)
        query = knn_search_sql(self._table, vector, top_k, ef, dim, filters, taken=self._taken)
        if query is None:
            return []  # nothing can match (a taken_* filter on a table without the taken columns)
        rows = self._run(lambda cur: self._fetch(cur, query))
        if filters is not None and len(rows) < top_k:
            k = min(MAX_TOP_K, top_k * FILTER_RETRY_FACTOR)
            retry = knn_search_sql(self._table, vector, k, max(ef, k), dim, filters, limit=top_k, taken=self._taken)
            rows = self._run(lambda cur: self._fetch(cur, retry))
        rows = sorted(rows, key=lambda r: float(r[-1]))  # by distance (the last column); the engine already does
        # Columns: id, image_id, the metadata columns, [path_ok with a path filter], distance.
        end = -2 if filters is not None and filters.path_prefix is not None else -1
        return [SearchHit(text(r[1]), 1.0 - float(r[-1]), metadata_from_row(r[2:end])) for r in rows[:top_k]]

    @staticmethod
    def _fetch(cur, query: tuple[str, tuple]) -> list:
        cur.execute(*query)
        return cur.fetchall()

    def get(self, image_id: str) -> ImageRecord | None:
        if not is_valid_image_id(image_id) or not self._ready():  # malformed: never stored, never put into SQL
            return None

        def _get(cur):
            cur.execute(*get_sql(self._table, image_id, taken=self._taken))
            return cur.fetchall()

        rows = [r for r in self._run(_get) if text(r[1]) == image_id]
        return record_from_row(rows[0], self._dim) if rows else None

    def existing_ids(self, ids: Iterable[str]) -> set[str]:
        wanted = {i for i in ids if is_valid_image_id(i)}  # malformed ids are never stored: dropped
        if not wanted or not self._ready():
            return set()
        by_doc = {doc_id_for(i): i for i in wanted}
        doc_ids = sorted(by_doc)

        def _existing(cur) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(doc_ids), IN_BATCH):
                cur.execute(lookup_doc_ids_sql(self._table, doc_ids[start : start + IN_BATCH]))
                for doc_id, stored in cur.fetchall():
                    if by_doc.get(int(doc_id)) == text(stored):  # a collision is not a match
                        found.add(text(stored))
            return found

        return self._run(_existing)

    def scan(self, batch_size: int = 1000) -> Iterator[list[ImageRecord]]:
        """Every record, in batches of at most ``batch_size``, ordered by Manticore document id (not image id).

        Keyset pages on the numeric document id (``WHERE id > last ORDER BY id ASC``): a real Manticore engine gave
        wrong results for string range filters (``image_id > '...'``) on disk chunks, and a scan paged that way
        returned 18,282 of 200,000 rows (issue #12), while filters on the document id stay exact; this scan was
        verified complete at 200,000 rows on a real Manticore 29.0.2 engine, the release pinned in
        docker-compose.yml (issue #27). A page
        whose ids do not increase raises :class:`DatabaseUnavailableError` rather than skipping rows silently.
        """
        batch_size = checked_int(batch_size, "batch_size", 1, 100_000)
        if not self._ready():
            return
        last = 0  # document ids are >= 1
        while True:

            def _page(cur, after: int = last):
                cur.execute(scan_sql(self._table, after, batch_size, taken=self._taken))
                return cur.fetchall()

            rows = self._run(_page, long=True)
            if not rows:
                return
            doc_ids = [int(r[0]) for r in rows]
            if doc_ids[0] <= last or any(a >= b for a, b in zip(doc_ids, doc_ids[1:], strict=False)):
                raise DatabaseUnavailableError("Manticore returned scan pages out of document-id order")
            yield [record_from_row(r, self._dim) for r in rows]
            last = doc_ids[-1]
            if len(rows) < batch_size:
                return

    def count(self) -> int:
        if not self._ready():
            return 0

        def _count(cur) -> int:
            cur.execute(count_sql(self._table))
            row = cur.fetchone()
            return int(row[0]) if row else 0

        return self._run(_count)

    def health(self) -> bool:
        try:
            self._run(lambda cur: self._table_exists(cur, self._meta))
            return True
        except Exception:  # health must report, never raise
            return False

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            self._discard(conn)

    # --- several collections (see manticore_sql: image_search_active) ------------------------------------------
    def _read_active(self, cur) -> str:
        if not self._table_exists(cur, ACTIVE_TABLE):
            return DEFAULT_COLLECTION
        cur.execute(select_active_sql())
        row = cur.fetchone()
        return text(row[0]) if row else DEFAULT_COLLECTION

    def active_collection(self) -> str:
        return self._run(self._read_active)

    def open_collection(self, name: str) -> ManticoreHandler:
        return ManticoreHandler(
            self._host,
            self._port,
            table=validate_collection_name(name),
            hnsw_m=self._hnsw_m,
            hnsw_ef_construction=self._hnsw_ef_construction,
            ef_search=self._ef_search,
            timeout_s=self._timeout_s,
            request_timeout_s=self._request_timeout_s,
            max_idle=self._max_idle,
        )

    def _info_of(self, cur, table: str) -> CollectionInfo | None:
        if not self._table_exists(cur, meta_table_name(table)):
            return None
        cur.execute(select_meta_sql(table))
        row = cur.fetchone()
        return CollectionInfo(text(row[0]), int(row[1])) if row else None

    def activate_collection(self, name: str) -> None:
        validate_collection_name(name)

        def _switch(cur) -> None:
            if self._info_of(cur, name) is None:
                raise ValueError(f"there is no collection {name!r} to switch to")
            cur.execute(create_active_table_sql())
            cur.execute(*replace_active_sql(name))

        self._run(_switch, long=True)

    def list_collections(self) -> dict[str, CollectionInfo]:
        def _list(cur) -> dict[str, CollectionInfo]:
            cur.execute(*show_meta_tables_sql())
            names = {text(r[0]) for r in cur.fetchall()}
            found = {}
            for meta in sorted(names):
                table = meta[: -len(META_SUFFIX)]
                if not meta.endswith(META_SUFFIX) or not self._table_exists(cur, table):
                    continue
                info = self._info_of(cur, table)
                if info is not None:
                    found[table] = info
            return found

        return self._run(_list, long=True)

    def drop_collection(self, name: str) -> bool:
        validate_collection_name(name)

        def _drop(cur) -> bool:
            if self._read_active(cur) == name:
                raise ValueError(f"{name!r} is the active collection; switch to another one before dropping it")
            existed = self._info_of(cur, name) is not None
            cur.execute(drop_table_sql(name))
            cur.execute(drop_table_sql(meta_table_name(name)))
            return existed

        return self._run(_drop, long=True)
