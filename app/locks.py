"""Per-id write locks that hold across threads and processes: ``fcntl.flock`` on one lock file per id shard.

Index, delete and re-index of one image id must not interleave (a DELETE between an index's "save the original"
and "write the row" left a row whose original was gone), whoever runs them: the API's worker threads,
``bulk_index.py --direct`` next to a running server, ``fsck.py --repair``. :class:`IdLocks` live with the image
store (under ``IMAGE_DIR/.locks``, or ``DATA_DIR/.locks`` with object storage), so they work the same with every
vector database backend, on one machine. :class:`PgAdvisoryLocks` are PostgreSQL advisory locks, shared by every
machine using the same database: :func:`app.storage.from_settings` uses them whenever a ``DATABASE_URL`` is set,
with every ``VECTOR_DB`` (Milvus and Manticore have no locks of their own, so a PostgreSQL beside them provides the
exclusion; without one the ``flock`` files remain, one machine).

``flock`` locks belong to an open file description, so two ``open()`` calls in one process exclude each other just
as two processes do, and the kernel drops a lock when its holder dies (``kill -9`` included): nothing goes stale.
Ids are sharded by their first two hex characters (256 lock files); ids in one shard share a lock, which only
serialises writes that are already rare to collide. Several ids are locked in shard order, so two batches can never
deadlock.

Where it sits: below the image stores, which own their writers' locks (:attr:`app.storage.base.ImageStore.locks`),
and above only what it uses: the client deadline of database calls (:mod:`app.vectordb.deadline`), the errors and
the ids. Whoever writes (the indexing code, the service) takes the locks through its store (``store.locks.hold``),
so nothing here knows about indexing.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from app.config import DB_DEADLINE_GRACE_S
from app.ids import is_valid_image_id

__all__ = ["LOCK_DIR_NAME", "SWEEP_NAMESPACE", "IdLocks", "PgAdvisoryLocks", "pg_try_lease"]

#: directory under the store root that holds the shard lock files; the store never names an original like this
LOCK_DIR_NAME = ".locks"
#: advisory-lock namespace (first key) of the periodic orphan sweep's lease (app/indexing/fsck.py)
SWEEP_NAMESPACE = 0x5357_4550 - 2**31


@contextmanager
def pg_try_lease(database_url: str, name: str, *, connect_timeout_s: float = 5.0) -> Iterator[bool]:
    """A lease for the ``with`` block: a session-level advisory lock (:data:`SWEEP_NAMESPACE`, a key from ``name``)
    on a connection of its own, taken only if no process holds it (never waits). Yields ``True`` when this process
    holds it, ``False`` when another does. Closing the connection drops the lock, so a holder killed with
    ``kill -9`` gives it up. Raises ``psycopg.OperationalError`` when the database cannot be reached."""
    import zlib

    import psycopg

    key = zlib.crc32(name.encode()) - 2**31
    with psycopg.connect(database_url, autocommit=True, connect_timeout=max(1, int(connect_timeout_s))) as conn:
        held = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (SWEEP_NAMESPACE, key)).fetchone()[0]
        yield bool(held)


class IdLocks:
    """Exclusive locks on image ids, shared by every thread and process that uses the same ``root``.

    Args:
        root: the image store's root (``IMAGE_DIR``); lock files go to ``root/.locks/<2 hex>.lock``.
    """

    def __init__(self, root: Path) -> None:
        self.directory = Path(root) / LOCK_DIR_NAME
        self.directory.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def shard(image_id: str) -> str:
        """The shard of an id: its first two hex characters. Raises ``ValueError`` for an invalid id."""
        if not is_valid_image_id(image_id):
            raise ValueError("image id must be 64 lower-case hex characters")
        return image_id[:2]

    @contextmanager
    def hold(self, image_ids: Iterable[str]) -> Iterator[None]:
        """Hold the locks of every id in ``image_ids`` (blocking) until the block exits.

        Shards are taken in sorted order, so callers never deadlock. Not re-entrant: a thread that holds an id's
        shard and asks for it again waits forever. Raises ``ValueError`` for an invalid id and ``OSError`` when
        a lock file cannot be created.
        """
        shards = sorted({self.shard(i) for i in image_ids})
        with ExitStack() as stack:
            for shard in shards:
                fd = os.open(self.directory / f"{shard}.lock", os.O_RDWR | os.O_CREAT, 0o644)
                stack.callback(os.close, fd)  # closing the descriptor releases its flock
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield


class PgAdvisoryLocks:
    """Exclusive locks on image ids shared by every thread, process and machine that uses the same PostgreSQL
    database: session-level advisory locks (``pg_advisory_lock(namespace, key)``), one per id.

    What replicas on several machines sharing one database (``DATABASE_URL``) and one bucket need instead of
    :class:`IdLocks`, whose ``flock`` files exclude the writers of one machine only. Each :meth:`hold` takes a
    connection of its own from a small pool, so two holders in one process exclude each other as two machines do;
    PostgreSQL drops the locks of a connection that closes, so a holder killed with ``kill -9`` (or a machine that
    disappears, once its TCP connection times out) never leaves one behind. Keys are the first 32 bits of the id, so
    unrelated ids almost never share one; several are taken in key order, so holders never deadlock.

    A server that *hangs* (a stopped process, a network dropping packets) must not hold a writer forever, while a
    lock another writer holds may rightly take a while: each lock call waits at most ``call_s`` on the server
    (``lock_timeout``; then it is asked again, so the wait for a held lock stays unbounded) and is cut by the client
    ``call_s`` + 0.5 s later (:mod:`app.vectordb.deadline`), which raises
    :class:`app.errors.DatabaseUnavailableError` (HTTP 503) within about 2 s of a hang.

    Args:
        database_url: the PostgreSQL URL (``DATABASE_URL``). max_holders: holds at once in this process (pool size).
        wait_s: longest wait for a pooled connection (seconds), after which
            :class:`app.errors.DatabaseUnavailableError` is raised.
        call_s: seconds one lock call may wait on the server (``DB_STATEMENT_TIMEOUT_S``); ``None`` or 0: no
            deadline (a hung server then blocks the writer).
    """

    #: advisory-lock namespace (first key) of this service's id locks
    NAMESPACE = 0x1D5E_A7C4 - 2**31

    def __init__(
        self, database_url: str, *, max_holders: int = 32, wait_s: float = 10.0, call_s: float | None = None
    ) -> None:
        from psycopg_pool import ConnectionPool

        from app.vectordb.deadline import Deadlines

        self.wait_s = wait_s
        self.call_s = call_s or None
        self._url = database_url
        self._probe_lock = threading.Lock()
        self._probe_conn = None
        self._deadlines = Deadlines("lock-db-deadlines")  # its thread starts with the first bounded call
        lock_timeout_ms = int(self.call_s * 1000) if self.call_s else 0

        def configure(conn) -> None:  # noqa: ANN001 - psycopg.Connection; runs once per new pooled connection
            conn.execute(f"SET lock_timeout = {lock_timeout_ms}")

        self._pool = ConnectionPool(
            database_url,
            min_size=0,
            max_size=max_holders,
            kwargs={"autocommit": True},
            configure=configure,
            open=False,
            name="id-locks",
        )
        self._pool.open(wait=False)

    def _bounded(self, conn):  # noqa: ANN001, ANN202 - psycopg.Connection; a context manager
        """The client deadline of one call on ``conn``: its socket is shut down ``call_s`` + 0.5 s after the start."""
        from app.vectordb.deadline import shutdown_socket

        seconds = self.call_s + DB_DEADLINE_GRACE_S if self.call_s else None
        return self._deadlines.bound(lambda: shutdown_socket(conn.pgconn.socket), seconds)

    def _lock(self, conn, key: int) -> None:  # noqa: ANN001 - psycopg.Connection
        """``pg_advisory_lock`` of ``key`` on ``conn``, asked again after each ``lock_timeout`` (a live server whose
        lock another writer holds); a hung server's call is cut by :meth:`_bounded` (``psycopg.OperationalError``)."""
        import psycopg

        while True:
            try:
                with self._bounded(conn):
                    conn.execute("SELECT pg_advisory_lock(%s, %s)", (self.NAMESPACE, key))
                return
            except psycopg.errors.LockNotAvailable:
                continue

    @staticmethod
    def key(image_id: str) -> int:
        """The signed 32-bit lock key of an id (its first 8 hex characters). Raises ``ValueError`` for an invalid
        id."""
        IdLocks.shard(image_id)
        return int(image_id[:8], 16) - 2**31

    @contextmanager
    def hold(self, image_ids: Iterable[str]) -> Iterator[None]:
        """Hold the locks of every id in ``image_ids`` (blocking) until the block exits; not re-entrant.

        Raises ``ValueError`` for an invalid id and :class:`app.errors.DatabaseUnavailableError` when the database
        cannot be reached.
        """
        import psycopg
        from psycopg_pool import PoolTimeout

        from app.errors import DatabaseUnavailableError

        keys = sorted({self.key(i) for i in image_ids})
        held = False
        try:
            with self._pool.connection(timeout=self.wait_s) as conn:
                try:
                    for key in keys:
                        self._lock(conn, key)
                    held = True
                    yield
                finally:
                    try:
                        with self._bounded(conn):
                            conn.execute("SELECT pg_advisory_unlock_all()")
                    except psycopg.Error:
                        pass  # a broken connection is closed by the pool, which drops its locks
        except (PoolTimeout, psycopg.OperationalError) as exc:
            if held:
                raise  # the caller's own database error, not the locks'
            raise DatabaseUnavailableError(
                f"The write locks in PostgreSQL cannot be taken: {type(exc).__name__}"
            ) from None

    def health(self) -> bool:
        """Whether the database answers ``SELECT 1`` within 1 s, on a connection of its own (not the pool's: holders
        may occupy it all). Reconnects (libpq ``connect_timeout`` 2 s) after a failure; a server that hangs has the
        probe's socket shut down at the deadline (app/vectordb/deadline.py). Never raises.

        What ``GET /health`` reports as ``shared_state`` when the vectors live elsewhere (Milvus, Manticore): then
        no other probe watches this database (:class:`app.vectordb.guard.GuardedHandler` calls this)."""
        import psycopg

        from app.vectordb.deadline import shutdown_socket

        with self._probe_lock:
            conn = self._probe_conn
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = self._probe_conn = psycopg.connect(self._url, autocommit=True, connect_timeout=2)
                with self._deadlines.bound(lambda: shutdown_socket(conn.pgconn.socket), 1.0):
                    conn.execute("SELECT 1").fetchone()
                return True
            except Exception:  # noqa: BLE001 - health must report, never raise
                self._probe_conn = None
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is gone either way
                        pass
                return False

    def close(self) -> None:
        """Close the pool (dropping any lock still held) and the health probe's connection."""
        self._pool.close()
        with self._probe_lock:
            if self._probe_conn is not None:
                self._probe_conn.close()
                self._probe_conn = None
        self._deadlines.close()
