"""Write locks that hold across machines with pgvector (issue #21): PostgreSQL advisory locks on a real (embedded)
PostgreSQL. Two lock objects with pools of their own stand for two machines; a holder killed with kill -9 leaves
no lock behind; the service picks them with VECTOR_DB=pgvector and a DATABASE_URL."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from app.errors import DatabaseUnavailableError
from app.locks import IdLocks, PgAdvisoryLocks
from app.storage import from_settings
from tests.helpers import PROJECT_ROOT, free_port, make_settings

A = "a" * 64
A2 = "a" * 8 + "b" * 56  # same first 32 bits: the same lock
B = "b" * 64


def _blocked(locks: PgAdvisoryLocks, ids: list[str], wait_s: float = 0.5) -> tuple[bool, threading.Event]:
    """Whether ``hold(ids)`` on another thread is still waiting after ``wait_s``; the event is set once it got them."""
    got = threading.Event()

    def take() -> None:
        with locks.hold(ids):
            got.set()

    threading.Thread(target=take, daemon=True).start()
    return not got.wait(wait_s), got


def test_two_machines_exclude_each_other_per_id(database_url):
    first, second = PgAdvisoryLocks(database_url), PgAdvisoryLocks(database_url)
    try:
        with first.hold([A]):
            blocked, got = _blocked(second, [A2])
            assert blocked
            assert not _blocked(second, [B])[0]  # another id is free
        assert got.wait(5)  # released: the waiter gets it
        with first.hold([B, A]), second.hold([]):  # several ids, and none
            assert _blocked(second, [B])[0]
    finally:
        first.close()
        second.close()


def test_a_holder_killed_with_kill_9_leaves_no_lock(database_url):
    code = (
        "import sys, time\n"
        "from app.locks import PgAdvisoryLocks\n"
        f"locks = PgAdvisoryLocks({database_url!r})\n"
        f"with locks.hold([{A!r}]):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(PROJECT_ROOT), "PATH": "/usr/bin:/bin"},
    )
    locks = PgAdvisoryLocks(database_url)
    try:
        assert holder.stdout.readline().strip() == "held"
        blocked, got = _blocked(locks, [A])
        assert blocked
        holder.kill()
        holder.wait(10)
        assert got.wait(10)  # the server dropped the dead session's lock
    finally:
        holder.kill()
        locks.close()


def test_a_database_that_is_down_is_503_not_a_hang():
    locks = PgAdvisoryLocks(f"postgresql://u:p@127.0.0.1:{free_port()}/none?connect_timeout=1", wait_s=1.0)
    try:
        start = time.monotonic()
        with pytest.raises(DatabaseUnavailableError), locks.hold([A]):
            pass
        assert time.monotonic() - start < 5
    finally:
        locks.close()


def test_the_service_uses_them_whenever_a_database_url_is_set(tmp_path, database_url):
    from app.vectordb.guard import GuardedHandler

    shared = from_settings(make_settings(tmp_path / "a", database_url))
    assert isinstance(shared.locks, PgAdvisoryLocks)
    shared.close()
    # Milvus has no locks: the PostgreSQL beside it provides them, behind a breaker of their own.
    milvus = from_settings(make_settings(tmp_path / "b", database_url, vector_db="milvus"))
    assert isinstance(milvus.locks, GuardedHandler) and isinstance(milvus.locks.db, PgAdvisoryLocks)
    milvus.close()
    alone = from_settings(make_settings(tmp_path / "d", "", vector_db="milvus"))
    assert isinstance(alone.locks, IdLocks)  # no DATABASE_URL: flock files, one machine
    embedded = from_settings(make_settings(tmp_path / "c", ""))
    assert isinstance(embedded.locks, IdLocks)  # the embedded PostgreSQL serves one machine anyway


def test_a_lock_held_longer_than_the_call_deadline_is_still_waited_for(database_url):
    """call_s bounds each call on the server (lock_timeout), not the wait for a lock another writer holds: the
    second writer asks again after each lock_timeout and gets the lock once the first lets go."""
    first = PgAdvisoryLocks(database_url, call_s=0.2)
    second = PgAdvisoryLocks(database_url, call_s=0.2)
    got_at: list[float] = []
    try:
        with first.hold([A]):
            start = time.monotonic()

            def take() -> None:
                with second.hold([A]):
                    got_at.append(time.monotonic() - start)

            t = threading.Thread(target=take)
            t.start()
            time.sleep(1.0)  # five lock_timeouts
            assert got_at == []  # still excluded
        t.join(timeout=10)
        assert got_at and 1.0 <= got_at[0] < 3.0
    finally:
        first.close()
        second.close()


def test_the_sweep_lease_is_held_by_one_process_at_a_time(database_url, tmp_path, caplog):
    """The periodic orphan sweep's lease (app/locks.py pg_try_lease): one holder per store; another store's lease is
    independent; closing the holder's connection frees it; a sweep that does not get it skips its round."""
    import logging

    from app.indexing.fsck import start_sweep
    from app.locks import pg_try_lease
    from app.storage.local import LocalImageStore

    with pg_try_lease(database_url, "s3://a/x") as first:
        assert first is True
        with pg_try_lease(database_url, "s3://a/x") as second, pg_try_lease(database_url, "s3://b/y") as other:
            assert second is False and other is True

        store = LocalImageStore(tmp_path / "images")
        caplog.set_level(logging.DEBUG, logger="app.indexing.fsck")
        stop = threading.Event()
        thread = start_sweep(
            None, store, 1.0, stop, interval_s=0.1, lease=lambda: pg_try_lease(database_url, "s3://a/x")
        )
        time.sleep(0.5)
        stop.set()
        thread.join(timeout=10)
        store.close()
        skipped = [r for r in caplog.records if "another replica holds the lease" in r.getMessage()]
        assert len(skipped) >= 2  # the start-up round and periodic ones, none of which touched db (None)
    with pg_try_lease(database_url, "s3://a/x") as again:
        assert again is True
