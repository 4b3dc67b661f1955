"""Manticore Search backend of :class:`~app.vectordb.base.VectorDBHandler`, over the MySQL protocol (``pymysql``).

Layout (two real-time tables per collection):

* ``<table>`` - one document per image::

      image_id    string      SHA-256 hex of the file (the service's id; 64 lower-case hex)
      filename    string      \\
      img_format  string       |  ImageMetadata
      width       int          |  (int = 32-bit unsigned in Manticore)
      height      int          |
      size_bytes  bigint       |
      indexed_us  bigint      /   indexed_at as microseconds since the Unix epoch, UTC
      embedding   float_vector knn_type='hnsw' knn_dims='D' hnsw_similarity='COSINE' hnsw_m='M'
                               hnsw_ef_construction='EF'

  No full-text field: since Manticore 5.0.0 a real-time table does not need one ("Having at least one full-text
  field in a real-time/plain index is not mandatory anymore", Changelog), and the Data types page creates
  attribute-only tables (``create table t(id_text string)``). ``indexed_at`` is a ``bigint`` of microseconds
  rather than a ``timestamp`` because Manticore's timestamp is a 32-bit count of *seconds* (Data types,
  "Timestamps"), which would drop the microseconds the service stores and overflow in 2038 or 2106.

* ``<table>_meta`` - one document (id 1) holding ``model_id string, dim int``: which model filled the collection,
  the analogue of pgvector's ``collection_meta`` row.

Document ids. Manticore needs a non-zero 64-bit document id (shown signed over SQL, so this module keeps them in
``1 .. 2**63-1``). The id is derived from the image id: the first 8 bytes of BLAKE2b(image id bytes, person
``imgsim-docid``), masked to 63 bits, 0 mapped to 1. It is *hashed* rather than a slice of the SHA-256 itself so
that structured ids (the contract suite uses ``f"{i:064x}"``, whose first 16 hex digits are all zero) still spread
over the whole range. Two different images share a document id with probability about ``n**2 / 2**64`` for ``n``
stored images (about 3e-6 for ten million). That case is handled, never silently merged: every read checks the
``image_id`` attribute of the row it got (so a collision can never return the wrong image), and :meth:`upsert`
looks the batch's document ids up first and raises :class:`DocumentIdCollisionError` instead of overwriting
another image.

Scores. ``hnsw_similarity='COSINE'`` normalises stored and query vectors and searches Manticore's inner-product
space, whose distance is ``1 - dot`` (columnar library ``knn/knn.cpp`` maps COSINE to ``IPSpace32BitFloat_c``/
hnswlib ``InnerProductSpace``; a maintainer states "it returns 1-dot_product(v1,v2)" in manticoresearch issue
#2005). So ``knn_dist()`` is the cosine distance and the score is ``1 - knn_dist()``, cosine similarity as on every
backend. The manual's KNN_DIST() entry only says "Returns KNN vector search distance".

Query syntax, as the current manual writes it: ``WHERE knn(embedding, K, (v1,...,vD), {ef=N})``. The newest
manual calls ``k`` a compatibility parameter and says the row count should come from ``LIMIT``; both are given,
and ``LIMIT K`` is what bounds the result anyway (the manual: each disk chunk may return ``k`` rows and ``k`` does
not apply to the RAM chunk). Manuals of the 6.x series documented ef as a fourth positional argument instead
(``knn(f, k, (...), 2000)``); that form is not emitted, and the first release accepting the ``{...}`` options form
was not pinned down here. ``ef`` is ``max(ef_search, top_k)`` because HNSW returns at most ``ef`` candidates.
Results come back ordered by distance ("Documents are always sorted by their distance to the search vector");
they are re-sorted here anyway.

What SQL this module sends, and why it is safe: every string value (image ids, file names, formats, model ids) is
a ``%s`` parameter escaped by pymysql (``'`` -> ``\\'``, ``\\`` -> ``\\\\``); Manticore's SQL lexer reads quoted
strings as ``'([^'\\\\]|\\\\.|\\\\\\\\)*'`` and unescapes ``\\x`` to ``x`` (``\\n \\r \\t \\b`` to control
characters), so the escaped text always stays one literal. Two of pymysql's escapes do not round-trip through
Manticore's unescaper: ``\\0`` becomes a space and ``\\Z`` (0x1A) becomes ``Z``; :func:`clean_text` replaces NUL,
0x1A and lone surrogates by U+FFFD first so what is stored is what is read back. Everything else (table names,
dimensions, limits, ef, m, document ids, vector components) is formatted by this module from values validated
here: table names match ``^[a-z_][a-z0-9_]{0,62}$``, integers are range-checked, vector components come from a
float32 array checked with ``np.isfinite`` and are written with ``format(x, '.9g')`` (9 significant digits
round-trip float32; the lexer accepts ``1.5``, ``1e-05`` and ``1.5e-05`` forms).

Known precision limit: Manticore renders floats to SQL clients with 6 decimals (issue #140; a float_vector comes
back as ``"0.100000,0.200000"``, issue #3827), so vectors returned by :meth:`get` and :meth:`scan` are within
about 5e-7 per component of what was stored (COSINE also renormalises them on insert). Scores are unaffected.

Sources (read, not copied):
https://manual.manticoresearch.com/Searching/KNN,
https://manual.manticoresearch.com/Creating_a_table/Data_types (Document ID, String, Integer, Big Integer,
Timestamps, Float vector),
https://manual.manticoresearch.com/Data_creation_and_modification/Updating_documents/REPLACE,
https://manual.manticoresearch.com/Data_creation_and_modification/Deleting_documents,
https://manual.manticoresearch.com/Searching/Options#max_matches,
https://manual.manticoresearch.com/Searching/Filters and /Searching/Expressions#Comparison-operators,
https://manual.manticoresearch.com/Searching/Full_text_matching/Escaping,
https://manual.manticoresearch.com/Functions/Other_functions#KNN_DIST(),
https://manual.manticoresearch.com/Server_settings/Setting_variables_online (pymysql's ``SET NAMES`` is a no-op),
https://manual.manticoresearch.com/Changelog,
https://github.com/manticoresoftware/manticoresearch/issues/2005, /issues/140, /issues/3827, /pull/1900
(string ``<``/``>`` filters), and for what the manual leaves open the sources ``src/sphinxql.l`` (lexer),
``SqlUnescape`` (string unescaping), the SHOW CREATE TABLE writer (``knn_dims='D'``), and columnar ``knn/knn.cpp``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pymysql
import pymysql.converters
import pymysql.err

from app.errors import CollectionMismatchError, DatabaseUnavailableError
from app.ids import from_epoch_us, is_valid_image_id, to_epoch_us
from app.vectordb.base import CollectionInfo, ImageMetadata, ImageRecord, SearchHit, VectorDBHandler

log = logging.getLogger(__name__)

TABLE_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

#: Words Manticore's SQL lexer treats as keywords (src/sphinxql.l); a table may not be called one of these.
RESERVED_WORDS = frozenset(
    """agent all and any as asc attach attributes avg begin between bigint by call character chunk cluster collate
    collation column commit committed count create databases delete desc describe distinct div double explain facet
    false float flush for force from global group groupby group_concat having hostnames ignore in index indexes
    indexof insert integer int into is isolation kill level like logs freeze limit match max meta min mod multi
    multi64 names not null offset option optimize or order plan plugins profile ramchunk rand read regex reconfigure
    reload repeatable replace remap rollback rtindex select serializable set settings session show soname start
    status string sum sysfilters table tables threads to transaction true truncate uncommitted unfreeze update use
    values variables warnings weight where with within alter drop join import debug""".split()
)

META_SUFFIX = "_meta"
META_DOC_ID = 1
MAX_DIM = 65536  # a sanity bound; Manticore documents no limit on knn_dims
MAX_TOP_K = 100_000
DEFAULT_MAX_MATCHES = 1000  # Manticore's default per-query match buffer (Searching/Options#max_matches)
UPSERT_BATCH = 128  # rows per multi-row REPLACE: a 512-d row is ~6 KB of SQL text, far under max_packet_size
IN_BATCH = 1000  # document ids per IN (...) lookup, which also keeps it within the default max_matches

_MASK63 = (1 << 63) - 1
_UINT32_MAX = (1 << 32) - 1
_SURROGATES = re.compile("[\ud800-\udfff]")

#: Columns read back for a record (vector included) and for a search hit (no vector), in this order.
RECORD_COLUMNS = "id, image_id, filename, img_format, width, height, size_bytes, indexed_us, embedding"
HIT_COLUMNS = "id, image_id, filename, img_format, width, height, size_bytes, indexed_us"
REQUIRED_COLUMNS = ("image_id", "filename", "img_format", "width", "height", "size_bytes", "indexed_us", "embedding")

# pymysql client-side error codes that mean the connection itself failed (not the statement).
_CONNECTION_ERROR_CODES = frozenset({2002, 2003, 2005, 2006, 2012, 2013, 2014, 2055})


class DocumentIdCollisionError(RuntimeError):
    """Two different image ids map to the same Manticore document id (probability ~ n**2 / 2**64); refused."""


# --- pure helpers: validation, ids, SQL text ----------------------------------------------------------------------
def validate_table_name(name: str) -> str:
    """``name`` if it is a safe Manticore table name (``^[a-z_][a-z0-9_]{0,62}$``, not a keyword), else ValueError."""
    if not isinstance(name, str) or not TABLE_NAME_RE.match(name) or name in RESERVED_WORDS:
        raise ValueError(f"invalid Manticore table name {name!r}: need ^[a-z_][a-z0-9_]{{0,62}}$, not a keyword")
    return name


def validate_image_id(image_id: str) -> str:
    """``image_id`` if it is 64 lower-case hex digits (a SHA-256), else ValueError."""
    if not is_valid_image_id(image_id):
        raise ValueError(f"invalid image id {image_id!r}: need 64 lower-case hex digits")
    return image_id


def _checked_int(value, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {value}")
    return value


def doc_id_for(image_id: str) -> int:
    """The Manticore document id of ``image_id``: 63 bits of BLAKE2b over its 32 bytes, never 0. Deterministic."""
    digest = hashlib.blake2b(bytes.fromhex(validate_image_id(image_id)), digest_size=8, person=b"imgsim-docid")
    return (int.from_bytes(digest.digest(), "big") & _MASK63) or 1


def clean_text(value: str) -> str:
    """``value`` with NUL, 0x1A and lone surrogates replaced by U+FFFD.

    Manticore unescapes pymysql's ``\\0`` to a space and ``\\Z`` to ``Z`` and keeps strings as C strings, and lone
    surrogates (from undecodable file names) cannot be encoded as UTF-8; replacing them keeps reads equal to writes.
    """
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return _SURROGATES.sub("\ufffd", value.replace("\x00", "\ufffd").replace("\x1a", "\ufffd"))


def format_vector(vector, dim: int) -> str:
    """``(v1,...,vD)`` for a ``(dim,)`` vector: float32, all finite, non-zero; components as ``format(x, '.9g')``.

    Raises ValueError on a wrong shape, a non-finite component or a zero vector (COSINE cannot normalise it).
    """
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range float64 becomes inf, rejected just below
        v = np.asarray(vector, dtype=np.float32)
    if v.shape != (dim,):
        raise ValueError(f"vector must have shape ({dim},), got {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("vector has non-finite components (nan or inf)")
    if not np.any(v):
        raise ValueError("vector is all zeros; cosine similarity is undefined for it")
    return "(" + ",".join(format(float(x), ".9g") for x in v) + ")"


def _limit_clause(n: int) -> str:
    # LIMIT above the default max_matches (1000) silently returns fewer rows unless max_matches is raised too.
    n = _checked_int(n, "limit", 1, 10_000_000)
    return f"LIMIT {n}" + (f" OPTION max_matches={n}" if n > DEFAULT_MAX_MATCHES else "")


def meta_table_name(table: str) -> str:
    """The bookkeeping table of ``table``: ``<table>_meta``."""
    return validate_table_name(table) + META_SUFFIX


def create_table_sql(table: str, dim: int, m: int, ef_construction: int) -> str:
    """``CREATE TABLE IF NOT EXISTS`` for the images table: attributes plus an HNSW COSINE ``float_vector``."""
    table = validate_table_name(table)
    dim = _checked_int(dim, "dim", 1, MAX_DIM)
    m = _checked_int(m, "hnsw_m", 2, 1000)
    ef_construction = _checked_int(ef_construction, "hnsw_ef_construction", 1, 100_000)
    return (
        f"CREATE TABLE IF NOT EXISTS {table} ("
        "image_id string, filename string, img_format string, width int, height int, size_bytes bigint, "
        f"indexed_us bigint, embedding float_vector knn_type='hnsw' knn_dims='{dim}' hnsw_similarity='COSINE' "
        f"hnsw_m='{m}' hnsw_ef_construction='{ef_construction}')"
    )


def create_meta_table_sql(table: str) -> str:
    """``CREATE TABLE IF NOT EXISTS <table>_meta (model_id string, dim int)``."""
    return f"CREATE TABLE IF NOT EXISTS {meta_table_name(table)} (model_id string, dim int)"


def select_meta_sql(table: str) -> str:
    """The stored model id and dimension (document 1 of the meta table)."""
    return f"SELECT model_id, dim FROM {meta_table_name(table)} WHERE id = {META_DOC_ID}"


def insert_meta_sql(table: str, model_id: str, dim: int) -> tuple[str, tuple[str, ...]]:
    """``INSERT`` (not REPLACE) of document 1: it fails if another process recorded its model first."""
    dim = _checked_int(dim, "dim", 1, MAX_DIM)
    if not model_id:
        raise ValueError("model_id must be a non-empty string")
    return (
        f"INSERT INTO {meta_table_name(table)} (id, model_id, dim) VALUES ({META_DOC_ID}, %s, {dim})",
        (clean_text(model_id),),
    )


def show_tables_sql(name: str) -> tuple[str, tuple[str, ...]]:
    """``SHOW TABLES LIKE %s`` for one table name (``_`` is a LIKE wildcard: callers compare names exactly)."""
    return "SHOW TABLES LIKE %s", (validate_table_name(name),)


def describe_sql(table: str) -> str:
    return f"DESCRIBE {validate_table_name(table)}"


def show_create_table_sql(table: str) -> str:
    return f"SHOW CREATE TABLE {validate_table_name(table)}"


def replace_sql(table: str, records: Sequence[ImageRecord], dim: int) -> tuple[str, tuple[str, ...]]:
    """One multi-row ``REPLACE INTO`` for ``records`` (idempotent upsert by document id) and its string params.

    Raises ValueError for an empty batch, an invalid id, a vector that is not ``(dim,)`` finite non-zero, metadata
    out of the attribute types' range.
    """
    table = validate_table_name(table)
    if not records:
        raise ValueError("replace_sql needs at least one record")
    rows: list[str] = []
    params: list[str] = []
    for r in records:
        image_id = validate_image_id(r.id)
        md = r.metadata
        width = _checked_int(md.width, "width", 0, _UINT32_MAX)
        height = _checked_int(md.height, "height", 0, _UINT32_MAX)
        size = _checked_int(md.bytes, "bytes", 0, _MASK63)
        rows.append(
            f"({doc_id_for(image_id)}, %s, %s, %s, {width}, {height}, {size}, {to_epoch_us(md.indexed_at)}, "
            f"{format_vector(r.vector, dim)})"
        )
        params += [image_id, clean_text(md.filename), clean_text(md.format)]
    sql = (
        f"REPLACE INTO {table} (id, image_id, filename, img_format, width, height, size_bytes, indexed_us, embedding) "
        "VALUES " + ", ".join(rows)
    )
    return sql, tuple(params)


def knn_search_sql(table: str, vector, k: int, ef: int, dim: int) -> str:
    """The KNN query: ``SELECT ..., knn_dist() AS distance FROM t WHERE knn(embedding, K, (...), {ef=E}) LIMIT K``.

    Only numbers validated here go into it, so it takes no parameters.
    """
    table = validate_table_name(table)
    k = _checked_int(k, "top_k", 1, MAX_TOP_K)
    ef = _checked_int(ef, "ef", 1, 10_000_000)
    return (
        f"SELECT {HIT_COLUMNS}, knn_dist() AS distance FROM {table} "
        f"WHERE knn(embedding, {k}, {format_vector(vector, dim)}, {{ef={ef}}}) {_limit_clause(k)}"
    )


def get_sql(table: str, image_id: str) -> tuple[str, tuple[str, ...]]:
    """One record by document id *and* image id (so a document-id collision cannot return another image)."""
    return (
        f"SELECT {RECORD_COLUMNS} FROM {validate_table_name(table)} WHERE id = {doc_id_for(image_id)} "
        "AND image_id = %s",
        (image_id,),
    )


def lookup_doc_ids_sql(table: str, doc_ids: Sequence[int]) -> str:
    """``id, image_id`` of the documents among ``doc_ids`` that exist (a fast id-set lookup, no full scan)."""
    if not doc_ids:
        raise ValueError("lookup_doc_ids_sql needs at least one id")
    ids = ", ".join(str(_checked_int(d, "document id", 1, _MASK63)) for d in doc_ids)
    return f"SELECT id, image_id FROM {validate_table_name(table)} WHERE id IN ({ids}) {_limit_clause(len(doc_ids))}"


def scan_sql(table: str, after: str | None, limit: int) -> tuple[str, tuple[str, ...]]:
    """A keyset page ordered by ``image_id``: rows with ``image_id > after`` (all rows when ``after`` is None).

    String ``>`` filters exist since manticoresearch PR #1900 (2024); they compare by the collation, and for
    lower-case hex the default ``libc_ci`` order is plain byte order.
    """
    table = validate_table_name(table)
    where, params = "", ()
    if after is not None:
        where, params = "WHERE image_id > %s ", (validate_image_id(after),)
    return f"SELECT {RECORD_COLUMNS} FROM {table} {where}ORDER BY image_id ASC {_limit_clause(limit)}", params


def delete_sql(table: str, image_id: str) -> tuple[str, tuple[str, ...]]:
    """``DELETE`` of one image; Manticore reports the number of rows deleted."""
    return (
        f"DELETE FROM {validate_table_name(table)} WHERE id = {doc_id_for(image_id)} AND image_id = %s",
        (image_id,),
    )


def count_sql(table: str) -> str:
    return f"SELECT COUNT(*) FROM {validate_table_name(table)}"


def render_sql(sql: str, params: Sequence[str] = ()) -> str:
    """The statement text pymysql would send for ``cursor.execute(sql, params)`` (for logs and tests).

    Uses pymysql's own literal escaping, as ``Cursor.mogrify`` does with a server in backslash-escape mode.
    """
    if not params:
        return sql
    return sql % tuple(pymysql.converters.escape_item(p, "utf8mb4") for p in params)


# --- row decoding -------------------------------------------------------------------------------------------------
def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def parse_vector(value, dim: int) -> np.ndarray:
    """A ``(dim,)`` float32 array from Manticore's text form of a float_vector (``"0.1,0.2"``, maybe bracketed)."""
    parts = [p for p in _text(value).strip().strip("()[]").replace(" ", "").split(",") if p]
    v = np.asarray(parts, dtype=np.float64).astype(np.float32)
    if v.shape != (dim,):
        raise DatabaseUnavailableError(f"Manticore returned a vector of {v.shape[0]} values, expected {dim}")
    return v


def _metadata(row: Sequence) -> ImageMetadata:
    filename, fmt, width, height, size, indexed_us = row
    return ImageMetadata(_text(filename), _text(fmt), int(width), int(height), int(size), from_epoch_us(indexed_us))


def _record(row: Sequence, dim: int) -> ImageRecord:
    # row: RECORD_COLUMNS = id, image_id, 6 metadata columns, embedding
    return ImageRecord(_text(row[1]), parse_vector(row[8], dim), _metadata(row[2:8]))


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, (pymysql.err.InterfaceError, OSError)):
        return True
    return isinstance(exc, pymysql.err.OperationalError) and bool(exc.args) and exc.args[0] in _CONNECTION_ERROR_CODES


class ManticoreHandler(VectorDBHandler):
    """Images in a Manticore Search real-time table with an HNSW COSINE ``float_vector``; see the module docstring.

    Args:
        host, port: Manticore's MySQL-protocol listener (``searchd`` default 9306).
        table: images table name (``^[a-z_][a-z0-9_]{0,62}$``); ``<table>_meta`` holds the model id and dimension.
        hnsw_m, hnsw_ef_construction: HNSW build parameters written into the table definition (pgvector-like
            defaults 16 and 64; Manticore's own default ef_construction is 200).
        ef_search: HNSW query beam width; each query uses ``max(ef_search, top_k)``.
        timeout_s: seconds to connect; reads and writes may take ``max(60, 6 * timeout_s)`` seconds.
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
        table: str = "images",
        hnsw_m: int = 16,
        hnsw_ef_construction: int = 64,
        ef_search: int = 40,
        timeout_s: float = 10.0,
        max_idle: int = 4,
    ) -> None:
        self._host = str(host)
        self._port = _checked_int(port, "port", 1, 65535)
        self._table = validate_table_name(table)
        self._meta = meta_table_name(table)
        validate_table_name(self._meta)
        self._hnsw_m = _checked_int(hnsw_m, "hnsw_m", 2, 1000)
        self._hnsw_ef_construction = _checked_int(hnsw_ef_construction, "hnsw_ef_construction", 1, 100_000)
        self._ef_search = _checked_int(ef_search, "ef_search", 1, 10_000_000)
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self._timeout_s = float(timeout_s)
        self._max_idle = max(0, int(max_idle))
        self._idle: list[pymysql.connections.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._dim: int | None = None
        info = self.collection_info()
        self._dim = info.dim if info else None

    @classmethod
    def from_settings(cls, settings) -> ManticoreHandler:
        """Build from :class:`app.config.Settings` (``MANTICORE_HOST``/``MANTICORE_PORT``, ``HNSW_*``)."""
        return cls(
            settings.manticore_host,
            settings.manticore_port,
            hnsw_m=settings.hnsw_m,
            hnsw_ef_construction=settings.hnsw_ef_construction,
            ef_search=settings.hnsw_ef_search,
            timeout_s=settings.db_connect_timeout_s,
        )

    # --- connections ----------------------------------------------------------------------------------------------
    def _connect(self) -> pymysql.connections.Connection:
        try:
            return pymysql.connect(
                host=self._host,
                port=self._port,
                connect_timeout=self._timeout_s,
                read_timeout=max(60.0, 6 * self._timeout_s),
                write_timeout=max(60.0, 6 * self._timeout_s),
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

    def _run(self, fn, *, retry: bool = True):
        """Run ``fn(cursor)`` on a pooled connection; connection failures become DatabaseUnavailableError.

        A pooled connection may have gone stale (server restart, idle timeout): then, if ``retry``, the call runs
        once more on a fresh connection. Statements Manticore rejects also raise DatabaseUnavailableError (the
        request failed), with Manticore's message.
        """
        for attempt in (0, 1):
            conn, pooled = self._acquire()
            try:
                with conn.cursor() as cur:
                    result = fn(cur)
            except (pymysql.err.Error, OSError) as exc:
                if _is_connection_error(exc):
                    self._discard(conn)
                    if pooled and retry and attempt == 0:
                        continue
                    raise DatabaseUnavailableError(
                        f"Lost the connection to Manticore Search at {self._host}:{self._port}: {exc}"
                    ) from exc
                self._release(conn)
                raise DatabaseUnavailableError(f"Manticore Search rejected the request: {exc}") from exc
            except BaseException:
                self._release(conn)  # our own exception (mismatch, ValueError): the connection is fine
                raise
            self._release(conn)
            return result
        raise AssertionError("unreachable")

    # --- collection -----------------------------------------------------------------------------------------------
    @staticmethod
    def _table_exists(cur, name: str) -> bool:
        cur.execute(*show_tables_sql(name))
        return any(_text(row[0]) == name for row in cur.fetchall())

    def _read_meta(self, cur) -> CollectionInfo | None:
        if not self._table_exists(cur, self._meta):
            return None
        cur.execute(select_meta_sql(self._table))
        row = cur.fetchone()
        return CollectionInfo(_text(row[0]), int(row[1])) if row else None

    def collection_info(self) -> CollectionInfo | None:
        return self._run(self._read_meta)

    def ensure_collection(self, model_id: str, dim: int) -> CollectionInfo:
        dim = _checked_int(dim, "dim", 1, MAX_DIM)
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
            return wanted

        info = self._run(_ensure)
        self._dim = info.dim
        return info

    def _check_table(self, cur, wanted: CollectionInfo) -> None:
        """Refuse an existing ``table`` that is not ours or was built for another dimension."""
        cur.execute(describe_sql(self._table))
        fields = {_text(row[0]) for row in cur.fetchall()}
        missing = [c for c in REQUIRED_COLUMNS if c not in fields]
        if missing:
            raise RuntimeError(f"Manticore table {self._table!r} exists but lacks columns {missing}")
        cur.execute(show_create_table_sql(self._table))
        row = cur.fetchone()
        found = re.search(r"knn_dims='(\d+)'", _text(row[-1])) if row else None
        if found and int(found.group(1)) != wanted.dim:
            raise CollectionMismatchError(wanted.model_id, int(found.group(1)), wanted.model_id, wanted.dim)

    def _ready(self) -> bool:
        """True once the collection exists (another process may have created it since this handler started)."""
        if self._dim is None:
            info = self.collection_info()
            self._dim = info.dim if info else None
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
            batches.append((chunk, replace_sql(self._table, chunk, dim)))
        by_doc: dict[int, str] = {}
        for image_id in latest:
            other = by_doc.setdefault(doc_id_for(image_id), image_id)
            if other != image_id:
                raise DocumentIdCollisionError(f"images {other} and {image_id} share a Manticore document id")

        def _write(cur) -> None:
            for chunk, (sql, params) in batches:
                self._check_collisions(cur, [r.id for r in chunk])
                cur.execute(sql, params)

        self._run(_write)

    def _check_collisions(self, cur, image_ids: Sequence[str]) -> None:
        wanted = {doc_id_for(i): i for i in image_ids}
        cur.execute(lookup_doc_ids_sql(self._table, list(wanted)))
        for doc_id, stored in cur.fetchall():
            stored = _text(stored)
            if stored != wanted.get(int(doc_id), stored):
                raise DocumentIdCollisionError(
                    f"image {wanted[int(doc_id)]} would overwrite stored image {stored} (same Manticore document id)"
                )

    def delete(self, image_id: str) -> bool:
        validate_image_id(image_id)
        if not self._ready():
            return False

        def _delete(cur) -> bool:
            return cur.execute(*delete_sql(self._table, image_id)) > 0

        # No retry: a DELETE whose reply was lost may have happened, and a second one would then report False.
        return self._run(_delete, retry=False)

    # --- reads ----------------------------------------------------------------------------------------------------
    def search(self, vector: np.ndarray, top_k: int) -> list[SearchHit]:
        dim = self._require_dim()
        top_k = _checked_int(top_k, "top_k", 1, MAX_TOP_K)
        sql = knn_search_sql(self._table, vector, top_k, max(self._ef_search, top_k), dim)

        def _search(cur):
            cur.execute(sql)
            return cur.fetchall()

        rows = sorted(self._run(_search), key=lambda r: float(r[8]))  # by distance; the engine already does
        return [SearchHit(_text(r[1]), 1.0 - float(r[8]), _metadata(r[2:8])) for r in rows[:top_k]]

    def get(self, image_id: str) -> ImageRecord | None:
        validate_image_id(image_id)
        if not self._ready():
            return None

        def _get(cur):
            cur.execute(*get_sql(self._table, image_id))
            return cur.fetchall()

        rows = [r for r in self._run(_get) if _text(r[1]) == image_id]
        return _record(rows[0], self._dim) if rows else None

    def existing_ids(self, ids: Iterable[str]) -> set[str]:
        wanted = {validate_image_id(i) for i in ids}
        if not wanted or not self._ready():
            return set()
        by_doc = {doc_id_for(i): i for i in wanted}
        doc_ids = sorted(by_doc)

        def _existing(cur) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(doc_ids), IN_BATCH):
                cur.execute(lookup_doc_ids_sql(self._table, doc_ids[start : start + IN_BATCH]))
                for doc_id, stored in cur.fetchall():
                    if by_doc.get(int(doc_id)) == _text(stored):  # a collision is not a match
                        found.add(_text(stored))
            return found

        return self._run(_existing)

    def scan(self, batch_size: int = 1000) -> Iterator[list[ImageRecord]]:
        batch_size = _checked_int(batch_size, "batch_size", 1, 100_000)
        if not self._ready():
            return
        last: str | None = None
        while True:

            def _page(cur, after: str | None = last):
                cur.execute(*scan_sql(self._table, after, batch_size))
                return cur.fetchall()

            rows = self._run(_page)
            if not rows:
                return
            yield [_record(r, self._dim) for r in rows]
            last = _text(rows[-1][1])
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
