"""PostgreSQL + pgvector backend of :class:`~app.vectordb.base.VectorDBHandler`.

Follows pgvector-python's psycopg 3 examples: numpy vectors through ``register_vector``, cosine distance ``<=>``
with an HNSW index on ``vector_cosine_ops`` (or ``halfvec_cosine_ops`` with ``VECTOR_TYPE=halfvec``).
Schema: ``sql/init.sql`` (``taken_at timestamptz``, NULL when unknown, is added to older tables on start).

Filtered search (issues #9 and #29; pgvector's README, "Filtering", "Iterative Index Scans", "Binary
Quantization", 0.8.0+): a :class:`~app.vectordb.base.SearchFilter` becomes a ``WHERE`` built with :mod:`psycopg.sql`
and bound parameters (:func:`filter_sql`). HNSW alone returns at most ``ef_search`` candidates *before* the filter,
and its recall falls with the filter's selectivity ``s`` (the share of rows it keeps): the filtered top-10 are the
matching rows among roughly the ``10 / s`` nearest of all rows, which the graph ranks worse the deeper they lie
(1M x 512-d: recall 0.82-0.84 at ``s`` = 2 %, whatever ``ef_search``). The plan therefore follows ``s``
(measured in docs/benchmarks.md, "Filtered search at a million"):

* **exact pass** when at most :func:`exact_pass_limit` rows match (the filter keeps at most
  ``EXACT_MAX_SELECTIVITY`` = 5 % of the rows, or at most ``EXACT_ALWAYS_ROWS``): the matching rows (found through
  the B-tree indexes of :data:`FILTER_INDEXES`, covering ones that hold the bits) are ranked by the Hamming distance
  of ``embedding_bq``, a stored binary quantisation of the embedding (``binary_quantize``: one bit per dimension, 64
  bytes at 512-d, kept in the row, as is the vector itself since ``sql/init.sql`` sets ``toast_tuple_target``; a
  bit is set when its component exceeds the collection's median, :func:`bq_thresholds`, from the collection's
  :data:`BQ_CALIBRATION_ROWS`-th row on), and the best :func:`rerank_candidates` of them are ranked again by exact
  cosine distance. The row count is not trusted to the planner: when its estimate is within the limit, the
  matching rows are counted first (at most the limit plus one, one index-only scan), so an estimate that was too
  low (measured: 100 for a nested folder holding 5,067 of 1M rows) sends the search to the next plan after one
  bounded read instead of ranking far more rows than intended; only a filter on one column whose estimate cannot
  be that far off (:meth:`PgVectorHandler._estimate_holds`: its histogram's error and the rows written since the
  last ANALYZE included) skips the count. What a filter matched is kept for
  :data:`~app.vectordb.filter_rows.FILTER_ROWS_TTL_S` (:mod:`app.vectordb.filter_rows`): the same filter searched
  again goes straight to its plan, without estimate or count. The exact pass itself has no row limit, so rows added
  since the count are ranked too: a stale count makes it slower, never wrong.
* **iterative index scan** otherwise (``SET LOCAL hnsw.iterative_scan = relaxed_order``, ``ITERATIVE_SCAN``) with
  ``hnsw.ef_search`` raised by :func:`iterative_ef` to about ``per_result * top_k / s`` (at most 1,000, pgvector's
  limit; ``per_result`` from :func:`ef_per_result`, by how well the index was built), so that the first candidates
  already hold the filtered top-k; ``ITERATIVE_FACTOR`` times ``top_k`` of its rows (which may come slightly out of
  distance order once the scan goes past its first ``ef_search`` candidates) are collected and sorted again in SQL.
* **exact search** over every matching row, whenever the iterative scan came back with fewer than ``top_k`` rows
  (it stopped at ``hnsw.max_scan_tuples``, or few rows match), so a filtered search always returns
  ``min(top_k, matching rows)`` rows.

Collections created before issue #29 have no ``embedding_bq`` column until it is added (see
:meth:`PgVectorHandler.ensure_collection`); their exact pass ranks the vectors themselves, at most
``EXACT_ALWAYS_ROWS`` of them.

Several collections per database (``scripts/reindex.py``): each collection is a PostgreSQL schema holding
``sql/init.sql``'s two tables; the default collection (``images``) is the ``public`` schema's, so databases from
before this need no migration. A handler sets ``search_path`` to its collection's schema (then ``public``, where the
``vector`` extension lives) on every pooled connection, so no statement below names a schema. Which collection a
handler built without a name opens is the one row of ``public.image_search_active`` (none: ``images``), switched in
one transaction by :meth:`PgVectorHandler.activate_collection`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psycopg
import psycopg_pool
from pgvector import Vector
from pgvector.psycopg import register_vector
from psycopg import sql

from app.config import DB_DEADLINE_GRACE_S
from app.errors import (
    CollectionMismatchError,
    DatabaseTimeoutError,
    DatabaseUnavailableError,
    StorageFullError,
    VectorTypeMismatchError,
)
from app.ids import is_valid_image_id
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
from app.vectordb.deadline import Deadlines, shutdown_socket
from app.vectordb.filter_rows import FilterRows, FilterRowsCache

if TYPE_CHECKING:
    from app.config import Settings

log = logging.getLogger(__name__)

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "sql" / "init.sql"
COLLECTION = "images"
INDEX_NAME = "images_embedding_hnsw"
# Any constant works as long as every process uses the same one: it serialises schema changes across workers.
_SCHEMA_LOCK_KEY = 0x1A6E5EA4C4
#: the one-row table in ``public`` naming the active collection (see the module docstring)
ACTIVE_TABLE = "image_search_active"

_META_COLUMNS = "filename, format, width, height, bytes, indexed_at, taken_at"
# Storage type -> (largest dimension pgvector allows for it, HNSW operator class for cosine distance).
VECTOR_TYPES = {"vector": (16000, "vector_cosine_ops"), "halfvec": (16000, "halfvec_cosine_ops")}
# pgvector's HNSW index accepts at most 2,000 dimensions for vector and 4,000 for halfvec.
_HNSW_MAX_DIM = {"vector": 2000, "halfvec": 4000}


#: extra statement time an upsert gets per row, seconds: HNSW inserts ran at 836 rows/s (1.2 ms each) into a small
#: collection on machine A (docs/benchmarks.md, "Backends on the same vectors"); eight times that leaves room for
#: large graphs and a loaded machine, so batch writes (migrate.py's 1,000 rows) are not cut by DB_STATEMENT_TIMEOUT_S.
UPSERT_ROW_ALLOWANCE_S = 0.01
#: client deadline, seconds, of the pool's check of an idle connection (an empty query: milliseconds when the
#: server answers) and of the health probe's ``SELECT 1``
CHECK_DEADLINE_S = 1.0


# A filtered search ranks the matching rows exactly (by their binary quantisation, then the best rerank_candidates
# by the full vectors) instead of walking the HNSW graph when the filter keeps at most EXACT_MAX_SELECTIVITY of the
# rows: below that the graph's recall falls (1M x 512-d, filter keeping 2 %: 0.82-0.84 for any ef_search; 5 %:
# 0.95 only at ef_search 1,000), above it the iterative scan is both right and cheaper than reading the rows.
# docs/benchmarks.md, "Filtered search at a million".
EXACT_MAX_SELECTIVITY = 0.05
# ... but at most this many rows (the pass reads each: 5 % of a million), and always when at most EXACT_ALWAYS_ROWS
# match (a few milliseconds, whatever the selectivity). EXACT_ALWAYS_ROWS is also the limit of collections without
# embedding_bq (created before issue #29), whose exact pass reads the vectors, about 5 us per row.
EXACT_SEARCH_MAX_ROWS = 50_000
EXACT_ALWAYS_ROWS = 5000
# pgvector's iterative scan mode for filtered searches: relaxed_order returns rows slightly out of distance order
# (re-sorted in SQL, see _ranked_sql) and finds more of the true nearest matching rows than strict_order, which
# drops candidates that arrive after a farther row was already returned (pgvector's README). Measured in
# docs/benchmarks.md ("Filtered search").
ITERATIVE_SCAN = "relaxed_order"
# ef_search of an iterative scan: about this many candidates per wanted result and per unit of selectivity, so that
# the first batch of candidates already holds the filtered top-k. It depends on how well the graph was built
# (1M x 512-d, 10 % filter, docs/benchmarks.md "The graph's build beam"): with ef_construction 64, recall@10 0.945
# at ef 160-250, 0.952 at 350, 0.965 at 500; with ef_construction 128 (the default since then), 0.96-0.97 from ef
# 160 on. Latency was flat up to ef 350 and grew beyond (p50 +40 % at 500).
ITERATIVE_EF_PER_RESULT = 5
#: ... for an index built with ef_construction >= STRONG_GRAPH_EF_CONSTRUCTION: 2.5, so that a 10 % filter's first
#: batch (ef_search 250) holds about 25 matching rows for the ITERATIVE_FACTOR * top_k = 15 collected. Measured side
#: by side on 1M x 512-d (bench/filtered_ab.py, docs/benchmarks.md "The iterative scan's first batch"): against 3
#: and a factor of 2 (ef_search 300, 20 rows collected), 10 % filters' p50 10.9-11.6 -> 9.0-9.6 ms (a folder's
#: 14.7 -> 12.5), recall@10 0.967-0.972 -> 0.962-0.968.
ITERATIVE_EF_PER_RESULT_STRONG = 2.5
STRONG_GRAPH_EF_CONSTRUCTION = 128
#: what pgvector builds with when the index names none (and this handler's defaults)
PGVECTOR_DEFAULT_M = 16
PGVECTOR_DEFAULT_EF_CONSTRUCTION = 64
# Filtered statements are never prepared (psycopg prepares a statement run 5 times on a connection, and PostgreSQL
# then may switch it to a generic plan, planned without the parameters' values): a generic plan could not turn
# "filename LIKE $1" into a range of the prefix index, nor estimate the filter's rows, so the exact pass read every
# row of the table (200k rows, a folder keeping 0.5 %: 30 ms a search, 9 ms unprepared, in the same run).
FILTERED_PREPARE = False
# pgvector's largest hnsw.ef_search.
MAX_EF_SEARCH = 1000
# The iterative scan collects this many times top_k matching rows before they are re-sorted: rows that come in a
# later batch can be nearer than rows of an earlier one (relaxed_order), so stopping at top_k would lose some then.
# The first batch (hnsw.ef_search candidates) comes sorted, and the cost is in the batches: collecting 20 rows from
# a first batch of 300 cost as much as from one of 200 (where about 20 match, so a second batch was often needed),
# while collecting 10 from 200 cost a third less (bench/filtered_ab.py, 1M x 512-d, 10 % filters). 1.5 keeps some
# margin for a filter whose share the planner overestimates (its first batch then holds fewer matching rows).
ITERATIVE_FACTOR = 1.5


def exact_pass_limit(total_rows: float, *, bq: bool = True) -> int:
    """Most matching rows a filtered search ranks exactly (module docstring): ``EXACT_MAX_SELECTIVITY`` of
    ``total_rows``, at least ``EXACT_ALWAYS_ROWS`` and at most ``EXACT_SEARCH_MAX_ROWS``; ``EXACT_ALWAYS_ROWS``
    (capped the same way) without ``embedding_bq``."""
    if not bq:
        return min(EXACT_ALWAYS_ROWS, EXACT_SEARCH_MAX_ROWS)
    wanted = int(np.ceil(EXACT_MAX_SELECTIVITY * max(0.0, float(total_rows))))
    return min(EXACT_SEARCH_MAX_ROWS, max(EXACT_ALWAYS_ROWS, wanted))


#: ... and at least this share of the matching rows: on real embeddings (2,020 EfficientNet-Lite2 embeddings of
#: Caltech-101, median thresholds; bench/bq_quality.py) re-ranking the best 2 % by Hamming distance found 0.958 of
#: the top-10, the best 1 % only 0.899, so a filter matching 50,000 rows re-ranks 1,000, not 400 (0.8 %).
RERANK_SHARE = 0.02


def rerank_candidates(top_k: int, matching: int = 0) -> int:
    """How many rows of the binary-quantised ranking are ranked again by exact cosine distance: ``max(400,
    10 * top_k, ceil(RERANK_SHARE * matching))``, ``matching`` being the number of rows the filter keeps (the exact
    pass passes the planner's estimate, so that its LIMIT stays a constant the planner can see). Measured at 1M x
    512-d (docs/benchmarks.md): 200 / 400 / 800 candidates gave recall@10 0.93 / 0.97 / 0.99 on a 2 % filter of
    synthetic vectors, at a cost of a primary-key lookup and a heap page each (about 8 us; 10-25 us while vectors
    were stored out of line, in TOAST); :data:`RERANK_SHARE` for real embeddings."""
    return max(400, 10 * int(top_k), int(np.ceil(RERANK_SHARE * max(0, int(matching)))))


def ef_per_result(ef_construction: int | None) -> float:
    """Candidates per wanted result and unit of selectivity of an iterative filtered scan on an HNSW index built
    with ``ef_construction`` (``None``: unknown, taken as pgvector's default 64): :data:`ITERATIVE_EF_PER_RESULT_STRONG`
    from :data:`STRONG_GRAPH_EF_CONSTRUCTION` on, else :data:`ITERATIVE_EF_PER_RESULT` (measured at 1M x 512-d,
    docs/benchmarks.md)."""
    if ef_construction is not None and ef_construction >= STRONG_GRAPH_EF_CONSTRUCTION:
        return ITERATIVE_EF_PER_RESULT_STRONG
    return ITERATIVE_EF_PER_RESULT


def iterative_ef(top_k: int, selectivity: float, ef_search: int, ef_construction: int | None = None) -> int:
    """``hnsw.ef_search`` of an iterative filtered scan: ``ef_per_result(ef_construction) * top_k / selectivity``,
    at least ``max(ef_search, top_k)`` and at most :data:`MAX_EF_SEARCH`. ``selectivity``: the estimated share of
    rows the filter keeps, in (0, 1]; ``ef_construction``: what the HNSW index was built with (``None``: unknown,
    see :func:`ef_per_result`)."""
    floor = max(int(ef_search), int(top_k))
    if selectivity <= 0:
        return max(floor, MAX_EF_SEARCH)
    wanted = int(np.ceil(ef_per_result(ef_construction) * top_k / selectivity))
    return max(floor, min(wanted, MAX_EF_SEARCH))


#: seconds a handler reuses the table's row count (``pg_class.reltuples``) in its filtered-search plan
TOTAL_ROWS_TTL_S = 10.0

#: collections holding at most this many rows get ``embedding_bq`` added, or calibrated, when they are opened without
#: it (a stored generated column rewrites the table and rebuilds its indexes: seconds at this size); larger ones are
#: left to the operator (``image-search-fsck --calibrate``), see :meth:`PgVectorHandler.ensure_collection`.
BQ_AUTO_ADD_MAX_ROWS = 20_000
#: a collection's binary quantisation is calibrated (:func:`bq_thresholds`) once it holds this many rows: a median
#: from 200 real embeddings already gave the recall of one from 2,020 (docs/benchmarks.md, "Binary quantisation
#: thresholds"), and the table rewrite it costs is about a second at this size.
BQ_CALIBRATION_ROWS = 1000
#: rows the calibration reads: the first ones by id, a uniform sample since ids are SHA-256 digests.
BQ_CALIBRATION_SAMPLE = 5000
#: seconds a write waits, after a calibration it started failed, before a later write tries again: a database that
#: times the rewrite out would otherwise make every write wait for it (each bounded, but each seconds long).
BQ_RETRY_S = 60.0


def bq_thresholds(sample: np.ndarray) -> np.ndarray:
    """Per-dimension thresholds of a collection's binary quantisation: the median of each component.

    ``binary_quantize`` alone sets bit ``i`` when component ``i`` is positive, which splits each dimension in two
    only for embeddings centred on zero. Real ones are not: EfficientNet-Lite2's features are pooled ReLU6
    activations (non-negative; 36 % exactly zero on Caltech-101), CLIP's share a mean direction. Thresholding at the
    median makes every bit split the collection in half, the most information a bit can carry. Measured on 2,020
    real EfficientNet-Lite2 embeddings, re-ranking the best 2 % by Hamming distance: recall@10 0.836 with sign bits,
    0.958 with median thresholds (bench/bq_quality.py, docs/benchmarks.md).

    Args:
        sample: ``(N, D)`` float32 embeddings of the collection, ``N >= 1``.

    Returns:
        ``(D,)`` float32 thresholds.

    Raises:
        ValueError: ``sample`` is not a non-empty 2-d array.
    """
    sample = np.asarray(sample, dtype=np.float32)
    if sample.ndim != 2 or sample.shape[0] == 0:
        raise ValueError(f"need a non-empty (N, D) sample, got shape {sample.shape}")
    return np.median(sample, axis=0).astype(np.float32)


def _bq_column_sql(dim: int, vector_type: str = "vector", thresholds: np.ndarray | None = None) -> sql.Composed:
    """``ALTER TABLE`` adding ``embedding_bq``: the embedding's binary quantisation, ``bit(dim)``, stored and kept up
    to date by PostgreSQL. Bit ``i`` is set when component ``i`` exceeds ``thresholds[i]`` (pgvector's
    ``binary_quantize`` of the difference; :func:`bq_thresholds`), or is positive when ``thresholds`` is ``None``
    (a collection not calibrated yet)."""
    d = sql.Literal(int(dim))
    if thresholds is None:
        source = sql.SQL("embedding")
    else:
        source = sql.SQL("embedding - {}::{}({})").format(
            sql.Literal(Vector(thresholds).to_text()), sql.SQL(vector_type), d
        )
    return sql.SQL(
        "ALTER TABLE images ADD COLUMN IF NOT EXISTS embedding_bq bit({d}) "
        "GENERATED ALWAYS AS (binary_quantize({source})::bit({d})) STORED"
    ).format(d=d, source=source)


def _bq_state(conn: psycopg.Connection) -> tuple[bool, bool]:
    """``(has embedding_bq, calibrated)`` of the collection first on the connection's ``search_path``: whether
    ``images`` has the column, and whether ``collection_meta`` holds its thresholds."""
    with conn.transaction():
        has = (
            conn.execute(
                "SELECT 1 FROM pg_attribute WHERE attrelid = 'images'::regclass "
                "AND attname = 'embedding_bq' AND NOT attisdropped"
            ).fetchone()
            is not None
        )
        row = conn.execute("SELECT bq_threshold IS NOT NULL FROM collection_meta WHERE name = %s", (COLLECTION,))
        calibrated = bool((row.fetchone() or (False,))[0])
    return has, has and calibrated


#: The B-tree indexes on the search filter columns (issues #9 and #29), their one owner: ``(name, key, columns)``.
#: They give the planner statistics (``upper(format)`` only has them through its expression index) and, for a
#: selective filter, a cheap way to read the few matching rows for the exact pass (module docstring).
#: ``text_pattern_ops``: a path prefix is a range of file names in byte order (:func:`prefix_range`), which a B-tree
#: serves only with this operator class (or the C collation). On a table with ``embedding_bq`` each index is *covering*:
#: ``INCLUDE (columns..., id, embedding_bq)``, so that a one-column filter's exact pass reads the matching rows'
#: ids and bits by an index-only scan instead of visiting one heap page per scattered row (1M x 512-d, 2 GB
#: shared_buffers: 5,000 matching rows 9.4 -> 7.3 ms, 20,000 rows 25.3 -> 11.7 ms, 50,000 rows 51 -> 25 ms, for
#: about 150 MB per index; bench/exact_pass_layout.py, 2026-12-07). ``columns``: the base column of an expression
#: key, which PostgreSQL needs in the index before it considers an index-only scan on the expression.
FILTER_INDEXES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("images_filename_prefix", "filename text_pattern_ops", ()),
    ("images_format_upper", "upper(format)", ("format",)),
    ("images_indexed_at", "indexed_at", ()),
    ("images_taken_at", "taken_at", ()),
    # Minimum-size filters (issue #29): without these a selective min_width/min_height filter reads the whole table.
    ("images_width", "width", ()),
    ("images_height", "height", ()),
)


def _filter_index_sql(name: str, key: str, columns: Sequence[str], *, covering: bool) -> sql.Composed:
    """``CREATE INDEX name ON images (key)``, with ``INCLUDE (columns..., id, embedding_bq)`` when ``covering``."""
    include = sql.SQL("")
    if covering:
        include = sql.SQL(" INCLUDE ({})").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in (*columns, "id", "embedding_bq"))
        )
    return sql.SQL("CREATE INDEX {} ON images ({}){}").format(sql.Identifier(name), sql.SQL(key), include)


def _sync_filter_indexes(conn: psycopg.Connection) -> list[str]:
    """Make the :data:`FILTER_INDEXES` of the collection first on the connection's ``search_path`` what its table
    needs, in the caller's transaction (which should hold the schema lock): missing ones are created, covering when
    ``images`` has ``embedding_bq``, plain otherwise; plain ones on a table with ``embedding_bq`` (a collection
    calibrated before the indexes were covering) are replaced by covering ones. Returns the names (re)built.

    The replacement is a one-time migration costing one index build per index, about 15 s each at 1M rows (2
    cores): the covering indexes are built under temporary names first, while reads go on (``CREATE INDEX`` blocks
    writes only), then the plain ones dropped and the new ones renamed, so searches wait only for that last step.
    The plain index must go, not stay beside the covering one: with both, the planner preferred the plain one.
    Dropping ``embedding_bq`` drops the covering indexes with it, so whatever re-adds the column calls this again.
    """
    has_bq, missing, replaced = _filter_index_changes(conn)
    for name, key, columns in FILTER_INDEXES:
        if name in missing:
            conn.execute(_filter_index_sql(name, key, columns, covering=has_bq))
    if replaced:
        # A new collection passes here too (its plain indexes came before its embedding_bq): only a table holding
        # rows is a migration worth telling the operator about.
        if conn.execute("SELECT EXISTS (SELECT 1 FROM images)").fetchone()[0]:
            rows = conn.execute("SELECT reltuples FROM pg_class WHERE oid = 'images'::regclass").fetchone()[0]
            log.info(
                "Rebuilding %d filter indexes as covering indexes (issue #29, once; about 15 s per index at a "
                "million rows, the table holds about %d): %s",
                len(replaced),
                max(0, int(rows)),
                ", ".join(replaced),
            )
        for name, key, columns in FILTER_INDEXES:
            if name in replaced:
                conn.execute(_filter_index_sql(f"{name}_covering", key, columns, covering=True))
        for name in replaced:
            conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))
            conn.execute(
                sql.SQL("ALTER INDEX {} RENAME TO {}").format(sql.Identifier(f"{name}_covering"), sql.Identifier(name))
            )
    return missing + replaced


def _filter_index_changes(conn: psycopg.Connection) -> tuple[bool, list[str], list[str]]:
    """``(has embedding_bq, missing, plain ones to make covering)``: what :func:`_sync_filter_indexes` would do on
    the collection first on the connection's ``search_path`` (names of :data:`FILTER_INDEXES`)."""
    has_bq, _ = _bq_state(conn)
    existing = {
        name: covering
        for name, covering in conn.execute(
            "SELECT c.relname, i.indnatts > i.indnkeyatts FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE i.indrelid = 'images'::regclass"
        )
    }
    missing = [name for name, _, _ in FILTER_INDEXES if name not in existing]
    replaced = [name for name, _, _ in FILTER_INDEXES if has_bq and existing.get(name) is False]
    return has_bq, missing, replaced


def _prefixed_meta(alias: str) -> str:
    """:data:`_META_COLUMNS` qualified with a table alias (``i.filename, i.format, ...``)."""
    return ", ".join(f"{alias}.{c.strip()}" for c in _META_COLUMNS.split(","))


def _metadata(row: Sequence) -> ImageMetadata:
    filename, fmt, width, height, nbytes, indexed_at, taken_at = row
    return ImageMetadata(filename, fmt, width, height, nbytes, indexed_at, taken_at)


def like_prefix(prefix: str) -> str:
    """A ``LIKE`` pattern matching every string that starts with ``prefix``, taken literally.

    ``\\``, ``%`` and ``_`` are escaped with a backslash, PostgreSQL's default ``LIKE`` escape character (so
    ``a_b/`` does not match ``axb/``). Only for a prefix :func:`prefix_range` has no range for.
    """
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def prefix_range(prefix: str) -> tuple[str, str] | None:
    """``(low, high)`` such that a string starts with ``prefix`` exactly when ``low <= s < high`` in code point order,
    which is UTF-8's byte order and so the order of PostgreSQL's ``~>=~`` / ``~<~`` operators and of a
    ``text_pattern_ops`` B-tree: ``low`` is ``prefix``, ``high`` is ``prefix`` with its last character replaced by
    the next one (``trips/`` -> ``trips0``; surrogates, which UTF-8 cannot hold, are skipped). ``None`` for an
    empty prefix or one ending in U+10FFFF, the last code point.

    Why a range and not ``LIKE 'prefix%'``: PostgreSQL reads the same index range for both, but keeps the ``LIKE``
    as a filter it evaluates again on every row read, and estimates a deep prefix's rows far worse than a range's
    (1M rows: 100 for a folder holding 5,067 as ``LIKE``, 9,801 as a range). 1M x 512-d, side by side: folders
    keeping 0.5 % and 10 %, 4.85 -> 4.54 and 5.56 -> 5.09 ms; at 2 % the range's larger estimate re-ranks more
    candidates, recall@10 0.969 -> 0.9855 for 10.63 -> 11.2 ms (docs/benchmarks.md, "A filter's rows counted
    once").
    """
    if not prefix:
        return None
    nxt = ord(prefix[-1]) + 1
    if 0xD800 <= nxt <= 0xDFFF:
        nxt = 0xE000
    if nxt > 0x10FFFF:
        return None
    return prefix, prefix[:-1] + chr(nxt)


#: The counters of :meth:`PgVectorHandler.plan_counts` (besides ``last_ef``), their one owner: the plans that
#: answered, and how a first search learnt its filter's rows (counted, or an estimate that held).
PLAN_COUNTERS = ("exact_pass", "iterative", "exact_fallback", "row_counts", "estimates_held")

#: Where PostgreSQL keeps the statistics it estimates each :class:`~app.vectordb.base.SearchFilter` field with:
#: ``(relation, column)`` as ``pg_stats`` names them; ``upper(format)`` has its own, those of its expression index.
FILTER_STATS_COLUMNS = {
    "path_prefix": ("images", "filename"),
    "formats": ("images_format_upper", "upper"),
    "indexed_after": ("images", "indexed_at"),
    "indexed_before": ("images", "indexed_at"),
    "taken_after": ("images", "taken_at"),
    "taken_before": ("images", "taken_at"),
    "min_width": ("images", "width"),
    "min_height": ("images", "height"),
}

#: Histogram buckets by which the estimate of a filter on one column may be off: a range's two ends each fall
#: inside a bucket, whose share is interpolated; the buckets between are counted whole (PostgreSQL's documentation,
#: "Row Estimation Examples"). Measured at 1M rows: every filter of bench/search_scale.py within one bucket, the
#: largest miss a folder's range (29,603 estimated for 19,922; docs/benchmarks.md).
ESTIMATE_ERROR_BUCKETS = 2


def filter_stats_column(filters: SearchFilter) -> tuple[str, str] | None:
    """The one ``(relation, column)`` of :data:`FILTER_STATS_COLUMNS` whose statistics estimate ``filters``, or
    ``None`` when it reads several columns (or none)."""
    columns = {column for name, column in FILTER_STATS_COLUMNS.items() if getattr(filters, name) is not None}
    return columns.pop() if len(columns) == 1 else None


def filter_sql(filters: SearchFilter) -> tuple[sql.Composable, list]:
    """``(condition, params)``: the ``WHERE`` condition of ``filters`` (``TRUE`` for an empty filter) and its bound
    parameters, in order. Values never enter the SQL text; the condition means :meth:`SearchFilter.matches`:

    ``path_prefix`` is the range of file names :func:`prefix_range` (``filename ~>=~ low AND filename ~<~ high``),
    ``formats`` compares ``upper(format)`` (indexed), times compare ``timestamptz`` values (``taken_at IS NULL``
    never passes a comparison), sizes are ``>=``.
    """
    clauses: list[sql.Composable] = []
    params: list = []

    def add(text: str, *values) -> None:
        clauses.append(sql.SQL(text))
        params.extend(values)

    if filters.path_prefix is not None:
        bounds = prefix_range(filters.path_prefix)
        if bounds is None:
            add("filename LIKE %s", like_prefix(filters.path_prefix))
        else:
            add("filename ~>=~ %s AND filename ~<~ %s", *bounds)
    if filters.formats is not None:
        add("upper(format) = ANY(%s)", list(filters.formats))
    if filters.indexed_after is not None:
        add("indexed_at >= %s", filters.indexed_after)
    if filters.indexed_before is not None:
        add("indexed_at < %s", filters.indexed_before)
    if filters.taken_after is not None:
        add("taken_at >= %s", filters.taken_after)
    if filters.taken_before is not None:
        add("taken_at < %s", filters.taken_before)
    if filters.min_width is not None:
        add("width >= %s", int(filters.min_width))
    if filters.min_height is not None:
        add("height >= %s", int(filters.min_height))
    if not clauses:
        return sql.SQL("TRUE"), []
    return sql.SQL(" AND ").join(clauses), params


def _to_numpy(value) -> np.ndarray:
    # pgvector-python returns its own Vector type for vector columns; older versions returned numpy arrays.
    return np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value, dtype=np.float32)


class PgVectorHandler(VectorDBHandler):
    """Images table in PostgreSQL with a pgvector ``vector(D)`` column and an HNSW cosine index.

    Args:
        url: libpq connection URL.
        pool_min, pool_max: connection pool bounds.
        timeout_s: seconds to wait for a pooled connection before :class:`DatabaseUnavailableError`.
        hnsw_m, hnsw_ef_construction: HNSW build parameters (default: pgvector's, 16 and 64; the service's settings
            default to 16 and 128).
        vector_type: column storage, ``vector`` (float32, 4 bytes per dimension) or ``halfvec`` (float16, 2 bytes
            per dimension, half the table and index; vectors are rounded to float16 on write, queries are cast to
            halfvec so the index is used). Recorded with the collection; a mismatch raises
            :class:`VectorTypeMismatchError` in :meth:`ensure_collection`.
        ef_search: HNSW query beam width (pgvector default 40); raised per query to ``top_k`` when smaller,
            because HNSW returns at most ``ef_search`` rows.
        on_close: called once by :meth:`close`, e.g. to stop an embedded server.
        request_timeout_s: seconds a call waits for a pooled connection once the handler is built (``None``:
            ``timeout_s``); short, so that requests fail fast while the server is down.
        collection: the collection (schema) to open; ``None``: the database's active one, read once, here.
        statement_timeout_s: PostgreSQL ``statement_timeout`` of the pooled connections, seconds (``None`` or 0:
            none). Every call but the maintenance ones (index builds, collection switches) also gets a client-side
            deadline of ``statement_timeout_s + DB_DEADLINE_GRACE_S``: past it the connection's socket is shut down
            (app/vectordb/deadline.py) and the call raises :class:`DatabaseUnavailableError`, so a server that hangs
            (SIGSTOP, a network dropping packets) costs a request that long, not as long as it hangs. Connecting
            waits at most ``timeout_s`` (libpq ``connect_timeout``).

    Raises :class:`DatabaseUnavailableError` if the database cannot be reached to apply the schema.
    """

    backend_name = "pgvector"

    def __init__(
        self,
        url: str,
        *,
        pool_min: int = 1,
        pool_max: int = 10,
        timeout_s: float = 10.0,
        hnsw_m: int = PGVECTOR_DEFAULT_M,
        hnsw_ef_construction: int = PGVECTOR_DEFAULT_EF_CONSTRUCTION,
        ef_search: int = 40,
        vector_type: str = "vector",
        on_close=None,
        request_timeout_s: float | None = None,
        collection: str | None = None,
        statement_timeout_s: float | None = None,
    ) -> None:
        if vector_type not in VECTOR_TYPES:
            raise ValueError(f"vector_type must be one of {sorted(VECTOR_TYPES)}, got {vector_type!r}")
        self._requested_type = vector_type  # what ensure_collection creates, or checks the stored one against
        self._vector_type = vector_type  # what the column holds: queries are cast to it
        self._hnsw_m = int(hnsw_m)
        self._hnsw_ef_construction = int(hnsw_ef_construction)
        self._ef_search = int(ef_search)
        self._on_close = on_close
        self._dim: int | None = None
        self._closed = False
        # health() has a connection of its own: a pool busy with requests is not a database that is down.
        self._probe_conn: psycopg.Connection | None = None
        self._probe_lock = threading.Lock()
        self._request_timeout_s: float | None = None  # the pool's timeout_s until the handler is ready
        # What open_collection needs to build a handler like this one on another collection.
        self._url = url
        self._options = dict(
            pool_min=pool_min,
            pool_max=pool_max,
            timeout_s=timeout_s,
            hnsw_m=hnsw_m,
            hnsw_ef_construction=hnsw_ef_construction,
            ef_search=ef_search,
            vector_type=vector_type,
            request_timeout_s=request_timeout_s,
            statement_timeout_s=statement_timeout_s,
        )
        self._statement_timeout_ms = int(round((statement_timeout_s or 0) * 1000))
        self._deadline_s = (statement_timeout_s + DB_DEADLINE_GRACE_S) if statement_timeout_s else None
        self._deadlines = Deadlines("pgvector-deadlines")
        # libpq counts connect_timeout in whole seconds, at least 2 (values 1 are raised to 2).
        connect_timeout = max(2, int(round(timeout_s)))
        # The extension must exist before register_vector can look its types up on pooled connections.
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=connect_timeout) as conn:
                conn.execute(SCHEMA_FILE.read_text())
                self.collection_name = _read_active(conn) if collection is None else collection
                self._schema = _schema_of(self.collection_name)
                if self._schema != "public":
                    _apply_schema_in(conn, self._schema)
                _sync_filter_indexes_in(conn, self._schema)
        except psycopg.Error as exc:
            raise DatabaseUnavailableError(f"Cannot reach PostgreSQL to apply {SCHEMA_FILE.name}: {exc}") from exc
        self._pool = psycopg_pool.ConnectionPool(
            url,
            min_size=pool_min,
            max_size=max(pool_min, pool_max),
            timeout=timeout_s,
            kwargs={"connect_timeout": connect_timeout},
            configure=self._configure,
            check=self._check_connection,  # replaces connections broken by a server restart, or hung
            open=True,
            name="pgvector",
        )
        info = self.collection_info()
        self._dim = info.dim if info else None
        self._has_bq, self._bq_calibrated = self._run(_bq_state) if info is not None else (False, False)
        self._bq_too_large = False  # set once a warning said the collection is too large to calibrate here
        self._bq_retry_at = 0.0  # time.monotonic() before which a write does not retry a failed calibration
        # (time.monotonic(), rows, the HNSW index's ef_construction), see _table_stats
        self._table_stats_cache: tuple[float, float, int | None] = (-float("inf"), 0.0, None)
        self._plans_lock = threading.Lock()
        self._plans: dict[str, int] = dict.fromkeys(PLAN_COUNTERS, 0)
        self._filter_rows = FilterRowsCache()  # what recent filters matched (app/vectordb/filter_rows.py)
        if info is not None:
            # Until ensure_collection refuses a mismatch, reads must still cast queries to the column's real type.
            self._vector_type = self._stored_vector_type() or "vector"
        self._request_timeout_s = request_timeout_s

    @classmethod
    def from_settings(cls, settings: Settings) -> PgVectorHandler:
        """Build from :class:`app.config.Settings`: ``DATABASE_URL`` if set, otherwise the embedded PostgreSQL under
        ``DATA_DIR/pgdata`` (started here, stopped by :meth:`close`); ``DB_POOL_MIN``/``DB_POOL_MAX``,
        ``DB_CONNECT_TIMEOUT_S``, ``DB_REQUEST_TIMEOUT_S``, the ``HNSW_*`` settings and ``VECTOR_TYPE``.

        Raises :class:`DatabaseUnavailableError` when the database cannot be reached or started.
        """
        url, on_close = settings.database_url, None
        if url is None:
            from app.vectordb.embedded_pg import start_embedded_postgres

            embedded = start_embedded_postgres(settings.data_dir / "pgdata")
            url, on_close = embedded.url, embedded.stop
        try:
            return cls(
                url,
                pool_min=settings.db_pool_min,
                pool_max=settings.db_pool_max,
                timeout_s=settings.db_connect_timeout_s,
                hnsw_m=settings.hnsw_m,
                hnsw_ef_construction=settings.hnsw_ef_construction,
                ef_search=settings.hnsw_ef_search,
                vector_type=settings.vector_type,
                on_close=on_close,
                request_timeout_s=settings.db_request_timeout_s,
                statement_timeout_s=settings.db_statement_timeout_s,
            )
        except BaseException:
            if on_close is not None:  # do not leave the embedded server running behind a failed start
                on_close()
            raise

    @property
    def vector_type(self) -> str:
        """Storage type of the collection's column: ``vector`` (float32) or ``halfvec`` (float16)."""
        return self._vector_type

    def _stored_vector_type(self) -> str | None:
        row = self._run(
            lambda c: c.execute("SELECT vector_type FROM collection_meta WHERE name = %s", (COLLECTION,)).fetchone()
        )
        return row[0] if row else None

    def _configure(self, conn: psycopg.Connection) -> None:
        if self._schema != "public":  # the collection's tables first, then public's extension types
            conn.execute(sql.SQL("SET search_path TO {}, public").format(sql.Identifier(self._schema)))
        register_vector(conn)
        conn.execute(sql.SQL("SET hnsw.ef_search = {}").format(sql.Literal(self._ef_search)))
        conn.execute(sql.SQL("SET statement_timeout = {}").format(sql.Literal(self._statement_timeout_ms)))
        conn.commit()

    @staticmethod
    def _sever(conn: psycopg.Connection) -> None:
        """Deadline action: shut the connection's socket down, so the call blocked on it fails at once."""
        try:
            fd = conn.pgconn.socket
        except psycopg.Error:  # already closed
            return
        shutdown_socket(fd)

    def _check_connection(self, conn: psycopg.Connection) -> None:
        """The pool's check of a connection it is about to hand out (psycopg_pool's ``check_connection``), bounded
        by :data:`CHECK_DEADLINE_S`: a hung server fails the check instead of holding the request."""
        with self._deadlines.bound(lambda: self._sever(conn), CHECK_DEADLINE_S):
            psycopg_pool.ConnectionPool.check_connection(conn)

    def _conn(self):
        if self._closed:
            raise DatabaseUnavailableError("The database handler is closed.")
        return self._pool.connection(timeout=self._request_timeout_s)

    def _run(self, fn, *, deadline_s: float | None | bool = True):
        """Run ``fn(conn)`` on a pooled connection, mapping connection failures to 503s.

        ``deadline_s``: ``True``: the handler's deadline (``statement_timeout_s + DB_DEADLINE_GRACE_S``); a number:
        that many seconds; ``False``: none, and ``statement_timeout`` is lifted for the call (index builds and
        other maintenance that may take minutes, or wait on a lock).

        Raises :class:`DatabaseTimeoutError` when the deadline passed (the outcome of a write is then unknown),
        :class:`DatabaseUnavailableError` (connection lost, pool timeout, statement cancelled by
        ``statement_timeout``: nothing applied) or :class:`StorageFullError`.
        """
        limit = self._deadline_s if deadline_s is True else (deadline_s or None)
        try:
            with self._conn() as conn:
                with self._deadlines.bound(lambda: self._sever(conn), limit) as deadline:
                    try:
                        if deadline_s is False and self._statement_timeout_ms:
                            conn.execute("SET statement_timeout = 0")
                            conn.commit()
                            try:
                                return fn(conn)
                            finally:
                                if not conn.broken:
                                    conn.rollback()
                                    conn.execute(
                                        sql.SQL("SET statement_timeout = {}").format(
                                            sql.Literal(self._statement_timeout_ms)
                                        )
                                    )
                                    conn.commit()
                        return fn(conn)
                    except psycopg.OperationalError as exc:
                        if deadline.fired:
                            raise DatabaseTimeoutError(
                                f"PostgreSQL did not answer within {limit:g} s (the connection was dropped)"
                            ) from exc
                        raise
        except psycopg.errors.DiskFull as exc:
            raise StorageFullError(f"PostgreSQL's disk is full: {exc}") from exc
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed) as exc:
            raise DatabaseUnavailableError(f"PostgreSQL is unavailable: {exc}") from exc

    # --- collection ---------------------------------------------------------------------------------------
    def collection_info(self) -> CollectionInfo | None:
        row = self._run(
            lambda c: c.execute("SELECT model_id, dim FROM collection_meta WHERE name = %s", (COLLECTION,)).fetchone()
        )
        return CollectionInfo(row[0], row[1]) if row else None

    def _index_sql(self) -> sql.Composed:
        ops = VECTOR_TYPES[self._vector_type][1]
        return sql.SQL(
            "CREATE INDEX IF NOT EXISTS {} ON images USING hnsw (embedding {}) WITH (m = {}, ef_construction = {})"
        ).format(
            sql.Identifier(INDEX_NAME),
            sql.SQL(ops),
            sql.Literal(self._hnsw_m),
            sql.Literal(self._hnsw_ef_construction),
        )

    def ensure_collection(self, model_id: str, dim: int) -> CollectionInfo:
        """See :meth:`VectorDBHandler.ensure_collection`; also checks the stored ``vector_type``.

        A new collection gets ``embedding_bq`` (the binary quantisation the filtered exact pass ranks by, module
        docstring) with its dimension, with plain sign bits until it holds :data:`BQ_CALIBRATION_ROWS` rows; then
        the write that reaches that count calibrates it (:meth:`calibrate_bq`). A collection opened without the
        column or its thresholds (created before issue #29, or loaded by ``COPY``) gets them here when it holds at
        most :data:`BQ_AUTO_ADD_MAX_ROWS` rows; a larger one is left as it is (the rewrite would take minutes at a
        million rows, during a start) and a warning names ``image-search-fsck --calibrate`` (docs/backends.md).

        Raises :class:`VectorTypeMismatchError` when the collection was created with the other storage type
        (converting would rewrite the table and rebuild the index, so it is refused, not done silently).
        """
        dim = int(dim)
        requested_type = self._requested_type
        max_dim = min(VECTOR_TYPES[requested_type][0], _HNSW_MAX_DIM[requested_type])
        if not 0 < dim <= max_dim:
            raise ValueError(f"dimension must be in 1..{max_dim} for an HNSW index on {requested_type}, got {dim}")

        def _ensure(conn: psycopg.Connection) -> CollectionInfo:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
                row = conn.execute(
                    "SELECT model_id, dim, vector_type FROM collection_meta WHERE name = %s", (COLLECTION,)
                ).fetchone()
                if row is not None:
                    if (row[0], row[1]) != (model_id, dim):
                        raise CollectionMismatchError(row[0], row[1], model_id, dim)
                    if row[2] != requested_type:
                        raise VectorTypeMismatchError(row[2], requested_type)
                else:
                    log.info("Creating collection for %s (dim %d, %s)", model_id, dim, requested_type)
                    conn.execute(
                        sql.SQL("ALTER TABLE images ALTER COLUMN embedding TYPE {}({})").format(
                            sql.SQL(requested_type), sql.Literal(dim)
                        )
                    )
                    conn.execute(
                        "INSERT INTO collection_meta (name, model_id, dim, vector_type) VALUES (%s, %s, %s, %s)",
                        (COLLECTION, model_id, dim, requested_type),
                    )
                    conn.execute(_bq_column_sql(dim, requested_type))
                    _sync_filter_indexes(conn)  # covering now that the table has embedding_bq
                conn.execute(self._index_sql())
            return CollectionInfo(model_id, dim)

        info = self._run(_ensure, deadline_s=False)  # may build the HNSW index
        self._dim = info.dim
        self._vector_type = requested_type
        self._has_bq, self._bq_calibrated = self._run(_bq_state)
        if not self._bq_calibrated:
            self._maybe_calibrate(opening=True)
        return info

    # --- binary quantisation ------------------------------------------------------------------------------
    def _maybe_calibrate(self, *, opening: bool = False) -> None:
        """Calibrate (or add) ``embedding_bq`` once the collection holds :data:`BQ_CALIBRATION_ROWS` rows, while it
        holds at most :data:`BQ_AUTO_ADD_MAX_ROWS` (the table rewrite takes seconds there). A larger collection
        without the column or its thresholds is left as it is, with one warning naming ``image-search-fsck
        --calibrate``; a smaller one without the column gets it uncalibrated (plain signs) when ``opening``."""
        if self._bq_too_large:
            return
        rows = self.count()
        if rows > BQ_AUTO_ADD_MAX_ROWS:
            self._bq_too_large = True
            log.warning(
                "The collection (%d rows) has %s, so its filtered searches %s. Calibrate it once with "
                "`image-search-fsck --calibrate` while the service is stopped (it rewrites the table and rebuilds "
                "the HNSW index: about 10 minutes at a million rows; docs/backends.md).",
                rows,
                "binary quantisation thresholds of zero" if self._has_bq else "no embedding_bq column",
                "rank candidates less well"
                if self._has_bq
                else f"use the slower exact pass of up to {EXACT_ALWAYS_ROWS} rows",
            )
            return
        if rows >= BQ_CALIBRATION_ROWS:
            # A write's caller is waiting: the rewrite gets the write's own bound, grown per row as an upsert's is,
            # so a database that hangs mid-calibration cannot hold the request forever.
            self.calibrate_bq(allowance_s=None if opening else UPSERT_ROW_ALLOWANCE_S * rows)
        elif opening and not self._has_bq:

            def _add(conn: psycopg.Connection) -> None:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
                    conn.execute(_bq_column_sql(self._dim, self._vector_type))
                    _sync_filter_indexes(conn)  # the plain filter indexes become covering ones

            log.info("Adding embedding_bq to a collection of %d rows (filtered search, issue #29)", rows)
            self._run(_add, deadline_s=False)
            self._has_bq = True

    def calibrate_bq(self, *, force: bool = False, allowance_s: float | None = None) -> bool:
        """Set the collection's binary quantisation thresholds (:func:`bq_thresholds` of up to
        :data:`BQ_CALIBRATION_SAMPLE` stored embeddings) and rebuild ``embedding_bq`` with them, in one
        transaction: the column and ``collection_meta.bq_threshold`` change together, so a search (on any replica)
        quantises its query as the rows were. Rewrites the table and rebuilds its indexes (about a second at 1,000
        rows, minutes at a million); searches and writes wait meanwhile.

        Args:
            force: calibrate again even when thresholds are set (e.g. after the collection's content changed).
            allowance_s: ``None``: no deadline and no ``statement_timeout`` (start-up, ``image-search-fsck``,
                benches); seconds: the handler's ``statement_timeout`` and deadline grown by this much, as
                :meth:`upsert` grows them (the write path, which a hung database must not hold).

        Returns:
            Whether thresholds were set now (``False``: already calibrated, or the collection is empty).

        Raises:
            DatabaseUnavailableError: PostgreSQL cannot be reached (or cancelled the rewrite at its timeout).
            DatabaseTimeoutError: the deadline passed (nothing changed: the rewrite is one transaction).
        """
        if self._dim is None:
            return False

        def _calibrate(conn: psycopg.Connection) -> bool:
            with conn.transaction():
                if allowance_s is not None and self._statement_timeout_ms:
                    timeout_ms = self._statement_timeout_ms + int(allowance_s * 1000)
                    conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(timeout_ms)))
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
                if not force and _bq_state(conn)[1]:
                    return False  # another replica calibrated it first
                rows = conn.execute(
                    "SELECT embedding FROM images ORDER BY id LIMIT %s", (BQ_CALIBRATION_SAMPLE,)
                ).fetchall()
                if not rows:
                    return False
                thresholds = bq_thresholds(np.stack([_to_numpy(r[0]) for r in rows]))
                log.info("Calibrating embedding_bq from %d embeddings (filtered search, issue #29)", len(rows))
                # Dropping the column drops the covering filter indexes (they include it): rebuilt in the same
                # transaction, so no search ever sees the calibrated table without them.
                conn.execute("ALTER TABLE images DROP COLUMN IF EXISTS embedding_bq")
                conn.execute(_bq_column_sql(self._dim, self._vector_type, thresholds))
                _sync_filter_indexes(conn)
                conn.execute(
                    "UPDATE collection_meta SET bq_threshold = %s::vector WHERE name = %s", (thresholds, COLLECTION)
                )
                return True

        if allowance_s is None:
            deadline: float | bool = False
        else:
            deadline = self._deadline_s + allowance_s if self._deadline_s else True
        done = self._run(_calibrate, deadline_s=deadline)
        self._has_bq, self._bq_calibrated = self._run(_bq_state)
        return done

    # --- bulk loads ---------------------------------------------------------------------------------------
    def drop_index(self) -> None:
        """Drop the HNSW index, e.g. before loading many rows: building once afterwards is far faster than
        updating the graph row by row. Searches are exact (sequential scan) until :meth:`create_index` runs."""

        def _drop(conn: psycopg.Connection) -> None:
            with conn.transaction():
                conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(INDEX_NAME)))

        self._run(_drop, deadline_s=False)  # waits for the table's lock

    def create_index(self, *, maintenance_work_mem: str | None = None, parallel_workers: int | None = None) -> None:
        """(Re)build the HNSW index if missing, with this handler's ``m``/``ef_construction``.

        Args:
            maintenance_work_mem: PostgreSQL memory setting for this build (e.g. ``"8GB"``); pgvector builds much
                faster when the whole graph fits in it (it logs a notice and slows down when it does not).
            parallel_workers: ``max_parallel_maintenance_workers`` for this build (pgvector builds HNSW in
                parallel since 0.6.0); ``None`` keeps the server's setting.
        """

        def _build(conn: psycopg.Connection) -> None:
            with conn.transaction():
                if maintenance_work_mem is not None:
                    conn.execute(
                        sql.SQL("SET LOCAL maintenance_work_mem = {}").format(sql.Literal(str(maintenance_work_mem)))
                    )
                if parallel_workers is not None:
                    conn.execute(
                        sql.SQL("SET LOCAL max_parallel_maintenance_workers = {}").format(
                            sql.Literal(int(parallel_workers))
                        )
                    )
                conn.execute(self._index_sql())

        self._run(_build, deadline_s=False)  # minutes for a large collection

    # --- writes -------------------------------------------------------------------------------------------
    def upsert(self, records: Sequence[ImageRecord]) -> None:
        """See :meth:`VectorDBHandler.upsert`; its statement timeout and deadline grow by
        :data:`UPSERT_ROW_ALLOWANCE_S` per row, so large batches (``migrate.py``) are not cut short."""
        if not records:
            return
        for r in records:  # the whole batch is checked before anything is written
            if not is_valid_image_id(r.id):
                raise ValueError(f"image id must be 64 lower-case hex characters, got {r.id!r}")
        rows = [
            (
                r.id,
                checked_vector(r.vector, self._dim),
                r.metadata.filename,
                r.metadata.format,
                r.metadata.width,
                r.metadata.height,
                r.metadata.bytes,
                r.metadata.indexed_at,
                r.metadata.taken_at,
            )
            for r in records
        ]

        extra_s = UPSERT_ROW_ALLOWANCE_S * len(rows)

        def _write(conn: psycopg.Connection) -> None:
            with conn.transaction(), conn.cursor() as cur:
                if self._statement_timeout_ms:
                    timeout_ms = self._statement_timeout_ms + int(extra_s * 1000)
                    cur.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(timeout_ms)))
                cur.executemany(
                    f"INSERT INTO images (id, embedding, {_META_COLUMNS}) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (id) DO UPDATE SET embedding = EXCLUDED.embedding, filename = EXCLUDED.filename, "
                    "format = EXCLUDED.format, width = EXCLUDED.width, height = EXCLUDED.height, "
                    "bytes = EXCLUDED.bytes, indexed_at = EXCLUDED.indexed_at, taken_at = EXCLUDED.taken_at",
                    rows,
                )

        self._run(_write, deadline_s=self._deadline_s + extra_s if self._deadline_s else True)
        if not self._bq_calibrated and not self._bq_too_large and time.monotonic() >= self._bq_retry_at:
            try:
                self._maybe_calibrate()
            except Exception:  # the rows are committed; calibration is retried by a later write
                self._bq_retry_at = time.monotonic() + BQ_RETRY_S
                log.warning(
                    "Calibrating embedding_bq failed; retried by the first write after %.0f s",
                    BQ_RETRY_S,
                    exc_info=True,
                )

    def delete(self, image_id: str) -> bool:
        if not is_valid_image_id(image_id):
            return False  # never stored: upsert refuses such ids

        def _delete(conn: psycopg.Connection) -> bool:
            with conn.transaction():
                return conn.execute("DELETE FROM images WHERE id = %s RETURNING id", (image_id,)).fetchone() is not None

        return self._run(_delete)

    # --- reads --------------------------------------------------------------------------------------------
    def search(
        self, vector: np.ndarray, top_k: int, filters: SearchFilter | None = None, *, ef_search: int | None = None
    ) -> list[SearchHit]:
        """See :meth:`VectorDBHandler.search`; with ``filters``, the plans of the module docstring."""
        v = checked_vector(vector, self._dim)
        top_k = int(top_k)
        if top_k <= 0:
            return []
        where, params = filter_sql(filters) if filters is not None and not filters.empty else (None, [])

        def _search(conn: psycopg.Connection) -> list:
            with conn.transaction():
                ef = self._ef_search if ef_search is None else int(ef_search)
                if where is None:
                    return self._index_search(conn, v, top_k, ef=ef)
                return self._filtered_search(conn, v, top_k, filters, where, params, ef)

        return [SearchHit(r[0], float(r[1]), _metadata(r[2:])) for r in self._run(_search)]

    def _filtered_search(
        self,
        conn: psycopg.Connection,
        v: np.ndarray,
        top_k: int,
        filters: SearchFilter,
        where: sql.Composable,
        params: Sequence,
        ef: int,
    ) -> list:
        """The plans of the module docstring, in the caller's transaction."""
        total, ef_construction = self._table_stats(conn)
        limit = exact_pass_limit(total, bq=self._has_bq)
        known = self._filter_rows.get(filters)
        if known is None:
            estimate = self._estimated_rows(conn, where, params)
            rows, matching, holds = [], None, False
            if estimate <= limit:
                holds = self._estimate_holds(conn, filters, estimate, total, limit)
                if holds:
                    self._count_plan("estimates_held")
                    rows = self._exact_pass(conn, v, top_k, where, params, estimate)[0]
                else:
                    rows, matching = self._exact_pass(conn, v, top_k, where, params, estimate, count_up_to=limit)
            # Only a new value is stored: storing it again on every search would keep a busy filter's count forever.
            known = FilterRows(estimate, matching, holds)
            self._filter_rows.put(filters, known)
            if known.within(limit):
                self._count_plan("exact_pass")
                return rows
        elif known.within(limit):
            self._count_plan("exact_pass")
            return self._exact_pass(conn, v, top_k, where, params, known.estimate)[0]
        selectivity = min(1.0, known.rows / total) if total > 0 else 1.0
        # pgvector 0.8: keep scanning the graph until enough rows pass the filter (or max_scan_tuples).
        conn.execute(sql.SQL("SET LOCAL hnsw.iterative_scan = {}").format(sql.SQL(ITERATIVE_SCAN)))
        beam = iterative_ef(top_k, selectivity, ef, ef_construction)
        rows = self._index_search(conn, v, top_k, where, params, ef=beam)
        if len(rows) == top_k:
            self._count_plan("iterative", beam)
            return rows
        self._count_plan("exact_fallback")
        return self._exact_search(conn, v, top_k, where, params)

    def _estimate_holds(
        self, conn: psycopg.Connection, filters: SearchFilter, estimate: float, total: float, limit: int
    ) -> bool:
        """Whether the planner's ``estimate`` of the rows ``filters`` matches (at most ``limit``) cannot be so far
        below the truth that more than ``limit`` rows match, so that the exact pass may skip its count.

        True only for a filter on one column (:func:`filter_stats_column`) that has statistics, when ``estimate``
        plus :data:`ESTIMATE_ERROR_BUCKETS` histogram buckets (each ``1 / default_statistics_target`` of the
        ``total`` rows) plus the rows written since the table's last ANALYZE (``pg_stat_get_mod_since_analyze``;
        each could have joined the filter) is at most ``limit``. PostgreSQL estimates a range on one column from its
        histogram, exact to the bucket but for the buckets the range's two ends fall in, and an equality from its
        most-common-value frequencies (PostgreSQL's documentation, "Row Estimation Examples"); several columns are
        combined as if independent, and correlated ones (a folder and a date) can be estimated 10x and more too low,
        so they are always counted. A wrong answer here only costs time: the pass without its count ranks every
        matching row. (Which is what a bulk import seconds old may cost: sessions report their writes to the
        statistics at most once a second, and a busy one up to a minute later.)"""
        column = filter_stats_column(filters)
        if column is None or total <= 0:
            return False
        written, target, has_stats = conn.execute(
            "SELECT pg_stat_get_mod_since_analyze('images'::regclass), "
            "current_setting('default_statistics_target')::int, "
            "EXISTS (SELECT 1 FROM pg_stats WHERE schemaname = current_schema() AND tablename = %s AND attname = %s)",
            column,
        ).fetchone()
        if not has_stats or target <= 0:
            return False
        return estimate + ESTIMATE_ERROR_BUCKETS * total / target + float(written) <= limit

    def _count_plan(self, plan: str, ef: int | None = None) -> None:
        with self._plans_lock:
            self._plans[plan] += 1
            if ef is not None:
                self._plans["last_ef"] = ef

    def plan_counts(self) -> dict[str, int]:
        """How many filtered searches of this handler each plan of the module docstring answered (``exact_pass``,
        ``iterative``, ``exact_fallback``), how many of them counted their filter's rows first (``row_counts``; a
        filter searched again within :data:`~app.vectordb.filter_rows.FILTER_ROWS_TTL_S` is not counted again), and
        ``last_ef``, the ``hnsw.ef_search`` of the latest iterative scan: a copy, for benchmarks and diagnostics."""
        with self._plans_lock:
            return dict(self._plans)

    def _exact_pass(
        self,
        conn: psycopg.Connection,
        v: np.ndarray,
        top_k: int,
        where,
        params: Sequence,
        estimate: float,
        *,
        count_up_to: int | None = None,
    ) -> tuple[list, int | None]:
        """The exact pass of the module docstring over the rows matching ``where``: ``(rows, matching)``.

        ``count_up_to``: the rows are also counted, in the same statement, which then reads at most
        ``count_up_to + 1`` of them: ``matching`` is their number, and when it is past ``count_up_to`` the rows
        ranked were only some of those matching (the caller discards them). ``None``: the filter was counted
        before (:class:`~app.vectordb.filter_rows.FilterRows`), every matching row is ranked, ``matching`` is
        ``None``. ``estimate``, the planner's row count, sizes the re-ranked candidates (:func:`rerank_candidates`):
        the same input on every replica, counted or not, so they all return the same rows."""
        t = sql.SQL(self._vector_type)
        if count_up_to is None and not self._has_bq:
            return self._exact_search(conn, v, top_k, where, params), None
        # One process: with enough rows estimated PostgreSQL splits the scan and the top-N sort across parallel
        # workers (a Gather Merge), whose start costs more than they save on a pass this short and takes cores from
        # concurrent searches: a folder keeping 2 % of 1M x 512-d rows, 20.4 -> 12.7 ms (docs/benchmarks.md, "A
        # filter's rows counted once").
        settings = "SET LOCAL max_parallel_workers_per_gather = 0"
        if count_up_to is not None:
            self._count_plan("row_counts")
            # The counted rows (id and 64-160 bytes of bits, or the vector on a legacy table) stay in memory.
            settings += "; SET LOCAL work_mem = '64MB'"
        conn.execute(settings)
        if not self._has_bq:  # a collection from before issue #29 ranks its vectors (at most EXACT_ALWAYS_ROWS)
            self._exact_settings(conn)
            query = sql.SQL(
                "WITH matching AS MATERIALIZED (SELECT id, embedding, {meta} FROM images WHERE {where} LIMIT %s) "
                "SELECT id, 1 - (embedding <=> %s::{t}) AS score, {meta}, (SELECT count(*) FROM matching) "
                "FROM matching ORDER BY embedding <=> %s::{t}, id LIMIT %s"
            ).format(where=where, t=t, meta=sql.SQL(_META_COLUMNS))
            rows = conn.execute(query, (*params, count_up_to + 1, v, v, top_k), prepare=FILTERED_PREPARE).fetchall()
            return [r[:-1] for r in rows], int(rows[0][-1]) if rows else 0
        # The matching rows are read as (id, bits), by an Index Only Scan where one filter column's covering index
        # (FILTER_INDEXES) serves the filter: 1M x 512-d, 20,000 matching rows 25.3 -> 11.7 ms against one heap page
        # per scattered row (bench/exact_pass_layout.py, 2026-12-07); several filter columns may still combine their
        # indexes in a bitmap heap scan, the planner chooses. Not ctid, which an index-only scan cannot return: the
        # candidates are fetched again by primary key. Hamming distances are small integers, so thousands of
        # matching rows tie and the top-N sort compares their ids: byte-wise (COLLATE "C") instead of under the
        # database's collation (C.UTF-8 here, compared through strcoll), 2 ms of 17 at 20,000 matching rows (1M x
        # 512-d, 2026-12-07). Any fixed order would do: it only has to be the same on every replica.
        if count_up_to is not None:
            # Counting keeps the rows read in a materialized CTE, read twice. Not a count of its own before the
            # pass: that reads the rows a second time, and where two filter columns meet in a bitmap heap scan it
            # cost as much as the pass (docs/benchmarks.md, "A filter's rows counted once").
            candidates = (
                "WITH matching AS MATERIALIZED (SELECT id AS t, embedding_bq AS b FROM images WHERE {where} LIMIT %s), "
                'candidates AS (SELECT t FROM matching ORDER BY b <~> ({query_bits}), t COLLATE "C" LIMIT %s) '
            )
            count = "(SELECT count(*) FROM matching)"
        else:
            # Counted before: the rows go straight into the top-N sort, 2 % of 1M x 512-d rows 20.7 -> 11.4 ms.
            candidates = (
                "WITH candidates AS (SELECT id AS t FROM images WHERE {where} "
                'ORDER BY embedding_bq <~> ({query_bits}), id COLLATE "C" LIMIT %s) '
            )
            count = "NULL"
        # The distance is computed once per candidate (each computation reads the vector again); OFFSET 0 keeps the
        # subquery from being merged into the outer query.
        query = sql.SQL(
            candidates + "SELECT id, 1 - d AS score, {meta}, " + count + " FROM ("
            "SELECT i.id, i.embedding <=> %s::{t} AS d, {meta_i} FROM images i "
            "WHERE i.id = ANY(ARRAY(SELECT t FROM candidates)) OFFSET 0) r "
            "ORDER BY d, id LIMIT %s"
        ).format(
            where=where,
            t=t,
            query_bits=self._query_bits_sql(),
            meta=sql.SQL(_META_COLUMNS),
            meta_i=sql.SQL(_prefixed_meta("i")),
        )
        # A constant LIMIT (from the planner's estimate, not the count in SQL): with a LIMIT it cannot see, the
        # planner guesses the candidates' number and may fetch them by a sequential scan of the whole table.
        ranked = (v, COLLECTION, v, rerank_candidates(top_k, int(estimate)), v, top_k)
        args = (*params, *ranked) if count_up_to is None else (*params, count_up_to + 1, *ranked)
        rows = conn.execute(query, args, prepare=FILTERED_PREPARE).fetchall()
        if count_up_to is None:
            return [r[:-1] for r in rows], None
        return [r[:-1] for r in rows], int(rows[0][-1]) if rows else 0

    def _query_bits_sql(self) -> sql.Composed:
        """The query's binary quantisation as ``embedding_bq`` holds the rows' (params: vector, collection name,
        vector): thresholds read from ``collection_meta`` in the same statement, so a replica whose collection was
        calibrated by another one quantises its query the new way at once; plain signs while uncalibrated."""
        t = sql.SQL(self._vector_type)
        # A scalar subquery, so PostgreSQL computes it once per statement (an InitPlan): written as an expression
        # it is not a constant (it reads a table) and was computed again for every matching row, 2-3 us each.
        return sql.SQL(
            "SELECT binary_quantize(coalesce(%s::{t} - (SELECT bq_threshold FROM collection_meta WHERE name = %s)::{t},"
            " %s::{t}))::bit({dim})"
        ).format(t=t, dim=sql.Literal(self._dim))

    def _table_stats(self, conn: psycopg.Connection) -> tuple[float, int | None]:
        """The planner's row count of the table (``pg_class.reltuples``, kept by ANALYZE and autovacuum; -1 before
        the first one, then the estimate of an unfiltered scan) and the ``ef_construction`` the HNSW index was
        built with (its ``reloptions``; pgvector's default 64 when the build named none; ``None`` without an
        index), read at most every :data:`TOTAL_ROWS_TTL_S`: the count only scales the filter's selectivity, the
        index may be rebuilt meanwhile (``REINDEX``, docs/backends.md), and caching saves a filtered search one of
        its round trips."""
        cached_at, rows, ef_construction = self._table_stats_cache
        now = time.monotonic()
        if now - cached_at < TOTAL_ROWS_TTL_S:
            return rows, ef_construction
        n, options, has_index = conn.execute(
            "SELECT t.reltuples, i.reloptions, i.oid IS NOT NULL FROM pg_class t "
            "LEFT JOIN pg_class i ON i.oid = to_regclass(%s) WHERE t.oid = 'images'::regclass",
            (INDEX_NAME,),
        ).fetchone()
        if n is None or n < 0:
            plan = conn.execute("EXPLAIN (FORMAT JSON) SELECT 1 FROM images").fetchone()[0]
            if isinstance(plan, str):
                plan = json.loads(plan)
            n = plan[0]["Plan"]["Plan Rows"]
        ef_construction = None
        if has_index:
            ef_construction = PGVECTOR_DEFAULT_EF_CONSTRUCTION
            for option in options or ():
                name, _, value = option.partition("=")
                if name == "ef_construction":
                    ef_construction = int(value)
        # one tuple: threads racing here store equally good values
        self._table_stats_cache = (now, float(n), ef_construction)
        return float(n), ef_construction

    def _ranked_sql(self, where: sql.Composable | None, *, resort: bool = False) -> sql.Composed:
        """``SELECT id, score, metadata`` of the ``top_k`` rows nearest the query (params: vector, filter params,
        vector, top_k). ``resort``: the rows come from a ``relaxed_order`` iterative scan, slightly out of order, so
        they are collected in a materialized CTE and sorted again (pgvector's README, "Iterative Index Scans");
        params then end with the CTE's row limit before ``top_k``."""
        # The explicit cast makes the operator (and so the index's operator class) match the column type.
        query = sql.SQL(
            "SELECT id, {score} AS {name}, {meta} FROM images {where} ORDER BY embedding <=> %s::{t} LIMIT %s"
        ).format(
            score=sql.SQL("embedding <=> %s::{t}" if resort else "1 - (embedding <=> %s::{t})").format(
                t=sql.SQL(self._vector_type)
            ),
            name=sql.SQL("distance" if resort else "score"),
            t=sql.SQL(self._vector_type),
            meta=sql.SQL(_META_COLUMNS),
            where=sql.SQL("") if where is None else sql.SQL("WHERE {}").format(where),
        )
        if not resort:
            return query
        # "+ 0": pgvector's README, so that PostgreSQL 17+ does not take the CTE's order as already sorted.
        return sql.SQL(
            "WITH ranked AS MATERIALIZED ({query}) "
            "SELECT id, 1 - distance AS score, {meta} FROM ranked ORDER BY distance + 0, id LIMIT %s"
        ).format(query=query, meta=sql.SQL(_META_COLUMNS))

    def _index_search(
        self, conn: psycopg.Connection, v: np.ndarray, top_k: int, where=None, params: Sequence = (), *, ef: int
    ) -> list:
        """Rows of the HNSW index scan (in the caller's transaction, whose ``hnsw.ef_search`` is ``ef``), best
        first."""
        # PostgreSQL's planner picks a sequential scan over the HNSW index when it estimates the graph walk (which
        # grows with ef_search) as dearer than reading the table: measured with 20,000 512-d rows and ef_search=100,
        # that was 61 ms (every TOASTed vector read) instead of under 1 ms. The index is always the right plan for
        # this query, so forbid the scan; without an index it still runs. With a filter, the B-tree indexes could
        # also tempt it into a bitmap scan and a sort: forbidden too, the caller chose the graph walk.
        settings = ["SET LOCAL enable_seqscan = off"]
        if where is not None:
            settings += ["SET LOCAL enable_bitmapscan = off", "SET LOCAL enable_sort = off"]
        beam = max(int(ef), int(top_k))  # HNSW returns at most ef_search rows
        if beam != self._ef_search:  # the connection's own setting otherwise (_configure)
            settings.append(f"SET LOCAL hnsw.ef_search = {beam}")
        # One round trip for all of them (no parameters, so psycopg sends them as one simple query): a search is a
        # few milliseconds, and the neighbour-graph job runs one per stored image.
        conn.execute("; ".join(settings))
        if where is not None and ITERATIVE_SCAN == "relaxed_order":
            args = (v, *params, v, int(np.ceil(ITERATIVE_FACTOR * top_k)), top_k)
            return conn.execute(self._ranked_sql(where, resort=True), args, prepare=FILTERED_PREPARE).fetchall()
        prepare = None if where is None else FILTERED_PREPARE
        return conn.execute(self._ranked_sql(where), (v, *params, v, top_k), prepare=prepare).fetchall()

    @staticmethod
    def _exact_settings(conn: psycopg.Connection) -> None:
        """Index scans off for the rest of the transaction: the HNSW index is only reachable through one (it has no
        bitmap scan), while the B-tree indexes still serve the filter through bitmap scans. Settings made before
        this in the same transaction (SET LOCAL) are undone."""
        conn.execute(
            "SET LOCAL enable_indexscan = off; SET LOCAL enable_seqscan = on; "
            "SET LOCAL enable_bitmapscan = on; SET LOCAL enable_sort = on"
        )

    def _exact_search(self, conn: psycopg.Connection, v: np.ndarray, top_k: int, where, params: Sequence) -> list:
        """Rows of an exact search over the rows matching ``where``: every one ranked by its full vector, no HNSW."""
        self._exact_settings(conn)
        return conn.execute(self._ranked_sql(where), (v, *params, v, top_k), prepare=FILTERED_PREPARE).fetchall()

    @staticmethod
    def _estimated_rows(conn: psycopg.Connection, where: sql.Composable, params: Sequence) -> float:
        """The planner's estimate of the rows matching ``where`` (``EXPLAIN``: planned, not executed)."""
        plan = conn.execute(
            sql.SQL("EXPLAIN (FORMAT JSON) SELECT 1 FROM images WHERE {}").format(where), params, prepare=False
        ).fetchone()[0]
        if isinstance(plan, str):  # EXPLAIN's column is text
            plan = json.loads(plan)
        return float(plan[0]["Plan"]["Plan Rows"])

    def get(self, image_id: str) -> ImageRecord | None:
        if not is_valid_image_id(image_id):
            return None  # never stored: upsert refuses such ids

        def _get(conn: psycopg.Connection):
            with conn.transaction():
                return conn.execute(
                    f"SELECT id, embedding, {_META_COLUMNS} FROM images WHERE id = %s", (image_id,)
                ).fetchone()

        row = self._run(_get)
        if row is None:
            return None
        return ImageRecord(row[0], _to_numpy(row[1]), _metadata(row[2:]))

    def scan(self, batch_size: int = 1000) -> Iterator[list[ImageRecord]]:
        batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        last = ""  # keyset on the primary key: `id > last` and ORDER BY id use the same collation
        while True:

            def _page(conn: psycopg.Connection, after: str = last):
                with conn.transaction():
                    return conn.execute(
                        f"SELECT id, embedding, {_META_COLUMNS} FROM images WHERE id > %s ORDER BY id LIMIT %s",
                        (after, int(batch_size)),
                    ).fetchall()

            rows = self._run(_page)
            if not rows:
                return
            yield [ImageRecord(r[0], _to_numpy(r[1]), _metadata(r[2:])) for r in rows]
            last = rows[-1][0]

    def existing_ids(self, ids: Iterable[str]) -> set[str]:
        ids = [i for i in ids if is_valid_image_id(i)]  # malformed ids are never stored: dropped
        if not ids:
            return set()

        def _existing(conn: psycopg.Connection) -> set[str]:
            with conn.transaction():
                return {r[0] for r in conn.execute("SELECT id FROM images WHERE id = ANY(%s)", (ids,))}

        return self._run(_existing)

    def count(self) -> int:
        def _count(conn: psycopg.Connection) -> int:
            with conn.transaction():
                return conn.execute("SELECT count(*) FROM images").fetchone()[0]

        return self._run(_count)

    def health(self) -> bool:
        """Whether the server answers ``SELECT 1`` within :data:`CHECK_DEADLINE_S`, on a connection of its own (not
        the pool's, so a pool busy with requests does not read as a database that is down, and a probe costs one
        round trip, about a millisecond). Reconnects (libpq ``connect_timeout`` 2 s) after a failure. Never raises."""
        if self._closed:
            return False
        with self._probe_lock:
            conn = self._probe_conn
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = self._probe_conn = psycopg.connect(self._url, autocommit=True, connect_timeout=2)
                with self._deadlines.bound(lambda: self._sever(conn), CHECK_DEADLINE_S):
                    conn.execute("SELECT 1").fetchone()
                return True
            except Exception:  # noqa: BLE001 - health must report, never raise
                self._close_probe()
                return False

    def _close_probe(self) -> None:
        conn, self._probe_conn = self._probe_conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close cleanly; it is gone either way
                pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.close()
        with self._probe_lock:
            self._close_probe()
        self._deadlines.close()
        if self._on_close is not None:
            self._on_close()

    # --- several collections (see the module docstring) -------------------------------------------------------
    def active_collection(self) -> str:
        return self._run(_read_active)

    def open_collection(self, name: str) -> PgVectorHandler:
        return PgVectorHandler(self._url, collection=validate_collection_name(name), **self._options)

    def activate_collection(self, name: str) -> None:
        schema = _schema_of(validate_collection_name(name))

        def _switch(conn: psycopg.Connection) -> None:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
                if _stored_info(conn, schema) is None:
                    raise ValueError(f"there is no collection {name!r} to switch to")
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS public.{} (one boolean PRIMARY KEY DEFAULT true CHECK (one), "
                        "collection text NOT NULL, previous text, switched_at timestamptz NOT NULL DEFAULT now())"
                    ).format(sql.Identifier(ACTIVE_TABLE))
                )
                conn.execute(
                    sql.SQL(
                        "INSERT INTO public.{t} AS a (collection, previous) VALUES (%s, %s) ON CONFLICT (one) DO "
                        "UPDATE SET collection = EXCLUDED.collection, previous = a.collection, switched_at = now()"
                    ).format(t=sql.Identifier(ACTIVE_TABLE)),
                    (name, DEFAULT_COLLECTION),
                )

        self._run(_switch, deadline_s=False)  # waits on the schema lock

    def list_collections(self) -> dict[str, CollectionInfo]:
        def _list(conn: psycopg.Connection) -> dict[str, CollectionInfo]:
            with conn.transaction():
                schemas = [
                    r[0]
                    for r in conn.execute(
                        "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE c.relname = 'collection_meta' AND c.relkind = 'r' ORDER BY n.nspname"
                    )
                ]
                found = {}
                for schema in schemas:
                    info = _stored_info(conn, schema)
                    if info is not None:
                        found[DEFAULT_COLLECTION if schema == "public" else schema] = info
                return found

        return self._run(_list)

    def drop_collection(self, name: str) -> bool:
        schema = _schema_of(validate_collection_name(name))

        def _drop(conn: psycopg.Connection) -> bool:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
                if _read_active(conn) == name:
                    raise ValueError(f"{name!r} is the active collection; switch to another one before dropping it")
                existed = _stored_info(conn, schema) is not None
                if schema == "public":  # the default collection: back to the empty tables of a new database
                    conn.execute("SET LOCAL search_path TO public")
                    conn.execute("DROP TABLE IF EXISTS public.images")
                    conn.execute("DELETE FROM public.collection_meta")
                    conn.execute(SCHEMA_FILE.read_text())
                    _sync_filter_indexes(conn)
                else:
                    exists = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
                    if exists:
                        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
                return existed

        return self._run(_drop, deadline_s=False)  # waits on the schema lock


def _schema_of(collection: str) -> str:
    """The PostgreSQL schema holding ``collection``: ``public`` for the default one, else its own name."""
    return "public" if collection == DEFAULT_COLLECTION else validate_collection_name(collection)


def _read_active(conn: psycopg.Connection) -> str:
    """The active collection's name: the pointer row, or :data:`DEFAULT_COLLECTION` without one."""
    table = conn.execute("SELECT to_regclass(%s)", (f"public.{ACTIVE_TABLE}",)).fetchone()[0]
    if table is None:
        return DEFAULT_COLLECTION
    row = conn.execute(sql.SQL("SELECT collection FROM public.{}").format(sql.Identifier(ACTIVE_TABLE))).fetchone()
    return row[0] if row else DEFAULT_COLLECTION


def _stored_info(conn: psycopg.Connection, schema: str) -> CollectionInfo | None:
    """The model and dimension recorded in ``schema``'s ``collection_meta``, or ``None`` (no table or no row)."""
    if conn.execute("SELECT to_regclass(%s)", (f"{schema}.collection_meta",)).fetchone()[0] is None:
        return None
    row = conn.execute(
        sql.SQL("SELECT model_id, dim FROM {}.collection_meta WHERE name = %s").format(sql.Identifier(schema)),
        (COLLECTION,),
    ).fetchone()
    return CollectionInfo(row[0], row[1]) if row else None


def _apply_schema_in(conn: psycopg.Connection, schema: str) -> None:
    """Create ``schema`` with ``sql/init.sql``'s tables if missing, serialised with every other schema change.

    ``conn`` is in autocommit mode, and its ``public`` schema file was applied first, so the extension (and its
    types) are in ``public``, where the statements find them through ``search_path``.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET LOCAL search_path TO {}, public").format(sql.Identifier(schema)))
        conn.execute(SCHEMA_FILE.read_text())


def _sync_filter_indexes_in(conn: psycopg.Connection, schema: str) -> None:
    """:func:`_sync_filter_indexes` on ``schema``'s collection, serialised with every other schema change, in its own
    transaction (``conn`` is in autocommit mode): creates the filter indexes of a new collection, and converts a
    calibrated collection's plain ones to covering ones the first time the new code opens it (seconds per index at a
    million rows, once)."""
    search_path = sql.SQL("SET LOCAL search_path TO {}, public").format(sql.Identifier(schema))
    with conn.transaction():  # the usual case, nothing to change, without waiting on the lock
        conn.execute(search_path)
        _, missing, replaced = _filter_index_changes(conn)
    if not missing and not replaced:
        return
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
        conn.execute(search_path)
        _sync_filter_indexes(conn)
