"""Following the libraries' folders with inotify (``LIBRARY_WATCH=true``), through ``watchdog``.

A change anywhere under a library's root (a file created, written, moved or deleted) marks the library *touched*;
once nothing under it has changed for ``LIBRARY_SETTLE_S``, a scan of it starts with ``settle`` on, so a file that
is still being copied (its mtime younger than the settle time) waits for the next round, and the round after the
scan picks it up (:meth:`Libraries.scan`'s ``deferred``). A scan rather than per-file work: the unchanged part of a
library costs one ``stat`` per file and no read (about 10 s for 200,000 files), every change goes through the one
code path that the periodic scans and ``POST /libraries/{name}/scan`` use, and moves are recognised by their bytes.

Network mounts (NFS, SMB) deliver no inotify events for changes made by other machines: ``LIBRARY_SCAN_INTERVAL``
covers them. A root that cannot be watched (too many folders for ``fs.inotify.max_user_watches``, a mount that is
gone) is logged and left to the periodic scans.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Protocol

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

log = logging.getLogger(__name__)

__all__ = ["LibraryWatcher"]

_TICK_S = 0.5


class Libraries(Protocol):
    """What the watcher needs of :class:`app.library.libraries.Libraries` (which imports this module)."""

    def roots(self) -> dict[str, list[Path]]: ...  # noqa: D102

    def scan(self, name: str, *, force: bool = False, settle: bool = False) -> tuple[object, bool]: ...  # noqa: D102


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: LibraryWatcher, name: str) -> None:
        self.watcher, self.name = watcher, name

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return  # reads (our own hashing, thumbnails) change nothing
        path = os.fsdecode(event.src_path)
        if os.path.basename(path).startswith("."):
            return  # hidden files are never indexed (editors' temporary files, .DS_Store)
        self.watcher.touch(self.name)


class LibraryWatcher:
    """Watches every library's roots and starts a scan once a touched library has settled. Thread-safe.

    Args:
        libraries: the service's :class:`app.library.libraries.Libraries`. settle_s: ``LIBRARY_SETTLE_S``.
    """

    def __init__(self, libraries: Libraries, settle_s: float) -> None:
        self.libraries = libraries
        self.settle_s = settle_s
        self._observer = Observer()
        self._lock = threading.Lock()
        self._touched: dict[str, float] = {}  # library -> monotonic time of its latest change
        self._watches: dict[str, list] = {}  # library -> watchdog watches
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="library-watch", daemon=True)

    def start(self) -> None:
        """Start watching the libraries' roots, and the thread that starts scans."""
        self._observer.start()
        self.refresh()
        self._thread.start()

    def refresh(self) -> None:
        """Watch the roots of every library (after one was created or deleted). Never raises."""
        try:
            roots = self.libraries.roots()
        except Exception as exc:  # noqa: BLE001 - the database may be down: the next refresh tries again
            log.warning("Library watch: cannot read the libraries (%s)", exc)
            return
        with self._lock:
            for name in set(self._watches) - set(roots):
                for watch in self._watches.pop(name):
                    self._observer.unschedule(watch)
            for name, folders in roots.items():
                if name in self._watches:
                    continue
                watches = []
                for folder in folders:
                    try:
                        watches.append(self._observer.schedule(_Handler(self, name), str(folder), recursive=True))
                    except OSError as exc:
                        log.warning(
                            "Library %s: cannot watch %s (%s); the periodic scans (LIBRARY_SCAN_INTERVAL) cover it",
                            name,
                            folder,
                            exc,
                        )
                self._watches[name] = watches
                log.info("Library %s: watching %d of %d roots", name, len(watches), len(folders))

    def watching(self, name: str) -> bool:
        """Whether at least one root of library ``name`` is watched."""
        with self._lock:
            return bool(self._watches.get(name))

    def touch(self, name: str) -> None:
        """Note a change in library ``name``: it is scanned once it has been quiet for ``settle_s``."""
        with self._lock:
            self._touched[name] = time.monotonic()

    def scan_ended(self, name: str) -> None:
        """Called when a scan of ``name`` ends: changes seen during it are scanned after the settle time."""
        # Nothing to do: a change during the scan left the library touched, and the loop starts the next scan.

    def _loop(self) -> None:
        while not self._stop.wait(_TICK_S):
            now = time.monotonic()
            with self._lock:
                due = [n for n, t in self._touched.items() if now - t >= self.settle_s]
            for name in due:
                try:
                    _, started = self.libraries.scan(name, settle=True)
                except Exception as exc:  # noqa: BLE001 - gone, or the database is down: try again later
                    log.info("Library %s: watch could not start a scan (%s)", name, exc)
                    started = False
                    if type(exc).__name__ == "LibraryNotFoundError":
                        started = True  # deleted meanwhile: forget it
                with self._lock:
                    if started and self._touched.get(name, 0) <= now:
                        self._touched.pop(name, None)
                    elif not started:
                        self._touched[name] = now  # a scan runs: look again after it and the settle time

    def stop(self) -> None:
        """Stop watching. Idempotent."""
        self._stop.set()
        try:
            self._observer.stop()
            self._observer.join(timeout=5)
        except RuntimeError:
            pass  # never started
        if self._thread.is_alive():
            self._thread.join(timeout=5)
