"""What a filter matched, kept per handler (app/vectordb/filter_rows.py, issue #29), on a real PostgreSQL: a filter
searched again is neither estimated nor counted again, a stale count never loses a row, a filter that matched past
the exact pass's limit goes straight to the iterative scan, entries expire, and a one-column filter whose estimate
cannot be far off is not counted at all."""

from __future__ import annotations

import time
from dataclasses import replace

import psycopg
import pytest

import app.vectordb.pgvector as pgvector_module
from app.vectordb.base import SearchFilter
from app.vectordb.filter_rows import FilterRows, FilterRowsCache
from app.vectordb.pgvector import PgVectorHandler
from tests.helpers import create_database
from tests.test_pgvector_filtered_plans import DIM, _estimates_never_hold, _exact, _records  # noqa: F401 (autouse)


@pytest.fixture
def handler(pg_server):
    h = PgVectorHandler(create_database(pg_server), ef_search=10)
    h.ensure_collection("m", DIM)
    yield h
    h.close()


def _spy_estimates(monkeypatch) -> list[int]:
    calls: list[int] = []
    estimate = PgVectorHandler._estimated_rows
    monkeypatch.setattr(PgVectorHandler, "_estimated_rows", staticmethod(lambda *a: calls.append(1) or estimate(*a)))
    return calls


def test_a_filter_searched_again_is_neither_estimated_nor_counted_again(handler, monkeypatch):
    records = _records(400, 1)
    handler.upsert(records)
    estimates = _spy_estimates(monkeypatch)
    rare = SearchFilter.create(path_prefix="rare")
    for q in (records[3].vector, records[4].vector, records[3].vector):
        assert [h.id for h in handler.search(q, 10, rare)] == _exact(records, q, "rare/", 10)
    plans = handler.plan_counts()
    assert plans["exact_pass"] == 3 and plans["row_counts"] == 1 and len(estimates) == 1
    # another filter is counted on its own; an equal filter built again is the same key
    handler.search(records[3].vector, 10, SearchFilter.create(path_prefix="common"))
    handler.search(records[3].vector, 10, SearchFilter.create(path_prefix="rare/"))
    assert handler.plan_counts()["row_counts"] == 2 and len(estimates) == 2


def test_rows_written_after_the_count_are_still_found(handler):
    """The count is only a plan: the exact pass ranks every row matching when it runs, so a row added to the
    folder since (the query itself, the nearest possible) is the first answer, and a deleted one is gone."""
    records = _records(400, 2)
    handler.upsert(records)
    rare = SearchFilter.create(path_prefix="rare")
    query = records[7].vector  # in common/
    assert records[7].id not in {h.id for h in handler.search(query, 10, rare)}
    moved = replace(records[7], metadata=replace(records[7].metadata, filename="rare/moved.jpg"))
    handler.upsert([moved])
    hits = handler.search(query, 10, rare)
    assert hits[0].id == records[7].id and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert handler.delete(hits[1].id)
    after = handler.search(query, 10, rare)
    assert hits[1].id not in {h.id for h in after} and len(after) == 10
    assert handler.plan_counts()["row_counts"] == 1


def test_a_filter_counted_past_the_limit_goes_straight_to_the_iterative_scan(handler, monkeypatch):
    """The planner says 1 row, 200 of 400 match and the exact pass's limit is 100: the first search counts (stopping
    at 101) and scans the graph; the next one scans the graph without estimate or count, sized the same way."""
    records = _records(400, 3, rare_every=2)
    handler.upsert(records)
    monkeypatch.setattr(pgvector_module, "EXACT_SEARCH_MAX_ROWS", 100)
    monkeypatch.setattr(PgVectorHandler, "_estimated_rows", staticmethod(lambda conn, where, params: 1.0))
    rare = SearchFilter.create(path_prefix="rare")
    first = handler.search(records[2].vector, 10, rare)
    plans = handler.plan_counts()
    assert plans["iterative"] == 1 and plans["row_counts"] == 1
    assert handler._filter_rows.get(rare) == FilterRows(1.0, 101)
    second = handler.search(records[2].vector, 10, rare)
    plans2 = handler.plan_counts()
    assert plans2["iterative"] == 2 and plans2["row_counts"] == 1 and plans2["last_ef"] == plans["last_ef"]
    assert [h.id for h in second] == [h.id for h in first]
    assert len(set(h.id for h in second) & set(_exact(records, records[2].vector, "rare/", 10))) >= 9


def test_entries_expire_and_the_least_recently_used_go_first():
    now = [0.0]
    cache = FilterRowsCache(maxsize=2, ttl_s=30.0, timer=lambda: now[0])
    a, b, c = (SearchFilter.create(min_width=w) for w in (1, 2, 3))
    cache.put(a, FilterRows(5.0, 5))
    now[0] = 29.9
    assert cache.get(a) == FilterRows(5.0, 5)
    now[0] = 30.0
    assert cache.get(a) is None  # counted 30 s ago: counted again
    cache.put(a, FilterRows(1.0, 1))
    cache.put(b, FilterRows(200_000.0))
    cache.get(a)
    cache.put(c, FilterRows(3.0, 3))
    assert cache.get(b) is None and cache.get(a) is not None and cache.get(c) is not None
    cache.clear()
    assert cache.get(a) is None


def test_a_filter_past_the_limit_by_its_estimate_is_not_estimated_again(handler, monkeypatch):
    """A filter the planner puts past the exact pass's limit is scanned in the graph at once, uncounted, and its
    estimate is kept for the next search."""
    records = _records(400, 4, rare_every=2)
    handler.upsert(records)
    handler._run(lambda conn: conn.execute("ANALYZE images"))  # the planner then puts common/ at about 200 rows
    monkeypatch.setattr(pgvector_module, "EXACT_SEARCH_MAX_ROWS", 100)
    estimates = _spy_estimates(monkeypatch)
    common = SearchFilter.create(path_prefix="common")
    for q in (records[1].vector, records[3].vector):
        assert len(handler.search(q, 10, common)) == 10
    plans = handler.plan_counts()
    assert plans["iterative"] == 2 and plans["row_counts"] == 0 and len(estimates) == 1
    known = handler._filter_rows.get(common)
    assert known.matching is None and known.rows == known.estimate > 100


@pytest.fixture
def replicas(pg_server):
    """Two handlers on one database, as two API replicas."""
    url = create_database(pg_server)
    a = PgVectorHandler(url, ef_search=10)
    b = PgVectorHandler(url, ef_search=10)
    try:
        a.ensure_collection("m", DIM)
        b.ensure_collection("m", DIM)
        yield a, b
    finally:
        a.close()
        b.close()


def test_replicas_that_did_and_did_not_count_return_the_same_rows(replicas):
    """Two replicas: one counts each filter afresh, the other reuses its count. With more matching rows than the
    exact pass re-ranks (600 > 400), the binary ranking chooses the candidates, and both choose the same ones: the
    re-ranked number comes from the planner's estimate in both."""
    a, b = replicas
    records = _records(1200, 5, rare_every=2)
    a.upsert(records)
    rare = SearchFilter.create(path_prefix="rare")
    for r in records[:12]:
        a._filter_rows.clear()
        assert [h.id for h in a.search(r.vector, 10, rare)] == [h.id for h in b.search(r.vector, 10, rare)]
    assert a.plan_counts()["row_counts"] == 12 and b.plan_counts()["row_counts"] == 1
    assert a.plan_counts()["exact_pass"] == b.plan_counts()["exact_pass"] == 12


def test_the_rows_to_plan_with():
    assert FilterRows(100.0).rows == 100.0
    assert FilterRows(100.0, 5067).rows == 5067.0  # counted past a low estimate
    assert FilterRows(22_566.0, 19_979).rows == 22_566.0


def _analysed(handler, records) -> None:
    """``records`` stored and the table analysed, with autovacuum off for it (no ANALYZE of its own mid-test)."""
    handler._run(lambda conn: conn.execute("ALTER TABLE images SET (autovacuum_enabled = false)"))
    handler.upsert(records)
    handler._run(lambda conn: conn.execute("ANALYZE images"))


def test_a_one_column_filter_whose_estimate_holds_is_not_counted(handler, monkeypatch):
    """4,000 rows analysed, 400 in rare/: the estimate (about 400) plus two histogram buckets (80 rows) is far
    below the exact pass's limit (5,000), so the first search skips the count, and is exact; the filter searched
    again is not estimated again. Two filter columns are always counted: the planner multiplies their shares."""
    monkeypatch.setattr(pgvector_module, "ESTIMATE_ERROR_BUCKETS", 2)
    records = _records(4000, 6)
    _analysed(handler, records)
    estimates = _spy_estimates(monkeypatch)
    rare = SearchFilter.create(path_prefix="rare")
    for q in (records[3].vector, records[4].vector):
        assert [h.id for h in handler.search(q, 10, rare)] == _exact(records, q, "rare/", 10)
    plans = handler.plan_counts()
    assert plans["exact_pass"] == 2 and plans["estimates_held"] == 1 and plans["row_counts"] == 0
    assert len(estimates) == 1 and handler._filter_rows.get(rare).estimate_holds
    both = SearchFilter.create(path_prefix="rare", min_width=1)
    assert [h.id for h in handler.search(records[3].vector, 10, both)] == _exact(
        records, records[3].vector, "rare/", 10
    )
    assert handler.plan_counts()["row_counts"] == 1 and handler.plan_counts()["estimates_held"] == 1


def test_rows_written_since_the_analyze_make_the_estimate_count_again(handler, monkeypatch):
    """The limit is 1,000: 400 estimated + 80 holds, but once 3,600 rows were written since the last ANALYZE (any
    of them could have moved into the folder) it does not, and the filter is counted."""
    monkeypatch.setattr(pgvector_module, "ESTIMATE_ERROR_BUCKETS", 2)
    monkeypatch.setattr(pgvector_module, "EXACT_SEARCH_MAX_ROWS", 1000)
    records = _records(4000, 7)
    _analysed(handler, records)
    rare = SearchFilter.create(path_prefix="rare")
    handler.search(records[3].vector, 10, rare)
    assert handler.plan_counts()["estimates_held"] == 1 and handler.plan_counts()["row_counts"] == 0

    def written(conn) -> int:
        return conn.execute("SELECT pg_stat_get_mod_since_analyze('images'::regclass)").fetchone()[0]

    with psycopg.connect(handler._url, autocommit=True) as conn:
        conn.execute("UPDATE images SET bytes = bytes + 1 WHERE filename LIKE 'common/%'")
        conn.execute("SELECT pg_stat_force_next_flush()")  # at once, not within the next 10 s
    deadline = time.monotonic() + 10
    while handler._run(written) < 3600 and time.monotonic() < deadline:
        time.sleep(0.05)
    handler._filter_rows.clear()
    hits = handler.search(records[3].vector, 10, rare)
    assert [h.id for h in hits] == _exact(records, records[3].vector, "rare/", 10)
    assert handler.plan_counts()["estimates_held"] == 1 and handler.plan_counts()["row_counts"] == 1


def test_a_table_never_analysed_is_counted(handler, monkeypatch):
    """Without statistics (no ANALYZE yet, autovacuum off) the planner's estimate is a default guess, so even a
    one-column filter far under the limit is counted."""
    monkeypatch.setattr(pgvector_module, "ESTIMATE_ERROR_BUCKETS", 2)
    handler._run(lambda conn: conn.execute("ALTER TABLE images SET (autovacuum_enabled = false)"))
    records = _records(4000, 9)
    handler.upsert(records)
    rare = SearchFilter.create(path_prefix="rare")
    assert [h.id for h in handler.search(records[3].vector, 10, rare)] == _exact(
        records, records[3].vector, "rare/", 10
    )
    assert handler.plan_counts()["row_counts"] == 1 and handler.plan_counts()["estimates_held"] == 0


def test_replicas_whose_estimate_held_or_not_return_the_same_rows(replicas, monkeypatch):
    """One replica skips the count (its estimate holds), the other counts (as one whose statistics lag would): with
    more matching rows than the exact pass re-ranks (600 > 400), both re-rank the same number, from the estimate,
    so they return the same rows."""
    monkeypatch.setattr(pgvector_module, "ESTIMATE_ERROR_BUCKETS", 2)
    a, b = replicas
    records = _records(1200, 8, rare_every=2)
    _analysed(a, records)
    monkeypatch.setattr(b, "_estimate_holds", lambda *args: False)
    rare = SearchFilter.create(path_prefix="rare")
    for r in records[:12]:
        a._filter_rows.clear()
        b._filter_rows.clear()
        assert [h.id for h in a.search(r.vector, 10, rare)] == [h.id for h in b.search(r.vector, 10, rare)]
    assert a.plan_counts()["estimates_held"] == 12 and a.plan_counts()["row_counts"] == 0
    assert b.plan_counts()["row_counts"] == 12
