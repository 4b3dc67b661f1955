"""Race-free writes (issue #8, item 4): index, delete and re-index of one id from threads and from a second
process leave the row and its original together, or neither; fsck finds and repairs every mismatch; the start-up
sweep removes what a kill -9 during a write leaves. Real database, real files, real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from app.ids import image_id_for
from app.indexing.fsck import check, sweep
from app.indexing.store import ImageStore
from app.search.paging import SearchOptions
from app.service import SearchService
from tests.helpers import PROJECT_ROOT, WriterProcess, make_settings, race_index_and_delete, run_fsck

pytestmark = pytest.mark.slow

ROUNDS = 200


def _env(settings, model_cache_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "IMAGE_", "DATA_", "EMBEDDER"))}
    env.update(
        PYTHONPATH=str(PROJECT_ROOT),
        DATABASE_URL=settings.database_url,
        DATA_DIR=str(settings.data_dir),
        IMAGE_DIR=str(settings.resolved_image_dir),
        MODEL_CACHE_DIR=str(model_cache_dir),
        EMBEDDER="efficientnet",
        UI_ENABLED="false",
    )
    return env


@pytest.fixture
def small_files(datasets) -> list[Path]:
    return sorted((datasets / "caltech101_subset/images").rglob("*.jpg"))[:3]


@pytest.fixture
def service(settings, offline_embedder):
    service = SearchService.open(settings, embedder=offline_embedder)
    yield service
    service.close()


def _assert_consistent(service: SearchService, ids: set[str]) -> None:
    rows = service.db.db.existing_ids(ids)
    for image_id in ids:
        assert (image_id in rows) == (service.store.find(image_id) is not None), image_id


def test_index_delete_race_threads_and_a_second_process(service, settings, small_files, model_cache_dir, tmp_path):
    # Two threads index and one deletes the same bytes each round, while a second process indexes and deletes them.
    env = _env(settings, model_cache_dir)
    with WriterProcess(env, small_files, tmp_path / "stop") as other:
        other.wait_ready()
        datas = [p.read_bytes() for p in small_files]
        broken = race_index_and_delete(service, datas, ROUNDS, seed=8, indexers=2)
        other_ops = other.finish(timeout_s=60)
    assert broken == [], f"{len(broken)} of {ROUNDS} rounds left a row without its original or the reverse"
    assert other_ops > ROUNDS / 4, other_ops  # the second process really raced along
    _assert_consistent(service, {image_id_for(d) for d in datas})
    report = check(service.db, service.store)
    assert report.clean, report.lines()
    fsck, result = run_fsck(env, timeout_s=120)
    assert fsck.returncode == 0, fsck.stderr
    assert result["mismatches"] == []


def test_exists_rechecks_the_original(service, small_files):
    data = small_files[0].read_bytes()
    image_id = service.index_image(data, "a.jpg").id
    service.store.delete(image_id)  # what the old race left: a row whose original is gone
    assert service.existing_ids([image_id]) == set()
    assert service.index_image(data, "a.jpg").status == "indexed"  # indexed again, original restored
    assert service.store.find(image_id) is not None and service.existing_ids([image_id]) == {image_id}


def test_fsck_reports_and_repairs_every_mismatch(service, settings, small_files, model_cache_dir):
    a, b, c = (p.read_bytes() for p in small_files)
    id_a = service.index_image(a, "a.jpg").id
    id_b = service.index_image(b, "b.jpg").id
    service.store.delete(id_a)  # row without original
    service.db.delete(id_b)  # original without row
    id_c = image_id_for(c)
    service.store.save(id_c, c, "jpg")  # another original without row (a kill -9 between file and row)
    temp = service.store.root / id_c[:2] / id_c[2:4] / ".upload-deadbeef"
    temp.write_bytes(b"half a file")  # a kill -9 during the file write
    env = _env(settings, model_cache_dir)

    found, result = run_fsck(env, timeout_s=120)
    assert found.returncode == 1, found.stderr
    assert sorted(result["mismatches"]) == sorted(
        [
            f"row without original: {id_a}",
            f"original without row: {service.store.find(id_b)}",
            f"original without row: {service.store.find(id_c)}",
            f"temporary upload file: {temp}",
        ]
    )

    repaired, result = run_fsck(env, "--repair")
    assert repaired.returncode == 0, repaired.stderr
    assert f"deleted row without original: {id_a}" in result["repaired"]
    assert result["remaining"] == []
    assert service.db.existing_ids([id_a, id_b, id_c]) == {id_b, id_c}  # indexed again, searchable
    assert service.search_image(b, 1, SearchOptions(exclude_self=False))[0].id == id_b
    assert not temp.exists()
    assert check(service.db, service.store).clean


def test_startup_sweep_removes_old_leftovers_only(settings, offline_embedder, small_files, database_url):
    store = ImageStore(settings.resolved_image_dir)
    data_old, data_new = (p.read_bytes() for p in small_files[:2])
    id_old, id_new = image_id_for(data_old), image_id_for(data_new)
    store.save(id_old, data_old, "jpg")
    store.save(id_new, data_new, "jpg")
    old_temp = store.root / id_old[:2] / id_old[2:4] / ".upload-old"
    new_temp = store.root / id_new[:2] / id_new[2:4] / ".upload-new"
    old_temp.write_bytes(b"x")
    new_temp.write_bytes(b"y")
    an_hour_ago = time.time() - 3600
    for path in (store.find(id_old), old_temp):
        os.utime(path, (an_hour_ago, an_hour_ago))

    service = SearchService.open(
        make_settings(settings.data_dir, database_url, orphan_grace_s=600), embedder=offline_embedder
    )
    try:
        service.sweep_thread.join(timeout=60)
        assert store.find(id_old) is None and not old_temp.exists()  # older than ORPHAN_GRACE_S: removed
        assert store.find(id_new) is not None and new_temp.exists()  # a write that may still be running: kept
    finally:
        service.close()


def test_sweep_keeps_originals_with_rows(service, small_files):
    data = small_files[0].read_bytes()
    image_id = service.index_image(data, "a.jpg").id
    an_hour_ago = time.time() - 3600
    os.utime(service.store.find(image_id), (an_hour_ago, an_hour_ago))
    result = sweep(service.db, service.store, grace_s=0)
    assert (result.temp_files, result.originals_without_row) == (0, 0)
    assert service.store.find(image_id) is not None


def test_kill_9_mid_write_leaves_only_what_fsck_cleans(settings, small_files, model_cache_dir, tmp_path, service):
    # A writer process killed at three different moments: whatever it leaves, the sweep cleans up (fsck agrees).
    env = _env(settings, model_cache_dir)
    datas = [p.read_bytes() for p in small_files]
    for attempt in range(3):
        with WriterProcess(env, small_files, tmp_path / f"never-{attempt}") as writer:
            writer.wait_ready()
            time.sleep(0.3 + 0.2 * attempt)
            writer.kill()
    sweep(service.db, service.store, grace_s=0)
    report = check(service.db, service.store)
    assert report.clean, report.lines()
    _assert_consistent(service, {image_id_for(d) for d in datas})
    assert np.isfinite(service.stats().count)


def test_bulk_index_direct_next_to_a_running_server_racing_deletes(
    settings, offline_embedder, datasets, model_cache_dir, tmp_path
):
    import httpx

    from app.main import create_app
    from tests.helpers import run_live_server, symlink

    files = sorted((datasets / "caltech101_subset/images").rglob("*.jpg"))[:40]
    folder = tmp_path / "folder"
    for src in files:
        symlink(src, folder / src.parent.name / src.name)
    ids = sorted({image_id_for(p.read_bytes()) for p in files})
    cmd = [sys.executable, str(PROJECT_ROOT / "scripts/bulk_index.py"), str(folder), "--direct", "--no-progress"]
    cmd += ["--workers", "1", "--batch-size", "4"]
    with run_live_server(create_app(settings, embedder=offline_embedder)) as url, httpx.Client(timeout=60) as http:
        proc = subprocess.Popen(
            cmd, env=_env(settings, model_cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        deleted = 0
        while proc.poll() is None:
            for image_id in ids:
                r = http.delete(f"{url}/image/{image_id}")
                assert r.status_code in (200, 404), r.text
                deleted += r.status_code == 200
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        service = SearchService.open(settings, embedder=offline_embedder)
        try:
            _assert_consistent(service, set(ids))
            assert check(service.db, service.store).clean
        finally:
            service.close()
    assert deleted > 0  # the deletes really raced the bulk writes
