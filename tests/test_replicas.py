"""Two replicas that share one PostgreSQL (DATABASE_URL) and one bucket, each with a DATA_DIR of its own (two
"machines"): what one indexes the other serves, what one deletes is gone in the other, and index/delete races of
the same bytes through both never leave a row without its original or the reverse (PostgreSQL advisory locks:
the flock files of the two DATA_DIRs exclude nothing); a ``kill -9`` of one replica (``python -m app``) in the
middle of a batch leaves the other serving, and after its restart ``fsck.py`` is clean. Issue #21; moto's
standalone S3 server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from app.errors import ImageNotFoundError
from app.ids import image_id_for
from app.indexing.fsck import check
from app.locks import PgAdvisoryLocks
from app.service import SearchService
from tests.helpers import (
    INSTANCE,
    PROJECT_ROOT,
    S3_TEST_ENV,
    WriterProcess,
    free_port,
    race_index_and_delete,
    s3_settings,
)

ROUNDS = 200


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
    # The other replica (its own DATA_DIR) indexes and deletes the same bytes at random all along.
    with WriterProcess(env, files, tmp_path / "stop") as other:
        service = SearchService.open(settings, embedder=offline_embedder)
        try:
            other.wait_ready()
            broken = race_index_and_delete(service, [p.read_bytes() for p in files], ROUNDS, seed=21)
            other_ops = other.finish()
            assert other_ops > ROUNDS / 4, other_ops  # the other replica really raced along
            assert broken == [], f"{len(broken)} of {ROUNDS} rounds left a row without its original or the reverse"
            report = check(service.db, service.store)
            assert report.clean, report.lines()
        finally:
            service.close()


# --- kill -9 of one replica in the middle of a batch -----------------------------------------------------------
def _start_replica(data_dir: Path, port: int, database_url: str, moto_s3, bucket: str, model_cache_dir: Path):
    """``python -m app`` on ``port``: a replica with a DATA_DIR of its own, the shared database and bucket."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "IMAGE_", "DATA_", "EMBEDDER", "AWS_"))
    }
    env.update(
        PYTHONPATH=str(PROJECT_ROOT),
        DATA_DIR=str(data_dir),
        DATABASE_URL=database_url,
        IMAGE_STORE_URL=f"s3://{bucket}/originals",
        AWS_ENDPOINT_URL=moto_s3.endpoint,
        MODEL_CACHE_DIR=str(model_cache_dir),
        EMBEDDER="efficientnet",
        UI_ENABLED="false",
        PORT=str(port),
        LOG_LEVEL="WARNING",
        ORPHAN_GRACE_S="1",  # the restart's sweep removes what the killed batch left (test_self_healing: 600 s)
        **S3_TEST_ENV,
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    log = (data_dir / "service.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "app"], env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, (data_dir / "service.log").read_text()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the replica did not start"
        time.sleep(0.2)


@pytest.mark.slow
def test_kill_9_of_a_replica_mid_batch_the_other_serves_and_fsck_is_clean(
    tmp_path, database_url, moto_s3, bucket, model_cache_dir, offline_embedder
):
    # offline_embedder: its ONNX export lands in model_cache_dir once, before the replicas load it from there.
    files = sorted(p for p in INSTANCE.rglob("*.jpg") if p.stat().st_size < 80_000)
    base, batch = files[:4], files[4:52]
    a, url_a = _start_replica(tmp_path / "a", free_port(), database_url, moto_s3, bucket, model_cache_dir)
    b, url_b = _start_replica(tmp_path / "b", free_port(), database_url, moto_s3, bucket, model_cache_dir)
    procs = [a, b]
    stop = threading.Event()
    failed_searches: list[str] = []
    searches = 0
    try:
        for p in base:
            assert httpx.post(f"{url_b}/index_image", files={"file": (p.name, p.read_bytes())}).status_code == 201
        base_id = image_id_for(base[0].read_bytes())

        def search_b() -> None:  # B serves all along: by id, by image, and the original itself
            nonlocal searches
            with httpx.Client(timeout=30) as http:
                while not stop.is_set():
                    answers = [
                        http.get(f"{url_b}/image/{base_id}/similar"),
                        http.post(f"{url_b}/search_image", files={"file": ("q.jpg", base[1].read_bytes())}),
                        http.get(f"{url_b}/image/{base_id}"),
                    ]
                    searches += 1
                    failed_searches.extend(f"{r.request.url}: {r.status_code}" for r in answers if r.status_code != 200)

        searcher = threading.Thread(target=search_b)
        searcher.start()

        def send_batch() -> None:  # the batch A dies in: its client sees the connection drop
            uploads = [("files", (p.name, p.read_bytes())) for p in batch]
            try:
                httpx.post(f"{url_a}/index_images", files=uploads, timeout=120)
            except httpx.TransportError:
                pass

        sender = threading.Thread(target=send_batch)
        sender.start()
        deadline = time.monotonic() + 120
        while len(moto_s3.keys(bucket)) <= len(base):  # A has begun writing the batch's originals
            assert sender.is_alive(), "the batch finished before A could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=30)
        sender.join(timeout=60)

        stored = {k.rsplit("/", 1)[1].split(".")[0] for k in moto_s3.keys(bucket)}
        with_row = set(httpx.post(f"{url_b}/images/exists", json={"ids": sorted(stored)}).json()["existing"])
        orphans = stored - with_row  # originals A stored for rows it never wrote
        # B writes some of the very bytes A was writing: A's advisory locks died with its connections, no wait.
        uploads = [("files", (p.name, p.read_bytes())) for p in batch[:8]]
        r = httpx.post(f"{url_b}/index_images", files=uploads, timeout=120)
        assert r.status_code == 200 and {x["status"] for x in r.json()["results"]} <= {"indexed", "exists"}, r.text
        stop.set()
        searcher.join(timeout=60)
        assert searches > 0 and failed_searches == []

        # A restarts: its start-up sweep removes the originals the kill left without a row; fsck.py is clean.
        time.sleep(1.1)  # older than ORPHAN_GRACE_S
        a, url_a = _start_replica(tmp_path / "a", free_port(), database_url, moto_s3, bucket, model_cache_dir)
        procs[0] = a
        rows = httpx.get(f"{url_a}/stats").json()["count"]
        assert len(base) + 8 <= rows <= len(base) + len(batch)
        deadline = time.monotonic() + 60
        while len(moto_s3.keys(bucket)) != rows:
            assert time.monotonic() < deadline, f"{len(moto_s3.keys(bucket))} originals for {rows} rows"
            time.sleep(0.2)
        if orphans - {image_id_for(p.read_bytes()) for p in batch[:8]}:  # beyond what B indexed: the sweep's
            assert "Start-up sweep removed" in (tmp_path / "a" / "service.log").read_text()
        assert httpx.get(f"{url_a}/image/{image_id_for(batch[0].read_bytes())}").content == batch[0].read_bytes()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "IMAGE_", "DATA_", "AWS_"))}
        env.update(
            PYTHONPATH=str(PROJECT_ROOT),
            DATA_DIR=str(tmp_path / "a"),
            DATABASE_URL=database_url,
            IMAGE_STORE_URL=f"s3://{bucket}/originals",
            AWS_ENDPOINT_URL=moto_s3.endpoint,
            **S3_TEST_ENV,
        )
        fsck = subprocess.run(
            [sys.executable, str(PROJECT_ROOT / "scripts/fsck.py")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert fsck.returncode == 0, (fsck.stdout, fsck.stderr)
    finally:
        stop.set()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


# --- the neighbour graph, duplicate groups and job progress, shared through PostgreSQL ---------------------------
_GRAPH_BUILDER = """
import sys, threading, time
from app.config import Settings
from app.neighbours import graph
from app.service import SearchService

real = graph.nearest
graph.SCAN_BATCH = 4  # progress committed every 4 images, each searched slowly: a kill lands mid-job

def slow(db, record, k, ef_search=None):
    time.sleep(0.1)
    return real(db, record, k, ef_search)

graph.nearest = slow
service = SearchService.open(Settings())
job, started = service.neighbours.start()
print(job.id, started, flush=True)
threading.Event().wait()
"""


@pytest.mark.slow
def test_replicas_share_the_graph_one_builds_and_a_killed_builder_loses_its_lease(
    tmp_path, database_url, offline_embedder, monkeypatch
):
    from app.errors import GraphNotBuiltError
    from app.neighbours import graph as graph_module
    from tests.helpers import make_settings

    folders = ["exif_portrait", "plasma_Kite", "gdk_bench_photo", "ocv_leuven_light", "single_Aqua", "single_Dune"]
    files = [p for f in folders for p in sorted((INSTANCE / f).iterdir()) if p.is_file()]
    b = SearchService.open(make_settings(tmp_path / "b", database_url, neighbours_k=4), embedder=offline_embedder)
    c = None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "IMAGE_", "DATA_", "EMBEDDER"))}
    env.update(
        PYTHONPATH=str(PROJECT_ROOT),
        DATABASE_URL=database_url,
        DATA_DIR=str(tmp_path / "a"),
        EMBEDDER="none",
        NEIGHBOURS_K="4",
        NEIGHBOURS_THREADS="1",
        UI_ENABLED="false",
    )
    a = None
    try:
        assert b.neighbours.shared
        rows = sum(r.status == "indexed" for r in b.index_images([(p.read_bytes(), p.name) for p in files]))
        assert rows >= 16
        a = subprocess.Popen(
            [sys.executable, "-c", _GRAPH_BUILDER], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        line = a.stdout.readline()
        assert line, a.stderr.read()
        job_id, started = int(line.split()[0]), line.split()[1] == "True"
        assert started
        # Its progress is visible from B; B asked to build answers A's job instead of starting a second one.
        deadline = time.monotonic() + 60
        while (job := b.neighbours.job(job_id)).done < 8:
            assert job.state == "running" and time.monotonic() < deadline
            time.sleep(0.05)
        again, started_here = b.neighbours.start()
        assert (again.id, started_here) == (job_id, False)
        with pytest.raises(GraphNotBuiltError):
            b.neighbours.duplicates(None)

        a.send_signal(signal.SIGKILL)  # the builder dies: its lease goes with its connection
        a.wait(timeout=30)
        done_at_kill = b.neighbours.job(job_id).done
        assert 0 < done_at_kill < rows
        deadline = time.monotonic() + 10
        while b.neighbours.job(job_id).state != "interrupted":
            assert time.monotonic() < deadline, "the dead builder's lease was not released"
            time.sleep(0.05)

        calls: list[str] = []
        real = graph_module.nearest
        monkeypatch.setattr(graph_module, "nearest", lambda db, r, k, ef=None: calls.append(r.id) or real(db, r, k, ef))
        resumed, started_here = b.neighbours.start()  # B takes the lease over and resumes the same job
        assert (resumed.id, started_here) == (job_id, True)
        assert b.neighbours.wait(timeout=120)
        job = b.neighbours.job(job_id)
        assert job.state == "completed" and job.done == rows
        assert len(calls) <= rows - done_at_kill  # what A committed is not searched again

        # Every replica serves the same groups: C, started afresh, reads them from the database.
        c = SearchService.open(make_settings(tmp_path / "c", database_url, neighbours_k=4), embedder=offline_embedder)
        groups_b = b.neighbours.duplicates(0.9)
        groups_c = c.neighbours.duplicates(0.9)
        assert groups_b.total >= 2 and groups_b == groups_c
        assert c.neighbours.job(job_id).state == "completed"

        # A rebuild asked of B and C at the same instant runs once: both answer one job, one of them started it.
        monkeypatch.setattr(graph_module, "nearest", lambda db, r, k, ef=None: time.sleep(0.05) or real(db, r, k, ef))
        barrier = threading.Barrier(2)
        answers: dict[str, tuple] = {}

        def ask(name: str, replica: SearchService) -> None:
            barrier.wait()
            job, started = replica.neighbours.start()
            answers[name] = (job.id, started)

        threads = [threading.Thread(target=ask, args=(n, r)) for n, r in (("b", b), ("c", c))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert answers["b"][0] == answers["c"][0] != job_id
        assert sorted(started for _, started in answers.values()) == [False, True]
        assert b.neighbours.wait(timeout=120) and c.neighbours.wait(timeout=120)
        assert b.neighbours.job(answers["b"][0]).state == "completed"
        assert b.neighbours.duplicates(0.9) == c.neighbours.duplicates(0.9)
    finally:
        if a is not None and a.poll() is None:
            a.kill()
            a.wait(timeout=30)
        b.close()
        if c is not None:
            c.close()
