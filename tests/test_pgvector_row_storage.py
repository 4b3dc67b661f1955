"""Where the pgvector backend keeps a row's vector (issue #29, ``sql/init.sql``'s ``toast_tuple_target``): in the
row's own heap page whenever the row fits one, so that a search reading a row by its vector (the exact pass's
re-ranked candidates) reads one page instead of a TOAST index and two TOAST pages. Checked on a real PostgreSQL
through the TOAST table's row count: PostgreSQL's default target (2,032 bytes) moves every 512-d vector there."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector
from psycopg import sql

from app.vectordb.base import ImageMetadata, ImageRecord, SearchFilter
from app.vectordb.pgvector import PgVectorHandler
from tests.helpers import create_database

DIM = 512  # 2,056 bytes as a vector: past PostgreSQL's default TOAST threshold


def _records(n: int, seed: int, dim: int = DIM) -> list[ImageRecord]:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    now = datetime.now(UTC)
    return [
        ImageRecord(f"{seed:032x}{i:032x}", v[i], ImageMetadata(f"f{i % 4}/{i}.jpg", "JPEG", 8, 8, 1, now))
        for i in range(n)
    ]


def _storage(url: str, schema: str = "public") -> tuple[list[str], int]:
    """``(reloptions of images, rows in its TOAST table)`` of ``schema``'s collection."""
    with psycopg.connect(url) as conn:
        options, toast = conn.execute(
            "SELECT coalesce(reloptions, '{}'), reltoastrelid::regclass::text FROM pg_class WHERE oid = %s::regclass",
            (f"{schema}.images",),
        ).fetchone()
        rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.SQL(toast))).fetchone()[0]
    return list(options), rows


def _check_reads(h: PgVectorHandler, records: list[ImageRecord]) -> None:
    """Every record reads back bit for bit, and a filtered search (the exact pass) ranks its own vector first."""
    for r in records[::7]:
        np.testing.assert_array_equal(h.get(r.id).vector, r.vector)
    r = records[4]
    hits = h.search(r.vector, 3, SearchFilter.create(path_prefix="f0"))
    assert hits[0].id == r.id and hits[0].score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("collection", [None, "second"])
def test_new_collections_keep_the_vector_in_the_row(pg_server, collection):
    url = create_database(pg_server)
    h = PgVectorHandler(url, ef_search=10, collection=collection)
    try:
        h.ensure_collection("m", DIM)
        records = _records(60, 1)
        h.upsert(records)
        options, toasted = _storage(url, collection or "public")
        assert "toast_tuple_target=8160" in options
        assert toasted == 0
        _check_reads(h, records)
    finally:
        h.close()


def test_a_table_from_before_keeps_its_toasted_rows_and_stores_new_ones_in_the_row(pg_server):
    """A table created before the setting (PostgreSQL's default target: its vectors in TOAST) gets it when the
    service opens it; the old rows stay where they are and read back unchanged, the new ones go into the row, and
    ``VACUUM FULL images`` (docs/backends.md) moves the old ones in too."""
    url = create_database(pg_server)
    h = PgVectorHandler(url, ef_search=10)
    h.ensure_collection("m", DIM)
    h.close()
    old = _records(40, 2)
    with psycopg.connect(url, autocommit=True) as conn:  # the old code's table and writes
        register_vector(conn)
        conn.execute("ALTER TABLE images RESET (toast_tuple_target)")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO images (id, embedding, filename, format, width, height, bytes) "
                "VALUES (%s, %s, %s, 'JPEG', 8, 8, 1)",
                [(r.id, r.vector, r.metadata.filename) for r in old],
            )
    options, toasted = _storage(url)
    assert options == [] and toasted >= len(old)  # the old layout: each vector in TOAST (in two chunks)

    h = PgVectorHandler(url, ef_search=10)  # a start of the new code
    try:
        h.ensure_collection("m", DIM)
        assert _storage(url) == (["toast_tuple_target=8160"], toasted)
        new = _records(40, 3)
        h.upsert(new)
        assert _storage(url)[1] == toasted  # no new TOAST rows
        _check_reads(h, old + new)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM FULL images")
        assert _storage(url)[1] == 0
        _check_reads(h, old + new)
    finally:
        h.close()


def test_rows_larger_than_a_page_still_move_their_vector_out_of_line(pg_server):
    """A 2,000-d vector (8,008 bytes, pgvector's largest for an HNSW index) does not fit a page with its row: the
    setting is a target, not PLAIN storage, so PostgreSQL still moves it to TOAST instead of refusing the row."""
    url = create_database(pg_server)
    h = PgVectorHandler(url, ef_search=10)
    try:
        h.ensure_collection("m", 2000)
        records = _records(12, 4, dim=2000)
        h.upsert(records)
        assert _storage(url)[1] > 0
        _check_reads(h, records)
    finally:
        h.close()
