"""Embedded Milvus Lite: the per-process registry of Lite servers, its flush policy, and importing pymilvus.

Split from :mod:`app.vectordb.milvus` (the handler) because it is a different job: starting and sharing the
embedded server of a database path, and working around how pymilvus reads the environment at import time.

* Inside one process, pymilvus runs one embedded Lite gRPC server per database path (in threads) and shares it
  between clients. :func:`acquire_lite` / :func:`release_lite` count the handlers open on each path (the
  module-level ``_LITE_SERVERS`` registry, the only global state here: it is a connection cache) so that the last
  handler to close stops that server, which releases the database's ``LOCK`` and lets the same process, or another
  one, reopen it. Each :class:`LiteServer` also holds the write lock of its database (Lite does not support
  concurrent writers to one collection) and the flush bookkeeping below.
* pymilvus is imported here, under :func:`milvus_uri_hidden`; the handler imports ``MilvusClient``, ``DataType``
  and ``MilvusException`` from this module, so the workaround runs whichever module imports pymilvus first.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from app.errors import DatabaseUnavailableError

# Milvus Lite flush policy. Lite searches its in-memory memtable by brute force, slowly (a 2,020-row memtable of
# 1280-d vectors: 146 ms per search, against 2-4 ms once flushed; bench/backends.py), and on its own flushes only
# at 128 MiB. So the handler flushes after every LITE_FLUSH_ROWS written rows, and before a search once writes have
# paused for LITE_IDLE_FLUSH_S; Lite's size-tiered compaction merges the small segments this makes.
LITE_FLUSH_ROWS = 1024
LITE_IDLE_FLUSH_S = 1.0


@contextlib.contextmanager
def milvus_uri_hidden() -> Iterator[None]:
    """Hide this service's ``MILVUS_URI`` from pymilvus while it is imported.

    pymilvus reads ``MILVUS_URI`` at import time for the default connection of its legacy ORM and raises
    ``ConnectionConfigException`` unless it is an ``http(s)://`` URL, but here it may be a Milvus Lite path. An
    empty value is skipped by pymilvus, and also stops the ``load_dotenv()`` it runs on import from reading the
    variable out of a ``.env`` file. The previous value is restored afterwards; the handler never uses the ORM.
    """
    saved = os.environ.get("MILVUS_URI")
    os.environ["MILVUS_URI"] = ""
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MILVUS_URI", None)
        else:
            os.environ["MILVUS_URI"] = saved


with milvus_uri_hidden():
    from pymilvus import DataType, MilvusClient
    from pymilvus.exceptions import MilvusException

__all__ = [
    "DataType",
    "LiteServer",
    "MilvusClient",
    "MilvusException",
    "acquire_lite",
    "milvus_uri_hidden",
    "release_lite",
]


@dataclass(eq=False)
class LiteServer:
    """One embedded Milvus Lite gRPC server (started through pymilvus' own registry) and its users."""

    path: str
    uri: str
    refs: int = 0
    # Milvus Lite does not support concurrent writers to one collection: every handler on this path writes under it.
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    # Rows written since the last flush, and when the last write happened (time.monotonic()).
    unflushed_rows: int = 0
    last_write: float = 0.0

    def note_write(self, rows: int) -> bool:
        """Count ``rows`` just written (caller holds :attr:`write_lock`); ``True`` when it is time to flush."""
        self.unflushed_rows += rows
        self.last_write = time.monotonic()
        return self.unflushed_rows >= LITE_FLUSH_ROWS

    def idle_with_unflushed_rows(self) -> bool:
        """``True`` when rows wait in the memtable and writes paused ``LITE_IDLE_FLUSH_S`` s: flush before searching."""
        return bool(self.unflushed_rows) and time.monotonic() - self.last_write >= LITE_IDLE_FLUSH_S


_LITE_LOCK = threading.Lock()
_LITE_SERVERS: dict[str, LiteServer] = {}


def _lite_failure_reason(path: str) -> str:
    """Best guess at why Milvus Lite could not open ``path`` (pymilvus only logs the exception)."""
    if os.path.exists(path) and not os.path.isdir(path):
        return (
            "it is a file, not a Milvus Lite 3 database directory (databases written by milvus-lite 2.x cannot be "
            "read by milvus-lite 3: re-index into a new path)"
        )
    lock_path = os.path.join(path, "LOCK")
    try:
        import fcntl
    except ImportError:  # Windows: no cheap probe
        return "see the log above for the cause; another process may hold the database"
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except OSError:
        return "see the log above for the cause"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
        return (
            "another process holds it (Milvus Lite allows one process per database: stop the other process, "
            "or run a Milvus server and set MILVUS_URI=http://host:19530)"
        )
    finally:
        os.close(fd)
    return "see the log above for the cause"


def acquire_lite(path: str) -> LiteServer:
    """Start (or reuse) the embedded Milvus Lite server of ``path`` and count one more user."""
    with _LITE_LOCK:
        server = _LITE_SERVERS.get(path)
        if server is None:
            try:
                from milvus_lite.server_manager import server_manager_instance
            except ImportError as exc:
                raise DatabaseUnavailableError(
                    "MILVUS_URI is a local path, which needs Milvus Lite: pip install milvus-lite"
                ) from exc
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            except OSError as exc:
                raise DatabaseUnavailableError(
                    f"Cannot create the directory of Milvus Lite database {path}: {exc}"
                ) from exc
            # pymilvus' own registry: a MilvusClient("….db") elsewhere in this process shares the same server.
            uri = server_manager_instance.start_and_get_uri(path)
            if uri is None:
                raise DatabaseUnavailableError(
                    f"Cannot open the Milvus Lite database {path}: {_lite_failure_reason(path)}."
                )
            server = _LITE_SERVERS[path] = LiteServer(path, uri)
        server.refs += 1
        return server


def release_lite(server: LiteServer) -> None:
    """One user fewer; the last one stops the server, which flushes and unlocks the database."""
    with _LITE_LOCK:
        server.refs -= 1
        if server.refs > 0 or _LITE_SERVERS.get(server.path) is not server:
            return
        del _LITE_SERVERS[server.path]
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(server.path)
