"""Where the neighbour graph, the DBA vectors and the job state live: one SQLite file under ``DATA_DIR``.

Backend-agnostic on purpose: the graph is derived data (it can always be rebuilt from the collection), so it needs
no schema change in pgvector, Milvus or Manticore, and the same file works beside each. SQLite (stdlib ``sqlite3``)
in WAL mode with ``synchronous=NORMAL``: a committed batch survives a ``kill -9`` of the service (WAL fsyncs at
checkpoints; a power loss may lose the last batches, which the job then redoes). Tables:

- ``jobs``: one row per build (integer id, state, phase, progress, parameters, times, error);
- ``nodes``: per job, every image walked: its filename (copied from the stored metadata), and with DBA its original
  vector and its DBA vector, both float16 (half the space; 3 significant digits are plenty to re-rank);
- ``edges``: per job, each image's ``k`` nearest neighbours by rank, with the cosine similarity; indexed by score
  for ``GET /duplicates``;
- ``meta``: ``current_graph``, the id of the completed job whose graph and DBA vectors are served.

Image ids are stored as their 32 bytes, not 64 hex characters: that halves the file (100k images with k=15 make 1.5M
edges).

A new build writes beside the current graph, which keeps being served until the build completes; then the new job
becomes current and the rows of every other job are deleted.

Thread-safe: one connection, one lock (a batch write holds it for milliseconds).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

FILENAME = "neighbours.sqlite3"
"""The graph file's name under ``DATA_DIR``."""

_SQL_CHUNK = 900  # ids per ``IN (...)``: under SQLite's historical limit of 999 bound parameters

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    phase TEXT NOT NULL,
    k INTEGER NOT NULL,
    dba_n INTEGER,
    dba_alpha REAL,
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    error TEXT
);
CREATE TABLE IF NOT EXISTS nodes (
    job_id INTEGER NOT NULL,
    id BLOB NOT NULL,
    filename TEXT NOT NULL,
    vector BLOB,
    dba BLOB,
    PRIMARY KEY (job_id, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS edges (
    job_id INTEGER NOT NULL,
    src BLOB NOT NULL,
    rank INTEGER NOT NULL,
    dst BLOB NOT NULL,
    score REAL NOT NULL,
    PRIMARY KEY (job_id, src, rank)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS edges_by_score ON edges (job_id, score);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

JOB_STATES = ("queued", "running", "interrupted", "failed", "completed")
"""``running``: a thread works on it; ``interrupted``: the service stopped (or was killed) during it, it resumes on
the next start or ``POST /jobs/neighbours``; ``failed``: it stopped on an error (``error``), the next
``POST /jobs/neighbours`` resumes it; ``completed``: its graph is (or was) the one served."""


def utc_now() -> datetime:
    """Now, timezone-aware UTC, to the second."""
    return datetime.now(UTC).replace(microsecond=0)


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One graph build as stored.

    Attributes:
        id: job id (1, 2, ...). kind: ``neighbours``. state: one of :data:`JOB_STATES`.
        phase: ``graph`` (searching each image's neighbours), ``dba`` (computing DBA vectors) or ``done``.
        k: neighbours per image. dba_n, dba_alpha: DBA parameters, ``None`` when built without DBA.
        done, total: images finished / to do in the current phase (``total`` is the collection size when the phase
            started; images indexed meanwhile may push ``done`` past it, and the job then raises ``total``).
        created_at, started_at, finished_at: timezone-aware UTC (``started_at`` is the latest (re)start).
        error: why a ``failed`` job stopped.
    """

    id: int
    kind: str
    state: str
    phase: str
    k: int
    dba_n: int | None
    dba_alpha: float | None
    done: int
    total: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None


@dataclass(frozen=True, slots=True)
class Edge:
    """One graph edge: ``dst`` is among the ``k`` nearest neighbours of ``src``, with cosine similarity ``score``."""

    src: str
    dst: str
    score: float


def _time(value: str | datetime | None) -> datetime | None:
    """A stored time (ISO 8601 text in SQLite, ``timestamptz`` from PostgreSQL) as an aware UTC datetime."""
    if value is None:
        return None
    return (value if isinstance(value, datetime) else datetime.fromisoformat(value)).astimezone(UTC)


def _job(row: Sequence) -> JobRecord:
    return JobRecord(
        id=row[0],
        kind=row[1],
        state=row[2],
        phase=row[3],
        k=row[4],
        dba_n=row[5],
        dba_alpha=row[6],
        done=row[7],
        total=row[8],
        created_at=_time(row[9]),
        started_at=_time(row[10]),
        finished_at=_time(row[11]),
        error=row[12],
    )


_JOB_COLUMNS = "id, kind, state, phase, k, dba_n, dba_alpha, done, total, created_at, started_at, finished_at, error"


def _key(image_id: str) -> bytes:
    """An image id (64 hex characters) as the 32 bytes stored: half the file of the text form."""
    return bytes.fromhex(image_id)


def _keys(ids: Iterable[str]) -> list[bytes]:
    return [bytes.fromhex(i) for i in ids]


def _f16(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=np.float16).tobytes()


def _chunks(items: Sequence[str], size: int = _SQL_CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _NoLease:
    """The lease of a store only this process writes: nothing to hold."""

    def close(self) -> None:
        """Nothing to give up."""


class GraphStore:
    """The SQLite file of neighbour graphs and jobs (see the module docstring). Thread-safe; :meth:`close` it.

    Its lease and start lock exclude nothing: one process owns the file (the service's own job lock suffices).
    :class:`app.neighbours.pgstore.PgGraphStore` is the same interface in PostgreSQL, shared by replicas.
    """

    shared = False
    """Only this process builds and serves this graph (``PgGraphStore``'s is ``True``)."""

    def __init__(self, path: Path) -> None:
        """Open (creating the file, its folder and the tables if missing) ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the connection. Idempotent."""
        with self._lock:
            self._conn.close()

    def _write(self):
        """``with store._write() as conn``: the lock and one ``BEGIN IMMEDIATE`` transaction."""
        store = self

        class _Tx:
            def __enter__(self) -> sqlite3.Connection:
                store._lock.acquire()
                try:
                    store._conn.execute("BEGIN IMMEDIATE")
                except BaseException:
                    store._lock.release()
                    raise
                return store._conn

            def __exit__(self, exc_type, exc, tb) -> None:
                try:
                    store._conn.execute("ROLLBACK" if exc_type else "COMMIT")
                finally:
                    store._lock.release()

        return _Tx()

    def _read(self, query: str, params: Sequence = ()) -> list:
        with self._lock:
            return self._conn.execute(query, params).fetchall()

    # --- one builder at a time (one process owns the file) --------------------------------------------------
    @contextmanager
    def start_lock(self) -> Iterator[None]:
        """Nothing to hold: the service's own start lock serialises its starts."""
        yield

    def acquire_lease(self) -> _NoLease:
        """Always granted: the file has one writer."""
        return _NoLease()

    def lease_held(self) -> bool:
        """Not consulted for a store that is not shared; ``True``."""
        return True

    # --- jobs ---------------------------------------------------------------------------------------------
    def create_job(self, kind: str, k: int, dba_n: int | None, dba_alpha: float | None) -> JobRecord:
        """A new ``queued`` job in phase ``graph``."""
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO jobs (kind, state, phase, k, dba_n, dba_alpha, created_at) VALUES (?, 'queued', 'graph', "
                "?, ?, ?, ?)",
                (kind, k, dba_n, dba_alpha, utc_now().isoformat()),
            )
            job_id = cur.lastrowid
        return self.job(job_id)

    def job(self, job_id: int) -> JobRecord | None:
        """The job with this id, or ``None``."""
        rows = self._read(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def unfinished_job(self, kind: str) -> JobRecord | None:
        """The latest job of ``kind`` not ``completed`` (queued, running, interrupted or failed), or ``None``."""
        rows = self._read(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE kind = ? AND state != 'completed' ORDER BY id DESC LIMIT 1",
            (kind,),
        )
        return _job(rows[0]) if rows else None

    def latest_job(self, kind: str) -> JobRecord | None:
        """The latest job of ``kind`` in any state, or ``None``."""
        rows = self._read(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE kind = ? ORDER BY id DESC LIMIT 1", (kind,))
        return _job(rows[0]) if rows else None

    def update_job(self, job_id: int, **fields: object) -> None:
        """Set columns of a job (``state``, ``phase``, ``done``, ``total``, ``started_at``, ``finished_at``, ``error``);
        datetimes are stored as ISO 8601 text."""
        allowed = {"state", "phase", "done", "total", "started_at", "finished_at", "error"}
        if not fields or not set(fields) <= allowed:
            raise ValueError(f"update_job: fields must be among {sorted(allowed)}, got {sorted(fields)}")
        values = [v.isoformat() if isinstance(v, datetime) else v for v in fields.values()]
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._write() as conn:
            conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*values, job_id))

    def mark_unfinished_interrupted(self) -> None:
        """Every ``running`` or ``queued`` job becomes ``interrupted``: at start-up, those are what a stopped or killed
        service left behind."""
        with self._write() as conn:
            conn.execute("UPDATE jobs SET state = 'interrupted' WHERE state IN ('running', 'queued')")

    def discard_job(self, job_id: int) -> None:
        """Delete a job's nodes and edges and mark it ``failed`` (superseded): used when a new build replaces an
        unfinished one built with other parameters."""
        with self._write() as conn:
            conn.execute("DELETE FROM nodes WHERE job_id = ?", (job_id,))
            conn.execute("DELETE FROM edges WHERE job_id = ?", (job_id,))
            conn.execute(
                "UPDATE jobs SET state = 'failed', error = COALESCE(error, 'superseded by a newer job') WHERE id = ?",
                (job_id,),
            )

    def complete(self, job_id: int) -> None:
        """Make ``job_id`` the served graph (state ``completed``, phase ``done``, ``total = done``) and delete every
        other job's nodes and edges, in one transaction."""
        with self._write() as conn:
            conn.execute(
                "UPDATE jobs SET state = 'completed', phase = 'done', total = done, finished_at = ?, error = NULL "
                "WHERE id = ?",
                (utc_now().isoformat(), job_id),
            )
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('current_graph', ?)", (str(job_id),))
            conn.execute("DELETE FROM nodes WHERE job_id != ?", (job_id,))
            conn.execute("DELETE FROM edges WHERE job_id != ?", (job_id,))

    def current_graph(self) -> JobRecord | None:
        """The completed job whose graph is served, or ``None`` before the first build completes."""
        rows = self._read("SELECT value FROM meta WHERE key = 'current_graph'")
        return self.job(int(rows[0][0])) if rows else None

    # --- graph phase --------------------------------------------------------------------------------------
    def done_ids(self, job_id: int, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` the job has already walked (their neighbours are stored)."""
        found: set[str] = set()
        for part in _chunks(list(ids)):
            marks = ",".join("?" * len(part))
            rows = self._read(f"SELECT id FROM nodes WHERE job_id = ? AND id IN ({marks})", (job_id, *_keys(part)))
            found.update(r[0].hex() for r in rows)
        return found

    def add_nodes(
        self,
        job_id: int,
        nodes: Iterable[tuple[str, str, np.ndarray | None, Sequence[tuple[str, float]]]],
    ) -> int:
        """Store walked images and their neighbours in one transaction and add them to the job's ``done``.

        Each node is ``(id, filename, vector or None, [(neighbour id, cosine), ...] best first)``; the vector (``(D,)``,
        kept as float16) is stored only for DBA. Returns the job's new ``done``.
        """
        node_rows, edge_rows = [], []
        for image_id, filename, vector, neighbours in nodes:
            key = _key(image_id)
            node_rows.append((job_id, key, filename, None if vector is None else _f16(vector)))
            edge_rows += [(job_id, key, rank, _key(dst), float(s)) for rank, (dst, s) in enumerate(neighbours)]
        with self._write() as conn:
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO nodes (job_id, id, filename, vector) VALUES (?, ?, ?, ?)", node_rows
            )
            added = conn.total_changes - before
            conn.executemany("INSERT OR REPLACE INTO edges VALUES (?, ?, ?, ?, ?)", edge_rows)
            conn.execute(
                "UPDATE jobs SET done = done + ?, total = MAX(total, done + ?) WHERE id = ?", (added, added, job_id)
            )
            return conn.execute("SELECT done FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]

    def count_nodes(self, job_id: int, *, without_dba: bool = False) -> int:
        """Nodes of the job (only those still without a DBA vector with ``without_dba``)."""
        extra = " AND dba IS NULL" if without_dba else ""
        return self._read(f"SELECT COUNT(*) FROM nodes WHERE job_id = ?{extra}", (job_id,))[0][0]

    # --- DBA phase ----------------------------------------------------------------------------------------
    def nodes_without_dba(self, job_id: int, limit: int) -> list[tuple[str, np.ndarray]]:
        """Up to ``limit`` ``(id, original vector as float32)`` of the job that have no DBA vector yet."""
        rows = self._read(
            "SELECT id, vector FROM nodes WHERE job_id = ? AND dba IS NULL AND vector IS NOT NULL ORDER BY id LIMIT ?",
            (job_id, limit),
        )
        return [(r[0].hex(), np.frombuffer(r[1], dtype=np.float16).astype(np.float32)) for r in rows]

    def neighbours_of(self, job_id: int, ids: Sequence[str], n: int) -> dict[str, list[tuple[str, float]]]:
        """``{id: [(neighbour id, cosine), ...]}``, the first ``n`` by rank, for each of ``ids``."""
        out: dict[str, list[tuple[str, float]]] = {i: [] for i in ids}
        for part in _chunks(list(ids)):
            marks = ",".join("?" * len(part))
            rows = self._read(
                f"SELECT src, dst, score FROM edges WHERE job_id = ? AND rank < ? AND src IN ({marks}) "
                "ORDER BY src, rank",
                (job_id, n, *_keys(part)),
            )
            for src, dst, score in rows:
                out[src.hex()].append((dst.hex(), score))
        return out

    def vectors(self, job_id: int, ids: Iterable[str], column: str = "vector") -> dict[str, np.ndarray]:
        """``{id: float32 vector}`` of the job's nodes among ``ids`` that have one; ``column`` is ``vector`` (the
        original) or ``dba``."""
        if column not in ("vector", "dba"):
            raise ValueError(f"column must be 'vector' or 'dba', got {column!r}")
        out: dict[str, np.ndarray] = {}
        for part in _chunks(sorted(set(ids))):
            marks = ",".join("?" * len(part))
            rows = self._read(
                f"SELECT id, {column} FROM nodes WHERE job_id = ? AND {column} IS NOT NULL AND id IN ({marks})",
                (job_id, *_keys(part)),
            )
            out.update((r[0].hex(), np.frombuffer(r[1], dtype=np.float16).astype(np.float32)) for r in rows)
        return out

    def set_dba(self, job_id: int, vectors: Mapping[str, np.ndarray]) -> None:
        """Store DBA vectors (float16) and add them to the job's ``done``, in one transaction."""
        with self._write() as conn:
            conn.executemany(
                "UPDATE nodes SET dba = ? WHERE job_id = ? AND id = ?",
                [(_f16(v), job_id, _key(i)) for i, v in vectors.items()],
            )
            conn.execute("UPDATE jobs SET done = done + ? WHERE id = ?", (len(vectors), job_id))

    # --- served graph -------------------------------------------------------------------------------------
    def edges_at_least(self, job_id: int, threshold: float) -> list[Edge]:
        """Every edge of the job with ``score >= threshold`` (through the score index)."""
        rows = self._read("SELECT src, dst, score FROM edges WHERE job_id = ? AND score >= ?", (job_id, threshold))
        return [Edge(src.hex(), dst.hex(), score) for src, dst, score in rows]

    def filenames(self, job_id: int, ids: Iterable[str]) -> dict[str, str]:
        """``{id: filename}`` as stored in the collection when the job walked the image."""
        out: dict[str, str] = {}
        for part in _chunks(sorted(set(ids))):
            marks = ",".join("?" * len(part))
            rows = self._read(
                f"SELECT id, filename FROM nodes WHERE job_id = ? AND id IN ({marks})", (job_id, *_keys(part))
            )
            out.update((r[0].hex(), r[1]) for r in rows)
        return out
