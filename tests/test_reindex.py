"""Switching models with ``scripts/reindex.py`` (issue #9, item 7): every stored original re-embedded with a new
model into a new collection, the active collection switched atomically, resumable after a real ``kill -9``, on the
real embedded PostgreSQL and on Milvus Lite, with real images. The "new model" is an OpenCLIP ViT-S-32 with
random weights saved to a checkpoint file by the test (no download), the old one the offline model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psycopg
import pytest
from psycopg import sql

from app.errors import CollectionMismatchError
from app.imaging.prepare import prepare_bytes
from app.indexing.reindex import NothingToReindex, ReindexError, reindex
from app.indexing.store import ImageStore
from app.service import SearchService
from app.vectordb.base import DEFAULT_COLLECTION, SearchFilter, collection_name_for, validate_collection_name
from app.vectordb.pgvector import PgVectorHandler
from tests.helpers import PROJECT_ROOT, make_settings

# Loads a model, a database or a server: left out of `make test-fast`.
pytestmark = pytest.mark.slow

CLIP_ARCH = "ViT-S-32"  # the smallest built-in ViT with CLIP's tokenizer (as tests/test_embedders.py)
# Real images of several formats besides the Caltech JPEGs: the re-index decodes them with the ingest code.
OTHER_FORMATS = [
    "formats/heic/nokia_autumn_1440x960.heic",
    "formats/avif/rot1mir0.avif",
    "formats/webp/flower.webp",
    "formats/png/bridge_L.png",
    "instance_small/images/exif_portrait/Portrait_5.jpg",
]


# --- names (no database) -------------------------------------------------------------------------------------
def test_collection_names_derived_from_model_ids():
    assert collection_name_for("efficientnet-lite2:imagenet") == "efficientnet_lite2_imagenet"
    assert collection_name_for("open_clip:ViT-B-32/laion2b_s34b_b79k") == "open_clip_vit_b_32_laion2b_s34b_b79k"
    long_a = collection_name_for("open_clip:" + "x" * 80 + "/a")
    long_b = collection_name_for("open_clip:" + "x" * 80 + "/b")
    assert long_a != long_b and len(long_a) <= 48 and validate_collection_name(long_a) == long_a
    assert collection_name_for("images") != DEFAULT_COLLECTION and collection_name_for("9x")[0].isalpha()
    for bad in ("", "Images", "pg_x", "public", "a-b", "x" * 49, "1abc"):
        with pytest.raises(ValueError):
            validate_collection_name(bad)


# --- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory) -> Path:
    """A ViT-S-32 with random (seeded) weights, saved as a checkpoint file: CLIP_PRETRAINED=<this path>."""
    import torch

    from app.embedders.clip import OpenClipEmbedder

    torch.manual_seed(0)
    model = OpenClipEmbedder(CLIP_ARCH, pretrained=None, device="cpu")
    path = tmp_path_factory.mktemp("clip") / "random-vit-s-32.pt"
    torch.save(model.model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def clip_embedder(clip_checkpoint):
    """The new model, loaded in this process from the checkpoint, as ``CPU_ENCODER=torch`` loads it."""
    from app.embedders.clip import OpenClipEmbedder

    return OpenClipEmbedder(CLIP_ARCH, pretrained=str(clip_checkpoint), device="cpu", batch_size=16)


def _image_files(datasets: Path, n_caltech: int) -> list[Path]:
    files = sorted((datasets / "caltech101_subset/images").rglob("*.jpg"))
    picks = files[:: max(1, len(files) // n_caltech)][:n_caltech]
    return picks + [datasets / rel for rel in OTHER_FORMATS]


def _index_with_offline_model(settings, embedder, files: list[Path]) -> dict[str, str]:
    """Index ``files`` through the service (the old model); returns ``{id: stored filename}``."""
    service = SearchService.open(settings, embedder=embedder)
    try:
        stored = {}
        for start in range(0, len(files), 32):
            chunk = files[start : start + 32]
            uploads = [(p.read_bytes(), f"{p.parent.name}/{p.name}") for p in chunk]
            for r in service.index_images(uploads):
                assert r.status == "indexed", r
                stored[r.id] = r.filename
        return stored
    finally:
        service.close()


def _reindex_kwargs(settings) -> dict:
    return dict(workers=1, batch_size=8, max_pixels=settings.max_image_pixels, max_bytes=settings.max_upload_bytes)


# --- in process: the whole switch, and writes through the service during it -----------------------------------
def test_reindex_switches_the_active_collection_and_keeps_the_metadata(
    tmp_path, database_url, datasets, offline_embedder, clip_embedder
):
    settings = make_settings(tmp_path / "data", database_url)
    files = _image_files(datasets, 40)
    stored = _index_with_offline_model(settings, offline_embedder, files[:-2])
    late_file = files[-2]  # indexed through the service while the re-index runs
    after_file = files[-1]  # indexed through the old service after the switch, before its restart
    # taken_at: a row's own value is kept; a row without one (indexed before it was stored) gets its EXIF date.
    flower = next(i for i, name in stored.items() if name.endswith("flower.webp"))  # EXIF date 2003-12-14
    kept = next(i for i, name in stored.items() if name.endswith(".jpg"))
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE images SET taken_at = NULL WHERE id = %s", (flower,))
        conn.execute("UPDATE images SET taken_at = '1999-01-02 03:04:05+00' WHERE id = %s", (kept,))
    source = PgVectorHandler(database_url)
    before = {r.id: r.metadata for page in source.scan() for r in page}
    assert before[flower].taken_at is None and before[kept].taken_at.year == 1999
    deleted = sorted(i for i in stored if i not in (flower, kept))[3]

    service = SearchService.open(settings, embedder=offline_embedder)  # the running service, on the old model
    events: list[str] = []

    def progress(done: int, total: int) -> None:
        if not events and done >= 5:  # writes through the running service, in the middle of the re-index
            events.append(service.index_image(late_file.read_bytes(), "late/bridge_L.png").id)
            service.delete_image(deleted)

    try:
        store = ImageStore(settings.resolved_image_dir)
        result = reindex(source, clip_embedder, store, progress=progress, **_reindex_kwargs(settings))
        after_id = service.index_image(after_file.read_bytes(), "after/switch.jpg").id  # lands in the old one
    finally:
        service.close()
    target = collection_name_for(clip_embedder.model_id)
    assert (result.source, result.target, result.switched, result.complete) == ("images", target, True, True)
    expected = (set(stored) | {events[0]}) - {deleted}
    assert result.source_count == len(expected) and result.failures == [] and result.already == 0

    # A handler built now (the service after a restart, every CLI) opens the new collection.
    active = PgVectorHandler(database_url)
    try:
        assert active.collection_name == target
        assert active.collection_info().model_id == clip_embedder.model_id
        rows = {r.id: r for page in active.scan() for r in page}
        assert set(rows) == expected and active.count() == len(expected)
        for image_id, record in rows.items():  # the source row's metadata, unchanged (indexed_at included)
            if image_id in before and image_id != flower:
                assert record.metadata == before[image_id]
        assert rows[flower].metadata.taken_at == datetime(2003, 12, 14, 12, 1, 44, tzinfo=UTC)
        assert rows[kept].metadata.taken_at == datetime(1999, 1, 2, 3, 4, 5, tzinfo=UTC)
        assert rows[events[0]].metadata.filename == "late/bridge_L.png"
        # Filtered search works on a collection in its own schema (the planner's estimate and the B-tree indexes).
        hits = active.search(rows[events[0]].vector, 5, SearchFilter.create(path_prefix="late"))
        assert [h.id for h in hits] == [events[0]]
        assert len(active.search(rows[events[0]].vector, 5, SearchFilter.create(formats="PNG,WEBP"))) >= 1
        # Each vector is the new model's embedding of the original, decoded the way the ingest pipeline does.
        sample = sorted(rows)[:4]
        prepared = [
            prepare_bytes(
                store.find(i).read_bytes(),
                i,
                max_pixels=settings.max_image_pixels,
                max_bytes=settings.max_upload_bytes,
                draft_size=clip_embedder.draft_size,
                fit_size=clip_embedder.fit_size,
            )
            for i in sample
        ]
        expected_vectors = clip_embedder.embed_images([p.image for p in prepared])
        got = np.stack([rows[i].vector for i in sample])
        assert np.min(np.sum(got * expected_vectors, axis=1)) > 0.9999
        # The old collection is kept, untouched but for the service's own writes.
        assert set(active.list_collections()) == {"images", target}
        old = active.open_collection("images")
        assert old.count() == len(expected) + 1 and old.collection_info().model_id == offline_embedder.model_id
        old.close()

        # The image indexed after the switch: the start-up sweep keeps its original (the old collection has its
        # row), and --from copies it into the active collection with its metadata.
        from app.indexing.fsck import sweep

        assert after_id not in rows and sweep(active, store, grace_s=0).originals_without_row == 0
        assert store.find(after_id) is not None
        caught = reindex(active, clip_embedder, store, source_name="images", **_reindex_kwargs(settings))
        assert (caught.embedded, caught.already, caught.switched, caught.failures) == (1, len(expected), False, [])
        assert active.get(after_id).metadata.filename == "after/switch.jpg"
        expected.add(after_id)
    finally:
        active.close()
        source.close()

    # The service with the new model serves the new collection; with the old model it refuses to start.
    new_settings = make_settings(
        tmp_path / "data", database_url, embedder="clip", clip_model=CLIP_ARCH, clip_pretrained="unused"
    )
    service = SearchService.open(new_settings, embedder=clip_embedder)
    try:
        assert service.stats().count == len(expected) and service.stats().model == clip_embedder.model_id
        query = next(i for i in sorted(expected) if i != events[0])
        hits = service.search_image(store.find(query).read_bytes(), 5)
        assert len(hits) == 5 and query not in {h.id for h in hits}  # itself left out, as before the switch
        assert service.similar(query, 3)[0].score > 0.5
    finally:
        service.close()
    with pytest.raises(CollectionMismatchError) as err:
        SearchService.open(settings, embedder=offline_embedder)
    message = str(err.value)
    assert "scripts/reindex.py" in message and clip_embedder.model_id in message and "EMBEDDER" in message

    # Nothing left to do with the same model; a target that is the active collection is refused.
    again = PgVectorHandler(database_url)
    try:
        with pytest.raises(NothingToReindex):
            reindex(again, clip_embedder, store, **_reindex_kwargs(settings))
        with pytest.raises(ReindexError, match="active collection itself"):
            reindex(again, offline_embedder, store, target_name=target, **_reindex_kwargs(settings))
        with pytest.raises(ValueError, match="active collection"):
            again.drop_collection(target)
    finally:
        again.close()


# --- a real kill -9 of scripts/reindex.py, then a resume ----------------------------------------------------
def _cli_env(data_dir: Path, database_url: str, clip_checkpoint: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("IMAGE_SEARCH_API",)}
    env.update(
        DATA_DIR=str(data_dir),
        DATABASE_URL=database_url,
        VECTOR_DB="pgvector",
        EMBEDDER="clip",
        CLIP_MODEL=CLIP_ARCH,
        CLIP_PRETRAINED=str(clip_checkpoint),
        CPU_ENCODER="torch",  # no per-test ONNX export; the re-index path is what is tested here
        DEVICE="cpu",
        PYTHONPATH=str(PROJECT_ROOT),
    )
    return env


def _target_rows(database_url: str, schema: str) -> tuple[int, int]:
    """``(rows, distinct ids)`` of the target collection's table (0, 0 before it exists)."""
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        if conn.execute("SELECT to_regclass(%s)", (f"{schema}.images",)).fetchone()[0] is None:
            return 0, 0
        query = sql.SQL("SELECT count(*), count(DISTINCT id) FROM {}.images").format(sql.Identifier(schema))
        return tuple(conn.execute(query).fetchone())


def test_kill_9_in_the_middle_then_resume(tmp_path, database_url, datasets, offline_embedder, clip_checkpoint):
    settings = make_settings(tmp_path / "data", database_url)
    stored = _index_with_offline_model(settings, offline_embedder, _image_files(datasets, 60))
    from app.embedders.onnx_model import clip_model_id

    schema = collection_name_for(clip_model_id(CLIP_ARCH, str(clip_checkpoint)))
    env = _cli_env(tmp_path / "data", database_url, clip_checkpoint)
    cmd = [sys.executable, str(PROJECT_ROOT / "scripts/reindex.py"), "--workers", "1", "--batch-size", "8"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while _target_rows(database_url, schema)[0] < 16:
        if proc.poll() is not None:
            pytest.fail(f"finished before it could be killed: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("nothing was re-indexed in time")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    written, distinct = _target_rows(database_url, schema)
    assert 0 < written < len(stored) and written == distinct
    check = PgVectorHandler(database_url)
    assert check.active_collection() == "images"  # not switched: the service still opens the old collection
    check.close()

    done = subprocess.run(cmd + ["--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert f"{len(stored)} images, " in done.stdout
    already = int(done.stdout.split(" already there")[0].rsplit(" ", 1)[1])
    assert already >= written
    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith(f"switched: '{schema}' is now the active collection") and "restarted" in lines[-1]
    assert "scripts/reindex.py --drop images" in lines[-2]
    assert _target_rows(database_url, schema) == (len(stored), len(stored))  # every id exactly once
    check = PgVectorHandler(database_url)
    try:
        assert check.collection_name == schema and {r.id for page in check.scan() for r in page} == set(stored)
    finally:
        check.close()

    # Again: nothing to do; it names the old collection and how to drop it. Then --drop, --list.
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to re-index" in again.stdout, again
    assert "--drop images" in again.stdout
    listed = subprocess.run(cmd + ["--list"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and f"{schema}: model open_clip:{CLIP_ARCH}/file-" in listed.stdout
    assert "(active)" in listed.stdout and "images: model efficientnet-lite2:imagenet" in listed.stdout
    refused = subprocess.run(cmd + ["--drop", schema], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "active collection" in refused.stderr
    dropped = subprocess.run(cmd + ["--drop", "images"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert dropped.returncode == 0 and "dropped collection 'images'" in dropped.stdout
    check = PgVectorHandler(database_url)
    try:
        assert set(check.list_collections()) == {schema} and check.count() == len(stored)
    finally:
        check.close()


# --- Milvus Lite: the alias is the pointer; --drop-old ------------------------------------------------------
def test_milvus_lite_reindex_with_drop_old(tmp_path, datasets, offline_embedder, clip_embedder):
    from app.vectordb.milvus import MilvusHandler

    uri = str(tmp_path / "milvus.db")
    settings = make_settings(tmp_path / "data", "", vector_db="milvus", milvus_uri=uri)
    stored = _index_with_offline_model(settings, offline_embedder, _image_files(datasets, 20))
    source = MilvusHandler(uri)
    try:
        assert source.collection_name == "images"
        result = reindex(
            source,
            clip_embedder,
            ImageStore(settings.resolved_image_dir),
            target_name="clip_small",
            drop_old=True,
            **_reindex_kwargs(settings),
        )
    finally:
        source.close()
    assert result.switched and result.dropped and result.source_count == len(stored)
    reopened = MilvusHandler(uri)  # a new process would see the same: the alias is stored with the database
    try:
        assert reopened.collection_name == "clip_small" and reopened.count() == len(stored)
        assert set(reopened.list_collections()) == {"clip_small"}
        assert reopened.collection_info().model_id == clip_embedder.model_id
        some = sorted(stored)[0]
        hits = reopened.search(reopened.get(some).vector, 3)
        assert hits[0].id == some and hits[0].metadata.filename == stored[some]
    finally:
        reopened.close()
