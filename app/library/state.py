"""Where libraries, their files and their hidden (offline) vectors live: PostgreSQL tables every replica shares when
``DATABASE_URL`` is set (``Settings.shared_state_url``, with every ``VECTOR_DB``), else one SQLite file,
``DATA_DIR/libraries.sqlite3`` (one machine), like the neighbour graph (:mod:`app.neighbours.store`).

One class, :class:`LibraryState`, over both: the SQL is written once (``?`` parameters; PostgreSQL gets ``%s``)
and only the types, the connection handling and the lease differ. Tables:

- ``libraries``: one row per library: its roots and exclusion globs (JSON), where it came from, and the state of
  its scan (``idle``/``scanning``/``failed``, phase, progress, times, the last result, error and warning);
- ``library_files``: one row per file seen: ``(library, path)`` with ``path`` the raw bytes of the library path,
  its image id (32 bytes; ``NULL`` with ``error`` for a file that cannot be indexed, so an unchanged one is not
  read again), ``size`` and ``mtime_ns`` from its ``stat``, and ``offline_since`` (epoch seconds) once it went
  missing; indexed by image id, for reads and for "who else holds these bytes";
- ``library_hidden``: per collection, the vector and metadata of each image whose every library file is offline:
  the row leaves the vector database (so no backend needs a "hidden" flag) and comes back from here, with no model
  call, when a file returns.

Leases (one scanner per library across processes): a session-level advisory lock on a connection of its own in
PostgreSQL, an ``flock`` on ``DATA_DIR/libraries/<name>.lock`` otherwise; both are lost with their process, so a
scan cut short by ``kill -9`` is seen as interrupted at once.

Errors: a database that cannot be reached raises :class:`app.errors.DatabaseUnavailableError` (HTTP 503). A server
that hangs (a stopped process, a network dropping packets) answers nothing and closes nothing, so every transaction
on PostgreSQL has a client deadline (:mod:`app.vectordb.deadline`): ``DB_STATEMENT_TIMEOUT_S`` + 0.5 s for what a
request reads or writes (then 503, as for the vectors), :data:`BULK_CALL_S` for the bulk statements of scans and
deletes (a scan then waits and retries).
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from app.config import Settings
from app.errors import DatabaseUnavailableError
from app.library.model import Library

__all__ = ["FileRow", "LibraryRow", "LibraryState", "PathRow"]

FILENAME = "libraries.sqlite3"
_CHUNK = 500  # ids or paths per IN (...): under SQLite's historical limit of 999 bound parameters
#: advisory-lock namespace (first key) of the scan leases; the id locks and the neighbour graph use others
NAMESPACE = 0x6C69_6272 - 2**31
#: client deadline, seconds, of a transaction whose size grows with the library (every file of it, a batch of
#: records, a deleted library): long on a live server, yet bounded on a hung one
BULK_CALL_S = 120.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {s}libraries (
    name TEXT PRIMARY KEY,
    roots TEXT NOT NULL,
    excludes TEXT NOT NULL,
    source TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    state TEXT NOT NULL DEFAULT 'idle',
    phase TEXT NOT NULL DEFAULT '',
    done BIGINT NOT NULL DEFAULT 0,
    total BIGINT NOT NULL DEFAULT 0,
    scan_started_at DOUBLE PRECISION,
    scan_finished_at DOUBLE PRECISION,
    last_result TEXT,
    error TEXT,
    warning TEXT
);
CREATE TABLE IF NOT EXISTS {s}library_files (
    library TEXT NOT NULL,
    path {blob} NOT NULL,
    image_id {blob},
    size BIGINT NOT NULL,
    mtime_ns BIGINT NOT NULL,
    offline_since DOUBLE PRECISION,
    error TEXT,
    PRIMARY KEY (library, path)
);
CREATE INDEX IF NOT EXISTS library_files_by_id ON {s}library_files (image_id);
CREATE TABLE IF NOT EXISTS {s}library_hidden (
    collection TEXT NOT NULL,
    image_id {blob} NOT NULL,
    vector {blob} NOT NULL,
    metadata TEXT NOT NULL,
    hidden_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (collection, image_id)
);
"""

_LIBRARY_COLUMNS = (
    "name, roots, excludes, source, created_at, state, phase, done, total, scan_started_at, scan_finished_at, "
    "last_result, error, warning"
)
_UPDATABLE = frozenset(
    "state phase done total scan_started_at scan_finished_at last_result error warning roots excludes".split()
)


@dataclass(frozen=True, slots=True)
class LibraryRow:
    """A library and the state of its scan as stored.

    Attributes:
        library: its definition. created_at, scan_started_at, scan_finished_at: epoch seconds (UTC).
        state: ``idle``, ``scanning`` (shown ``interrupted`` when no process holds its lease) or ``failed``.
        phase: ``walk``, ``hash``, ``index``, ``offline``, ``purge`` while scanning. done, total: progress of it.
        last_result: the counts of the last completed scan (a dict), ``None`` before one.
        error: why the last scan failed. warning: why the last scan marked nothing offline (mount safety).
    """

    library: Library
    created_at: float
    state: str
    phase: str
    done: int
    total: int
    scan_started_at: float | None
    scan_finished_at: float | None
    last_result: dict | None
    error: str | None
    warning: str | None

    @property
    def name(self) -> str:
        """The library's name."""
        return self.library.name


@dataclass(frozen=True, slots=True)
class FileRow:
    """One known file: ``image_id`` (64 hex, ``None`` when it cannot be indexed: ``error`` says why), ``size``
    (bytes) and ``mtime_ns`` when last read, ``offline_since`` (epoch seconds) once it went missing."""

    image_id: str | None
    size: int
    mtime_ns: int
    offline_since: float | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class PathRow:
    """Where an image id lives: a library, a library path, and that file's recorded size, mtime and offline time."""

    library: str
    path: bytes
    size: int
    mtime_ns: int
    offline_since: float | None


def _hex(value: bytes | memoryview | None) -> str | None:
    return None if value is None else bytes(value).hex()


def _chunks(items: Sequence, size: int = _CHUNK) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _FileLease:
    """A scan lease held as an ``flock`` on a file of its own until :meth:`close`."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def close(self) -> None:
        """Give the lease up. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock


class _PgLease:
    """A scan lease held as an advisory lock by a connection of its own until :meth:`close`."""

    def __init__(self, conn, key: int) -> None:  # noqa: ANN001 - psycopg.Connection
        self._conn, self._key = conn, key

    def close(self) -> None:
        """Give the lease up: unlocked first, so that a scan asked for right after finds it free (a closed
        connection's lock lingers until its server process has exited); closing the connection drops it anyway.
        Waits at most about a second. Idempotent."""
        conn, self._conn = self._conn, None
        if conn is None:
            return

        closing = threading.Lock()  # the close and the shutdown below exclude each other

        def unlock_and_close() -> None:
            # The connection is used and closed by this thread alone: closing it from another thread while a call
            # still waits on its socket would free the descriptor for reuse under that call.
            try:
                conn.execute("SELECT pg_advisory_unlock(%s, %s)", (NAMESPACE, self._key))
            except Exception:  # noqa: BLE001 - the database is gone: closing the connection is all there is
                pass
            finally:
                with closing:
                    conn.close()

        # On a thread, at most a second: a hung database must not keep a scan's thread from ending. A thread
        # still waiting then is cut loose by shutting the socket down (the descriptor stays its own).
        thread = threading.Thread(target=unlock_and_close, name="library-lease-unlock", daemon=True)
        thread.start()
        thread.join(1.0)
        if thread.is_alive():
            from app.vectordb.deadline import shutdown_socket

            with closing:
                if not conn.closed:
                    shutdown_socket(conn.pgconn.socket)


class LibraryState:
    """The libraries' tables in PostgreSQL or SQLite (see the module docstring). Thread-safe; :meth:`close` it.

    Build it with :meth:`open`. Every method raises :class:`app.errors.DatabaseUnavailableError` when PostgreSQL
    cannot be reached within ``wait_s``.
    """

    def __init__(
        self, *, database_url: str | None, data_dir: Path, wait_s: float = 10.0, call_s: float | None = None
    ) -> None:
        self.database_url, self.data_dir, self.wait_s = database_url, data_dir, wait_s
        self.call_s = call_s or None  # a request's transaction on PostgreSQL; None: no deadline
        self.shared = database_url is not None
        self._lock = threading.Lock()
        self._sqlite: sqlite3.Connection | None = None
        self._pool = None
        self._deadlines = None
        if self.shared:
            from psycopg_pool import ConnectionPool

            from app.vectordb.deadline import Deadlines

            self._deadlines = Deadlines("library-db-deadlines")  # its thread starts with the first bounded call
            # One connection kept open (and replaced in the background when it breaks), so that a request rarely
            # waits for a new one: see Settings.shared_state_wait_s.
            self._pool = ConnectionPool(
                database_url, min_size=1, max_size=8, kwargs={"autocommit": True}, open=False, name="libraries"
            )
            self._pool.open(wait=False)
            schema = _SCHEMA.format(s="public.", blob="BYTEA")
            try:
                with self._tx(bulk=True) as conn:  # another replica may be creating them: wait for it
                    conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (NAMESPACE, -(2**31)))
                    conn.execute(schema)
            except BaseException:
                self._pool.close()
                self._deadlines.close()
                raise
        else:
            data_dir.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(data_dir / FILENAME, check_same_thread=False, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA.format(s="", blob="BLOB"))
            self._sqlite = conn

    @classmethod
    def open(cls, settings: Settings) -> LibraryState:
        """The state for these settings: PostgreSQL at ``shared_state_url`` if set, else ``DATA_DIR``'s file."""
        return cls(
            database_url=settings.shared_state_url,
            data_dir=settings.data_dir.resolve(),
            wait_s=settings.shared_state_wait_s,
            call_s=settings.db_call_deadline_s,
        )

    @staticmethod
    def exists(settings: Settings) -> bool:
        """Whether a state may hold libraries: always with PostgreSQL, else when the SQLite file exists (so a
        service or a tool that never saw a library creates nothing)."""
        return bool(settings.shared_state_url) or (settings.data_dir.resolve() / FILENAME).exists()

    def close(self) -> None:
        """Close the connections. Idempotent."""
        if self._pool is not None:
            self._pool.close()
        if self._deadlines is not None:
            self._deadlines.close()
        if self._sqlite is not None:
            with self._lock:
                self._sqlite.close()
                self._sqlite = None

    # --- connections ------------------------------------------------------------------------------------------
    def _bounded(self, conn, bulk: bool = False):  # noqa: ANN001, ANN202 - psycopg.Connection; a context manager
        """The client deadline of a call on ``conn``: its socket is shut down (the call then raises
        ``psycopg.OperationalError``) :attr:`call_s` (``bulk``: :data:`BULK_CALL_S`) after the start."""
        from app.vectordb.deadline import shutdown_socket

        seconds = (BULK_CALL_S if bulk else self.call_s) if self.call_s else None
        return self._deadlines.bound(lambda: shutdown_socket(conn.pgconn.socket), seconds)

    @contextmanager
    def _tx(self, bulk: bool = False) -> Iterator:
        """A connection inside one transaction: psycopg for PostgreSQL (``%s`` parameters; bounded by
        :meth:`_bounded`), else the SQLite connection under the lock (``?`` parameters; :meth:`_sql` converts)."""
        if self._pool is not None:
            import psycopg
            from psycopg_pool import PoolTimeout

            try:
                with (
                    self._pool.connection(timeout=self.wait_s) as conn,
                    self._bounded(conn, bulk),
                    conn.transaction(),
                ):
                    yield conn
            except (PoolTimeout, psycopg.OperationalError) as exc:
                raise DatabaseUnavailableError(
                    f"The libraries' tables cannot be reached: {type(exc).__name__}"
                ) from None
            return
        with self._lock:
            conn = self._sqlite
            if conn is None:
                raise RuntimeError("the library state is closed")
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _sql(self, query: str) -> str:
        return query.replace("?", "%s") if self.shared else query

    def _read(self, query: str, params: Sequence = (), bulk: bool = False) -> list[tuple]:
        with self._tx(bulk) as conn:
            return list(conn.execute(self._sql(query), tuple(params)).fetchall())

    def _write(self, query: str, params: Sequence = ()) -> int:
        with self._tx() as conn:
            return conn.execute(self._sql(query), tuple(params)).rowcount

    def _write_many(self, query: str, rows: Sequence[Sequence]) -> None:
        if not rows:
            return
        with self._tx(bulk=True) as conn:
            if self.shared:
                with conn.cursor() as cur:
                    cur.executemany(self._sql(query), [tuple(r) for r in rows])
            else:
                conn.executemany(query, [tuple(r) for r in rows])

    # --- leases -----------------------------------------------------------------------------------------------
    def _lease_key(self, name: str) -> int:
        return zlib.crc32(name.encode()) - 2**31

    def acquire_lease(self, name: str) -> _FileLease | _PgLease | None:
        """The scan lease of library ``name`` if no process holds it (never waits), else ``None``."""
        if self.shared:
            import psycopg

            try:
                conn = psycopg.connect(self.database_url, autocommit=True, connect_timeout=max(1, int(self.wait_s)))
            except psycopg.OperationalError as exc:
                raise DatabaseUnavailableError(
                    f"A library's scan lease cannot be taken: {type(exc).__name__}"
                ) from None
            try:
                with self._bounded(conn):
                    key = (NAMESPACE, self._lease_key(name))
                    taken = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", key).fetchone()[0]
            except psycopg.OperationalError as exc:
                conn.close()
                raise DatabaseUnavailableError(
                    f"A library's scan lease cannot be taken: {type(exc).__name__}"
                ) from None
            if taken:
                return _PgLease(conn, self._lease_key(name))
            conn.close()
            return None
        folder = self.data_dir / "libraries"
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return _FileLease(fd)

    def lease_held(self, name: str) -> bool:
        """Whether some process (this one included) holds library ``name``'s scan lease."""
        if self.shared:
            rows = self._read(
                "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid::bigint = ? "
                "AND objid::bigint = ? AND objsubid = 2 AND database = (SELECT oid FROM pg_database "
                "WHERE datname = current_database())",
                (NAMESPACE & 0xFFFFFFFF, self._lease_key(name) & 0xFFFFFFFF),
            )
            return bool(rows)
        lease = self.acquire_lease(name)
        if lease is None:
            return True
        lease.close()
        return False

    # --- libraries --------------------------------------------------------------------------------------------
    def _row(self, r: tuple) -> LibraryRow:
        library = Library(r[0], tuple(json.loads(r[1])), tuple(json.loads(r[2])), r[3])
        return LibraryRow(
            library, r[4], r[5], r[6], r[7], r[8], r[9], r[10], json.loads(r[11]) if r[11] else None, r[12], r[13]
        )

    def create_library(self, library: Library) -> bool:
        """Store a new library; ``False`` (nothing changed) when one of that name exists."""
        return bool(
            self._write(
                "INSERT INTO libraries (name, roots, excludes, source, created_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (name) DO NOTHING",
                (library.name, json.dumps(library.roots), json.dumps(library.excludes), library.source, time.time()),
            )
        )

    def library(self, name: str) -> LibraryRow | None:
        """The library called ``name``, or ``None``."""
        rows = self._read(f"SELECT {_LIBRARY_COLUMNS} FROM libraries WHERE name = ?", (name,))
        return self._row(rows[0]) if rows else None

    def libraries(self) -> list[LibraryRow]:
        """Every library, by name."""
        return [self._row(r) for r in self._read(f"SELECT {_LIBRARY_COLUMNS} FROM libraries ORDER BY name")]

    def update_library(self, name: str, **fields: object) -> None:
        """Set scan-state fields (see :class:`LibraryRow`); ``last_result`` (a dict), ``roots`` and ``excludes``
        (sequences) are stored as JSON. Raises ``ValueError`` for another field."""
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)}")
        values = [
            json.dumps(v if k == "last_result" else list(v))
            if k in ("last_result", "roots", "excludes") and v is not None
            else v
            for k, v in fields.items()
        ]
        assignments = ", ".join(f"{k} = ?" for k in fields)
        self._write(f"UPDATE libraries SET {assignments} WHERE name = ?", (*values, name))

    def delete_library(self, name: str) -> list[str]:
        """Delete the library and its file rows in one transaction; returns the image ids its files had (the
        caller reconciles them: :func:`app.library.visibility.reconcile`)."""
        with self._tx(bulk=True) as conn:
            ids = conn.execute(
                self._sql("SELECT DISTINCT image_id FROM library_files WHERE library = ? AND image_id IS NOT NULL"),
                (name,),
            ).fetchall()
            conn.execute(self._sql("DELETE FROM library_files WHERE library = ?"), (name,))
            conn.execute(self._sql("DELETE FROM libraries WHERE name = ?"), (name,))
        return [_hex(r[0]) for r in ids]

    # --- files ------------------------------------------------------------------------------------------------
    def files(self, name: str) -> dict[bytes, FileRow]:
        """Every known file of library ``name`` by library path, in one query (a rescan compares with this)."""
        rows = self._read(
            "SELECT path, image_id, size, mtime_ns, offline_since, error FROM library_files WHERE library = ?",
            (name,),
            bulk=True,
        )
        return {bytes(r[0]): FileRow(_hex(r[1]), r[2], r[3], r[4], r[5]) for r in rows}

    def put_files(self, name: str, rows: Iterable[tuple[bytes, str | None, int, int, str | None]]) -> None:
        """Record files as online: ``(path, image_id or None, size, mtime_ns, error or None)`` each; replaces what
        was known of those paths (an offline file that is back is online again)."""
        self._write_many(
            "INSERT INTO library_files (library, path, image_id, size, mtime_ns, offline_since, error) "
            "VALUES (?, ?, ?, ?, ?, NULL, ?) ON CONFLICT (library, path) DO UPDATE SET image_id = excluded.image_id, "
            "size = excluded.size, mtime_ns = excluded.mtime_ns, offline_since = NULL, error = excluded.error",
            [
                (name, path, None if image_id is None else bytes.fromhex(image_id), size, mtime, error)
                for path, image_id, size, mtime, error in rows
            ],
        )

    def set_offline(self, name: str, paths: Sequence[bytes], since: float) -> None:
        """Mark these files offline since ``since`` (epoch seconds); a file already offline keeps its time."""
        self._write_many(
            "UPDATE library_files SET offline_since = ? WHERE library = ? AND path = ? AND offline_since IS NULL",
            [(since, name, p) for p in paths],
        )

    def delete_files(self, name: str, paths: Sequence[bytes]) -> None:
        """Forget these files of library ``name``."""
        self._write_many("DELETE FROM library_files WHERE library = ? AND path = ?", [(name, p) for p in paths])

    def paths_of(self, image_ids: Iterable[str]) -> dict[str, list[PathRow]]:
        """Every file of every library holding each of ``image_ids`` (online first, then by library and path);
        ids no library holds are left out."""
        ids = sorted(set(image_ids))
        found: dict[str, list[PathRow]] = {}
        for chunk in _chunks(ids):
            marks = ", ".join("?" * len(chunk))
            for r in self._read(
                "SELECT image_id, library, path, size, mtime_ns, offline_since FROM library_files "
                f"WHERE image_id IN ({marks})",
                [bytes.fromhex(i) for i in chunk],
            ):
                found.setdefault(_hex(r[0]), []).append(PathRow(r[1], bytes(r[2]), r[3], r[4], r[5]))
        for rows in found.values():
            rows.sort(key=lambda p: (p.offline_since is not None, p.library, p.path))
        return found

    def expired(self, name: str, before: float) -> list[tuple[bytes, str | None]]:
        """``(path, image_id)`` of library ``name``'s files offline since before ``before`` (epoch seconds)."""
        rows = self._read(
            "SELECT path, image_id FROM library_files WHERE library = ? AND offline_since IS NOT NULL "
            "AND offline_since < ?",
            (name, before),
            bulk=True,
        )
        return [(bytes(r[0]), _hex(r[1])) for r in rows]

    def counts(self, name: str) -> dict[str, int]:
        """``files`` known, ``online``, ``offline``, ``failed`` (cannot be indexed) and distinct ``images``."""
        r = self._read(
            "SELECT count(*), count(*) FILTER (WHERE offline_since IS NULL AND image_id IS NOT NULL), "
            "count(*) FILTER (WHERE offline_since IS NOT NULL), count(*) FILTER (WHERE image_id IS NULL), "
            "count(DISTINCT image_id) FROM library_files WHERE library = ?",
            (name,),
        )[0]
        return {"files": r[0], "online": r[1], "offline": r[2], "failed": r[3], "images": r[4]}

    def held_ids(self) -> set[str]:
        """Every image id some library file holds, online or offline (``fsck.py`` leaves their rows to the scans)."""
        return {
            _hex(r[0])
            for r in self._read("SELECT DISTINCT image_id FROM library_files WHERE image_id IS NOT NULL", bulk=True)
        }

    # --- hidden vectors ---------------------------------------------------------------------------------------
    def hide(self, collection: str, items: Sequence[tuple[str, bytes, str]]) -> None:
        """Keep ``(image_id, vector as float32 bytes, metadata JSON)`` of images taken out of the vector database."""
        now = time.time()
        self._write_many(
            "INSERT INTO library_hidden (collection, image_id, vector, metadata, hidden_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (collection, image_id) DO UPDATE SET vector = excluded.vector, metadata = excluded.metadata",
            [(collection, bytes.fromhex(i), v, m, now) for i, v, m in items],
        )

    def hidden(self, collection: str, image_ids: Iterable[str]) -> dict[str, tuple[bytes, str]]:
        """``image_id -> (vector bytes, metadata JSON)`` of those of ``image_ids`` that are hidden."""
        ids = sorted(set(image_ids))
        found: dict[str, tuple[bytes, str]] = {}
        for chunk in _chunks(ids):
            marks = ", ".join("?" * len(chunk))
            for r in self._read(
                f"SELECT image_id, vector, metadata FROM library_hidden WHERE collection = ? AND image_id IN ({marks})",
                [collection, *(bytes.fromhex(i) for i in chunk)],
            ):
                found[_hex(r[0])] = (bytes(r[1]), r[2])
        return found

    def unhide(self, collection: str, image_ids: Sequence[str]) -> None:
        """Forget the hidden vectors of these ids (they are back in the vector database, or gone for good)."""
        self._write_many(
            "DELETE FROM library_hidden WHERE collection = ? AND image_id = ?",
            [(collection, bytes.fromhex(i)) for i in image_ids],
        )

    def count_hidden(self, collection: str) -> int:
        """Images of ``collection`` hidden because every file of theirs is offline."""
        return self._read("SELECT count(*) FROM library_hidden WHERE collection = ?", (collection,))[0][0]
