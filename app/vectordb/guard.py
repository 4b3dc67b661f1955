"""Fail fast while the database is down: a circuit breaker in front of any :class:`VectorDBHandler`.

:class:`GuardedHandler` wraps a handler (pgvector, Milvus, Manticore; embedded or remote). A monitor thread asks
the handler's ``health()`` once a second (every 0.5 s while the database is down, and at once when a request just
failed with :class:`app.errors.DatabaseUnavailableError`) and caches the answer, so:

- while the database is known to be down, every call raises :class:`DatabaseUnavailableError` (HTTP 503 with
  ``Retry-After``) in microseconds instead of holding a worker thread for a pool timeout;
- ``health()`` answers from the cache at once, with the reason (:attr:`GuardedHandler.down_reason`);
- a request that fails before the monitor noticed costs at most the handler's own timeout (for pgvector
  ``DB_REQUEST_TIMEOUT_S``, 0.5 s by default).

A failed request alone never opens the breaker: only a failed health probe does, so a slow moment under load
cannot turn into an outage of its own.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any

from app.errors import DatabaseUnavailableError
from app.vectordb.base import VectorDBHandler

log = logging.getLogger(__name__)

__all__ = ["GuardedHandler"]

#: seconds between health probes while the database answers
UP_PROBE_INTERVAL_S = 1.0
#: seconds between health probes while it does not (the embedded server's watchdog restarts it in about 1-2 s)
DOWN_PROBE_INTERVAL_S = 0.5

# Attributes served by the wrapped handler unguarded: they never touch the database.
_UNGUARDED = frozenset({"backend_name", "vector_type"})


class GuardedHandler:
    """A :class:`VectorDBHandler` with a circuit breaker; every other attribute is the wrapped handler's.

    Args:
        db: the handler to guard; closed by :meth:`close`.
        name: what ``/health`` calls it when it is down (default ``"database"``).

    Thread-safe. The monitor thread starts here and stops in :meth:`close`.
    """

    def __init__(self, db: VectorDBHandler, *, name: str = "database") -> None:
        self.db = db
        self.name = name
        self._down_reason: str | None = None
        self._down_since: float | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._monitor, name="db-guard", daemon=True)
        self._thread.start()

    # --- state --------------------------------------------------------------------------------------------
    @property
    def down_reason(self) -> str | None:
        """Why the database is considered down (``None`` while it answers)."""
        return self._down_reason

    def health(self) -> bool:
        """The last probe's answer, at once (never blocks on the database, never raises)."""
        return self._down_reason is None

    def _raise_if_down(self) -> None:
        reason = self._down_reason
        if reason is not None:
            raise DatabaseUnavailableError(f"The {self.name} is unavailable: {reason}")

    def _probe(self) -> None:
        try:
            ok = self.db.health()
        except Exception as exc:  # noqa: BLE001 - health must never raise; treat a raise as down
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        else:
            detail = "it does not answer a health check"
        if ok and self._down_reason is not None:
            log.warning("The %s answers again after %.1f s", self.name, time.monotonic() - (self._down_since or 0))
            self._down_reason, self._down_since = None, None
        elif not ok and self._down_reason is None:
            log.error("The %s is unavailable (%s); requests needing it answer 503 until it is back", self.name, detail)
            self._down_since = time.monotonic()
            self._down_reason = detail

    def _monitor(self) -> None:
        while not self._stop.is_set():
            self._probe()
            interval = UP_PROBE_INTERVAL_S if self._down_reason is None else DOWN_PROBE_INTERVAL_S
            self._wake.wait(interval)
            self._wake.clear()

    # --- delegation ---------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.db, name)
        if name in _UNGUARDED or name.startswith("_") or not callable(attr):
            return attr

        @functools.wraps(attr)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            self._raise_if_down()
            try:
                return attr(*args, **kwargs)
            except DatabaseUnavailableError:
                self._wake.set()  # let the monitor confirm (and open the breaker) now, not in a second
                raise

        return guarded

    def close(self) -> None:
        """Stop the monitor, then close the wrapped handler (and its embedded server, if any). Idempotent."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        self.db.close()
