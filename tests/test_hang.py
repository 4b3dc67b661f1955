"""A database that hangs instead of dying (issue #20, item 1): every call has a deadline, a hung PostgreSQL gives the
same fast 503 + Retry-After as a dead one, ``/health`` turns within the bound, and the service recovers by itself
with nothing lost.

The first tests use a socket pair and a fake handler (milliseconds); the last two stop (``SIGSTOP``) a dedicated
embedded PostgreSQL (postmaster and every backend), and a Milvus Lite server run as a process of its own, under a
search and index load on a real HTTP server, then resume them (``SIGCONT``, always, also when the test fails). The
hung Manticore case, without an engine, is in ``tests/test_manticore_sql.py``.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from app.errors import DatabaseUnavailableError
from app.vectordb.deadline import Deadlines, shutdown_socket
from app.vectordb.guard import FRESH_S, GuardedHandler

#: the issue's aims: first 503 within 2 s of the hang, p99 of failed requests <= 2.5 s
FIRST_503_S = 2.0
FAILED_P99_S = 2.5
HANG_S = 6.0
RECOVERY_LIMIT_S = 10.0


def test_a_deadline_unblocks_a_read_on_a_silent_peer():
    deadlines = Deadlines()
    a, b = socket.socketpair()
    try:
        start = time.monotonic()
        with deadlines.bound(lambda: shutdown_socket(a.fileno()), 0.2) as deadline:
            data = a.recv(10)  # b never writes: only the deadline ends this
        took = time.monotonic() - start
        assert data == b"" and deadline.fired
        assert 0.15 < took < 1.0
    finally:
        a.close()
        b.close()
        deadlines.close()


def test_a_call_that_finished_in_time_is_never_cut_afterwards():
    deadlines = Deadlines()
    a, b = socket.socketpair()
    try:
        for _ in range(50):
            with deadlines.bound(lambda: shutdown_socket(a.fileno()), 0.05) as deadline:
                b.sendall(b"x")
                assert a.recv(1) == b"x"
            assert not deadline.fired
        time.sleep(0.2)  # every deadline has passed by now
        b.sendall(b"y")
        assert a.recv(1) == b"y"  # the socket still works: no late shutdown
        with deadlines.bound(lambda: None, None) as unbounded:  # None: no deadline at all
            pass
        assert not unbounded.fired
    finally:
        a.close()
        b.close()
        deadlines.close()


class _HangingHandler:
    """A stand-in handler whose health check and calls block while ``hang`` is set."""

    backend_name = "fake"

    def __init__(self) -> None:
        self.hang = threading.Event()
        self.released = threading.Event()

    def health(self) -> bool:
        if self.hang.is_set():
            self.released.wait(10)
        return True

    def count(self) -> int:
        return 1

    def close(self) -> None:
        self.released.set()


def test_the_guard_never_reports_a_stale_ok_for_a_hung_probe():
    fake = _HangingHandler()
    guard = GuardedHandler(fake, probe_timeout_s=0.3)
    try:
        assert guard.check_now() is True and guard.count() == 1
        fake.hang.set()
        time.sleep(FRESH_S + 0.05)  # past the moment a just-made probe may answer for /health
        start = time.monotonic()
        assert guard.check_now() is False  # no probe answers: down within probe_timeout_s, no cached "ok"
        assert time.monotonic() - start < 0.6
        time.sleep(0.35)  # the probe in flight is now overdue
        assert guard.health() is False and "has not answered a health check" in guard.down_reason
        start = time.monotonic()
        with pytest.raises(DatabaseUnavailableError):
            guard.count()  # requests fail at once while the probe hangs
        # The fake's count() answers, so the raise is the guard's; the bound says it did not wait on the hung probe
        # (blocked for up to 10 s) and leaves room for a stall of a shared CI machine.
        assert time.monotonic() - start < 0.5
        fake.hang.clear()
        fake.released.set()
        deadline = time.monotonic() + 3
        while not guard.check_now() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert guard.health() is True and guard.count() == 1
    finally:
        guard.close()


def test_statement_timeout_cancels_a_slow_statement_on_a_live_server(database_url):
    from app.errors import DatabaseTimeoutError
    from app.vectordb.pgvector import PgVectorHandler

    handler = PgVectorHandler(database_url, statement_timeout_s=0.2, request_timeout_s=0.5)
    try:
        assert handler._run(lambda c: c.execute("SHOW statement_timeout").fetchone()[0]) == "200ms"
        start = time.monotonic()
        with pytest.raises(DatabaseUnavailableError) as caught:
            handler._run(lambda c: c.execute("SELECT pg_sleep(5)"))
        # The server cancelled it (nothing applied, connection kept), before the client's deadline (0.2 + 0.5 s).
        assert not isinstance(caught.value, DatabaseTimeoutError) and "statement timeout" in str(caught.value)
        assert time.monotonic() - start < 0.65
        assert handler.count() == 0
        # Maintenance calls (index builds, collection switches) run without either limit, and restore it after.
        handler._run(lambda c: c.execute("SELECT pg_sleep(0.9)"), deadline_s=False)
        assert handler._run(lambda c: c.execute("SHOW statement_timeout").fetchone()[0]) == "200ms"
    finally:
        handler.close()


def _hang_under_load(application, images: list[Path], suspend, resume) -> list[str]:
    """Run a search and index load against ``application`` on a live loopback server, ``suspend()`` its database for
    :data:`HANG_S`, ``resume()`` it (always, in a ``finally``), and check the issue's bounds: failed requests are 503
    + Retry-After within them, ``/health`` turns within them and not back while stopped, the service recovers by
    itself within :data:`RECOVERY_LIMIT_S` of the resume, everything acknowledged exists afterwards, and fsck is
    clean.

    Returns the acknowledged ids. Prints the figures (seconds after the stop).
    """
    from tests.helpers import run_live_server

    acknowledged: list[str] = []
    failures: list[tuple[float, float, str]] = []  # (start since the stop, seconds taken, route)
    successes_during: list[tuple[float, str]] = []
    bad: list[str] = []
    health: list[tuple[float, int, float]] = []  # (since the stop, status, seconds taken)
    stop_flag = threading.Event()
    stopped_at: list[float] = []

    with run_live_server(application) as url:
        with httpx.Client(timeout=30) as http:
            for path in images[:5]:
                r = http.post(f"{url}/index_image", files={"file": (path.name, path.read_bytes())})
                assert r.status_code == 201, r.text
                acknowledged.append(r.json()["id"])
        query = images[0].read_bytes()
        to_index = list(images[5:])

        def since() -> float:
            return time.monotonic() - stopped_at[0] if stopped_at else -1e9

        def client(kind: str) -> None:
            with httpx.Client(timeout=30) as http:
                while not stop_flag.is_set():
                    start = time.monotonic()
                    if kind == "search":
                        r = http.post(f"{url}/search_image?top_k=3", files={"file": ("q.jpg", query)})
                    else:
                        if not to_index:
                            time.sleep(0.05)
                            continue
                        path = to_index[0]
                        r = http.post(f"{url}/index_image", files={"file": (path.name, path.read_bytes())})
                    took = time.monotonic() - start
                    t0 = start - stopped_at[0] if stopped_at else -1e9  # when it started, seconds after the stop
                    if r.status_code in (200, 201):
                        if kind == "index":
                            acknowledged.append(r.json()["id"])
                            to_index.pop(0)
                        if t0 > 0:
                            successes_during.append((t0, kind))
                    elif r.status_code == 503 and "Retry-After" in r.headers and r.json().get("detail"):
                        if t0 + took > 0:  # answered after the stop
                            failures.append((t0, took, kind))
                    else:
                        bad.append(f"{kind}: {r.status_code} {r.text[:200]}")
                    time.sleep(0.02)

        def watch_health() -> None:
            with httpx.Client(timeout=30) as http:
                while not stop_flag.is_set():
                    start = time.monotonic()
                    r = http.get(f"{url}/health")
                    t0 = start - stopped_at[0] if stopped_at else -1e9
                    health.append((t0, r.status_code, time.monotonic() - start))
                    time.sleep(0.1)

        threads = [threading.Thread(target=client, args=(k,)) for k in ("search", "search", "index")]
        threads.append(threading.Thread(target=watch_health))
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)  # load running against a healthy database
            try:
                suspend()
                stopped_at.append(time.monotonic())
                time.sleep(HANG_S)
            finally:
                resume()
                resumed = since()
            deadline = time.monotonic() + RECOVERY_LIMIT_S
            recovered_at = None
            while time.monotonic() < deadline:
                if any(t > resumed for t, _ in successes_during) and health and health[-1][0] > resumed:
                    if health[-1][1] == 200:
                        recovered_at = since() - resumed
                        break
                time.sleep(0.1)
        finally:
            stop_flag.set()
            for t in threads:
                t.join(timeout=60)

        assert bad == []
        during = [f for f in failures if f[0] < resumed]
        assert during, "no request failed while the database was stopped"
        first_503 = min(t + took for t, took, _ in during)  # seconds after the stop
        took_sorted = sorted(took for _, took, _ in during)
        p99 = took_sorted[min(len(took_sorted) - 1, int(0.99 * len(took_sorted)))]
        health_down = [t + took for t, status, took in health if status == 503 and -5 < t < resumed]
        slow_health = [(t, took) for t, status, took in health if 0 <= t < resumed and took > FIRST_503_S]
        print(
            f"first 503 after {first_503:.2f} s; failed requests: {len(during)}, p99 {p99:.2f} s, max "
            f"{took_sorted[-1]:.2f} s; /health 503 after {min(health_down) if health_down else None} s; recovered "
            f"{recovered_at} s after SIGCONT"
        )
        assert first_503 <= FIRST_503_S
        assert p99 <= FAILED_P99_S
        assert health_down and min(health_down) <= FIRST_503_S
        assert slow_health == []
        # Not "ok" again while stopped (one probe period of slack after the stop for a probe already answered).
        assert not [t for t, status, _ in health if status == 200 and 0.5 < t and t + 0.05 < resumed]
        assert recovered_at is not None and recovered_at <= RECOVERY_LIMIT_S

        with httpx.Client(timeout=30) as http:
            existing = http.post(f"{url}/images/exists", json={"ids": acknowledged}).json()["existing"]
            assert sorted(existing) == sorted(set(acknowledged))  # everything acknowledged is there
            assert http.get(f"{url}/stats").json()["count"] >= len(set(acknowledged))
        _fsck_is_clean(application)  # while the service (and its database handler) is still open
    return acknowledged


def _fsck_is_clean(application) -> None:
    """fsck: every row has its original. An original without a row (a write cut by the deadline whose commit never
    arrived) is allowed: invisible, and removed by the start-up sweep."""
    from app.indexing.fsck import check as fsck

    service = application.state.service
    report = fsck(service.db, service.store)
    print(f"fsck: {report.rows} rows, {len(report.originals_without_row)} originals without a row")
    assert report.rows_without_original == [] and report.temp_files == []


@pytest.mark.slow
def test_sigstop_of_the_embedded_postgres_under_search_and_index_load(tmp_path, offline_embedder, datasets):
    from app.main import create_app
    from tests.helpers import PostgresFreeze, make_settings

    images = sorted((datasets / "caltech101_subset/images").rglob("*.jpg"))[:40]
    settings = make_settings(tmp_path / "data", None)  # its own embedded server: stopping it freezes no other test
    freeze = PostgresFreeze(settings.data_dir / "pgdata")
    application = create_app(settings, embedder=offline_embedder)
    _hang_under_load(application, images, freeze.suspend, freeze.resume)


@pytest.mark.slow
def test_sigstop_of_a_postgres_server_reached_by_database_url(tmp_path, offline_embedder, datasets):
    """With a ``DATABASE_URL`` the per-id write locks are advisory locks on the same server (what replicas share),
    so an index request also waits on the server in ``app/locks.py``: those calls keep the same bounds."""
    from app.main import create_app
    from app.vectordb.embedded_pg import start_embedded_postgres
    from tests.helpers import PostgresFreeze, make_settings

    images = sorted((datasets / "caltech101_subset/images").rglob("*.jpg"))[:40]
    server = start_embedded_postgres(tmp_path / "pg")
    freeze = PostgresFreeze(tmp_path / "pg")
    try:
        application = create_app(make_settings(tmp_path / "data", server.url), embedder=offline_embedder)
        _hang_under_load(application, images, freeze.suspend, freeze.resume)

        # The lock call itself, deterministically: on a pooled connection to a server that stops, it is cut at
        # call_s + 0.5 s (a 503), where pg_advisory_lock alone would wait for the server to come back.
        from app.errors import DatabaseUnavailableError
        from app.locks import PgAdvisoryLocks

        image_id = "ab" * 32
        locks = PgAdvisoryLocks(server.url, wait_s=5, call_s=0.5)
        try:
            with locks.hold([image_id]):  # a pooled connection exists now
                pass
            freeze.suspend()
            try:
                start = time.monotonic()
                with pytest.raises(DatabaseUnavailableError), locks.hold([image_id]):
                    pass
                assert time.monotonic() - start < 2.0
            finally:
                freeze.resume()
            with locks.hold([image_id]):  # and the locks work again once it is back
                pass
        finally:
            locks.close()
    finally:
        freeze.resume()
        server.stop()


@pytest.mark.slow
def test_sigstop_of_a_milvus_lite_server_under_search_and_index_load(tmp_path, offline_embedder, datasets):
    """Milvus Lite 3 runs inside the service's process (threads), so a stoppable Milvus is Lite's own gRPC server in
    a process of its own (``milvus-lite server``), reached over loopback as a Milvus server is."""
    from app.main import create_app
    from tests.helpers import make_settings, milvus_lite_server

    images = sorted((datasets / "caltech101_subset/images").rglob("*.jpg"))[:40]
    with milvus_lite_server(tmp_path / "milvus.db") as (uri, server):
        settings = make_settings(tmp_path / "data", "", vector_db="milvus", milvus_uri=uri)
        application = create_app(settings, embedder=offline_embedder)
        acknowledged = _hang_under_load(application, images, server.suspend, server.resume)

        # The handler itself: a call cut by the deadline is a DatabaseTimeoutError (what write.py keeps the
        # originals for), within the deadline, and the handler works again once the server resumes.
        from app.errors import DatabaseTimeoutError
        from app.vectordb.milvus import MilvusHandler

        handler = MilvusHandler(uri, timeout_s=10, request_timeout_s=0.3)
        try:
            record = handler.get(acknowledged[0])
            assert record is not None
            server.suspend()
            try:
                for call in (lambda: handler.upsert([record]), lambda: handler.search(record.vector, 3)):
                    start = time.monotonic()
                    with pytest.raises(DatabaseTimeoutError):
                        call()
                    assert 0.25 < time.monotonic() - start < 1.0
                assert handler.health() is False
            finally:
                server.resume()
            assert handler.health() is True and handler.get(record.id) is not None
        finally:
            handler.close()
