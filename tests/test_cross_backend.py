"""pgvector and Milvus Lite agree, and migrate.py copies between them both ways, on real embeddings.

The 273 instance_small photos are decoded and embedded once per session with the offline model; both backends get
exactly the same vectors, so any difference in the answers comes from the databases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime

import numpy as np
import pytest

from app.ids import image_id_for
from app.imaging.decode import decode_image
from app.vectordb.base import ImageMetadata, ImageRecord, VectorDBHandler, canonical_top_ids
from app.vectordb.milvus import MilvusHandler
from app.vectordb.pgvector import PgVectorHandler
from tests.helpers import PROJECT_ROOT, create_database

# Runs a database or a server: left out of `make test-fast`.
pytestmark = pytest.mark.slow

MODEL = "efficientnet-lite2:imagenet"


@pytest.fixture(scope="session")
def instance_records(datasets, offline_embedder) -> list[ImageRecord]:
    """Every instance_small image as a record: id = SHA-256, filename = path relative to the dataset root."""
    root = datasets / "instance_small"
    files = sorted(p for p in (root / "images").rglob("*") if p.is_file())
    now = datetime.now(UTC).replace(microsecond=0)
    records, seen = [], set()
    for i in range(0, len(files), 16):
        batch = [(f, f.read_bytes()) for f in files[i : i + 16]]
        decoded = [decode_image(data, max_pixels=100_000_000) for _, data in batch]
        vectors = offline_embedder.embed_images([d.image for d in decoded])
        for (f, data), d, v in zip(batch, decoded, vectors, strict=True):
            image_id = image_id_for(data)
            if image_id in seen:  # the same bytes under two names are one image
                continue
            seen.add(image_id)
            meta = ImageMetadata(f.relative_to(root).as_posix(), d.format, d.width, d.height, len(data), now)
            records.append(ImageRecord(image_id, v, meta))
    return records


def _fill(handler: VectorDBHandler, records: list[ImageRecord]) -> VectorDBHandler:
    handler.ensure_collection(MODEL, records[0].vector.shape[0])
    for i in range(0, len(records), 100):
        handler.upsert(records[i : i + 100])
    return handler


def test_pgvector_and_milvus_lite_give_the_same_top5(pg_server, tmp_path, datasets, instance_records):
    queries = json.loads((datasets / "instance_small/queries.json").read_text())
    by_name = {r.metadata.filename: r for r in instance_records}
    pg = _fill(PgVectorHandler(create_database(pg_server)), instance_records)
    mv = _fill(MilvusHandler(str(tmp_path / "milvus.db")), instance_records)
    try:
        assert pg.count() == mv.count() == len(instance_records)
        for query in queries:
            vector = by_name[query].vector
            # Ask for a margin beyond 5 so a tie at rank 5 is ordered by id on both sides.
            a, b = pg.search(vector, 10), mv.search(vector, 10)
            assert canonical_top_ids(a, 5) == canonical_top_ids(b, 5), query
            np.testing.assert_allclose([h.score for h in a[:5]], [h.score for h in b[:5]], atol=1e-4)
    finally:
        pg.close()
        mv.close()


def _run_migrate(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts/migrate.py"), *args, "--no-progress"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PROJECT_ROOT,
    )


def test_migrate_pgvector_to_milvus_and_back(pg_server, tmp_path, instance_records):
    source_url, back_url = create_database(pg_server), create_database(pg_server)
    _fill(PgVectorHandler(source_url), instance_records).close()
    env = {"DATABASE_URL": source_url, "MILVUS_URI": str(tmp_path / "milvus.db"), "DATA_DIR": str(tmp_path)}

    forward = _run_migrate("--from", "pgvector", "--to", "milvus", env=env)
    assert forward.returncode == 0, forward.stderr
    n = len(instance_records)
    assert f"copied {n} records from pgvector to milvus; counts {n} -> {n}" in forward.stdout
    assert "same top-5 for 20/20 sample searches" in forward.stdout

    # Running it again is harmless: upserts by id.
    again = _run_migrate("--from", "pgvector", "--to", "milvus", env=env)
    assert again.returncode == 0 and f"counts {n} -> {n}" in again.stdout

    back = _run_migrate("--from", "milvus", "--to", "pgvector", env={**env, "DATABASE_URL": back_url})
    assert back.returncode == 0, back.stderr

    original, copy = PgVectorHandler(source_url), PgVectorHandler(back_url)
    try:
        assert copy.collection_info() == original.collection_info()
        assert copy.count() == n
        for record in instance_records[::25]:
            got = copy.get(record.id)
            assert got.metadata == record.metadata
            np.testing.assert_allclose(got.vector, record.vector, atol=1e-6)
            ours, theirs = copy.search(record.vector, 10), original.search(record.vector, 10)
            assert canonical_top_ids(ours, 5) == canonical_top_ids(theirs, 5)
    finally:
        original.close()
        copy.close()


def test_migrate_refuses_a_target_with_another_model(pg_server, tmp_path, instance_records):
    source_url = create_database(pg_server)
    _fill(PgVectorHandler(source_url), instance_records[:10]).close()
    other = MilvusHandler(str(tmp_path / "milvus.db"))
    other.ensure_collection("open_clip:ViT-B-32/laion2b_s34b_b79k", 512)
    other.close()
    env = {"DATABASE_URL": source_url, "MILVUS_URI": str(tmp_path / "milvus.db"), "DATA_DIR": str(tmp_path)}
    result = _run_migrate("--from", "pgvector", "--to", "milvus", env=env)
    assert result.returncode == 2
    assert "open_clip:ViT-B-32/laion2b_s34b_b79k" in result.stderr and MODEL in result.stderr


def test_migrate_moves_a_collection_from_vector_to_halfvec_in_another_database(pg_server, tmp_path, instance_records):
    source_url, target_url = create_database(pg_server), create_database(pg_server)
    _fill(PgVectorHandler(source_url), instance_records).close()
    env = {"DATABASE_URL": source_url, "DATA_DIR": str(tmp_path), "VECTOR_TYPE": "vector"}
    args = ("--from", "pgvector", "--to", "pgvector", "--to-database-url", target_url, "--to-vector-type", "halfvec")
    result = _run_migrate(*args, env=env)
    assert result.returncode == 0, result.stderr
    n = len(instance_records)
    assert f"copied {n} records from pgvector to pgvector; counts {n} -> {n}" in result.stdout
    assert "same vectors for 20/20 samples" in result.stdout and "same top-5 for 20/20" in result.stdout
    copy = PgVectorHandler(target_url, vector_type="halfvec")
    try:
        assert copy.vector_type == "halfvec" and copy.count() == n
        assert copy.ensure_collection(MODEL, instance_records[0].vector.shape[0])  # no VectorTypeMismatchError
        got = copy.get(instance_records[7].id)
        np.testing.assert_allclose(got.vector, instance_records[7].vector.astype(np.float16), atol=1e-7)
    finally:
        copy.close()


def test_migrate_refuses_to_copy_a_database_onto_itself(pg_server, tmp_path):
    url = create_database(pg_server)
    env = {"DATABASE_URL": url, "DATA_DIR": str(tmp_path)}
    result = _run_migrate("--from", "pgvector", "--to", "pgvector", env=env)
    assert result.returncode == 2
    assert "source and target are the same database" in result.stderr


def test_migrate_fails_loudly_when_the_target_does_not_match(pg_server, tmp_path, instance_records):
    source_url, target_url = create_database(pg_server), create_database(pg_server)
    _fill(PgVectorHandler(source_url), instance_records[:40]).close()
    # A target that already holds an image the source lacks: after the copy its count cannot match.
    _fill(PgVectorHandler(target_url), instance_records[40:41]).close()
    env = {"DATABASE_URL": source_url, "DATA_DIR": str(tmp_path)}
    result = _run_migrate("--from", "pgvector", "--to", "pgvector", "--to-database-url", target_url, env=env)
    assert result.returncode == 1
    assert "error: the target does not match the source" in result.stderr
    assert "counts differ: the source holds 40, 40 were read and copied, the target holds 41" in result.stderr


def test_verify_reports_a_changed_vector_and_a_missing_record(pg_server, instance_records):
    from app.cli import migrate as migrate_script

    source = _fill(PgVectorHandler(create_database(pg_server)), instance_records[:30])
    target = PgVectorHandler(create_database(pg_server))
    try:
        copied = migrate_script.migrate(source, target, batch_size=7, progress=False, samples=30)
        assert copied.rows == 30 and sorted(copied.sample) == sorted(r.id for r in instance_records[:30])
        assert migrate_script.verify(source, target, copied)["problems"] == []
        changed, gone = instance_records[3], instance_records[4]
        target.upsert([ImageRecord(changed.id, -changed.vector, changed.metadata)])
        target.delete(gone.id)
        problems = migrate_script.verify(source, target, copied)["problems"]
        assert any(p.startswith("counts differ") for p in problems)
        assert f"record {gone.id} is missing from the target" in problems
        assert any(p.startswith(f"record {changed.id}: vectors differ by up to") for p in problems)
    finally:
        source.close()
        target.close()
