"""Photo libraries as the service runs them: create, list, scan, purge, delete; background scans, periodic and
watched; the reads of their files.

:class:`Libraries` is created by :class:`app.service.SearchService` (``service.libraries``) and is what the REST API
(:mod:`app.api.libraries`) and the web UI call. One scan per library at a time across every process and replica
(a lease in :class:`app.library.state.LibraryState`); each runs on a thread of its own and writes its progress to
the shared state, so any replica shows it. A scan whose process died (``kill -9``) shows ``interrupted`` and is
resumed by the next start of any replica (or by ``POST /libraries/{name}/scan``): a scan resumes by running again,
since nothing it did is lost. A database that stops answering mid-scan pauses it: it retries with a growing wait
(2 s to 60 s) until the database is back, showing phase ``waiting``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from app.config import Settings
from app.embedders.base import Embedder
from app.errors import (
    DatabaseUnavailableError,
    InvalidParameterError,
    LibraryConflictError,
    LibraryNotFoundError,
    StorageUnavailableError,
)
from app.library.files import LibraryFiles
from app.library.model import Library, display_name, parse_library_roots, split_patterns, validate_library_name
from app.library.scan import ScanContext, ScanResult, ScanStopped, purge_offline, scan_library
from app.library.state import LibraryRow, LibraryState
from app.library.visibility import reconcile
from app.storage.base import ImageStore
from app.vectordb.base import DEFAULT_COLLECTION, VectorDBHandler

if TYPE_CHECKING:
    from app.library.watch import LibraryWatcher

log = logging.getLogger(__name__)

__all__ = ["Libraries", "LibraryStatus"]

_SCHEDULER_TICK_S = 30.0  # how often the periodic scans are looked at
_FAILED_RETRY_S = 600.0  # a failed scan is started again this long after it started
_PROGRESS_EVERY_S = 1.0  # most one progress write per second


@dataclass(frozen=True)
class LibraryStatus:
    """A library with its counts and the state of its scan (``GET /libraries``).

    Attributes:
        library: its definition. state: ``idle``, ``scanning``, ``waiting`` (the database is down: it retries),
            ``interrupted`` (its process died: the next start or scan resumes it) or ``failed`` (``error``).
        phase, done, total: the running scan's progress. counts: ``files``, ``online``, ``offline``, ``failed``
            (cannot be indexed), distinct ``images``. scan_started_at, scan_finished_at: epoch seconds.
        last_scan: the last completed scan's :class:`app.library.scan.ScanResult` as a dict. warning: why the last
            scan marked nothing offline (mount safety). watching: inotify follows its roots here.
    """

    library: Library
    state: str
    phase: str
    done: int
    total: int
    counts: dict[str, int]
    scan_started_at: float | None
    scan_finished_at: float | None
    last_scan: dict | None
    error: str | None
    warning: str | None
    watching: bool = False
    extra: dict = field(default_factory=dict)


class Libraries:
    """The libraries of one service (see the module docstring). Thread-safe; :meth:`close` it.

    Args:
        settings: the service's settings. db: the vector database (guarded). uploads: the image store of uploads.
        embedder: the loaded model (``None`` with ``EMBEDDER=none``).
    """

    def __init__(self, settings: Settings, db: VectorDBHandler, uploads: ImageStore, embedder: Embedder | None) -> None:
        self.settings = settings
        self.db = db
        self.uploads = uploads
        self.embedder = embedder
        self.collection = getattr(db, "collection_name", DEFAULT_COLLECTION)
        self.extra_excludes = split_patterns(settings.library_exclude)
        self.files = LibraryFiles(self._state_if_any, on_changed=self._file_changed)
        self._state: LibraryState | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: dict[str, threading.Thread] = {}
        self._closed = False
        self._scheduler: threading.Thread | None = None
        self._watcher: LibraryWatcher | None = None

    # --- state ------------------------------------------------------------------------------------------------
    def _state_if_any(self) -> LibraryState | None:
        """The state if a library may exist (opened on first need); ``None`` while none was ever created."""
        with self._lock:
            if self._state is None and not self._closed and LibraryState.exists(self.settings):
                self._state = LibraryState.open(self.settings)
            return self._state

    def _open_state(self) -> LibraryState:
        with self._lock:
            if self._closed:
                raise RuntimeError("the service is closing")
            if self._state is None:
                self._state = LibraryState.open(self.settings)
            return self._state

    def _context(self, state: LibraryState) -> ScanContext:
        s = self.settings
        return ScanContext(
            db=self.db,
            uploads=self.uploads,
            state=state,
            embedder=self.embedder,
            extra_excludes=self.extra_excludes,
            max_offline_fraction=s.library_max_offline_fraction,
            offline_grace_s=s.library_offline_grace_s,
            workers=s.library_scan_workers,
            batch_size=s.embed_batch_size,
            hash_threads=max(2, min(8, (os.cpu_count() or 2) * 2)),
            max_pixels=s.max_image_pixels,
            max_bytes=s.max_upload_bytes,
        )

    def _file_changed(self, library: str, path: bytes) -> None:
        log.info("Library %s: %r changed since it was indexed; the next scan reads it again", library, path[:200])
        if self._watcher is not None:
            self._watcher.touch(library)

    # --- start and stop ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """At service start: create or update the ``LIBRARY_ROOTS`` libraries, resume scans that a stop or
        ``kill -9`` cut short, start the scans that are due now (a library never scanned, such as one just created
        from ``LIBRARY_ROOTS``, or one whose last scan is older than ``LIBRARY_SCAN_INTERVAL``) rather than at the
        scheduler's first tick, start the periodic scans and (``LIBRARY_WATCH``) the watcher. A database that is
        down is logged, not raised: the scheduler tries again."""
        try:
            self._sync_env_libraries()
            state = self._state_if_any()
            if state is not None:
                for row in state.libraries():
                    if row.state in ("scanning", "waiting") and not state.lease_held(row.name):
                        log.info("Library %s: resuming the scan a stop or kill -9 cut short", row.name)
                        self.scan(row.name)
        except DatabaseUnavailableError as exc:
            log.error("Libraries: cannot read their state at start (%s); retrying in the background", exc)
        # A library never scanned (a new LIBRARY_ROOTS one) or overdue starts now; never raises for a database that
        # is down (the scheduler's ticks try again).
        self.run_due_scans()
        self._scheduler = threading.Thread(target=self._schedule, name="library-scheduler", daemon=True)
        self._scheduler.start()
        if self.settings.library_watch:
            from app.library.watch import LibraryWatcher

            self._watcher = LibraryWatcher(self, self.settings.library_settle_s)
            self._watcher.start()

    def _sync_env_libraries(self) -> None:
        wanted = parse_library_roots(self.settings.library_roots)
        if not wanted:
            return
        state = self._open_state()
        for library in wanted:
            missing = [r for r in library.roots if not os.path.isdir(r)]
            if missing:
                log.warning("LIBRARY_ROOTS: library %s: %s is not a folder here", library.name, ", ".join(missing))
            row = state.library(library.name)
            if row is None:
                state.create_library(library)
                log.info("Library %s created from LIBRARY_ROOTS: %s", library.name, ", ".join(library.roots))
            elif row.library.source != "env":
                log.warning(
                    "LIBRARY_ROOTS names library %s, which was created through the API: left as it is", library.name
                )
            elif row.library.roots != library.roots:
                state.update_library(library.name, roots=library.roots)
                log.info("Library %s: roots from LIBRARY_ROOTS now %s", library.name, ", ".join(library.roots))

    def _schedule(self) -> None:
        """Every tick: scan each library whose last scan is older than LIBRARY_SCAN_INTERVAL (or that was never
        scanned); a database that is down is tried again at the next tick."""
        while not self._stop.wait(_SCHEDULER_TICK_S):
            self.run_due_scans()

    def run_due_scans(self) -> list[str]:
        """Start the scans that are due (see :meth:`_schedule`); returns the names started."""
        interval = self.settings.library_scan_interval_s
        started = []
        try:
            state = self._state_if_any()
            if state is None:
                return started
            for row in state.libraries():
                never = row.scan_finished_at is None and row.state == "idle"
                # With periodic scans on, a failed scan is tried again after _FAILED_RETRY_S (or the interval, if
                # shorter), not at every tick.
                retry = min(_FAILED_RETRY_S, interval)
                failed = row.state == "failed" and time.time() - (row.scan_started_at or 0) > retry
                never = never or (interval > 0 and failed)
                due = (
                    interval > 0 and row.scan_finished_at is not None and time.time() - row.scan_finished_at > interval
                )
                if (never or due) and not self._running(row.name):
                    try:
                        _, ok = self.scan(row.name, settle=True)
                    except LibraryNotFoundError:  # deleted meanwhile (by another replica)
                        continue
                    if ok:
                        started.append(row.name)
        except (DatabaseUnavailableError, LibraryConflictError) as exc:
            log.info("Libraries: periodic scans wait (%s)", exc)
        return started

    def close(self) -> None:
        """Stop the watcher and the scans between two steps (each resumes at the next start), close the state."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.stop()
        for thread in list(self._threads.values()):
            thread.join(timeout=60)
        if self._scheduler is not None:
            self._scheduler.join(timeout=5)
        with self._lock:
            self._closed = True
            if self._state is not None:
                self._state.close()
                self._state = None

    # --- libraries ----------------------------------------------------------------------------------------------
    def create(self, name: str, roots: list[str], excludes: list[str] | None = None) -> LibraryStatus:
        """Create a library and start its first scan.

        Raises :class:`InvalidParameterError` (422: a bad name, root or pattern; a root that is not a folder here),
        :class:`LibraryConflictError` (409: the name is taken) and :class:`DatabaseUnavailableError`.
        """
        try:
            library = Library.create(name, roots, excludes or ())
        except ValueError as exc:
            raise InvalidParameterError(str(exc)) from None
        for root in library.roots:
            if not os.path.isdir(root):
                raise InvalidParameterError(
                    f"{root} is not a folder the service can see (in Docker, mount it into the container first)."
                )
        state = self._open_state()
        if not state.create_library(library):
            raise LibraryConflictError(f"A library called '{name}' exists; delete it first or choose another name.")
        log.info("Library %s created: %s", name, ", ".join(library.roots))
        if self._watcher is not None:
            self._watcher.refresh()
        self.scan(name)
        return self.status(name)

    def _row(self, name: str) -> tuple[LibraryState, LibraryRow]:
        try:
            validate_library_name(name)
        except ValueError:
            raise LibraryNotFoundError(f"No library called '{str(name)[:60]}'.") from None
        state = self._state_if_any()
        row = None if state is None else state.library(name)
        if row is None or state is None:
            raise LibraryNotFoundError(f"No library called '{name}'.")
        return state, row

    def _status(self, state: LibraryState, row: LibraryRow) -> LibraryStatus:
        run_state = row.state
        if run_state in ("scanning", "waiting") and not self._running(row.name) and not state.lease_held(row.name):
            run_state = "interrupted"
        return LibraryStatus(
            library=row.library,
            state=run_state,
            phase=row.phase,
            done=row.done,
            total=row.total,
            counts=state.counts(row.name),
            scan_started_at=row.scan_started_at,
            scan_finished_at=row.scan_finished_at,
            last_scan=row.last_result,
            error=row.error,
            warning=row.warning,
            watching=self._watcher is not None and self._watcher.watching(row.name),
        )

    def status(self, name: str) -> LibraryStatus:
        """One library's status; raises :class:`LibraryNotFoundError` and :class:`DatabaseUnavailableError`."""
        state, row = self._row(name)
        return self._status(state, row)

    def list(self) -> list[LibraryStatus]:
        """Every library's status, by name (``[]`` while none was ever created)."""
        state = self._state_if_any()
        return [] if state is None else [self._status(state, row) for row in state.libraries()]

    def delete(self, name: str) -> int:
        """Forget library ``name``: its rows and the images no other library or upload holds go; its files are never
        touched. Returns the number of images removed. Raises :class:`LibraryNotFoundError` and
        :class:`LibraryConflictError` while a scan of it runs (in any process)."""
        state, _ = self._row(name)
        lease = state.acquire_lease(name)
        if lease is None:
            raise LibraryConflictError(f"Library '{name}' is being scanned; try again when the scan ends.")
        try:
            ids = state.delete_library(name)
            removed = reconcile(self.db, self.uploads, state, ids).removed
        finally:
            lease.close()
        log.info("Library %s deleted: %d images removed", name, removed)
        if self._watcher is not None:
            self._watcher.refresh()
        return removed

    def purge(self, name: str) -> dict[str, int]:
        """Forget every offline file of library ``name`` now, with its image unless held elsewhere:
        ``{"files": n, "images": n}``. Raises :class:`LibraryNotFoundError` and :class:`LibraryConflictError`
        while a scan of it runs."""
        state, row = self._row(name)
        lease = state.acquire_lease(name)
        if lease is None:
            raise LibraryConflictError(f"Library '{name}' is being scanned; try again when the scan ends.")
        try:
            files, done = purge_offline(self._context(state), row.library)
        finally:
            lease.close()
        return {"files": files, "images": done.removed}

    def holder(self, image_id: str) -> str | None:
        """The display name of a library file holding ``image_id`` (online or offline), or ``None``."""
        state = self._state_if_any()
        rows = [] if state is None else state.paths_of([image_id]).get(image_id, [])
        return display_name(rows[0].library, rows[0].path) if rows else None

    def held_ids(self) -> set[str]:
        """Image ids some library file holds (``fsck.py`` leaves their rows to the scans)."""
        state = self._state_if_any()
        return set() if state is None else state.held_ids()

    def problems(self) -> tuple[int, list[str]]:
        """What ``/health`` says of the libraries: ``(how many there are, problem lines)``, a line per failed scan
        or mount-safety warning. Never raises."""
        try:
            state = self._state_if_any()
            rows = [] if state is None else state.libraries()
        except DatabaseUnavailableError:
            return 1, ["state: it cannot be read"]
        problems = []
        for row in rows:
            if row.state == "failed" and row.error:
                problems.append(f"{row.name}: the last scan failed: {row.error}"[:300])
            elif row.warning:
                problems.append(f"{row.name}: {row.warning}"[:300])
        return len(rows), problems

    # --- scans --------------------------------------------------------------------------------------------------
    def _running(self, name: str) -> bool:
        thread = self._threads.get(name)
        return thread is not None and thread.is_alive()

    def scan(self, name: str, *, force: bool = False, settle: bool = False) -> tuple[LibraryStatus, bool]:
        """Start a scan of library ``name`` in the background, or report the one already running in any process.

        Returns ``(status, started)``. ``force``: mark missing files offline even past
        ``LIBRARY_MAX_OFFLINE_FRACTION``. ``settle``: leave files modified in the last ``LIBRARY_SETTLE_S`` for the
        next scan (watching and the periodic scans). Raises :class:`LibraryNotFoundError` and
        :class:`DatabaseUnavailableError`.
        """
        state, row = self._row(name)
        with self._lock:
            if self._closed or self._stop.is_set():
                raise LibraryConflictError("The service is stopping.")
            if self._running(name):
                return self._status(state, row), False
            lease = state.acquire_lease(name)
            if lease is None:  # another process or replica scans it
                return self._status(state, row), False
            thread = threading.Thread(
                target=self._run,
                args=(state, row.library, lease, force, settle),
                name=f"library-scan-{name}",
                daemon=True,
            )
            self._threads[name] = thread
            try:
                state.update_library(
                    name, state="scanning", phase="walk", done=0, total=0, scan_started_at=time.time(), error=None
                )
            except BaseException:
                lease.close()
                del self._threads[name]
                raise
            thread.start()
        return self._status(state, state.library(name) or row), True

    def _run(self, state: LibraryState, library: Library, lease, force: bool, settle: bool) -> None:  # noqa: ANN001
        name = library.name
        last: list = [0.0, ""]  # when progress was last written, and its phase

        def progress(phase: str, done: int, total: int) -> None:
            now = time.monotonic()
            # A new phase is written at once: its first step may take long (the index phase starts the decoding
            # processes and embeds a whole batch first), and meanwhile the status must not show the last one done.
            if phase != last[1] or now - last[0] >= _PROGRESS_EVERY_S or done == total:
                last[0], last[1] = now, phase
                try:
                    state.update_library(name, phase=phase, done=done, total=total)
                except DatabaseUnavailableError:
                    pass  # progress is best effort; the scan itself notices a database that is down

        wait = 2.0
        try:
            while True:
                try:
                    result = scan_library(
                        self._context(state),
                        library,
                        force=force,
                        settle_s=self.settings.library_settle_s if settle else 0.0,
                        stop=self._stop,
                        progress=progress,
                    )
                    break
                except (DatabaseUnavailableError, StorageUnavailableError) as exc:
                    log.warning("Library %s: scan paused, %s; retrying in %.0f s", name, exc, wait)
                    try:
                        state.update_library(name, state="waiting", phase="waiting", error=str(exc)[:500])
                    except DatabaseUnavailableError:
                        pass
                    if self._stop.wait(wait):
                        raise ScanStopped from None
                    wait = min(wait * 2, 60.0)
                    try:
                        state.update_library(name, state="scanning", phase="walk", error=None)
                    except DatabaseUnavailableError:
                        pass
            self._finish(state, name, result)
        except ScanStopped:
            log.info("Library %s: scan stopped; it resumes at the next start", name)
        except Exception as exc:  # the status reports it; the service keeps serving
            log.exception("Library %s: scan failed", name)
            try:
                state.update_library(name, state="failed", phase="", error=f"{type(exc).__name__}: {exc}"[:1000])
            except DatabaseUnavailableError:
                pass
        finally:
            lease.close()
            if self._watcher is not None and not self._stop.is_set():
                self._watcher.scan_ended(name)

    def _finish(self, state: LibraryState, name: str, result: ScanResult) -> None:
        state.update_library(
            name,
            state="idle",
            phase="",
            done=0,
            total=0,
            scan_finished_at=time.time(),
            last_result=result.as_dict(),
            error=None,
            warning=result.warning,
        )
        log.info(
            "Library %s scanned in %.1f s: %s",
            name,
            result.seconds,
            json.dumps({k: v for k, v in result.as_dict().items() if v and k not in ("errors", "seconds")}),
        )
        if self._watcher is not None and result.deferred:
            self._watcher.touch(name)  # files still being written: look again once they settle

    def wait(self, name: str, timeout: float | None = None) -> bool:
        """Wait for this process's scan of ``name`` to end; ``True`` when none runs any more (tests, scripts)."""
        thread = self._threads.get(name)
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def roots(self) -> dict[str, list[Path]]:
        """Every library's root folders, by name (the watcher follows them)."""
        state = self._state_if_any()
        if state is None:
            return {}
        return {row.name: [Path(r) for r in row.library.roots] for row in state.libraries()}
