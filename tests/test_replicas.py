"""Two replicas that share one PostgreSQL (DATABASE_URL) and one bucket, each with a DATA_DIR of its own (two
"machines"): what one indexes the other serves, what one deletes is gone in the other, and index/delete races of
the same bytes through both never leave a row without its original or the reverse (PostgreSQL advisory locks:
the flock files of the two DATA_DIRs exclude nothing). Issue #21; moto's standalone S3 server."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time

import pytest

from app.errors import ImageNotFoundError
from app.ids import image_id_for
from app.indexing.fsck import check
from app.indexing.locks import PgAdvisoryLocks
from app.service import SearchService
from tests.helpers import INSTANCE, PROJECT_ROOT, S3_TEST_ENV, s3_settings
from tests.test_write_races import _OTHER_PROCESS

ROUNDS = 100


@pytest.fixture
def bucket(moto_s3) -> str:
    return moto_s3.create_bucket()


def test_what_one_replica_indexes_the_other_serves_and_deletes(
    tmp_path, database_url, moto_s3, bucket, offline_embedder
):
    data = sorted(INSTANCE.rglob("*.jpg"))[0].read_bytes()
    a = SearchService.open(s3_settings(tmp_path / "a", database_url, moto_s3, bucket), embedder=offline_embedder)
    b = SearchService.open(s3_settings(tmp_path / "b", database_url, moto_s3, bucket), embedder=offline_embedder)
    try:
        assert isinstance(a.store.locks, PgAdvisoryLocks) and isinstance(b.store.locks, PgAdvisoryLocks)
        image_id = a.index_image(data, "holiday.jpg").id
        assert b.read_original(image_id) == (data, "holiday.jpg")  # same bytes, same name
        assert b.image_file(image_id).read_bytes() == data and str(tmp_path / "b") in str(b.image_file(image_id))
        assert b.index_image(data, "again.jpg").status == "exists"
        b.delete_image(image_id)
        assert a.existing_ids([image_id]) == set()
        with pytest.raises(ImageNotFoundError):
            a.original_info(image_id)
    finally:
        a.close()
        b.close()


@pytest.mark.slow
def test_index_and_delete_races_through_two_replicas_leave_no_mismatch(
    tmp_path, database_url, moto_s3, bucket, offline_embedder, model_cache_dir
):
    files = sorted((INSTANCE).rglob("*.jpg"))[:3]
    settings = s3_settings(tmp_path / "a", database_url, moto_s3, bucket)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "IMAGE_", "DATA_", "EMBEDDER", "AWS_"))
    }
    env.update(
        PYTHONPATH=str(PROJECT_ROOT),
        DATABASE_URL=database_url,
        DATA_DIR=str(tmp_path / "b"),
        IMAGE_STORE_URL=settings.image_store_url,
        AWS_ENDPOINT_URL=moto_s3.endpoint,
        MODEL_CACHE_DIR=str(model_cache_dir),
        EMBEDDER="efficientnet",
        UI_ENABLED="false",
        **S3_TEST_ENV,
    )
    stop = tmp_path / "stop"
    other = subprocess.Popen(
        [sys.executable, "-c", _OTHER_PROCESS, str(stop), *map(str, files)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    service = SearchService.open(settings, embedder=offline_embedder)
    try:
        assert other.stdout.readline().strip() == "ready", other.stderr.read()
        datas = [p.read_bytes() for p in files]
        rng = random.Random(21)
        broken: list[str] = []
        for _ in range(ROUNDS):
            data = rng.choice(datas)
            image_id = image_id_for(data)
            barrier = threading.Barrier(2)

            def index(data=data, barrier=barrier) -> None:
                barrier.wait()
                service.index_image(data, "race")

            delay = rng.uniform(0, 0.1)  # lands anywhere inside the index's decode-embed-save-upsert

            def delete(image_id=image_id, barrier=barrier, delay=delay) -> None:
                barrier.wait()
                time.sleep(delay)
                try:
                    service.delete_image(image_id)
                except ImageNotFoundError:
                    pass

            threads = [threading.Thread(target=f) for f in (index, delete)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
                assert not t.is_alive()
            with service.store.locks.hold([image_id]):  # no writer on either machine is between original and row
                row = bool(service.db.existing_ids([image_id]))
                if row != (service.store.head(image_id) is not None):
                    broken.append(image_id)
        stop.touch()
        out, err = other.communicate(timeout=120)
        assert other.returncode == 0, err
        assert int(out.split()[-1]) > ROUNDS / 4, out  # the other replica really raced along
        assert broken == [], f"{len(broken)} of {ROUNDS} rounds left a row without its original or the reverse"
        report = check(service.db, service.store)
        assert report.clean, report.lines()
    finally:
        stop.touch()
        if other.poll() is None:
            other.kill()
        service.close()
