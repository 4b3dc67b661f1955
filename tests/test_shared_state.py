"""Replicas whose vectors live in Milvus (or Manticore) share the write locks, the neighbour graph and job progress
through a PostgreSQL beside the vectors (``DATABASE_URL`` with any ``VECTOR_DB``; issue #21): Milvus and Manticore
have no locks of their own, and the flock files of two ``DATA_DIR``s exclude nothing.

Two service instances with their own ``DATA_DIR`` ("machines") on one Milvus server (Milvus Lite's own gRPC server
as a process of its own), one PostgreSQL and one bucket on moto's standalone S3 server. The same code serves
Manticore (the locks and the graph never touch the vector database); no Manticore engine installs here.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from app.errors import DatabaseUnavailableError, ImageNotFoundError
from app.ids import image_id_for
from app.indexing.fsck import check
from app.locks import PgAdvisoryLocks
from app.service import SearchService
from app.vectordb.guard import GuardedHandler
from tests.helpers import INSTANCE, make_settings, milvus_lite_server, race_index_and_delete, s3_settings

ROUNDS = 200


@pytest.mark.slow
def test_two_replicas_on_one_milvus_share_locks_originals_and_the_graph(
    tmp_path, database_url, moto_s3, offline_embedder
):
    bucket = moto_s3.create_bucket()
    with milvus_lite_server(tmp_path / "milvus.db") as (uri, _):

        def replica(name: str) -> SearchService:
            settings = s3_settings(
                tmp_path / name, database_url, moto_s3, bucket, vector_db="milvus", milvus_uri=uri, neighbours_k=4
            )
            return SearchService.open(settings, embedder=offline_embedder)

        a, b = replica("a"), replica("b")
        try:
            for r in (a, b):  # the locks and the graph live in PostgreSQL, behind a breaker of their own
                assert isinstance(r.store.locks, GuardedHandler) and isinstance(r.store.locks.db, PgAdvisoryLocks)
                assert r.neighbours.shared
                health = r.health()
                assert (health.backend, health.shared_state, health.status) == ("milvus", "ok", "ok")

            # What one indexes the other serves; what one deletes is gone in the other.
            data = sorted(INSTANCE.rglob("*.jpg"))[0].read_bytes()
            image_id = a.index_image(data, "holiday.jpg").id
            assert b.read_original(image_id) == (data, "holiday.jpg")
            assert b.existing_ids([image_id]) == {image_id}
            b.delete_image(image_id)
            assert a.existing_ids([image_id]) == set()
            with pytest.raises(ImageNotFoundError):
                a.original_info(image_id)

            # Index through A and delete through B, the same bytes at once, ROUNDS times: the advisory locks in
            # PostgreSQL keep every round whole (row and original both there, or both gone).
            datas = [p.read_bytes() for p in sorted(INSTANCE.rglob("*.jpg"))[:3]]
            broken = race_index_and_delete(a, datas, ROUNDS, seed=21, deleter=b)
            assert broken == [], f"{len(broken)} of {ROUNDS} rounds left a row without its original or the reverse"
            assert check(b.db, b.store).clean

            # The graph: asked of both at the same instant, one job runs; both serve the same groups.
            folders = ["exif_portrait", "plasma_Kite", "gdk_bench_photo", "single_Aqua"]
            files = [p for f in folders for p in sorted((INSTANCE / f).iterdir()) if p.is_file()]
            a.index_images([(p.read_bytes(), p.name) for p in files])
            start = threading.Barrier(2)
            answers: dict[str, tuple[int, bool]] = {}

            def ask(name: str, r: SearchService) -> None:
                start.wait()
                job, started = r.neighbours.start()
                answers[name] = (job.id, started)

            askers = [threading.Thread(target=ask, args=(n, r)) for n, r in (("a", a), ("b", b))]
            for t in askers:
                t.start()
            for t in askers:
                t.join(timeout=60)
            assert answers["a"][0] == answers["b"][0]
            assert sorted(started for _, started in answers.values()) == [False, True]
            assert a.neighbours.wait(timeout=120) and b.neighbours.wait(timeout=120)
            job = b.neighbours.job(answers["a"][0])
            assert job.state == "completed" and job.done >= len(files)
            groups = a.neighbours.duplicates(0.9)
            assert groups.total >= 2 and groups == b.neighbours.duplicates(0.9)
        finally:
            a.close()
            b.close()


@pytest.mark.slow
def test_a_hung_shared_state_database_beside_milvus_degrades_writes_not_searches(tmp_path, offline_embedder):
    """SIGSTOP of the PostgreSQL that holds the locks (Milvus Lite holds the vectors): ``/health`` says
    ``shared_state: unavailable`` (200, degraded), searches keep working, writes answer 503 within a bounded time,
    and all is well again after SIGCONT."""
    from app.main import create_app
    from app.vectordb.embedded_pg import start_embedded_postgres
    from tests.helpers import PostgresFreeze, run_live_server

    pgdata = tmp_path / "state-pg"
    state = start_embedded_postgres(pgdata)
    try:
        settings = make_settings(tmp_path / "data", state.url, vector_db="milvus")
        files = sorted(INSTANCE.rglob("*.jpg"))[:3]
        with run_live_server(create_app(settings, embedder=offline_embedder)) as url, httpx.Client(timeout=30) as http:
            first = http.post(f"{url}/index_image", files={"file": (files[0].name, files[0].read_bytes())})
            assert first.status_code == 201, first.text
            image_id = first.json()["id"]
            assert http.get(f"{url}/health").json()["shared_state"] == "ok"

            freeze = PostgresFreeze(pgdata)
            freeze.suspend()
            try:
                deadline = time.monotonic() + 10
                while (health := http.get(f"{url}/health")).json()["shared_state"] != "unavailable":
                    assert time.monotonic() < deadline, health.text
                    time.sleep(0.1)
                body = health.json()
                assert health.status_code == 200 and body["status"] == "degraded" and body["database"] == "ok"
                assert any(p.startswith("shared state") for p in body["problems"]), body
                assert http.get(f"{url}/image/{image_id}/similar").status_code == 200
                assert http.post(f"{url}/search_image", files={"file": ("q.jpg", files[1].read_bytes())}).is_success
                started = time.monotonic()
                write = http.post(f"{url}/index_image", files={"file": (files[1].name, files[1].read_bytes())})
                assert write.status_code == 503 and "retry-after" in write.headers, write.text
                assert time.monotonic() - started < 3
                assert http.delete(f"{url}/image/{image_id}").status_code == 503
            finally:
                freeze.resume()
            deadline = time.monotonic() + 15
            while http.get(f"{url}/health").json()["shared_state"] != "ok":
                assert time.monotonic() < deadline, "the shared state did not recover"
                time.sleep(0.2)
            again = http.post(f"{url}/index_image", files={"file": (files[1].name, files[1].read_bytes())})
            assert again.status_code == 201, again.text
            assert http.delete(f"{url}/image/{image_id}").status_code == 200
    finally:
        state.stop()


def test_without_a_database_url_the_state_is_this_machines(tmp_path, offline_embedder):
    settings = make_settings(tmp_path, "", vector_db="milvus")
    service = SearchService.open(settings, embedder=offline_embedder)
    try:
        assert not isinstance(service.store.locks, (GuardedHandler, PgAdvisoryLocks))
        assert not service.neighbours.shared
        assert service.health().shared_state == "local"
    finally:
        service.close()


def test_locks_beside_milvus_fail_fast_while_their_database_is_down(tmp_path, offline_embedder):
    """Nothing listens at DATABASE_URL: the breaker opens on its first probe and a write fails at once (503)."""
    from tests.helpers import free_port

    dead = f"postgresql://nobody:nothing@127.0.0.1:{free_port()}/none"
    service = SearchService.open(make_settings(tmp_path, dead, vector_db="milvus"), embedder=offline_embedder)
    try:
        health = service.health()
        assert health.shared_state == "unavailable" and health.status == "degraded"
        assert "nothing" not in health.model_dump_json()  # the URL's password is never shown
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailableError, match="shared-state database"):
            service.index_image(sorted(INSTANCE.rglob("*.jpg"))[0].read_bytes(), "x.jpg")
        assert time.monotonic() - started < 1.0
        assert service.existing_ids([image_id_for(b"x")]) == set()  # searches and reads of Milvus still work
    finally:
        service.close()
