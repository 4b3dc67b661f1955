"""The stored originals as the service hands them out: a local file, a saved copy, their facts, a byte-range stream.

:class:`Originals` answers the same way whichever store holds them: the file store (app/storage/local.py) gives its
own files; an object store (app/storage/s3.py) streams, and keeps local copies only for callers that need a path
(app/storage/cache.py). Every unknown or malformed id is :class:`app.errors.ImageNotFoundError` (404), an object
store that is down :class:`app.errors.StorageUnavailableError` (503).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from app.errors import ImageNotFoundError
from app.ids import is_valid_image_id
from app.storage.base import ImageStore, ObjectInfo, ObjectStream
from app.storage.cache import LocalCopies, copy_verified
from app.storage.local import LocalImageStore

__all__ = ["Originals"]


def _not_found(image_id: str) -> ImageNotFoundError:
    return ImageNotFoundError(f"No image with id '{image_id[:80]}'.")  # cut: the id may be any string a client sent


class Originals:
    """Read access to the originals of ``store``.

    Args:
        store: where the originals live.
        copies_dir: where local copies of an object store's originals go (``DATA_DIR/cache/originals``); unused with
            the file store, created on first use.

    Thread-safe; closes nothing (the store belongs to its caller).
    """

    def __init__(self, store: ImageStore, copies_dir: Path) -> None:
        self.store = store
        # The file store's own files, where they can be used as they are (a path, a hard link): the store itself,
        # or the store of uploads inside a store that also reads photo-library files (its ``uploads``).
        uploads = getattr(store, "uploads", None)
        self._local = store if isinstance(store, LocalImageStore) else uploads
        if not isinstance(self._local, LocalImageStore):
            self._local = None
        self._copies = None if self._local is store else LocalCopies(store, copies_dir)

    def _local_file(self, image_id: str) -> Path | None:
        return None if self._local is None else self._local.find(image_id)

    def file(self, image_id: str) -> Path:
        """A local file with the original's bytes, named ``<id>.<ext>``: the file itself in the file store; a cached
        copy (:class:`app.storage.cache.LocalCopies`) of an object store's original or a library file."""
        path = self._local_file(image_id)
        if path is not None:
            return path
        if not is_valid_image_id(image_id) or self._copies is None:
            raise _not_found(image_id)
        return self._copies.path(image_id)

    def save(self, image_id: str, target: Path) -> None:
        """Put the original's bytes in the file ``target``, atomically (a reader never sees part of it).

        From the file store: a hard link when both are on one file system (no copy, even for a 50 MB TIFF), else
        one copy. From an object store: one stream from the store straight into ``target`` (chunks, never whole in
        memory; checked against the id), not through :meth:`file`'s local copy, so a download is written to disk
        once.
        """
        source = self._local_file(image_id)
        if source is None:
            if not is_valid_image_id(image_id):
                raise _not_found(image_id)
            copy_verified(self.store, image_id, target)
            return
        part = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        try:
            os.link(source, part)
        except OSError:  # another file system, or one without hard links
            shutil.copyfile(source, part)
        os.replace(part, target)

    def info(self, image_id: str) -> ObjectInfo:
        """Name (``<id>.<ext>``), size (bytes) and modification time of the original."""
        info = self.store.head(image_id)
        if info is None:
            raise _not_found(image_id)
        return info

    def open(self, image_id: str, start: int = 0, end: int | None = None) -> ObjectStream:
        """The original's bytes ``start``..``end`` (end exclusive) as a stream of chunks, never whole in memory."""
        if not is_valid_image_id(image_id):
            raise _not_found(image_id)
        return self.store.get(image_id, start, end)
