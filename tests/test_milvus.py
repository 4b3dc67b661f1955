"""Milvus-specific behaviour of :class:`app.vectordb.milvus.MilvusHandler`, on real embedded Milvus Lite databases.

The backend-independent contract is in ``tests/test_vectordb_contract.py``; these tests cover what only Milvus
has: durability of a Lite database across close/reopen, safe filter expressions, the index Lite really builds,
one process per Lite database, and connection failures.
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from app.errors import CollectionMismatchError, DatabaseUnavailableError
from app.vectordb.base import ImageMetadata, ImageRecord
from app.vectordb.milvus import MilvusHandler

# Runs a database or a server: left out of `make test-fast`.
pytestmark = pytest.mark.slow

DIM = 64
MODEL = "test-model:v1"


def _unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _records(vectors: np.ndarray, start: int = 0, filename: str | None = None) -> list[ImageRecord]:
    now = datetime.now(UTC)  # microseconds kept: the round trip must be exact to the microsecond
    return [
        ImageRecord(
            f"{start + i:064x}",
            v,
            ImageMetadata(filename or f"dir/img_{start + i}.jpg", "JPEG", 640 + i, 480, 10_000 + i, now),
        )
        for i, v in enumerate(vectors)
    ]


@pytest.fixture
def db_path(tmp_path) -> str:
    return str(tmp_path / "milvus.db")


@pytest.fixture
def open_handler(db_path):
    """Opens handlers on ``db_path`` (keyword arguments passed on) and closes whatever a test left open."""
    made: list[MilvusHandler] = []

    def _open(**kw) -> MilvusHandler:
        h = MilvusHandler(db_path, **kw)
        made.append(h)
        return h

    yield _open
    for h in made:
        h.close()


def _lock_is_free(db_path: str) -> bool:
    """Whether nothing (in this or another process) holds Milvus Lite's lock on the database."""
    fd = os.open(os.path.join(db_path, "LOCK"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def test_data_survives_close_and_reopen(open_handler, db_path):
    rng = np.random.default_rng(11)
    vectors = _unit(rng, 300)
    records = _records(vectors)
    query = _unit(rng, 1)[0]

    h = open_handler()
    h.ensure_collection(MODEL, DIM)
    h.upsert(records)
    before = h.search(query, 10)
    h.close()
    assert _lock_is_free(db_path)  # the last handler stopped the embedded server

    # ef_search >= N: the HNSW graph of the now sealed segment is searched exhaustively, so results are exact.
    h2 = open_handler(ef_search=400)
    assert h2.collection_info() is not None
    assert (h2.collection_info().model_id, h2.collection_info().dim) == (MODEL, DIM)
    assert h2.ensure_collection(MODEL, DIM).model_id == MODEL
    assert h2.count() == 300
    after = h2.search(query, 10)
    assert [x.id for x in after] == [x.id for x in before]
    np.testing.assert_allclose([x.score for x in after], [x.score for x in before], atol=1e-5)
    got = h2.get(records[7].id)
    assert got is not None and got.metadata == records[7].metadata
    np.testing.assert_allclose(got.vector, records[7].vector, atol=1e-6)

    # New rows land in the memtable beside the reopened segment; scan still returns one global id order.
    h2.upsert(_records(_unit(rng, 5), start=1000))
    scanned = [r.id for batch in h2.scan(batch_size=64) for r in batch]
    assert scanned == sorted({r.id for r in records} | {f"{1000 + i:064x}" for i in range(5)})


def test_lite_builds_hnsw_with_the_configured_parameters(open_handler, db_path):
    h = open_handler(hnsw_m=8, hnsw_ef_construction=40)
    h.ensure_collection(MODEL, DIM)
    desc = h.index_description()
    assert (desc["index_type"], desc["metric_type"]) == ("HNSW", "COSINE")
    # Milvus Lite reads build parameters only from a nested "params" entry; the handler sends them that way.
    params = desc.get("params", desc)
    assert (int(params["M"]), int(params["efConstruction"])) == (8, 40)

    rng = np.random.default_rng(12)
    vectors = _unit(rng, 400)
    h.upsert(_records(vectors))
    h.close()  # flushes the memtable into a sealed segment, which gets a FAISS HNSW index file
    assert any("hnsw" in p.name.lower() for p in Path(db_path).rglob("*.idx"))

    h2 = open_handler(ef_search=64)
    queries = _unit(rng, 20)
    recall = []
    for q in queries:
        exact = set(np.argsort(-(vectors @ q))[:10])
        got = {int(x.id, 16) for x in h2.search(q, 10)}
        recall.append(len(exact & got) / 10)
    assert np.mean(recall) >= 0.95


def test_mismatch_after_reopen_names_both_models(open_handler):
    h = open_handler()
    h.ensure_collection(MODEL, DIM)
    h.close()
    h2 = open_handler()
    with pytest.raises(CollectionMismatchError) as err:
        h2.ensure_collection("other-model:v2", DIM)
    assert MODEL in str(err.value) and "other-model:v2" in str(err.value)
    with pytest.raises(CollectionMismatchError) as err:
        h2.ensure_collection(MODEL, DIM * 2)
    assert (err.value.stored_dim, err.value.loaded_dim) == (DIM, DIM * 2)
    assert h2.collection_info().model_id == MODEL  # the refused calls changed nothing


HOSTILE_IDS = [
    '" or id != "',
    f'{"0" * 64}" or id != "',
    "' or id != '",
    '"] or id != ["',
    "a" * 63 + '"',
    "A" * 64,  # upper case: not how ids are stored
    "0" * 63,
    "0" * 65,
    "0" * 63 + "\\",
    "0" * 63 + "\n",
    "",
]


def test_hostile_ids_never_match_or_leak_milvus_errors(open_handler):
    h = open_handler()
    h.ensure_collection(MODEL, DIM)
    records = _records(_unit(np.random.default_rng(13), 3))
    h.upsert(records)
    assert h.existing_ids(HOSTILE_IDS) == set()
    assert h.existing_ids(HOSTILE_IDS + [records[0].id]) == {records[0].id}
    for bad in HOSTILE_IDS:
        assert h.get(bad) is None
        assert h.delete(bad) is False
    assert h.count() == 3
    with pytest.raises(ValueError):
        h.upsert([ImageRecord('" or id != "', records[0].vector, records[0].metadata)])
    assert h.count() == 3


def test_long_unicode_filename_and_exact_timestamp_round_trip(open_handler):
    h = open_handler()
    h.ensure_collection(MODEL, DIM)
    name = "\U0001f5bc" * 1024  # 1024 characters of 4 UTF-8 bytes: the service's longest name, in bytes
    record = _records(_unit(np.random.default_rng(14), 1), filename=name)[0]
    h.upsert([record])
    got = h.get(record.id)
    assert got.metadata == record.metadata
    assert got.metadata.indexed_at.tzinfo is not None
    with pytest.raises(ValueError):
        h.upsert(_records(_unit(np.random.default_rng(15), 1), start=9, filename=name + "x"))


def test_handlers_on_one_file_share_the_embedded_server(open_handler, db_path):
    a = open_handler()
    a.ensure_collection(MODEL, DIM)
    b = open_handler()
    b.upsert(_records(_unit(np.random.default_rng(16), 4)))  # b never ran ensure_collection: it read the dimension
    a.close()
    assert b.health() is True and b.count() == 4  # closing one handler leaves the other working
    assert not _lock_is_free(db_path)
    b.close()
    assert _lock_is_free(db_path)
    assert a.health() is False
    with pytest.raises(DatabaseUnavailableError):
        a.count()


def test_a_second_process_is_refused_with_a_clear_error(db_path, tmp_path):
    # Another process opens the database with Milvus Lite's own engine (no pymilvus: quicker to start).
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys; from milvus_lite import MilvusLite; db = MilvusLite({db_path!r}); "
            "print('ready', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(DatabaseUnavailableError, match="another process"):
            MilvusHandler(db_path)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    h = MilvusHandler(db_path)  # free again once the other process has gone
    try:
        assert h.health() is True
    finally:
        h.close()


def test_unreachable_server_fails_fast():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    start = time.monotonic()
    with pytest.raises(DatabaseUnavailableError, match="Cannot connect to Milvus"):
        MilvusHandler(f"http://127.0.0.1:{port}", timeout_s=2)
    assert time.monotonic() - start < 10


def test_from_settings_creates_the_data_directory(tmp_path, monkeypatch):
    from app.config import Settings

    for var in ("MILVUS_URI", "MILVUS_TOKEN", "DATA_DIR", "HNSW_M", "HNSW_EF_CONSTRUCTION", "HNSW_EF_SEARCH"):
        monkeypatch.delenv(var, raising=False)
    settings = Settings(vector_db="milvus", data_dir=tmp_path / "not" / "yet")
    h = MilvusHandler.from_settings(settings)
    try:
        assert h.backend_name == "milvus" and h.collection_info() is None
        assert (tmp_path / "not" / "yet" / "milvus.db").is_dir()
    finally:
        h.close()


def test_import_with_a_lite_path_in_milvus_uri(tmp_path):
    # pymilvus parses MILVUS_URI at import time and refuses a path; the module hides it during the import.
    env = dict(os.environ, MILVUS_URI=str(tmp_path / "milvus.db"))
    code = "import os, app.vectordb.milvus; print(os.environ['MILVUS_URI'])"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == env["MILVUS_URI"]  # and it is left as it was


def test_concurrent_writers_and_readers_on_lite(open_handler):
    # Milvus Lite does not support concurrent writers: the handler serialises writes per database.
    import threading

    h = open_handler()
    h.ensure_collection(MODEL, DIM)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        rng = np.random.default_rng(100 + t)
        try:
            for k in range(5):
                h.upsert(_records(_unit(rng, 20), start=t * 1000 + k * 20))
                h.search(_unit(rng, 1)[0], 5)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert h.count() == 4 * 5 * 20


def test_http_uri_reaches_a_milvus_server(tmp_path):
    # No Milvus standalone here: `milvus-lite server` speaks the same gRPC protocol over http://, so this covers the
    # URL code path (the handler recognises Lite from the server version and still gets HNSW with its parameters).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = Path(sys.executable).with_name("milvus-lite")
    server = subprocess.Popen(
        [str(cli), "server", "--data-dir", str(tmp_path / "srv"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "milvus-lite server did not start"
                time.sleep(0.1)
        h = MilvusHandler(f"http://127.0.0.1:{port}", hnsw_m=12)
        try:
            h.ensure_collection(MODEL, DIM)
            assert int(h.index_description().get("params", {}).get("M", 0)) == 12
            records = _records(_unit(np.random.default_rng(17), 10))
            h.upsert(records)
            assert h.count() == 10
            assert h.search(records[3].vector, 1)[0].id == records[3].id
        finally:
            h.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_lite_flushes_after_many_rows_and_before_a_search_once_writes_pause(open_handler, monkeypatch):
    import app.vectordb.milvus_lite_server as milvus_module

    monkeypatch.setattr(milvus_module, "LITE_FLUSH_ROWS", 50)
    h = open_handler()
    h.ensure_collection("m", DIM)
    vectors = _unit(np.random.default_rng(11), 90)
    h.upsert(_records(vectors[:60]))  # crosses the threshold: sealed at once
    assert h._lite.unflushed_rows == 0
    h.upsert(_records(vectors[60:], start=60))
    assert h._lite.unflushed_rows == 30
    # Writes "paused" long ago: the next search seals the memtable first, and still sees every row.
    monkeypatch.setattr(milvus_module, "LITE_IDLE_FLUSH_S", 0.0)
    hits = h.search(vectors[80], 3)
    assert h._lite.unflushed_rows == 0
    assert hits[0].id == f"{80:064x}" and h.count() == 90


# --- filters and taken_at (issue #9) -------------------------------------------------------------------------------
def test_filter_expressions_quote_every_string_and_use_a_range_for_the_folder():
    from app.vectordb.base import SearchFilter
    from app.vectordb.milvus import filter_expr, quote

    assert quote('a"b\\c\nd\re\tf') == '"a\\"b\\\\c\\nd\\re\\tf"'
    f = SearchFilter.create(
        path_prefix='x"] or id != "',
        formats=["jpeg"],
        indexed_after=datetime(2024, 1, 1, tzinfo=UTC),
        taken_before=datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC),
        min_width=5,
        min_height=0,
    )
    assert filter_expr(f) == (
        '(filename >= "x\\"] or id != \\"/" and filename < "x\\"] or id != \\"0") and (format in ["JPEG"]) '
        "and (indexed_at >= 1704067200000000) and (taken_at < 1000000) and (width >= 5) and (height >= 0)"
    )
    assert filter_expr(SearchFilter()) == ""
    assert filter_expr(SearchFilter.create(taken_after=datetime(2024, 1, 1)), has_taken_at=False) is None
    assert filter_expr(SearchFilter.create(min_width=1), has_taken_at=False) == "(width >= 1)"


def test_hostile_folder_names_are_matched_literally_on_lite(open_handler):
    """What Milvus Lite's expression parser makes of the quoting: a folder made of quotes, backslashes and
    wildcards matches only itself (and an expression that tries to break out of its literal does not parse into
    ``or``)."""
    from app.vectordb.base import SearchFilter

    h = open_handler()
    h.ensure_collection(MODEL, DIM)
    folders = ['a"] or id != "', "b\\", "b\\\\", "c%", "c_", "cx", "d\nnl", "e'q", "日本/"]
    records = []
    for i, folder in enumerate(folders):
        for j in range(2):
            records += _records(_unit(np.random.default_rng(40 + i), 1), start=10 * i + j, filename=f"{folder}/{j}.jpg")
    h.upsert(records)
    for folder in folders:
        hits = h.search(records[0].vector, 50, SearchFilter.create(path_prefix=folder))
        assert sorted(x.metadata.filename for x in hits) == [f"{folder}/0.jpg", f"{folder}/1.jpg"], folder


def test_collection_from_before_taken_at_still_opens_reads_and_writes(open_handler, db_path):
    """Milvus Lite cannot add a field to an existing collection: one created without ``taken_at`` keeps working
    without it (``taken_at`` comes back None, a ``taken_*`` filter matches nothing, other filters work)."""
    from app.vectordb.base import SearchFilter
    from app.vectordb.milvus_lite_server import DataType, MilvusClient, acquire_lite, release_lite

    lite = acquire_lite(db_path)
    client = MilvusClient(uri=lite.uri, dedicated=True)
    try:  # the schema as the previous release created it
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=DIM)
        schema.add_field("filename", DataType.VARCHAR, max_length=4096)
        schema.add_field("format", DataType.VARCHAR, max_length=64)
        schema.add_field("width", DataType.INT32)
        schema.add_field("height", DataType.INT32)
        schema.add_field("bytes", DataType.INT64)
        schema.add_field("indexed_at", DataType.INT64)
        client.create_collection(
            "images", schema=schema, consistency_level="Strong", properties={"image_search.model_id": MODEL}
        )
        old = _records(_unit(np.random.default_rng(30), 1))[0]
        client.insert(
            "images",
            [
                {
                    "id": old.id,
                    "embedding": old.vector,
                    "filename": old.metadata.filename,
                    "format": "JPEG",
                    "width": old.metadata.width,
                    "height": old.metadata.height,
                    "bytes": old.metadata.bytes,
                    "indexed_at": 1_700_000_000_000_000,
                }
            ],
        )
    finally:
        client.close()
        release_lite(lite)

    h = open_handler()
    assert h.get(old.id).metadata.taken_at is None  # readable before ensure_collection (a migration source)
    h.ensure_collection(MODEL, DIM)
    new = _records(_unit(np.random.default_rng(31), 1), start=1)[0]
    taken = ImageRecord(new.id, new.vector, replace(new.metadata, taken_at=datetime(2020, 1, 1, tzinfo=UTC)))
    h.upsert([taken])
    assert h.count() == 2
    assert h.get(new.id).metadata.taken_at is None  # not stored: the collection has no such field
    assert {r.id for batch in h.scan() for r in batch} == {old.id, new.id}
    assert h.search(new.vector, 5, SearchFilter.create(taken_after=datetime(1900, 1, 1))) == []
    assert [x.id for x in h.search(new.vector, 5, SearchFilter.create(indexed_after=datetime(2024, 1, 1)))] == [new.id]
