"""VECTOR_TYPE=halfvec on pgvector beyond the shared contract: the column, the index and the recorded type."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest

from app.errors import CollectionMismatchError, VectorTypeMismatchError
from app.vectordb.pgvector import PgVectorHandler
from tests.test_vectordb_contract import _records, _unit

# Runs a database or a server: left out of `make test-fast`.
pytestmark = pytest.mark.slow

DIM = 64


def test_halfvec_column_index_and_plan(database_url):
    h = PgVectorHandler(database_url, vector_type="halfvec")
    try:
        h.ensure_collection("test-model:v1", DIM)
        h.upsert(_records(_unit(np.random.default_rng(0), 50)))
        with psycopg.connect(database_url) as conn:
            column = conn.execute(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = 'images'::regclass AND attname = 'embedding'"
            ).fetchone()[0]
            index = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'images_embedding_hnsw'").fetchone()
            stored = conn.execute("SELECT vector_type FROM collection_meta").fetchone()[0]
            # The query the handler sends, with its cast, must be answered from the HNSW index.
            conn.execute("SET enable_seqscan = off")
            plan = "\n".join(
                r[0]
                for r in conn.execute(
                    f"EXPLAIN SELECT id FROM images ORDER BY embedding <=> '[{','.join(['0.1'] * DIM)}]'::halfvec "
                    "LIMIT 5"
                )
            )
        assert column == f"halfvec({DIM})"
        assert "halfvec_cosine_ops" in index[0]
        assert stored == "halfvec"
        assert "images_embedding_hnsw" in plan
        assert h.vector_type == "halfvec"
    finally:
        h.close()


@pytest.mark.parametrize(("created", "reopened"), [("halfvec", "vector"), ("vector", "halfvec")])
def test_a_different_vector_type_is_refused(database_url, created, reopened):
    first = PgVectorHandler(database_url, vector_type=created)
    first.ensure_collection("test-model:v1", DIM)
    first.upsert(_records(_unit(np.random.default_rng(1), 5)))
    first.close()
    second = PgVectorHandler(database_url, vector_type=reopened)
    try:
        with pytest.raises(VectorTypeMismatchError) as err:
            second.ensure_collection("test-model:v1", DIM)
        assert isinstance(err.value, CollectionMismatchError)  # stops startup like a model mismatch
        assert f"'{created}'" in str(err.value) and f"VECTOR_TYPE is '{reopened}'" in str(err.value)
        # Reads before ensure_collection still cast queries to the stored type.
        assert second.vector_type == created
        assert len(second.search(_unit(np.random.default_rng(2), 1)[0], 3)) == 3
    finally:
        second.close()


def test_collections_from_before_vector_type_read_as_vector(database_url):
    h = PgVectorHandler(database_url)
    h.ensure_collection("test-model:v1", DIM)
    h.close()
    with psycopg.connect(database_url, autocommit=True) as conn:  # as a pre-upgrade schema: column absent
        conn.execute("ALTER TABLE collection_meta DROP COLUMN vector_type")
    h = PgVectorHandler(database_url)  # re-applies init.sql, which adds the column with default 'vector'
    try:
        assert h.ensure_collection("test-model:v1", DIM).dim == DIM
        assert h.vector_type == "vector"
    finally:
        h.close()
