"""The contract every image store meets (app/storage/base.py), run against each store: the file store on a real
folder and the S3 store on moto's standalone S3 server (a process of its own, the S3 protocol over HTTP).

Parametrised over stores, as tests/test_vectordb_contract.py is over databases: a store added to ``STORES`` must
pass every test here unchanged. Faults that only an object store has (down, full, refusing) follow at the end.
"""

from __future__ import annotations

import http.server
import os
import socketserver
import threading
import time
from pathlib import Path

import pytest

from app.errors import ImageNotFoundError, StorageFullError, StorageUnavailableError
from app.ids import image_id_for
from app.storage import from_settings
from app.storage.base import CHUNK_BYTES, ImageStore
from app.storage.local import LocalImageStore
from app.storage.s3 import S3ImageStore
from app.store_url import parse_store_url
from tests.helpers import FORMATS, INSTANCE, S3_TEST_ENV, MotoS3, free_port, make_settings

STORES = ["file", "s3"]


def _s3(tmp_path: Path, endpoint: str, bucket: str, **kw) -> S3ImageStore:
    options = dict(
        endpoint=endpoint,
        access_key_id=S3_TEST_ENV["AWS_ACCESS_KEY_ID"],
        secret_access_key=S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
        region="us-east-1",
        path_style=True,
        connect_timeout_s=1.0,
        read_timeout_s=5.0,
        max_retries=1,
        lock_dir=tmp_path / "locks",
    )
    options.update(kw)
    return S3ImageStore(bucket, "some/prefix", **options)


@pytest.fixture(params=STORES)
def store(request, tmp_path) -> ImageStore:
    if request.param == "file":
        made: ImageStore = LocalImageStore(tmp_path / "images")
    else:
        moto: MotoS3 = request.getfixturevalue("moto_s3")
        made = _s3(tmp_path, moto.endpoint, moto.create_bucket())
    yield made
    made.close()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    """Real files: a few small JPEGs and one original over several chunks (real JPEGs, concatenated)."""
    small = [p.read_bytes() for p in sorted(INSTANCE.rglob("*.jpg"))[:3]]
    big, files = b"", sorted(FORMATS.rglob("*.jpg"))
    while len(big) < 2 * CHUNK_BYTES + 1000:
        big += files[len(big) % len(files)].read_bytes()
    return [*small, big]


def test_put_is_idempotent_and_head_describes_the_original(store, images):
    data = images[0]
    image_id = image_id_for(data)
    assert store.head(image_id) is None
    assert store.put(image_id, data, "jpg") is True
    assert store.put(image_id, data, "jpg") is False  # the same bytes again: stored once
    info = store.head(image_id)
    assert (info.image_id, info.name, info.size) == (image_id, f"{image_id}.jpg", len(data))
    assert abs(info.mtime - time.time()) < 120
    assert store.read(image_id) == data
    assert store.existing([image_id, image_id_for(images[1]), "nope"]) == {image_id}


def test_delete_removes_every_copy_of_an_id(store, images):
    """One id has one extension (it is a function of the bytes); were an original ever stored under a second one,
    the file store refuses it and the object store (which saves a LIST per put) keeps both, so delete removes every
    copy and nothing of the id is left."""
    data = images[0]
    image_id = image_id_for(data)
    assert store.put(image_id, data, "jpg") is True
    second = store.put(image_id, data, "png")
    assert second is (not isinstance(store, LocalImageStore))
    assert store.head(image_id).size == len(data)
    assert store.delete(image_id) is True
    assert store.head(image_id) is None and store.existing([image_id]) == set()
    assert image_id not in {entry.image_id for entry in store.walk()}
    assert store.delete(image_id) is False


def test_get_streams_whole_originals_and_byte_ranges(store, images):
    big = images[-1]
    image_id = image_id_for(big)
    store.put(image_id, big, "jpg")
    stream = store.get(image_id)
    chunks = list(stream)
    assert b"".join(chunks) == big and len(chunks) >= 2 and max(map(len, chunks)) <= CHUNK_BYTES
    assert (stream.start, stream.end, stream.info.size) == (0, len(big), len(big))
    for start, end in [(0, 1), (100, 5000), (CHUNK_BYTES - 10, CHUNK_BYTES + 10), (len(big) - 7, len(big))]:
        part = store.get(image_id, start, end)
        assert (part.start, part.end, part.info.size) == (start, end, len(big))
        assert part.read() == big[start:end]
    tail = store.get(image_id, len(big) - 100)
    assert tail.read() == big[-100:] and tail.end == len(big)
    store.get(image_id).close()  # closing without reading releases it


def test_what_is_not_stored(store, images):
    image_id = image_id_for(images[1])
    assert store.head(image_id) is None and store.delete(image_id) is False
    with pytest.raises(ImageNotFoundError):
        store.get(image_id)
    with pytest.raises(ImageNotFoundError):
        store.read(image_id)
    for bad in ["../../etc/passwd", "A" * 64, "ab" * 31]:
        assert store.head(bad) is None and store.delete(bad) is False
        with pytest.raises(ValueError):
            store.put(bad, images[1], "jpg")
    with pytest.raises(ValueError):
        store.put(image_id, images[1], "../x")


def test_delete_then_put_again(store, images):
    data = images[2]
    image_id = image_id_for(data)
    store.put(image_id, data, "jpg")
    assert store.delete(image_id) is True
    assert store.head(image_id) is None and store.delete(image_id) is False
    with pytest.raises(ImageNotFoundError):
        store.get(image_id)
    assert store.put(image_id, data, "jpg") is True and store.read(image_id) == data


def test_walk_lists_every_original_and_discard_removes_it(store, images):
    ids = sorted(image_id_for(d) for d in images)
    for data in images:
        store.put(image_id_for(data), data, "jpg")
    entries = [e for e in store.walk() if e.image_id is not None]
    assert [e.image_id for e in entries] == ids
    assert all(e.location.endswith(f"{e.image_id[:2]}/{e.image_id[2:4]}/{e.image_id}.jpg") for e in entries)
    store.discard(entries[0])
    assert store.head(ids[0]) is None
    assert [e.image_id for e in store.walk() if e.image_id] == ids[1:]


def test_concurrent_puts_of_the_same_bytes_store_once(store, images):
    data = images[0]
    image_id = image_id_for(data)
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def put() -> None:
        barrier.wait()
        with store.locks.hold([image_id]):
            results.append(store.put(image_id, data, "jpg"))

    threads = [threading.Thread(target=put) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert store.read(image_id) == data


def test_health_is_ok(store):
    assert store.health().state == "ok"


# --- the layout ----------------------------------------------------------------------------------------------
def test_the_file_store_keeps_todays_layout(tmp_path, images):
    store = LocalImageStore(tmp_path / "images")
    image_id = image_id_for(images[0])
    store.put(image_id, images[0], "jpg")
    assert (tmp_path / "images" / image_id[:2] / image_id[2:4] / f"{image_id}.jpg").read_bytes() == images[0]


def test_the_s3_store_uses_the_same_keys_under_its_prefix(tmp_path, moto_s3, images):
    bucket = moto_s3.create_bucket()
    store = _s3(tmp_path, moto_s3.endpoint, bucket)
    image_id = image_id_for(images[0])
    store.put(image_id, images[0], "jpg")
    assert moto_s3.keys(bucket) == [f"some/prefix/{image_id[:2]}/{image_id[2:4]}/{image_id}.jpg"]


def test_image_store_url_selects_the_store(tmp_path, moto_s3):
    assert parse_store_url(None) == ("file", "", "")
    assert parse_store_url("file:///srv/images") == ("file", "/srv/images", "")
    assert parse_store_url("s3://photos/a/b/") == ("s3", "photos", "a/b")
    for bad in ["http://x/y", "s3:///nobucket", "file://host/x", "s3://b/p?x=1"]:
        with pytest.raises(ValueError):
            parse_store_url(bad)
    with pytest.raises(ValueError, match="IMAGE_STORE_URL") as refused:  # with the settings, before anything starts
        make_settings(
            tmp_path / "d",
            "postgresql://unused",
            image_store_url="minio://photos",
            aws_secret_access_key=S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
        )
    _assert_no_credentials(str(refused.value))
    default = from_settings(make_settings(tmp_path / "d", "postgresql://unused"))
    assert isinstance(default, LocalImageStore) and default.root == (tmp_path / "d" / "images").resolve()
    chosen = from_settings(
        make_settings(tmp_path / "d", "postgresql://unused", image_store_url=(tmp_path / "elsewhere").as_uri())
    )
    assert isinstance(chosen, LocalImageStore) and chosen.root == (tmp_path / "elsewhere").resolve()
    s3 = from_settings(
        make_settings(
            tmp_path / "d",
            "postgresql://unused",
            image_store_url="s3://photos/originals",
            aws_endpoint_url=moto_s3.endpoint,
        )
    )
    assert isinstance(s3, S3ImageStore) and s3.url == f"s3://photos/originals at {moto_s3.endpoint}"


# --- faults of an object store ---------------------------------------------------------------------------------
def _assert_no_credentials(text: str) -> None:
    for secret in S3_TEST_ENV.values():
        assert secret not in text


def test_a_store_that_is_down_answers_503_within_a_bounded_time_and_recovers(tmp_path, images):
    moto = MotoS3().start()
    try:
        bucket = moto.create_bucket()
        store = _s3(tmp_path, moto.endpoint, bucket)
        data = images[0]
        image_id = image_id_for(data)
        store.put(image_id, data, "jpg")
        moto.stop()
        other = image_id_for(images[1])
        start = time.monotonic()
        with pytest.raises(StorageUnavailableError) as caught:
            store.put(other, images[1], "jpg")
        assert time.monotonic() - start < 5
        message = str(caught.value)
        assert "cannot be reached" in message and bucket in message
        _assert_no_credentials(message)
        assert caught.value.retry_after_s == 5.0
        start = time.monotonic()
        with pytest.raises(StorageUnavailableError):  # refused at once while it is known to be down
            store.ensure_space()
        assert time.monotonic() - start < 0.5  # microseconds in fact; room for a stall of a shared CI machine
        health = store.health()
        assert health.state == "degraded" and "503" in health.problem
        _assert_no_credentials(health.problem)
        with pytest.raises(StorageUnavailableError):
            store.get(other)

        moto.start()  # back (empty: moto keeps its data in memory)
        moto.create_bucket(bucket)
        time.sleep(1.1)  # the probe runs at most once a second
        assert store.health().state == "ok"
        store.ensure_space()
        assert store.put(other, images[1], "jpg") is True
    finally:
        moto.stop()


class _FullHandler(http.server.BaseHTTPRequestHandler):
    """A stand-in object store that is full (MinIO's answer) for PUTs and empty for LISTs."""

    def do_GET(self):  # noqa: N802
        body = b'<?xml version="1.0"?><ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = (
            b"<Error><Code>XMinioStorageFull</Code>"
            b"<Message>Storage backend has reached its minimum free drive threshold.</Message></Error>"
        )
        self.send_response(507)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_full_store_raises_storage_full(tmp_path, images):
    server = socketserver.ThreadingTCPServer(("127.0.0.1", free_port()), _FullHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        store = _s3(tmp_path, f"http://127.0.0.1:{server.server_address[1]}", "full-bucket", max_retries=0)
        with pytest.raises(StorageFullError) as caught:
            store.put(image_id_for(images[0]), images[0], "jpg")
        assert "full" in str(caught.value) and "nothing was stored" in str(caught.value)
        _assert_no_credentials(str(caught.value))
    finally:
        server.shutdown()
        server.server_close()


def test_wrong_credentials_or_a_missing_bucket_are_503_with_the_reason(tmp_path, moto_s3, images):
    store = _s3(tmp_path, moto_s3.endpoint, "no-such-bucket-here")
    with pytest.raises(StorageUnavailableError) as caught:
        store.put(image_id_for(images[0]), images[0], "jpg")
    assert "no bucket 'no-such-bucket-here'" in str(caught.value)
    _assert_no_credentials(str(caught.value))


def _twin(store: ImageStore, tmp_path: Path) -> ImageStore:
    """A second store object on the same folder or bucket: another replica's view."""
    if isinstance(store, LocalImageStore):
        return LocalImageStore(store.root)
    assert isinstance(store, S3ImageStore)
    return _s3(tmp_path / "twin", store.endpoint, store.bucket)


def test_a_second_replica_sees_puts_and_deletes_at_once(store, tmp_path, images):
    other = _twin(store, tmp_path)
    try:
        data = images[0]
        image_id = image_id_for(data)
        assert store.put(image_id, data, "jpg") is True
        assert other.read(image_id) == data and other.head(image_id) is not None  # B has read it (and cached)
        assert store.delete(image_id) is True
        assert other.head(image_id) is None and other.existing([image_id]) == set()
        with pytest.raises(ImageNotFoundError):
            other.get(image_id)
        assert other.put(image_id, data, "jpg") is True  # not "already stored" from a stale memory
        assert store.read(image_id) == data
        assert other.delete(image_id) is True and store.put(image_id, data, "jpg") is True
    finally:
        other.close()


def test_put_many_is_all_or_nothing(store, images):
    ids = [image_id_for(d) for d in images]
    store.put(ids[0], images[0], "jpg")
    with pytest.raises(ValueError):  # the last item is refused: the ones this call created are removed again
        store.put_many(
            [(i, d, "jpg") for i, d in zip(ids[:3], images[:3], strict=True)] + [(ids[3], images[3], "../x")]
        )
    assert store.existing(ids) == {ids[0]}  # the one stored before stays
    assert store.put_many([(i, d, "jpg") for i, d in zip(ids, images, strict=True)]) == [False, True, True, True]
    assert store.existing(ids) == set(ids)


def test_a_large_original_downloads_past_the_request_deadline(tmp_path, moto_s3):
    """S3_REQUEST_TIMEOUT_S bounds the wait for the first chunk and for each further one, not the whole transfer."""
    store = _s3(tmp_path, moto_s3.endpoint, moto_s3.create_bucket(), request_timeout_s=0.5)
    try:
        data = os.urandom(64_000_000)
        image_id = image_id_for(data)
        assert store.put(image_id, data, "jpg") is True  # the PUT's deadline grows with its body (+16 s here)
        start = time.monotonic()
        stream = store.get(image_id)
        chunks = 0
        got = bytearray()
        for chunk in stream:
            got += chunk
            chunks += 1
            time.sleep(0.005)  # a slow reader: the whole transfer takes longer than the deadline
        took = time.monotonic() - start
        print(f"64 MB in {chunks} chunks, {took:.2f} s with a 0.5 s request deadline")
        assert bytes(got) == data and chunks > 1 and took > 1.0
        assert store.health().state == "ok"
    finally:
        store.close()


def test_a_stopped_store_is_refused_fast_and_heals_after_sigcont(tmp_path, images):
    """The store alone, moto's server stopped (SIGSTOP): the first calls give up after S3_REQUEST_TIMEOUT_S, later
    ones (reads too) are refused at once, and the background probe lets calls through again after SIGCONT."""
    import signal

    moto = MotoS3().start()
    try:
        store = _s3(tmp_path, moto.endpoint, moto.create_bucket(), request_timeout_s=1.0)
        image_id = image_id_for(images[0])
        store.put(image_id, images[0], "jpg")
        assert store.get(image_id).read() == images[0]
        moto.process.send_signal(signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(StorageUnavailableError, match="did not answer within 1 s"):
                store.get(image_id)
            assert 0.9 < time.monotonic() - start < 2.0
            start = time.monotonic()
            for call in (lambda: store.get(image_id), lambda: store.head(image_id), store.ensure_space):
                with pytest.raises(StorageUnavailableError):
                    call()
            assert time.monotonic() - start < 0.1  # refused at once: the store is known down
            assert store.health().state == "degraded"
        finally:
            moto.process.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 5
        while store.health().state != "ok":
            assert time.monotonic() < deadline, "the store did not heal after SIGCONT"
            time.sleep(0.05)
        assert store.get(image_id).read() == images[0]
        store.close()
    finally:
        if moto.process is not None:
            moto.process.send_signal(signal.SIGCONT)
        moto.stop()


def test_a_slow_listing_fails_no_request(tmp_path, images):
    """fsck's and the orphan sweep's whole-bucket walk waits S3_READ_TIMEOUT_S per page, not the request deadline,
    and a slow page does not mark the store down: moto stopped (SIGSTOP) for 2 s during a walk, with a request
    deadline of 0.5 s, and the walk still lists every original while the store stays up for requests (issue #27:
    a slow listing by the periodic sweep made every request answer 503)."""
    import signal

    moto = MotoS3().start()
    try:
        store = _s3(tmp_path, moto.endpoint, moto.create_bucket(), request_timeout_s=0.5, read_timeout_s=20.0)
        ids = []
        for data in images[:3]:
            ids.append(image_id_for(data))
            store.put(ids[-1], data, "jpg")
        moto.process.send_signal(signal.SIGSTOP)
        resume = threading.Timer(2.0, lambda: moto.process.send_signal(signal.SIGCONT))
        resume.start()
        try:
            start = time.monotonic()
            found = {entry.image_id for entry in store.walk()}
            assert time.monotonic() - start > 1.5  # it waited for the stopped store
        finally:
            resume.join()
            moto.process.send_signal(signal.SIGCONT)
        assert found == set(ids)
        assert store.health().state == "ok"
        assert store.get(ids[0]).read() == images[0]
    finally:
        store.close()
        moto.stop()
