"""The SQL the Manticore Search backend sends, and how its rows are decoded: pure functions, no connection.

The handler and its connection pool are in :mod:`app.vectordb.manticore`.

Layout (two real-time tables per collection):

* ``<table>`` - one document per image::

      image_id    string      SHA-256 hex of the file (the service's id; 64 lower-case hex)
      filename    string      \\
      img_format  string       |  ImageMetadata
      width       int          |  (int = 32-bit unsigned in Manticore)
      height      int          |
      size_bytes  bigint       |
      indexed_us  bigint       |  indexed_at as microseconds since the Unix epoch, UTC
      taken_us    bigint       |  taken_at, the same unit (0 when has_taken is 0)
      has_taken   bool        /   1 when the image has a taken_at (Manticore attributes cannot be NULL)
      embedding   float_vector knn_type='hnsw' knn_dims='D' hnsw_similarity='COSINE' hnsw_m='M'
                               hnsw_ef_construction='EF'

  No full-text field: since Manticore 5.0.0 a real-time table does not need one ("Having at least one full-text
  field in a real-time/plain index is not mandatory anymore", Changelog), and the Data types page creates
  attribute-only tables (``create table t(id_text string)``). ``indexed_at`` is a ``bigint`` of microseconds
  rather than a ``timestamp`` because Manticore's timestamp is a 32-bit count of *seconds* (Data types,
  "Timestamps"), which would drop the microseconds the service stores and overflow in 2038 or 2106.

  ``taken_us``/``has_taken`` came with issue #9. A table created before them gets them on first use
  (:func:`add_column_sql`, ``ALTER TABLE ... ADD COLUMN``, which Manticore supports on real-time tables and which
  fills existing documents with 0, i.e. "no taken_at"); a separate flag rather than a sentinel time because an
  added column reads 0, and 0 is also a real time (1970-01-01T00:00:00Z, what cameras with a reset clock write).
  Should the engine refuse the ALTER, the handler keeps working without them (``taken_at`` not stored, a
  ``taken_*`` filter matches nothing) and logs a warning.

* ``<table>_meta`` - one document (id 1) holding ``model_id string, dim int``: which model filled the collection,
  the analogue of pgvector's ``collection_meta`` row.

* ``image_search_active`` - one document (id 1) holding ``collection string``: which images table the service
  and the CLIs open (``scripts/reindex.py`` switches it with one single-document ``REPLACE``, which Manticore
  applies atomically); no such table or document: ``images``.

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
backend. The manual's KNN_DIST() entry only says "Returns KNN vector search distance"; with a real Manticore
Search 29.1.1 engine (KNN: columnar 13.9.0) ``knn_dist()`` was ``1 - cos`` within 3e-7 (issue #12).

Query syntax: ``WHERE knn(embedding, K, (v1,...,vD), {ef=N, early_termination=0}) LIMIT K``. Observed with a
real 29.1.1 engine (issue #12): the ``{...}`` options form works, the 6.x positional form ``knn(f, k, (...), 100)``
is a syntax error, ``early_termination=0`` is accepted, and ``K`` does not cap the rows returned (``LIMIT`` does;
both are given). ``ef`` is ``max(ef_search, top_k)`` because HNSW returns at most ``ef`` candidates.
``early_termination=0`` because the engine searches HNSW per disk chunk and, with its default early termination,
stops early there: on 3,000 random 64-d vectors in one disk chunk recall@10 was 0.71 with default options, 0.85 with
``{ef=200}``, 0.99 with ``{ef=1000}`` and 1.0 with ``{ef=200, early_termination=0}``; 200,000 512-d vectors in 3
disk chunks gave 0.85 at ``ef=160`` without it (RAM chunks are searched exactly). Whether ``ef=160`` with
``early_termination=0`` reaches 0.95 at 200k and 1M was not measured (no engine installs here).
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

Precision: a selected ``float_vector`` comes back as one string of comma-separated floats, already normalised
by COSINE (29.1.1: 8 decimals; older releases rendered 6, manticoresearch issues #140 and #3827), so vectors
returned by ``get`` and ``scan`` are within about 5e-7 per component of what was stored (of its normalised form).
Scores are unaffected.

Scans page by the numeric document id (:func:`scan_sql`), never by a string range: see there.

Filters (issue #9, :func:`filter_sql`): attribute conditions beside ``knn(...)`` in the same ``WHERE``. Since
Manticore 19.0.1 such filters are applied *during* the HNSW traversal ("KNN prefiltering", on by default; the
engine picks filtered HNSW, ACORN-1 or a brute-force scan of the matching documents by the filter's selectivity,
per chunk), so ``k = top_k`` matching documents come back whenever that many match (manticoresearch.com/blog/
knn-prefiltering). Older engines apply them to the ``k`` candidates of each chunk (the KNN page: "the final
document count might be less than k if ... some are filtered out"); for those the handler searches once more with
``k`` and ``ef`` multiplied by ``FILTER_RETRY_FACTOR`` when fewer than ``top_k`` rows came back. Conditions:
``img_format IN (...)`` (exact: the service stores the decoder's upper-case names, which is what
:meth:`SearchFilter.create` normalises to), integer comparisons on ``indexed_us``/``taken_us``/``width``/``height``
(``has_taken = 1`` first), and the path prefix as ``REGEX(filename, '^...')`` computed in the select list and
tested as ``path_ok = 1`` (an expression alias, Searching/Filters), with every character of the folder outside
``[A-Za-z0-9_]`` and below U+0080 backslash-escaped (:func:`re2_literal`, what RE2's ``QuoteMeta`` does; REGEX uses
RE2 syntax, Functions/String_functions#REGEX()): not a string range (``filename >= 'a/' AND filename < 'a0'``)
because string range filters gave wrong results on disk chunks of a real 29.1.1 engine (issue #12, see
:func:`scan_sql`), and not ``LIKE``, which Manticore's SQL has only for ``SHOW`` statements. The pattern is a ``%s``
parameter like every other string.

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
import re
from collections.abc import Sequence

import numpy as np
import pymysql.converters

from app.errors import DatabaseUnavailableError
from app.ids import from_epoch_us, is_valid_image_id, to_epoch_us
from app.vectordb.base import ImageMetadata, ImageRecord, SearchFilter

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
RECORD_COLUMNS = (
    "id, image_id, filename, img_format, width, height, size_bytes, indexed_us, taken_us, has_taken, embedding"
)
HIT_COLUMNS = "id, image_id, filename, img_format, width, height, size_bytes, indexed_us, taken_us, has_taken"
#: The same for a table without the taken_at columns (created before issue #9, where ALTER TABLE was refused).
LEGACY_RECORD_COLUMNS = "id, image_id, filename, img_format, width, height, size_bytes, indexed_us, embedding"
LEGACY_HIT_COLUMNS = "id, image_id, filename, img_format, width, height, size_bytes, indexed_us"
REQUIRED_COLUMNS = ("image_id", "filename", "img_format", "width", "height", "size_bytes", "indexed_us", "embedding")
#: Columns added by issue #9, with their types: added to older tables by :func:`add_column_sql`.
TAKEN_COLUMNS = (("taken_us", "bigint"), ("has_taken", "bool"))
#: With a filter, when fewer than top_k rows come back (an engine before 19.0.1 filters after the KNN step), the
#: search runs once more with k and ef multiplied by this.
FILTER_RETRY_FACTOR = 16


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


def checked_int(value, name: str, lo: int, hi: int) -> int:
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
    n = checked_int(n, "limit", 1, 10_000_000)
    return f"LIMIT {n}" + (f" OPTION max_matches={n}" if n > DEFAULT_MAX_MATCHES else "")


def meta_table_name(table: str) -> str:
    """The bookkeeping table of ``table``: ``<table>_meta``."""
    return validate_table_name(table) + META_SUFFIX


def create_table_sql(table: str, dim: int, m: int, ef_construction: int) -> str:
    """``CREATE TABLE IF NOT EXISTS`` for the images table: attributes plus an HNSW COSINE ``float_vector``."""
    table = validate_table_name(table)
    dim = checked_int(dim, "dim", 1, MAX_DIM)
    m = checked_int(m, "hnsw_m", 2, 1000)
    ef_construction = checked_int(ef_construction, "hnsw_ef_construction", 1, 100_000)
    return (
        f"CREATE TABLE IF NOT EXISTS {table} ("
        "image_id string, filename string, img_format string, width int, height int, size_bytes bigint, "
        "indexed_us bigint, taken_us bigint, has_taken bool, "
        f"embedding float_vector knn_type='hnsw' knn_dims='{dim}' hnsw_similarity='COSINE' "
        f"hnsw_m='{m}' hnsw_ef_construction='{ef_construction}')"
    )


def add_column_sql(table: str, column: str) -> str:
    """``ALTER TABLE <table> ADD COLUMN <column> <type>`` for one of :data:`TAKEN_COLUMNS` (existing documents read
    0 in it: no ``taken_at``)."""
    types = dict(TAKEN_COLUMNS)
    if column not in types:
        raise ValueError(f"unknown column {column!r}")
    return f"ALTER TABLE {validate_table_name(table)} ADD COLUMN {column} {types[column]}"


def create_meta_table_sql(table: str) -> str:
    """``CREATE TABLE IF NOT EXISTS <table>_meta (model_id string, dim int)``."""
    return f"CREATE TABLE IF NOT EXISTS {meta_table_name(table)} (model_id string, dim int)"


def select_meta_sql(table: str) -> str:
    """The stored model id and dimension (document 1 of the meta table)."""
    return f"SELECT model_id, dim FROM {meta_table_name(table)} WHERE id = {META_DOC_ID}"


def insert_meta_sql(table: str, model_id: str, dim: int) -> tuple[str, tuple[str, ...]]:
    """``INSERT`` (not REPLACE) of document 1: it fails if another process recorded its model first."""
    dim = checked_int(dim, "dim", 1, MAX_DIM)
    if not model_id:
        raise ValueError("model_id must be a non-empty string")
    return (
        f"INSERT INTO {meta_table_name(table)} (id, model_id, dim) VALUES ({META_DOC_ID}, %s, {dim})",
        (clean_text(model_id),),
    )


ACTIVE_TABLE = "image_search_active"


def create_active_table_sql() -> str:
    """``CREATE TABLE IF NOT EXISTS image_search_active (collection string)``: the active-collection pointer."""
    return f"CREATE TABLE IF NOT EXISTS {ACTIVE_TABLE} (collection string)"


def select_active_sql() -> str:
    """The active collection's table name (document 1 of the pointer table)."""
    return f"SELECT collection FROM {ACTIVE_TABLE} WHERE id = {META_DOC_ID}"


def replace_active_sql(table: str) -> tuple[str, tuple[str, ...]]:
    """``REPLACE`` of document 1 of the pointer table: one document, so readers see the old or the new name."""
    return f"REPLACE INTO {ACTIVE_TABLE} (id, collection) VALUES ({META_DOC_ID}, %s)", (validate_table_name(table),)


def drop_table_sql(table: str) -> str:
    """``DROP TABLE IF EXISTS <table>`` (a validated name)."""
    return f"DROP TABLE IF EXISTS {validate_table_name(table)}"


def show_meta_tables_sql() -> tuple[str, tuple[str, ...]]:
    """``SHOW TABLES LIKE '%_meta'``: candidates for the collections' bookkeeping tables (``_`` is a wildcard, so
    callers keep only names that end in ``_meta`` exactly)."""
    return "SHOW TABLES LIKE %s", (f"%{META_SUFFIX}",)


def show_tables_sql(name: str) -> tuple[str, tuple[str, ...]]:
    """``SHOW TABLES LIKE %s`` for one table name (``_`` is a LIKE wildcard: callers compare names exactly)."""
    return "SHOW TABLES LIKE %s", (validate_table_name(name),)


def describe_sql(table: str) -> str:
    return f"DESCRIBE {validate_table_name(table)}"


def show_create_table_sql(table: str) -> str:
    return f"SHOW CREATE TABLE {validate_table_name(table)}"


def replace_sql(
    table: str, records: Sequence[ImageRecord], dim: int, *, taken: bool = True
) -> tuple[str, tuple[str, ...]]:
    """One multi-row ``REPLACE INTO`` for ``records`` (idempotent upsert by document id) and its string params.

    ``taken=False`` for a table without the ``taken_us``/``has_taken`` columns (``taken_at`` is then not stored).
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
        width = checked_int(md.width, "width", 0, _UINT32_MAX)
        height = checked_int(md.height, "height", 0, _UINT32_MAX)
        size = checked_int(md.bytes, "bytes", 0, _MASK63)
        times = f"{to_epoch_us(md.indexed_at)}, "
        if taken:
            times += "0, 0, " if md.taken_at is None else f"{to_epoch_us(md.taken_at)}, 1, "
        rows.append(
            f"({doc_id_for(image_id)}, %s, %s, %s, {width}, {height}, {size}, {times}{format_vector(r.vector, dim)})"
        )
        params += [image_id, clean_text(md.filename), clean_text(md.format)]
    columns = RECORD_COLUMNS if taken else LEGACY_RECORD_COLUMNS
    sql = f"REPLACE INTO {table} ({columns}) VALUES " + ", ".join(rows)
    return sql, tuple(params)


def re2_literal(text: str) -> str:
    """``text`` as an RE2 pattern matching exactly itself: every character below U+0080 outside ``[A-Za-z0-9_]``
    gets a backslash (RE2's ``QuoteMeta`` rule; RE2 reads a backslash before such a character as that character),
    other characters stay as they are (RE2 works on UTF-8)."""
    return "".join(c if (c.isascii() and (c.isalnum() or c == "_")) or not c.isascii() else "\\" + c for c in text)


def filter_sql(filters: SearchFilter, *, taken: bool = True) -> tuple[str, str, tuple[str, ...]] | None:
    """``(select_extra, where_extra, params)`` for ``filters`` (see the module docstring): text to append to the
    select list and to the ``WHERE`` after ``knn(...)``, and the string parameters in the order they appear.

    ``("", "", ())`` for an empty filter; ``None`` when nothing can match (a ``taken_*`` filter on a table without
    the taken columns, ``taken=False``). Numbers are formatted here from validated integers; strings are params.
    Raises ValueError for a size outside Manticore's 32-bit unsigned ``int``.
    """
    select, where, params = "", [], []
    if filters.path_prefix is not None:
        select = ", REGEX(filename, %s) AS path_ok"
        params.append("^" + re2_literal(clean_text(filters.path_prefix)))
        where.append("path_ok = 1")
    if filters.formats is not None:
        where.append("img_format IN (" + ", ".join("%s" for _ in filters.formats) + ")")
        params += [clean_text(f) for f in filters.formats]
    if filters.indexed_after is not None:
        where.append(f"indexed_us >= {to_epoch_us(filters.indexed_after)}")
    if filters.indexed_before is not None:
        where.append(f"indexed_us < {to_epoch_us(filters.indexed_before)}")
    if filters.taken_after is not None or filters.taken_before is not None:
        if not taken:
            return None
        where.append("has_taken = 1")
        if filters.taken_after is not None:
            where.append(f"taken_us >= {to_epoch_us(filters.taken_after)}")
        if filters.taken_before is not None:
            where.append(f"taken_us < {to_epoch_us(filters.taken_before)}")
    if filters.min_width is not None:
        where.append(f"width >= {checked_int(filters.min_width, 'min_width', 0, _UINT32_MAX)}")
    if filters.min_height is not None:
        where.append(f"height >= {checked_int(filters.min_height, 'min_height', 0, _UINT32_MAX)}")
    return select, "".join(f" AND {w}" for w in where), tuple(params)


def knn_search_sql(
    table: str,
    vector,
    k: int,
    ef: int,
    dim: int,
    filters: SearchFilter | None = None,
    *,
    limit: int | None = None,
    taken: bool = True,
) -> tuple[str, tuple[str, ...]] | None:
    """The KNN query and its params: ``SELECT ..., knn_dist() AS distance FROM t WHERE knn(embedding, K, (...),
    {ef=E, early_termination=0}) [AND filters] LIMIT L`` (see the module docstring for ``early_termination=0`` and
    the filters), ``L`` = ``limit`` or ``k``; ``None`` when ``filters`` can match nothing (see :func:`filter_sql`).

    Only numbers validated here go into the text; filter strings are params. Raises ValueError for a ``k`` or
    ``limit`` outside ``1..MAX_TOP_K``, an ``ef`` below 1 or a vector :func:`format_vector` refuses.
    """
    table = validate_table_name(table)
    k = checked_int(k, "top_k", 1, MAX_TOP_K)
    limit = k if limit is None else checked_int(limit, "limit", 1, MAX_TOP_K)
    ef = checked_int(ef, "ef", 1, 10_000_000)
    parts = ("", "", ()) if filters is None else filter_sql(filters, taken=taken)
    if parts is None:
        return None
    select, where, params = parts
    columns = HIT_COLUMNS if taken else LEGACY_HIT_COLUMNS
    sql = (
        f"SELECT {columns}{select}, knn_dist() AS distance FROM {table} "
        f"WHERE knn(embedding, {k}, {format_vector(vector, dim)}, {{ef={ef}, early_termination=0}}){where} "
        f"{_limit_clause(limit)}"
    )
    return sql, params


def get_sql(table: str, image_id: str, *, taken: bool = True) -> tuple[str, tuple[str, ...]]:
    """One record by document id *and* image id (so a document-id collision cannot return another image)."""
    columns = RECORD_COLUMNS if taken else LEGACY_RECORD_COLUMNS
    return (
        f"SELECT {columns} FROM {validate_table_name(table)} WHERE id = {doc_id_for(image_id)} AND image_id = %s",
        (image_id,),
    )


def lookup_doc_ids_sql(table: str, doc_ids: Sequence[int]) -> str:
    """``id, image_id`` of the documents among ``doc_ids`` that exist (a fast id-set lookup, no full scan)."""
    if not doc_ids:
        raise ValueError("lookup_doc_ids_sql needs at least one id")
    ids = ", ".join(str(checked_int(d, "document id", 1, _MASK63)) for d in doc_ids)
    return f"SELECT id, image_id FROM {validate_table_name(table)} WHERE id IN ({ids}) {_limit_clause(len(doc_ids))}"


def scan_sql(table: str, after: int, limit: int, *, taken: bool = True) -> str:
    """A keyset page ordered by document id: rows with ``id > after`` (``after=0`` for the first page).

    Pages by the numeric document id, not by ``image_id``: with a real Manticore 29.1.1 engine, string range
    filters on disk chunks gave wrong results (``COUNT(*) WHERE image_id > '...'`` returned 1 instead of 2,000, and a
    scan paged that way lost about nine rows in ten at 200,000 rows; issue #12), while a filter on ``id`` was exact.
    """
    after = checked_int(after, "after", 0, _MASK63)
    table = validate_table_name(table)
    columns = RECORD_COLUMNS if taken else LEGACY_RECORD_COLUMNS
    return f"SELECT {columns} FROM {table} WHERE id > {after} ORDER BY id ASC {_limit_clause(limit)}"


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
def text(value) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def parse_vector(value, dim: int) -> np.ndarray:
    """A ``(dim,)`` float32 array from Manticore's text form of a float_vector (``"0.1,0.2"``, maybe bracketed)."""
    parts = [p for p in text(value).strip().strip("()[]").replace(" ", "").split(",") if p]
    v = np.asarray(parts, dtype=np.float64).astype(np.float32)
    if v.shape != (dim,):
        raise DatabaseUnavailableError(f"Manticore returned a vector of {v.shape[0]} values, expected {dim}")
    return v


def metadata_from_row(row: Sequence) -> ImageMetadata:
    """Metadata from the columns ``filename .. indexed_us`` (6 values) or ``filename .. has_taken`` (8 values)."""
    filename, fmt, width, height, size, indexed_us, *taken = row
    taken_at = from_epoch_us(taken[0]) if taken and int(taken[1]) else None
    return ImageMetadata(
        text(filename), text(fmt), int(width), int(height), int(size), from_epoch_us(indexed_us), taken_at
    )


def record_from_row(row: Sequence, dim: int) -> ImageRecord:
    # row: RECORD_COLUMNS (or LEGACY_RECORD_COLUMNS) = id, image_id, metadata columns, embedding
    return ImageRecord(text(row[1]), parse_vector(row[-1], dim), metadata_from_row(row[2:-1]))
