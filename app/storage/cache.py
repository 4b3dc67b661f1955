"""Local copies of originals kept in an object store, for callers that need a file path (the web UI's file
components): ``DATA_DIR/cache/originals/<id>.<ext>``, at most :data:`MAX_FILES` files, oldest used dropped first.

A cache, local to each replica by design: anything in it may be deleted at any time. Each copy is streamed from the
store into a temporary file, checked against its id (SHA-256) and renamed into place, so a reader never sees part
of one (:func:`copy_verified`, which the web UI's "Download original" also uses to write its file straight from the
store).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path

from app.errors import ImageNotFoundError
from app.storage.base import ImageStore

__all__ = ["MAX_FILES", "LocalCopies", "copy_verified"]

#: most originals kept (a few hundred MB at most with typical photos)
MAX_FILES = 256


def copy_verified(store: ImageStore, image_id: str, target: Path) -> None:
    """Stream the original of ``image_id`` from ``store`` into the file ``target`` (in chunks: never whole in
    memory), checked against its id (SHA-256), through a temporary file in ``target``'s folder renamed into place:
    a reader never sees part of it, and a failure leaves nothing.

    Raises :class:`app.errors.ImageNotFoundError` (also when the stored bytes do not match the id) and
    :class:`app.errors.StorageUnavailableError`.
    """
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".copy-")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in store.get(image_id):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != image_id:
            raise ImageNotFoundError(f"The stored original of '{image_id}' does not match its id.")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


class LocalCopies:
    """Files of originals from ``store`` under ``directory`` (created on first use)."""

    def __init__(self, store: ImageStore, directory: Path, max_files: int = MAX_FILES) -> None:
        self.store, self.directory, self.max_files = store, Path(directory), max_files
        self._lock = threading.Lock()

    def path(self, image_id: str) -> Path:
        """A local file with the original's bytes, named ``<id>.<ext>``.

        Raises :class:`app.errors.ImageNotFoundError` (also when the stored bytes do not match the id) and
        :class:`app.errors.StorageUnavailableError`.
        """
        info = self.store.head(image_id)
        if info is None:
            raise ImageNotFoundError(f"No image with id '{image_id[:80]}'.")
        target = self.directory / info.name
        if target.exists():
            os.utime(target)  # recently used: kept longest
            return target
        self.directory.mkdir(parents=True, exist_ok=True)
        copy_verified(self.store, image_id, target)
        self._evict()
        return target

    def _evict(self) -> None:
        with self._lock:
            files = [p for p in self.directory.iterdir() if not p.name.startswith(".")]
            if len(files) <= self.max_files:
                return
            files.sort(key=lambda p: p.stat().st_mtime if p.exists() else 0)
            for old in files[: len(files) - self.max_files]:
                old.unlink(missing_ok=True)
