"""The service with its originals in S3-compatible object storage (IMAGE_STORE_URL=s3://bucket/prefix), against
moto's standalone S3 server (its own process, the S3 protocol over HTTP): the API, GET /image as a stream with
Range / ETag / Cache-Control on both stores, thumbnails, delete, fsck.py check and repair against the bucket, the
start-up sweep, bulk_index.py --direct, re-index, migrate.py to Milvus Lite and back; and the object store going
down under a running service."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.ids import image_id_for
from app.indexing.fsck import check, sweep
from app.indexing.reindex import reindex
from app.main import create_app
from app.service import SearchService
from app.storage.s3 import S3ImageStore
from app.vectordb import create_handler
from tests.helpers import INSTANCE, PROJECT_ROOT, S3_TEST_ENV, MotoS3, make_settings, run_fsck, s3_settings

PREFIX = "originals"


@pytest.fixture
def files() -> list[Path]:
    return sorted(INSTANCE.rglob("*.jpg"))[:4]


def _assert_no_credentials(text: str) -> None:
    for secret in S3_TEST_ENV.values():
        assert secret not in text


@pytest.fixture(params=["file", "s3"])
def any_store_settings(request, tmp_path, database_url):
    if request.param == "file":
        return make_settings(tmp_path / "data", database_url)
    moto: MotoS3 = request.getfixturevalue("moto_s3")
    return s3_settings(tmp_path / "data", database_url, moto, moto.create_bucket())


def test_get_image_streams_with_range_etag_and_cache_control(any_store_settings, offline_embedder, files):
    data = files[0].read_bytes()
    with TestClient(create_app(any_store_settings, embedder=offline_embedder)) as client:
        image_id = client.post("/index_image", files={"file": ("a.jpg", data)}).json()["id"]
        whole = client.get(f"/image/{image_id}")
        assert whole.status_code == 200 and whole.content == data
        assert whole.headers["content-type"] == "image/jpeg"
        assert whole.headers["etag"] == f'"{image_id}"' and whole.headers["accept-ranges"] == "bytes"
        assert whole.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert int(whole.headers["content-length"]) == len(data)

        part = client.get(f"/image/{image_id}", headers={"Range": "bytes=10-99"})
        assert part.status_code == 206 and part.content == data[10:100]
        assert part.headers["content-range"] == f"bytes 10-99/{len(data)}"
        suffix = client.get(f"/image/{image_id}", headers={"Range": "bytes=-50"})
        assert suffix.status_code == 206 and suffix.content == data[-50:]
        open_end = client.get(f"/image/{image_id}", headers={"Range": f"bytes={len(data) - 5}-"})
        assert open_end.status_code == 206 and open_end.content == data[-5:]
        past = client.get(f"/image/{image_id}", headers={"Range": f"bytes={len(data)}-"})
        assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(data)}"
        several = client.get(f"/image/{image_id}", headers={"Range": "bytes=0-1,5-6"})
        assert several.status_code == 200 and several.content == data  # one range only: the whole file
        stale = client.get(f"/image/{image_id}", headers={"Range": "bytes=0-9", "If-Range": '"other"'})
        assert stale.status_code == 200 and stale.content == data

        cached = client.get(f"/image/{image_id}", headers={"If-None-Match": f'"{image_id}"'})
        assert cached.status_code == 304 and cached.content == b""
        head = client.head(f"/image/{image_id}")
        assert head.status_code == 200 and head.content == b"" and head.headers["etag"] == f'"{image_id}"'
        assert int(head.headers["content-length"]) == len(data)

        thumb = client.get(f"/image/{image_id}/thumbnail", params={"size": 64})
        assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
        service: SearchService = client.app.state.service
        assert service.image_file(image_id).read_bytes() == data  # what the web UI reads: a local file
        assert service.read_original(image_id) == (data, "a.jpg")

        assert client.delete(f"/image/{image_id}").status_code == 200
        for path in (f"/image/{image_id}", f"/image/{image_id}/thumbnail"):
            assert client.get(path).status_code == 404
        assert client.get(f"/image/{'0' * 64}").status_code == 404


def test_the_api_keeps_originals_in_the_bucket(tmp_path, database_url, moto_s3, offline_embedder, files):
    bucket = moto_s3.create_bucket()
    settings = s3_settings(tmp_path / "data", database_url, moto_s3, bucket)
    datas = [f.read_bytes() for f in files]
    ids = [image_id_for(d) for d in datas]
    with TestClient(create_app(settings, embedder=offline_embedder)) as client:
        assert client.post("/index_image", files={"file": ("a.jpg", datas[0])}).status_code == 201
        assert client.post("/index_image", files={"file": ("a.jpg", datas[0])}).status_code == 200  # exists
        batch = client.post("/index_images", files=[("files", (f"{i}.jpg", d)) for i, d in enumerate(datas)])
        assert [r["status"] for r in batch.json()["results"]] == ["exists", "indexed", "indexed", "indexed"]
        assert sorted(moto_s3.keys(bucket)) == sorted(f"{PREFIX}/{i[:2]}/{i[2:4]}/{i}.jpg" for i in ids)
        assert not (tmp_path / "data" / "images").exists() or not any((tmp_path / "data" / "images").rglob("*.jpg"))
        assert set(client.post("/images/exists", json={"ids": ids}).json()["existing"]) == set(ids)
        hits = client.post("/search_image", files={"file": ("q.jpg", datas[1])}, params={"exclude_self": "false"})
        assert hits.json()["results"][0]["id"] == ids[1]
        health = client.get("/health").json()
        assert (health["status"], health["storage"]) == ("ok", "ok")
        assert client.delete(f"/image/{ids[2]}").status_code == 200
        assert len(moto_s3.keys(bucket)) == 3


def test_fsck_check_and_repair_against_the_bucket_and_the_sweep(
    tmp_path, database_url, moto_s3, offline_embedder, model_cache_dir, files
):
    bucket = moto_s3.create_bucket()
    settings = s3_settings(tmp_path / "data", database_url, moto_s3, bucket)
    a, b, c, d = (f.read_bytes() for f in files)
    service = SearchService.open(settings, embedder=offline_embedder)
    try:
        id_a = service.index_image(a, "a.jpg").id
        id_b = service.index_image(b, "b.jpg").id
        service.store.delete(id_a)  # row without original
        service.db.delete(id_b)  # original without row
        id_c = image_id_for(c)
        service.store.put(id_c, c, "jpg")  # an original without row (a kill -9 between original and row)
        base = f"s3://{bucket}/{PREFIX}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "IMAGE_", "DATA_", "AWS_"))}
        env.update(
            PYTHONPATH=str(PROJECT_ROOT),
            DATABASE_URL=database_url,
            DATA_DIR=str(tmp_path / "data"),
            IMAGE_STORE_URL=base,
            AWS_ENDPOINT_URL=moto_s3.endpoint,
            MODEL_CACHE_DIR=str(model_cache_dir),
            EMBEDDER="efficientnet",
            **S3_TEST_ENV,
        )
        found, result = run_fsck(env, timeout_s=120)
        assert found.returncode == 1, found.stderr
        assert sorted(result["mismatches"]) == sorted(
            [
                f"row without original: {id_a}",
                f"original without row: {base}/{id_b[:2]}/{id_b[2:4]}/{id_b}.jpg",
                f"original without row: {base}/{id_c[:2]}/{id_c[2:4]}/{id_c}.jpg",
            ]
        )
        repaired, result = run_fsck(env, "--repair")
        assert repaired.returncode == 0, repaired.stderr
        assert result["remaining"] == []
        assert service.db.existing_ids([id_a, id_b, id_c]) == {id_b, id_c}
        assert check(service.db, service.store).clean

        id_d = image_id_for(d)
        service.store.put(id_d, d, "jpg")  # an orphan the start-up sweep removes once older than the grace
        assert sweep(service.db, service.store, grace_s=3600).originals_without_row == 0
        assert sweep(service.db, service.store, grace_s=0).originals_without_row == 1
        assert service.store.head(id_d) is None and service.store.head(id_c) is not None
    finally:
        service.close()

    # The store down: fsck says so (exit 2) without credentials.
    env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"
    down, _ = run_fsck(env, timeout_s=120)
    assert down.returncode == 2 and "cannot be reached" in down.stderr and "Traceback" not in down.stderr
    _assert_no_credentials(down.stdout + down.stderr)


def test_bulk_index_direct_and_reindex_into_the_bucket(
    tmp_path, database_url, moto_s3, offline_embedder, model_cache_dir
):
    from tests.test_cli import run_cli

    bucket = moto_s3.create_bucket()
    folder = INSTANCE
    expected = sorted(folder.rglob("*.jpg"))[:6]
    small = tmp_path / "folder"
    small.mkdir()
    for f in expected:
        (small / f.name).symlink_to(f)
    env = {
        "DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": database_url,
        "EMBEDDER": "efficientnet",
        "MODEL_CACHE_DIR": str(model_cache_dir),
        "IMAGE_STORE_URL": f"s3://{bucket}/{PREFIX}",
        "AWS_ENDPOINT_URL": moto_s3.endpoint,
        **S3_TEST_ENV,
    }
    proc = run_cli("bulk_index.py", small, "--direct", "--no-progress", "--workers", "1", env=env, check_rc=0)
    _assert_no_credentials(proc.stdout + proc.stderr)
    ids = sorted(image_id_for(f.read_bytes()) for f in expected)
    assert sorted(k.rsplit("/", 1)[-1].split(".")[0] for k in moto_s3.keys(bucket)) == ids

    settings = s3_settings(tmp_path / "data", database_url, moto_s3, bucket)
    db = create_handler(settings)
    store = S3ImageStore.from_settings(settings, bucket=bucket, prefix=PREFIX)
    try:
        result = reindex(
            db, offline_embedder, store, target_name="again", workers=1, batch_size=4, max_pixels=10**8, max_bytes=10**8
        )
        assert result.switched and result.embedded == len(ids) and not result.failures
    finally:
        store.close()
        db.close()


@pytest.mark.slow
def test_migrate_to_milvus_lite_and_back_with_the_originals_in_the_bucket(
    tmp_path, pg_server, database_url, moto_s3, offline_embedder, model_cache_dir, files
):
    # migrate.py copies rows only: the originals stay where they are, in the bucket, addressed by id. After each
    # copy the target backend serves the same ids and the same bytes from the bucket, and fsck.py finds it agrees.
    from tests.helpers import create_database
    from tests.test_cli import run_cli

    bucket = moto_s3.create_bucket()
    milvus_uri, back_url = str(tmp_path / "milvus.db"), create_database(pg_server)
    datas = [f.read_bytes() for f in files]
    ids = sorted(image_id_for(d) for d in datas)
    source = s3_settings(tmp_path / "data", database_url, moto_s3, bucket)
    with TestClient(create_app(source, embedder=offline_embedder)) as client:
        for i, data in enumerate(datas):
            assert client.post("/index_image", files={"file": (f"{i}.jpg", data)}).status_code == 201
    keys = sorted(moto_s3.keys(bucket))
    env = {
        "DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": database_url,
        "MILVUS_URI": milvus_uri,
        "EMBEDDER": "efficientnet",
        "MODEL_CACHE_DIR": str(model_cache_dir),
        "IMAGE_STORE_URL": source.image_store_url,
        "AWS_ENDPOINT_URL": moto_s3.endpoint,
        **S3_TEST_ENV,
    }

    def assert_serves_the_collection(settings) -> None:
        with TestClient(create_app(settings, embedder=offline_embedder)) as client:
            assert client.get("/stats").json()["count"] == len(ids)
            assert sorted(client.post("/images/exists", json={"ids": ids}).json()["existing"]) == ids
            for data in datas:
                image_id = image_id_for(data)
                assert client.get(f"/image/{image_id}").content == data
                hits = client.post("/search_image", files={"file": ("q.jpg", data)}, params={"exclude_self": "false"})
                assert hits.json()["results"][0]["id"] == image_id
        assert sorted(moto_s3.keys(bucket)) == keys  # nothing copied, moved or removed in the bucket

    forward = run_cli("migrate.py", "--from", "pgvector", "--to", "milvus", "--no-progress", env=env, check_rc=0)
    assert f"copied {len(ids)} records from pgvector to milvus" in forward.stdout
    _assert_no_credentials(forward.stdout + forward.stderr)
    assert_serves_the_collection(source.model_copy(update={"vector_db": "milvus", "milvus_uri": milvus_uri}))
    on_milvus = {**env, "VECTOR_DB": "milvus"}
    assert "0 mismatches" in run_cli("fsck.py", env=on_milvus, check_rc=0).stdout

    back = run_cli(
        "migrate.py",
        "--from",
        "milvus",
        "--to",
        "pgvector",
        "--no-progress",
        env={**env, "DATABASE_URL": back_url},
        check_rc=0,
    )
    assert f"copied {len(ids)} records from milvus to pgvector" in back.stdout
    assert_serves_the_collection(source.model_copy(update={"database_url": back_url}))
    assert "0 mismatches" in run_cli("fsck.py", env={**env, "DATABASE_URL": back_url}, check_rc=0).stdout


def test_the_object_store_down_makes_writes_503_and_searches_work(
    tmp_path, database_url, offline_embedder, files, caplog
):
    moto = MotoS3().start()
    try:
        bucket = moto.create_bucket()
        settings = s3_settings(tmp_path / "data", database_url, moto, bucket, s3_connect_timeout_s=1.0)
        datas = [f.read_bytes() for f in files]
        caplog.set_level(logging.INFO)
        with TestClient(create_app(settings, embedder=offline_embedder)) as client:
            image_id = client.post("/index_image", files={"file": ("a.jpg", datas[0])}).json()["id"]
            moto.stop()

            start = time.monotonic()
            r = client.post("/index_image", files={"file": ("b.jpg", datas[1])})
            elapsed = time.monotonic() - start
            assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
            assert elapsed < 5, elapsed
            assert "object store" in r.json()["detail"]
            r = client.post("/index_images", files=[("files", ("c.jpg", datas[2]))])
            assert r.status_code == 503
            assert client.delete(f"/image/{image_id}").status_code == 503  # nothing changes while it is down
            assert client.get(f"/image/{image_id}").status_code == 503

            hits = client.post("/search_image", files={"file": ("q.jpg", datas[3])})
            assert hits.status_code == 200 and hits.json()["results"][0]["id"] == image_id
            assert client.get(f"/image/{image_id}/similar").status_code == 200
            health = client.get("/health")
            assert health.status_code == 200
            body = health.json()
            assert (body["status"], body["database"], body["storage"]) == ("degraded", "ok", "degraded")
            assert "object store" in body["problems"][0]
            _assert_no_credentials(health.text + r.text)

            moto.start()  # back, empty (moto keeps its data in memory): the bucket is made again
            moto.create_bucket(bucket)
            time.sleep(1.2)
            assert client.get("/health").json()["storage"] == "ok"
            assert client.post("/index_image", files={"file": ("b.jpg", datas[1])}).status_code == 201
        _assert_no_credentials(caplog.text)
    finally:
        moto.stop()


def test_no_credentials_in_settings_repr_or_store(tmp_path, moto_s3):
    settings = s3_settings(tmp_path / "data", "postgresql://unused", moto_s3, "some-bucket")
    store = S3ImageStore.from_settings(settings, bucket="some-bucket", prefix=PREFIX)
    _assert_no_credentials(repr(settings) + str(settings) + store.url + repr(store.__dict__.get("url")))
    store.close()
    assert httpx.get(moto_s3.endpoint, timeout=5).status_code < 500


@pytest.mark.slow
def test_the_object_store_killed_under_16_searching_clients_fails_no_search(
    tmp_path, database_url, offline_embedder, files
):
    from tests.helpers import run_live_server

    moto = MotoS3().start()
    try:
        bucket = moto.create_bucket()
        settings = s3_settings(tmp_path / "data", database_url, moto, bucket, s3_connect_timeout_s=1.0)
        datas = [f.read_bytes() for f in files]
        with run_live_server(create_app(settings, embedder=offline_embedder)) as url:
            with httpx.Client(base_url=url, timeout=30) as client:
                ids = [
                    client.post("/index_image", files={"file": (f"{i}.jpg", d)}).json()["id"]
                    for i, d in enumerate(datas)
                ]
            stop = threading.Event()
            failures: list[str] = []
            done = [0] * 16

            def search(n: int) -> None:
                with httpx.Client(base_url=url, timeout=30) as c:
                    while not stop.is_set():
                        if n % 2:
                            r = c.get(f"/image/{ids[n % len(ids)]}/similar", params={"top_k": 3})
                        else:
                            r = c.post("/search_image", files={"file": ("q.jpg", datas[n % len(datas)])})
                        if r.status_code != 200:
                            failures.append(f"{r.status_code} {r.text[:200]}")
                        done[n] += 1

            threads = [threading.Thread(target=search, args=(n,), daemon=True) for n in range(16)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            moto.stop()
            with httpx.Client(base_url=url, timeout=30) as client:
                extra = sorted(INSTANCE.rglob("*.jpg"))[len(datas)].read_bytes()  # not indexed yet
                r = client.post("/index_image", files={"file": ("new.jpg", extra)})
                assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
                assert client.delete(f"/image/{ids[0]}").status_code == 503
                assert client.get("/health").json()["storage"] == "degraded"
                time.sleep(2.0)
                moto.start()
                moto.create_bucket(bucket)
                deadline = time.monotonic() + 10
                while client.get("/health").json()["storage"] != "ok":
                    assert time.monotonic() < deadline, "storage did not recover by itself"
                    time.sleep(0.2)
            time.sleep(0.5)
            stop.set()
            for t in threads:
                t.join(timeout=30)
        assert failures == [], failures[:5]
        assert sum(done) > 50, done
    finally:
        moto.stop()
