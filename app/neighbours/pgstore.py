"""The neighbour graph, DBA vectors and job state in PostgreSQL: what API replicas on several machines sharing one
``DATABASE_URL`` share (issue #21). Same interface and rules as :class:`app.neighbours.store.GraphStore` (the
SQLite file the embedded default and the other backends keep).

Tables in the database's ``public`` schema (no collection can be named ``public``), one set for every collection:
``neighbour_jobs`` (with a ``collection`` column; job ids are unique across collections), ``neighbour_nodes``,
``neighbour_edges`` (indexed by score), ``neighbour_current`` (the served job of each collection). Ids are stored as
their 32 bytes, vectors as float16 bytes, as in the SQLite file.

One builder at a time, across machines: the replica that builds holds a **lease**, a session-level PostgreSQL
advisory lock on a connection of its own (:meth:`PgGraphStore.acquire_lease`). A replica killed with ``kill -9``
(or a machine that disappears, once its TCP connection times out) loses it with its connection, so its job shows
as ``interrupted`` on every replica (:meth:`PgGraphStore.lease_held`) and the next ``POST /jobs/neighbours`` on any
replica resumes it. Starting a job is serialised by a transaction-level advisory lock
(:meth:`PgGraphStore.start_lock`), so two replicas asked at once start one job, and both answer its id.

Errors: a database that cannot be reached raises :class:`app.errors.DatabaseUnavailableError` (HTTP 503).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np

from app.errors import DatabaseUnavailableError
from app.neighbours.store import _JOB_COLUMNS, Edge, JobRecord, _f16, _job, _key, _keys, utc_now

__all__ = ["PgGraphStore", "PgLease"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS public.neighbour_jobs (
    id BIGSERIAL PRIMARY KEY,
    collection TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    phase TEXT NOT NULL,
    k INTEGER NOT NULL,
    dba_n INTEGER,
    dba_alpha DOUBLE PRECISION,
    done BIGINT NOT NULL DEFAULT 0,
    total BIGINT NOT NULL DEFAULT 0,
    created_at TIMESTAMPTZ NOT NULL,
    started_at TIMESTAMPTZ,
    finished_at TIMESTAMPTZ,
    error TEXT
);
CREATE TABLE IF NOT EXISTS public.neighbour_nodes (
    job_id BIGINT NOT NULL,
    id BYTEA NOT NULL,
    filename TEXT NOT NULL,
    vector BYTEA,
    dba BYTEA,
    PRIMARY KEY (job_id, id)
);
CREATE TABLE IF NOT EXISTS public.neighbour_edges (
    job_id BIGINT NOT NULL,
    src BYTEA NOT NULL,
    rank INTEGER NOT NULL,
    dst BYTEA NOT NULL,
    score REAL NOT NULL,
    PRIMARY KEY (job_id, src, rank)
);
CREATE INDEX IF NOT EXISTS neighbour_edges_by_score ON public.neighbour_edges (job_id, score);
CREATE TABLE IF NOT EXISTS public.neighbour_current (collection TEXT PRIMARY KEY, job_id BIGINT NOT NULL);
"""

#: advisory-lock namespace (first key) of the graph's lease and start lock; the id locks use another
NAMESPACE = 0x6E65_6967 - 2**31
_SCHEMA_KEY = -(2**31)  # second key of the lock that serialises the tables' creation


class PgLease:
    """The lease of one graph build: an advisory lock held by a connection of its own until :meth:`close`."""

    def __init__(self, conn) -> None:  # noqa: ANN001 - psycopg.Connection
        self._conn = conn

    def close(self) -> None:
        """Give the lease up (closing the connection drops the lock). Idempotent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class PgGraphStore:
    """The graphs and jobs of ``collection`` in the PostgreSQL at ``database_url``; thread-safe; :meth:`close` it.

    Args:
        database_url: ``DATABASE_URL``. collection: the collection whose graph this is.
        wait_s: longest wait for a connection (seconds); then :class:`app.errors.DatabaseUnavailableError`.

    Creates the tables if missing (one replica at a time). Raises :class:`app.errors.DatabaseUnavailableError`.
    """

    shared = True
    """The graph is shared by every process using the database (the SQLite store's is ``False``)."""

    def __init__(self, database_url: str, collection: str, *, wait_s: float = 10.0) -> None:
        from psycopg_pool import ConnectionPool

        self.database_url, self.collection, self.wait_s = database_url, collection, wait_s
        self.lease_key = zlib.crc32(collection.encode()) - 2**31
        # One connection kept open, so that a request rarely waits for a new one (Settings.shared_state_wait_s).
        self._pool = ConnectionPool(
            database_url, min_size=1, max_size=8, kwargs={"autocommit": True}, open=False, name="neighbours"
        )
        self._pool.open(wait=False)
        try:
            with self._tx() as conn:
                conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (NAMESPACE, _SCHEMA_KEY))
                conn.execute(_SCHEMA)
        except BaseException:
            self._pool.close()
            raise

    def close(self) -> None:
        """Close the pool. Idempotent."""
        self._pool.close()

    @contextmanager
    def _conn(self) -> Iterator:
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            with self._pool.connection(timeout=self.wait_s) as conn:
                yield conn
        except (PoolTimeout, psycopg.OperationalError) as exc:
            what = type(exc).__name__
            raise DatabaseUnavailableError(f"The neighbour graph's tables cannot be reached: {what}") from None

    @contextmanager
    def _tx(self) -> Iterator:
        with self._conn() as conn, conn.transaction():
            yield conn

    def _read(self, query: str, params: Sequence = ()) -> list:
        with self._conn() as conn:
            return conn.execute(query, params).fetchall()

    # --- one builder at a time ----------------------------------------------------------------------------
    @contextmanager
    def start_lock(self) -> Iterator[None]:
        """Hold the collection's start lock (a transaction-level advisory lock, waits) for the block: one replica at
        a time decides which job to start or resume."""
        with self._tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (NAMESPACE + 1, self.lease_key))
            yield

    def acquire_lease(self) -> PgLease | None:
        """The build lease if no process holds it (never waits), else ``None``."""
        import psycopg

        try:
            conn = psycopg.connect(self.database_url, autocommit=True, connect_timeout=max(1, int(self.wait_s)))
        except psycopg.OperationalError as exc:
            what = type(exc).__name__
            raise DatabaseUnavailableError(f"The neighbour graph's lease cannot be taken: {what}") from None
        if conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (NAMESPACE, self.lease_key)).fetchone()[0]:
            return PgLease(conn)
        conn.close()
        return None

    def lease_held(self) -> bool:
        """Whether some process (this one included) holds the build lease: a job shown ``running`` without it was
        cut short (its replica was killed)."""
        rows = self._read(
            "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid::bigint = %s "
            "AND objid::bigint = %s AND objsubid = 2 AND database = (SELECT oid FROM pg_database "
            "WHERE datname = current_database())",
            (NAMESPACE & 0xFFFFFFFF, self.lease_key & 0xFFFFFFFF),
        )
        return bool(rows)

    # --- jobs ---------------------------------------------------------------------------------------------
    def create_job(self, kind: str, k: int, dba_n: int | None, dba_alpha: float | None) -> JobRecord:
        """A new ``queued`` job in phase ``graph``."""
        with self._tx() as conn:
            job_id = conn.execute(
                "INSERT INTO neighbour_jobs (collection, kind, state, phase, k, dba_n, dba_alpha, created_at) "
                "VALUES (%s, %s, 'queued', 'graph', %s, %s, %s, %s) RETURNING id",
                (self.collection, kind, k, dba_n, dba_alpha, utc_now()),
            ).fetchone()[0]
        return self.job(job_id)

    def job(self, job_id: int) -> JobRecord | None:
        """The collection's job with this id, or ``None``."""
        rows = self._read(
            f"SELECT {_JOB_COLUMNS} FROM neighbour_jobs WHERE id = %s AND collection = %s", (job_id, self.collection)
        )
        return _job(rows[0]) if rows else None

    def unfinished_job(self, kind: str) -> JobRecord | None:
        """The latest job of ``kind`` not ``completed``, or ``None``."""
        rows = self._read(
            f"SELECT {_JOB_COLUMNS} FROM neighbour_jobs WHERE collection = %s AND kind = %s AND state != 'completed' "
            "ORDER BY id DESC LIMIT 1",
            (self.collection, kind),
        )
        return _job(rows[0]) if rows else None

    def latest_job(self, kind: str) -> JobRecord | None:
        """The latest job of ``kind`` in any state, or ``None``."""
        rows = self._read(
            f"SELECT {_JOB_COLUMNS} FROM neighbour_jobs WHERE collection = %s AND kind = %s ORDER BY id DESC LIMIT 1",
            (self.collection, kind),
        )
        return _job(rows[0]) if rows else None

    def update_job(self, job_id: int, **fields: object) -> None:
        """Set columns of a job (``state``, ``phase``, ``done``, ``total``, ``started_at``, ``finished_at``,
        ``error``)."""
        allowed = {"state", "phase", "done", "total", "started_at", "finished_at", "error"}
        if not fields or not set(fields) <= allowed:
            raise ValueError(f"update_job: fields must be among {sorted(allowed)}, got {sorted(fields)}")
        assignments = ", ".join(f"{name} = %s" for name in fields)
        with self._tx() as conn:
            conn.execute(f"UPDATE neighbour_jobs SET {assignments} WHERE id = %s", (*fields.values(), job_id))

    def mark_unfinished_interrupted(self) -> None:
        """Every ``running`` or ``queued`` job of the collection becomes ``interrupted``. Only the lease's holder
        calls it: it knows no other replica builds."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE neighbour_jobs SET state = 'interrupted' "
                "WHERE collection = %s AND state IN ('running', 'queued')",
                (self.collection,),
            )

    def discard_job(self, job_id: int) -> None:
        """Delete a job's nodes and edges and mark it ``failed`` (superseded)."""
        with self._tx() as conn:
            conn.execute("DELETE FROM neighbour_nodes WHERE job_id = %s", (job_id,))
            conn.execute("DELETE FROM neighbour_edges WHERE job_id = %s", (job_id,))
            conn.execute(
                "UPDATE neighbour_jobs SET state = 'failed', error = COALESCE(error, 'superseded by a newer job') "
                "WHERE id = %s",
                (job_id,),
            )

    def complete(self, job_id: int) -> None:
        """Make ``job_id`` the served graph and delete the collection's other jobs' nodes and edges, in one
        transaction."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE neighbour_jobs SET state = 'completed', phase = 'done', total = done, finished_at = %s, "
                "error = NULL WHERE id = %s",
                (utc_now(), job_id),
            )
            conn.execute(
                "INSERT INTO neighbour_current (collection, job_id) VALUES (%s, %s) "
                "ON CONFLICT (collection) DO UPDATE SET job_id = EXCLUDED.job_id",
                (self.collection, job_id),
            )
            others = "SELECT id FROM neighbour_jobs WHERE collection = %s AND id != %s"
            conn.execute(f"DELETE FROM neighbour_nodes WHERE job_id IN ({others})", (self.collection, job_id))
            conn.execute(f"DELETE FROM neighbour_edges WHERE job_id IN ({others})", (self.collection, job_id))

    def current_graph(self) -> JobRecord | None:
        """The completed job whose graph is served, or ``None``."""
        rows = self._read("SELECT job_id FROM neighbour_current WHERE collection = %s", (self.collection,))
        return self.job(rows[0][0]) if rows else None

    # --- graph phase --------------------------------------------------------------------------------------
    def done_ids(self, job_id: int, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` the job has already walked."""
        rows = self._read(
            "SELECT id FROM neighbour_nodes WHERE job_id = %s AND id = ANY(%s::bytea[])", (job_id, _keys(ids))
        )
        return {bytes(r[0]).hex() for r in rows}

    def add_nodes(
        self,
        job_id: int,
        nodes: Iterable[tuple[str, str, np.ndarray | None, Sequence[tuple[str, float]]]],
    ) -> int:
        """Store walked images and their neighbours in one transaction, add them to ``done``; returns it."""
        ids, names, vectors = [], [], []
        src, rank, dst, score = [], [], [], []
        for image_id, filename, vector, neighbours in nodes:
            key = _key(image_id)
            ids.append(key)
            names.append(filename)
            vectors.append(None if vector is None else _f16(vector))
            for r, (d, s) in enumerate(neighbours):
                src.append(key)
                rank.append(r)
                dst.append(_key(d))
                score.append(float(s))
        with self._tx() as conn:
            added = conn.execute(
                "INSERT INTO neighbour_nodes (job_id, id, filename, vector) "
                "SELECT %s, * FROM unnest(%s::bytea[], %s::text[], %s::bytea[]) ON CONFLICT DO NOTHING",
                (job_id, ids, names, vectors),
            ).rowcount
            conn.execute(
                "INSERT INTO neighbour_edges (job_id, src, rank, dst, score) "
                "SELECT %s, * FROM unnest(%s::bytea[], %s::int[], %s::bytea[], %s::real[]) "
                "ON CONFLICT (job_id, src, rank) DO UPDATE SET dst = EXCLUDED.dst, score = EXCLUDED.score",
                (job_id, src, rank, dst, score),
            )
            return conn.execute(
                "UPDATE neighbour_jobs SET done = done + %s, total = GREATEST(total, done + %s) WHERE id = %s "
                "RETURNING done",
                (added, added, job_id),
            ).fetchone()[0]

    def count_nodes(self, job_id: int, *, without_dba: bool = False) -> int:
        """Nodes of the job (only those still without a DBA vector with ``without_dba``)."""
        extra = " AND dba IS NULL" if without_dba else ""
        return self._read(f"SELECT count(*) FROM neighbour_nodes WHERE job_id = %s{extra}", (job_id,))[0][0]

    # --- DBA phase ----------------------------------------------------------------------------------------
    def nodes_without_dba(self, job_id: int, limit: int) -> list[tuple[str, np.ndarray]]:
        """Up to ``limit`` ``(id, original vector as float32)`` of the job without a DBA vector yet."""
        rows = self._read(
            "SELECT id, vector FROM neighbour_nodes WHERE job_id = %s AND dba IS NULL AND vector IS NOT NULL "
            "ORDER BY id LIMIT %s",
            (job_id, limit),
        )
        return [(bytes(r[0]).hex(), np.frombuffer(r[1], dtype=np.float16).astype(np.float32)) for r in rows]

    def neighbours_of(self, job_id: int, ids: Sequence[str], n: int) -> dict[str, list[tuple[str, float]]]:
        """``{id: [(neighbour id, cosine), ...]}``, the first ``n`` by rank, for each of ``ids``."""
        out: dict[str, list[tuple[str, float]]] = {i: [] for i in ids}
        rows = self._read(
            "SELECT src, dst, score FROM neighbour_edges WHERE job_id = %s AND rank < %s AND src = ANY(%s::bytea[]) "
            "ORDER BY src, rank",
            (job_id, n, _keys(ids)),
        )
        for s, d, score in rows:
            out[bytes(s).hex()].append((bytes(d).hex(), score))
        return out

    def vectors(self, job_id: int, ids: Iterable[str], column: str = "vector") -> dict[str, np.ndarray]:
        """``{id: float32 vector}`` of the job's nodes among ``ids``; ``column`` is ``vector`` or ``dba``."""
        if column not in ("vector", "dba"):
            raise ValueError(f"column must be 'vector' or 'dba', got {column!r}")
        rows = self._read(
            f"SELECT id, {column} FROM neighbour_nodes WHERE job_id = %s AND {column} IS NOT NULL "
            "AND id = ANY(%s::bytea[])",
            (job_id, _keys(sorted(set(ids)))),
        )
        return {bytes(r[0]).hex(): np.frombuffer(r[1], dtype=np.float16).astype(np.float32) for r in rows}

    def set_dba(self, job_id: int, vectors: Mapping[str, np.ndarray]) -> None:
        """Store DBA vectors (float16) and add them to the job's ``done``, in one transaction."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE neighbour_nodes AS n SET dba = v.dba FROM unnest(%s::bytea[], %s::bytea[]) AS v(id, dba) "
                "WHERE n.job_id = %s AND n.id = v.id",
                (_keys(vectors), [_f16(v) for v in vectors.values()], job_id),
            )
            conn.execute("UPDATE neighbour_jobs SET done = done + %s WHERE id = %s", (len(vectors), job_id))

    # --- served graph -------------------------------------------------------------------------------------
    def edges_at_least(self, job_id: int, threshold: float) -> list[Edge]:
        """Every edge of the job with ``score >= threshold`` (through the score index)."""
        rows = self._read(
            "SELECT src, dst, score FROM neighbour_edges WHERE job_id = %s AND score >= %s", (job_id, threshold)
        )
        return [Edge(bytes(s).hex(), bytes(d).hex(), score) for s, d, score in rows]

    def filenames(self, job_id: int, ids: Iterable[str]) -> dict[str, str]:
        """``{id: filename}`` as stored when the job walked the image."""
        rows = self._read(
            "SELECT id, filename FROM neighbour_nodes WHERE job_id = %s AND id = ANY(%s::bytea[])",
            (job_id, _keys(sorted(set(ids)))),
        )
        return {bytes(r[0]).hex(): r[1] for r in rows}
