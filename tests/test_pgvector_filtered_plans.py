"""The pgvector backend's filtered-search plans (issue #29, app/vectordb/pgvector.py) on a real PostgreSQL:
the binary-quantised exact pass, its guard against a planner estimate that is too low, the iterative scan's
``ef_search`` raised by selectivity, and collections created before ``embedding_bq`` existed."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import psycopg
import pytest

import app.vectordb.pgvector as pgvector_module
from app.vectordb.base import ImageMetadata, ImageRecord, SearchFilter
from app.vectordb.pgvector import (
    PgVectorHandler,
    bq_thresholds,
    ef_per_result,
    exact_pass_limit,
    iterative_ef,
    rerank_candidates,
)
from tests.helpers import create_database

DIM = 64


def _records(n: int, seed: int, rare_every: int = 10) -> list[ImageRecord]:
    """``n`` unit vectors; every ``rare_every``-th is in folder ``rare/``, the rest in ``common/``."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    return [
        ImageRecord(
            f"{i:064x}",
            v[i],
            ImageMetadata(f"{'rare' if i % rare_every == 0 else 'common'}/{i}.jpg", "JPEG", 8, 8, 1, now),
        )
        for i in range(n)
    ]


def _exact(records: list[ImageRecord], query: np.ndarray, prefix: str, k: int) -> list[str]:
    rows = [r for r in records if r.metadata.filename.startswith(prefix)]
    scores = np.array([float(r.vector @ query) for r in rows])
    return [rows[i].id for i in np.argsort(-scores, kind="stable")[:k]]


@pytest.fixture(autouse=True)
def _estimates_never_hold(monkeypatch):
    """Every first search of these tests counts its filter's rows: autovacuum may analyse a test's table at any
    moment, after which a one-column filter's estimate could hold (``PgVectorHandler._estimate_holds``) and skip the
    count, and the plans asserted here must not depend on when. The tests of estimates that hold put the margin
    back."""
    monkeypatch.setattr(pgvector_module, "ESTIMATE_ERROR_BUCKETS", float("inf"))


@pytest.fixture
def handler(pg_server):
    h = PgVectorHandler(create_database(pg_server), ef_search=10)
    yield h
    h.close()


def test_new_collections_rank_selective_filters_by_their_binary_quantisation(handler, monkeypatch):
    """A new collection has embedding_bq; a filter keeping 50 of 500 rows is answered by the exact pass (the
    candidates it re-ranks cover every matching row here, so the answer is the exact one) in one statement."""
    handler.ensure_collection("m", DIM)
    assert handler._has_bq
    records = _records(500, 1)
    handler.upsert(records)
    iterative = []
    monkeypatch.setattr(PgVectorHandler, "_index_search", lambda *a, **k: iterative.append(1) or [])
    query = records[3].vector
    hits = handler.search(query, 10, SearchFilter.create(path_prefix="rare"))
    assert [h.id for h in hits] == _exact(records, query, "rare/", 10)
    by_id = {r.id: r for r in records}
    assert all(h.score == pytest.approx(float(by_id[h.id].vector @ query), abs=1e-5) for h in hits)  # cosine
    assert not iterative
    assert handler.plan_counts() == {
        "exact_pass": 1,
        "iterative": 0,
        "exact_fallback": 0,
        "row_counts": 1,
        "estimates_held": 0,
    }


def test_a_low_estimate_cannot_send_a_large_filter_through_the_exact_pass(handler, monkeypatch):
    """The planner says 1 row; 450 of 500 match and the exact pass's limit is 100: the count stops past the limit,
    and the iterative scan answers (with ef_search raised for the real selectivity), still correct."""
    handler.ensure_collection("m", DIM)
    records = _records(500, 2, rare_every=1)  # every row in rare/
    records = [replace(r, metadata=replace(r.metadata, filename=f"rare/{i}.jpg")) for i, r in enumerate(records)]
    handler.upsert(records[:450])
    handler.upsert(
        [replace(r, metadata=replace(r.metadata, filename=f"other/{i}.jpg")) for i, r in enumerate(records[450:], 450)]
    )
    monkeypatch.setattr(pgvector_module, "EXACT_SEARCH_MAX_ROWS", 100)
    monkeypatch.setattr(PgVectorHandler, "_estimated_rows", staticmethod(lambda conn, where, params: 1.0))
    efs = []
    index_search = PgVectorHandler._index_search

    def spy(self, conn, v, top_k, where=None, params=(), *, ef):
        efs.append(ef)
        return index_search(self, conn, v, top_k, where, params, ef=ef)

    monkeypatch.setattr(PgVectorHandler, "_index_search", spy)
    query = records[7].vector
    hits = handler.search(query, 10, SearchFilter.create(path_prefix="rare"))
    assert len(hits) == 10 and all(h.metadata.filename.startswith("rare/") for h in hits)
    assert len({h.id for h in hits} & set(_exact(records[:450], query, "rare/", 10))) >= 9
    assert len(efs) == 1 and efs[0] >= 10
    assert handler.plan_counts() == {
        "exact_pass": 0,
        "iterative": 1,
        "exact_fallback": 0,
        "row_counts": 1,
        "estimates_held": 0,
        "last_ef": efs[0],
    }


def test_collections_from_before_embedding_bq(pg_server, monkeypatch, caplog):
    """A large pre-#29 collection is left as it is (a warning names the statement) and still answers filtered
    searches exactly; a small one gets the column when it is opened."""
    url = create_database(pg_server)
    h = PgVectorHandler(url, ef_search=10)
    h.ensure_collection("m", DIM)
    records = _records(300, 3)
    h.upsert(records)
    h.close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER TABLE images DROP COLUMN embedding_bq")
    monkeypatch.setattr(pgvector_module, "BQ_AUTO_ADD_MAX_ROWS", 100)
    h = PgVectorHandler(url, ef_search=10)
    try:
        with caplog.at_level("WARNING", logger="app.vectordb.pgvector"):
            h.ensure_collection("m", DIM)
        assert not h._has_bq
        assert "embedding_bq" in caplog.text and "image-search-fsck --calibrate" in caplog.text
        # dropping the column dropped the covering filter indexes; opening rebuilt them plain
        assert set(_filter_indexes(url).values()) == {False} and len(_filter_indexes(url)) == 6
        query = records[11].vector
        assert [x.id for x in h.search(query, 5, SearchFilter.create(path_prefix="rare"))] == _exact(
            records, query, "rare/", 5
        )
    finally:
        h.close()
    monkeypatch.setattr(pgvector_module, "BQ_AUTO_ADD_MAX_ROWS", 1000)
    h = PgVectorHandler(url, ef_search=10)
    try:
        h.ensure_collection("m", DIM)
        assert h._has_bq
        assert set(_filter_indexes(url).values()) == {True} and len(_filter_indexes(url)) == 6
        query = records[12].vector
        assert [x.id for x in h.search(query, 5, SearchFilter.create(path_prefix="rare"))] == _exact(
            records, query, "rare/", 5
        )
    finally:
        h.close()


def test_plan_parameters():
    """ef_search grows as the filter narrows, within [max(ef_search, top_k), 1000]; re-ranked candidates."""
    assert iterative_ef(10, 0.5, 160) == 160
    assert iterative_ef(10, 0.1, 160) == 500
    assert iterative_ef(10, 0.02, 160) == 1000
    assert iterative_ef(10, 0.0, 40) == 1000
    assert iterative_ef(100, 0.9, 40) == 556
    assert iterative_ef(2000, 0.5, 40) == 2000  # HNSW returns at most ef_search rows
    # a graph built with ef_construction >= 128 finds the filtered top-10 with fewer candidates
    assert ef_per_result(None) == ef_per_result(64) == 5 and ef_per_result(128) == ef_per_result(200) == 2.5
    assert iterative_ef(10, 0.1, 160, ef_construction=128) == 250
    assert rerank_candidates(10) == 400 and rerank_candidates(100) == 1000
    assert rerank_candidates(10, 20_000) == 400 and rerank_candidates(10, 50_000) == 1000  # 2 % of the matching
    # exact pass: 5 % of the rows, at least 5,000, at most 50,000; 5,000 without embedding_bq
    assert exact_pass_limit(20_000) == 5000 and exact_pass_limit(1_000_000) == 50_000
    assert exact_pass_limit(400_000) == 20_000 and exact_pass_limit(10_000_000) == 50_000
    assert exact_pass_limit(1_000_000, bq=False) == 5000


def test_filtered_statements_are_never_prepared(pg_server):
    """psycopg prepares a statement run 5 times on a connection, and PostgreSQL may then plan it generically, without
    the LIKE pattern's value, so a folder filter read the whole table; filtered statements are sent unprepared
    (FILTERED_PREPARE), while the unfiltered search may still be prepared."""
    h = PgVectorHandler(create_database(pg_server), ef_search=10, pool_min=1, pool_max=1)
    try:
        h.ensure_collection("m", DIM)
        records = _records(300, 4)
        h.upsert(records)
        for i in range(8):
            h.search(records[i].vector, 5, SearchFilter.create(path_prefix="rare"))
            h.search(records[i].vector, 5)

        def prepared(conn):
            return [r[0] for r in conn.execute("SELECT statement FROM pg_prepared_statements")]

        statements = h._run(prepared)
        assert not [s for s in statements if "LIKE" in s or "embedding_bq" in s]
        assert [s for s in statements if "ORDER BY embedding <=>" in s]  # the unfiltered search is prepared
    finally:
        h.close()


def _offset_records(n: int, seed: int) -> list[ImageRecord]:
    """``n`` non-negative unit vectors in 40 clusters, like EfficientNet-Lite2's pooled ReLU6 features (every
    component >= 0, so every sign bit is 1); every row in folder ``all/``."""
    from datetime import UTC, datetime

    rng = np.random.default_rng(seed)
    centres = rng.gamma(2.0, 1.0, size=(40, DIM))
    v = np.abs(centres[rng.integers(0, 40, size=n)] + 0.4 * rng.normal(size=(n, DIM))).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    now = datetime.now(UTC)
    return [ImageRecord(f"{i:064x}", v[i], ImageMetadata(f"all/{i}.jpg", "JPEG", 8, 8, 1, now)) for i in range(n)]


def _recall(handler, records, queries, k=10) -> float:
    hits = [{h.id for h in handler.search(q, k, SearchFilter.create(path_prefix="all"))} for q in queries]
    return float(np.mean([len(h & set(_exact(records, q, "all/", k))) / k for h, q in zip(hits, queries, strict=True)]))


def test_calibrated_thresholds_restore_the_exact_pass_on_non_negative_embeddings(pg_server, monkeypatch):
    """Sign bits of non-negative embeddings are all 1, so the exact pass re-ranks an arbitrary 400 of 2,000 rows
    (recall about 0.2); the write that brings the collection to BQ_CALIBRATION_ROWS sets median thresholds in
    collection_meta and the column at once, and the same searches come back exact. A second handler (a replica)
    opened before the calibration quantises its queries the new way without being told."""
    url = create_database(pg_server)
    monkeypatch.setattr(pgvector_module, "BQ_CALIBRATION_ROWS", 2000)
    a, b = PgVectorHandler(url, ef_search=10), PgVectorHandler(url, ef_search=10)
    try:
        a.ensure_collection("m", DIM)
        b.ensure_collection("m", DIM)
        records = _offset_records(2000, 7)
        a.upsert(records[:1999])
        assert not a._bq_calibrated
        queries = [r.vector for r in records[::97]]
        before = _recall(b, records[:1999], queries)
        assert before < 0.5
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT bit_count(embedding_bq) FROM images LIMIT 1").fetchone()[0] == DIM
        a.upsert(records[1999:])
        assert a._bq_calibrated and not b._bq_calibrated
        with psycopg.connect(url) as conn:
            stored = np.array(
                conn.execute("SELECT bq_threshold::real[] FROM collection_meta").fetchone()[0], dtype=np.float32
            )
            np.testing.assert_array_equal(stored, bq_thresholds(np.stack([r.vector for r in records])))
            bits = conn.execute("SELECT id, embedding_bq::text FROM images ORDER BY id LIMIT 3").fetchall()
        by_id = {r.id: r.vector for r in records}
        for image_id, code in bits:  # PostgreSQL computes each row's code from the stored thresholds
            assert code == "".join("1" if x > t else "0" for x, t in zip(by_id[image_id.strip()], stored, strict=True))
        assert _recall(b, records, queries) >= 0.95  # the replica, never told
        assert _recall(a, records, queries) >= 0.95
        b.upsert(records[:1])  # its own check finds the collection calibrated: no second rewrite
        assert b._bq_calibrated
        assert not a.calibrate_bq()  # already calibrated
    finally:
        a.close()
        b.close()


def test_bq_thresholds_are_per_dimension_medians():
    x = np.array([[0.0, 1.0], [0.2, 3.0], [0.4, 2.0]], dtype=np.float32)
    np.testing.assert_array_equal(bq_thresholds(x), np.array([0.2, 2.0], dtype=np.float32))
    with pytest.raises(ValueError):
        bq_thresholds(np.zeros((0, 4), dtype=np.float32))


def test_halfvec_collections_calibrate_too(pg_server, monkeypatch):
    """``VECTOR_TYPE=halfvec``: the thresholds are cast to halfvec in the column and in the query."""
    monkeypatch.setattr(pgvector_module, "BQ_CALIBRATION_ROWS", 100)
    h = PgVectorHandler(create_database(pg_server), ef_search=10, vector_type="halfvec")
    try:
        h.ensure_collection("m", DIM)
        records = _offset_records(300, 8)
        h.upsert(records)
        assert h._bq_calibrated
        queries = [r.vector for r in records[::31]]
        assert _recall(h, records, queries) >= 0.95
    finally:
        h.close()


def test_fsck_calibrate_sets_the_thresholds_of_a_collection_that_has_none(pg_server, tmp_path):
    """``image-search-fsck --calibrate``, the command the start-up warning names for large collections: in its own
    process, with the service's settings; a second run finds nothing to do."""
    import os

    from tests.helpers import run_fsck

    url = create_database(pg_server)
    h = PgVectorHandler(url, ef_search=10)
    try:
        h.ensure_collection("m", DIM)
        h.upsert(_offset_records(300, 9))  # under BQ_CALIBRATION_ROWS: plain sign bits
        assert not h._bq_calibrated
    finally:
        h.close()
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "DATABASE_URL": url, "EMBEDDER": "none"}
    proc, report = run_fsck(env, "--calibrate")
    assert proc.returncode in (0, 1), proc.stderr  # 1: the rows have no originals in this empty store
    assert report["calibrated"] is True
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT bq_threshold IS NOT NULL FROM collection_meta").fetchone()[0]
    assert run_fsck(env, "--calibrate")[1]["calibrated"] is False


def test_a_database_hung_mid_calibration_does_not_hold_the_write(tmp_path, monkeypatch, caplog):
    """The write that reaches BQ_CALIBRATION_ROWS calibrates; if PostgreSQL stops (SIGSTOP) during that rewrite,
    the write still returns within its own bound grown per row (the rows are committed). Writes within
    BQ_RETRY_S of the failure do not try again (each would wait out the same bound); the first write after it
    calibrates, once the server is back."""
    import time

    from app.vectordb.embedded_pg import start_embedded_postgres
    from tests.helpers import PostgresFreeze

    server = start_embedded_postgres(tmp_path / "pg")
    freeze = PostgresFreeze(tmp_path / "pg")
    monkeypatch.setattr(pgvector_module, "BQ_CALIBRATION_ROWS", 50)
    real_thresholds = pgvector_module.bq_thresholds

    def stop_then_compute(sample):  # between reading the sample and rewriting the table
        freeze.suspend()
        return real_thresholds(sample)

    h = PgVectorHandler(server.url, ef_search=10, statement_timeout_s=1.0)
    try:
        h.ensure_collection("m", DIM)
        records = _offset_records(60, 10)
        monkeypatch.setattr(pgvector_module, "bq_thresholds", stop_then_compute)
        started = time.monotonic()
        with caplog.at_level("WARNING", logger="app.vectordb.pgvector"):
            h.upsert(records[:55])
        took = time.monotonic() - started
        freeze.resume()
        # statement_timeout 1 s + grace 0.5 s + 0.01 s per row for 55 rows = 2.05 s, plus the write itself
        assert took < 5.0, took
        assert not h._bq_calibrated and "Calibrating embedding_bq failed" in caplog.text
        calls = []
        monkeypatch.setattr(pgvector_module, "bq_thresholds", lambda sample: calls.append(1) or real_thresholds(sample))
        h.upsert(records[55:57])  # within BQ_RETRY_S (60 s) of the failure: no second attempt
        assert not h._bq_calibrated and not calls
        h._bq_retry_at = 0.0  # the minute has passed
        h.upsert(records[57:])
        assert h._bq_calibrated and calls == [1] and h.count() == 60
    finally:
        freeze.resume()
        h.close()
        server.stop()


@pytest.mark.parametrize(("ef_construction", "beam"), [(64, 500), (128, 250)])
def test_the_iterative_scan_sizes_its_beam_by_how_the_index_was_built(pg_server, monkeypatch, ef_construction, beam):
    """The iterative scan's ef_search for a filter keeping 10 % is 5 * top_k / 0.1 on a graph built with
    pgvector's default ef_construction and 2.5 * top_k / 0.1 on one built with 128 or more, read from the index's
    own reloptions (a collection keeps the index it was built with when the setting changes)."""
    monkeypatch.setattr(pgvector_module, "EXACT_SEARCH_MAX_ROWS", 0)  # every filtered search walks the graph
    h = PgVectorHandler(create_database(pg_server), ef_search=10, hnsw_ef_construction=ef_construction)
    try:
        h.ensure_collection("m", DIM)
        records = _records(1000, 5)
        h.upsert(records)
        with psycopg.connect(h._url, autocommit=True) as conn:
            conn.execute("ANALYZE images")
        hits = h.search(records[3].vector, 10, SearchFilter.create(path_prefix="rare"))
        assert len(hits) == 10 and all(hit.metadata.filename.startswith("rare/") for hit in hits)
        assert h._run(h._table_stats)[1] == ef_construction
        # the planner's estimate of the 100 matching rows sets the selectivity: near 0.1, not exactly
        assert h.plan_counts()["iterative"] == 1 and h.plan_counts()["last_ef"] == pytest.approx(beam, rel=0.15)
    finally:
        h.close()


def _filter_indexes(url: str, schema: str = "public") -> dict[str, bool]:
    """``{name: covering}`` of the filter indexes on ``schema.images`` (covering: it has INCLUDE columns)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT c.relname, i.indnatts > i.indnkeyatts FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE i.indrelid = to_regclass(%s)",
            (f"{schema}.images",),
        ).fetchall()
    names = {name for name, _, _ in pgvector_module.FILTER_INDEXES}
    return {name: covering for name, covering in rows if name in names}


def _plan_nodes(plan: dict) -> list[str]:
    """The node types of an ``EXPLAIN (FORMAT JSON)`` plan, depth first, each with its index's name."""
    out = [plan["Node Type"] + (f" {plan['Index Name']}" if plan.get("Index Name") else "")]
    for child in plan.get("Plans", []):
        out += _plan_nodes(child)
    return out


class _ExplainingConnection:
    """A connection that, before running the exact pass's statement, EXPLAINs it in the same transaction (so with
    the same SET LOCALs), and keeps the plan's nodes."""

    def __init__(self, conn: psycopg.Connection, plans: list[list[str]]):
        self._conn, self._plans = conn, plans

    def execute(self, query, params=None, **kwargs):
        if isinstance(query, pgvector_module.sql.Composable) and "candidates AS" in query.as_string(self._conn):
            explain = pgvector_module.sql.SQL("EXPLAIN (FORMAT JSON) ") + query
            plan = self._conn.execute(explain, params, prepare=False).fetchone()[0]
            self._plans.append(_plan_nodes(plan[0]["Plan"]))
        return self._conn.execute(query, params, **kwargs)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def _explain_exact_passes(url: str, monkeypatch) -> list[list[str]]:
    """Vacuum and analyse ``url``'s table (an index-only scan needs the visibility map), then have every exact
    pass of :class:`PgVectorHandler` EXPLAIN its statement first: the list its plans' nodes are appended to."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE images")
    plans: list[list[str]] = []
    exact_pass = PgVectorHandler._exact_pass
    monkeypatch.setattr(
        PgVectorHandler,
        "_exact_pass",
        lambda self, conn, *a, **k: exact_pass(self, _ExplainingConnection(conn, plans), *a, **k),
    )
    return plans


def test_a_calibrated_collection_reads_a_one_column_filter_by_an_index_only_scan(pg_server, monkeypatch, caplog):
    """A calibrated collection's filter indexes are covering (INCLUDE id and embedding_bq), calibration rebuilds
    them with the column it re-adds, and the exact pass of a one-column filter reads its matching rows by an Index
    Only Scan of that index (once the table is vacuumed: the visibility map), re-ranking the candidates by primary
    key; the answer is the exact one."""
    url = create_database(pg_server)
    monkeypatch.setattr(pgvector_module, "BQ_CALIBRATION_ROWS", 500)
    h = PgVectorHandler(url, ef_search=10)
    try:
        with caplog.at_level("INFO", logger="app.vectordb.pgvector"):
            h.ensure_collection("m", DIM)
        assert set(_filter_indexes(url).values()) == {True}  # a new collection: covering from the start
        assert "Rebuilding" not in caplog.text  # an empty table's indexes are no migration to announce
        records = _records(4000, 9)
        records = [  # 200 PNG (i % 20 == 0); 200 of width 100 (i % 40 in (0, 1)), 100 of them PNG
            replace(
                r,
                metadata=replace(
                    r.metadata, format="PNG" if i % 20 == 0 else "JPEG", width=100 if i % 40 in (0, 1) else 8
                ),
            )
            for i, r in enumerate(records)
        ]
        h.upsert(records[:400])
        h.upsert(records[400:])  # the 500th row calibrates: DROP and ADD embedding_bq, indexes rebuilt with it
        assert h._bq_calibrated
        indexes = _filter_indexes(url)
        assert sorted(indexes) == sorted(name for name, _, _ in pgvector_module.FILTER_INDEXES)
        assert set(indexes.values()) == {True}
        with psycopg.connect(url) as conn:
            definition = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'images_format_upper'")
            assert "INCLUDE (format, id, embedding_bq)" in definition.fetchone()[0]
        plans = _explain_exact_passes(url, monkeypatch)
        query = records[5].vector

        def exact_for(q, keep) -> list[str]:
            rows = [r for r in records if keep(r.metadata)]
            scores = np.array([float(r.vector @ q) for r in rows])
            return [rows[i].id for i in np.argsort(-scores, kind="stable")[:10]]

        def exact(keep) -> list[str]:
            return exact_for(query, keep)

        hits = h.search(query, 10, SearchFilter.create(formats=["png"]))
        assert [x.id for x in hits] == exact(lambda m: m.format == "PNG")
        assert len(plans) == 1, plans
        assert "Index Only Scan images_format_upper" in plans[0], plans
        assert "Index Scan images_pkey" in plans[0], plans  # the candidates, by primary key
        # the same filter again: counted before, its rows go straight into the top-N sort, by the same scan
        again = h.search(records[6].vector, 10, SearchFilter.create(formats=["png"]))
        assert [x.id for x in again] == exact_for(records[6].vector, lambda m: m.format == "PNG")
        assert "Index Only Scan images_format_upper" in plans[1] and "CTE Scan" not in plans[1], plans
        plans.pop(1)
        hits = h.search(query, 10, SearchFilter.create(min_width=50))
        assert [x.id for x in hits] == exact(lambda m: m.width >= 50)
        assert "Index Only Scan images_width" in plans[1], plans
        # two filter columns: no one index covers both, the planner picks (a bitmap or plain index scan); same answer
        hits = h.search(query, 10, SearchFilter.create(formats=["png"], min_width=50))
        assert [x.id for x in hits] == exact(lambda m: m.format == "PNG" and m.width >= 50)
        print("two-column filter's plan:", plans[2])
        assert h.plan_counts()["exact_pass"] == 4 and h.plan_counts()["row_counts"] == 3
    finally:
        h.close()


def test_a_collection_calibrated_before_covering_indexes_gets_them_when_opened(pg_server, caplog):
    """A collection calibrated by the earlier code has plain filter indexes beside embedding_bq: opening it
    replaces them by covering ones (a one-time migration, logged), and the answers stay the same. Another
    collection (its own schema) gets covering indexes too."""
    url = create_database(pg_server)
    h = PgVectorHandler(url, ef_search=10)
    h.ensure_collection("m", DIM)
    records = _records(600, 10)
    h.upsert(records)
    query = records[21].vector
    before = [(x.id, round(x.score, 5)) for x in h.search(query, 10, SearchFilter.create(path_prefix="rare"))]
    h.close()
    with psycopg.connect(url, autocommit=True) as conn:  # the earlier code's plain indexes
        for name, key, _ in pgvector_module.FILTER_INDEXES:
            conn.execute(f"DROP INDEX {name}")
            conn.execute(f"CREATE INDEX {name} ON images ({key})")
    assert set(_filter_indexes(url).values()) == {False}
    with caplog.at_level("INFO", logger="app.vectordb.pgvector"):
        h = PgVectorHandler(url, ef_search=10)
    try:
        assert "Rebuilding 6 filter indexes as covering indexes" in caplog.text
        assert set(_filter_indexes(url).values()) == {True} and len(_filter_indexes(url)) == 6
        h.ensure_collection("m", DIM)
        after = [(x.id, round(x.score, 5)) for x in h.search(query, 10, SearchFilter.create(path_prefix="rare"))]
        assert after == before == [(i, pytest.approx(s, abs=1e-5)) for i, s in before]
        other = h.open_collection("second")
        try:
            other.ensure_collection("m", DIM)
            assert set(_filter_indexes(url, "second").values()) == {True}
            assert len(_filter_indexes(url, "second")) == 6
        finally:
            other.close()
    finally:
        h.close()


def test_prefix_range_holds_exactly_the_strings_that_start_with_the_prefix():
    """``low <= s < high`` (code point order, PostgreSQL's byte-wise ``~>=~``/``~<~`` on UTF-8) iff ``s`` starts with
    the prefix, over strings drawn from characters at the edges: ``/`` and ``0`` (neighbours), multi-byte ones, the
    last code point before the surrogates and the first after them."""
    alphabet = ["/", "0", ".", "a", "ñ", "ß", "😀", "\ud7ff", "\ue000", "\U0010fffe"]
    rng = np.random.default_rng(7)

    def draw(n: int) -> str:
        return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=n))

    for _ in range(3000):
        prefix = draw(int(rng.integers(1, 4)))
        low, high = pgvector_module.prefix_range(prefix)
        for s in (draw(int(rng.integers(0, 6))), prefix + draw(int(rng.integers(0, 3))), prefix[:-1]):
            assert (low <= s < high) == s.startswith(prefix), (prefix, s, high)
    assert pgvector_module.prefix_range("trips/") == ("trips/", "trips0")
    assert pgvector_module.prefix_range("a\ud7ff") == ("a\ud7ff", "a\ue000")  # the surrogates skipped
    assert pgvector_module.prefix_range("") is None and pgvector_module.prefix_range("a\U0010ffff") is None


def test_folder_filters_with_multibyte_names_match_exactly(handler):
    """The range of file names a folder filter reads, on a real PostgreSQL, against ``SearchFilter.matches``:
    folders whose names share a prefix with the one searched or sort right after it, in several scripts, and one
    ending in the last code point (a normalised folder ends in ``/``, so it still has a range)."""
    folders = [
        "año/",
        "año0/",
        "añob/",
        "año/ß/",
        "añ/",
        "写真/",
        "写真0/",
        "写真/😀/",
        "x\U0010ffff/",
        "x\U0010ffff0/",
    ]
    handler.ensure_collection("m", DIM)
    records = _records(len(folders) * 20, 11)
    records = [
        replace(r, metadata=replace(r.metadata, filename=f"{folders[i % len(folders)]}{i}.jpg"))
        for i, r in enumerate(records)
    ]
    handler.upsert(records)
    for folder in ("año", "año/ß", "añ", "写真", "写真/😀", "x\U0010ffff"):
        f = SearchFilter.create(path_prefix=folder)
        hits = handler.search(records[0].vector, 500, f)
        assert sorted(h.id for h in hits) == sorted(r.id for r in records if f.matches(r.metadata)), folder


def test_the_exact_pass_is_planned_without_parallel_workers(pg_server, monkeypatch):
    """A filter searched again runs the exact pass without its count, a plain top-N sort that PostgreSQL may split
    across parallel workers (a Gather Merge) once it estimates enough rows: at 1M x 512-d a folder keeping 2 %
    took 20.4 ms that way against 12.7 ms in one process (docs/benchmarks.md, "A filter's rows counted once"). With
    parallel plans made free on this database, neither pass of the handler plans one, and both answer exactly."""
    url = create_database(pg_server)
    with psycopg.connect(url, autocommit=True) as conn:
        database = conn.info.dbname
        for setting in ("parallel_setup_cost", "parallel_tuple_cost", "min_parallel_index_scan_size"):
            conn.execute(
                psycopg.sql.SQL("ALTER DATABASE {} SET {} = 0").format(
                    psycopg.sql.Identifier(database), psycopg.sql.Identifier(setting)
                )
            )
    monkeypatch.setattr(pgvector_module, "BQ_CALIBRATION_ROWS", 500)
    h = PgVectorHandler(url, ef_search=10)
    try:
        h.ensure_collection("m", DIM)
        records = _records(4000, 12)  # 400 in rare/: all re-ranked, so exact
        h.upsert(records)
        plans = _explain_exact_passes(url, monkeypatch)
        rare = SearchFilter.create(path_prefix="rare")
        for q in (records[3].vector, records[7].vector):  # counted, then counted before
            assert [x.id for x in h.search(q, 10, rare)] == _exact(records, q, "rare/", 10)
        assert h.plan_counts()["exact_pass"] == 2 and h.plan_counts()["row_counts"] == 1
        assert len(plans) == 2, plans
        assert not [node for plan in plans for node in plan if node.startswith("Gather")], plans
    finally:
        h.close()
