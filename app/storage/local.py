"""Originals on disk, addressed by content hash: ``IMAGE_DIR/ab/cd/<sha256>.<ext>`` (today's layout, unchanged).

Two levels of 256 fan-out keep directories small at a million files. Ids are validated before any path is built,
so no id can name a file outside the store. A write that does not fit on the disk raises
:class:`app.errors.StorageFullError` and leaves nothing behind. The per-id write locks live under
``IMAGE_DIR/.locks`` (app/locks.py).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from app.errors import ImageNotFoundError, StorageFullError
from app.ids import is_valid_image_id
from app.locks import IdLocks
from app.storage.base import (
    CHUNK_BYTES,
    ORIGINAL_NAME,
    ImageStore,
    ObjectInfo,
    ObjectStream,
    StoreEntry,
    StoreHealth,
    check_extension,
    check_id,
)

__all__ = ["TEMP_PREFIX", "LocalImageStore"]

#: prefix of the temporary files a save writes before renaming them (what a kill -9 mid-write leaves behind)
TEMP_PREFIX = ".upload-"
# "No space left" and "quota exceeded": both mean this write cannot be stored.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_HEX2 = re.compile(r"[0-9a-f]{2}")


class LocalImageStore(ImageStore):
    """Content-addressed file store of the uploaded originals under ``root``."""

    def __init__(self, root: Path, *, min_free_bytes: int = 0) -> None:
        """``min_free_bytes``: free space (bytes) under ``root`` below which :meth:`ensure_space` refuses writes
        (``MIN_FREE_MB``); 0 disables that check."""
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.min_free_bytes = int(min_free_bytes)
        self.locks = IdLocks(self.root)
        self.url = self.root.as_uri()

    # --- space ----------------------------------------------------------------------------------------------
    def free_bytes(self) -> int:
        """Bytes free under the root for an unprivileged writer (``statvfs`` ``f_bavail``)."""
        return shutil.disk_usage(self.root).free

    def space_low(self) -> bool:
        """Whether free space is under ``min_free_bytes`` (always ``False`` when that is 0)."""
        return self.min_free_bytes > 0 and self.free_bytes() < self.min_free_bytes

    def ensure_space(self) -> None:
        """Refuse a write before it starts when free space is under ``min_free_bytes`` (``MIN_FREE_MB``).

        Raises :class:`app.errors.StorageFullError` naming the free space and the setting.
        """
        if self.space_low():
            raise StorageFullError(
                f"The image store is nearly full: {self.free_bytes() / 1e6:.0f} MB free, under MIN_FREE_MB "
                f"({self.min_free_bytes / 1e6:g} MB). Free some space or raise the volume's size."
            )

    def health(self) -> StoreHealth:
        """``low`` under ``MIN_FREE_MB`` (or when the volume is gone), else ``ok``."""
        try:
            if self.space_low():
                return StoreHealth(
                    "low",
                    f"{self.free_bytes() / 1e6:.0f} MB free under IMAGE_DIR, below MIN_FREE_MB "
                    f"({self.min_free_bytes / 1e6:g} MB); writes answer 507",
                )
        except OSError as exc:  # the volume itself is gone
            return StoreHealth("low", str(exc))
        return StoreHealth("ok")

    # --- originals ------------------------------------------------------------------------------------------
    def _dir(self, image_id: str) -> Path:
        check_id(image_id)
        return self.root / image_id[:2] / image_id[2:4]

    def find(self, image_id: str) -> Path | None:
        """Path of the stored original, or ``None`` (also for ids that are not 64 hex characters)."""
        if not is_valid_image_id(image_id):
            return None
        matches = sorted(self._dir(image_id).glob(f"{image_id}.*"))
        return matches[0] if matches else None

    def save(self, image_id: str, data: bytes, extension: str) -> bool:
        """Same as :meth:`put` (the name this store had before the contract)."""
        return self.put(image_id, data, extension)

    def put(self, image_id: str, data: bytes, extension: str) -> bool:
        """Write the original atomically (temporary file + rename); ``False`` if it was already stored.

        Raises ``ValueError`` for a malformed id or extension, :class:`app.errors.StorageFullError` when the disk is
        full (the temporary file is removed) and ``OSError`` for other file-system failures. Callers hold
        ``locks.hold([image_id])``.
        """
        check_extension(extension)
        if self.find(image_id) is not None:
            return False
        directory = self._dir(image_id)
        tmp: str | None = None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, directory / f"{image_id}.{extension}")
        except BaseException as exc:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
                raise StorageFullError(
                    f"The image store is full: {len(data) / 1e6:.1f} MB could not be written under {self.root}; "
                    "nothing was stored."
                ) from exc
            raise
        return True

    def head(self, image_id: str) -> ObjectInfo | None:
        """Name, size (bytes) and modification time of the stored original, or ``None``."""
        path = self.find(image_id)
        if path is None:
            return None
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(image_id, path.name, st.st_size, st.st_mtime)

    def get(self, image_id: str, start: int = 0, end: int | None = None) -> ObjectStream:
        """Open the original (bytes ``start``..``end``, end exclusive) as a stream of chunks read from the file.

        Raises :class:`app.errors.ImageNotFoundError`."""
        path = self.find(image_id)
        try:
            if path is None:
                raise FileNotFoundError
            f = path.open("rb")
        except FileNotFoundError:
            raise ImageNotFoundError(f"No image with id '{image_id[:80]}'.") from None
        st = os.fstat(f.fileno())
        info = ObjectInfo(image_id, path.name, st.st_size, st.st_mtime)
        stop = info.size if end is None else min(end, info.size)
        f.seek(start)

        def chunks() -> Iterator[bytes]:
            left = stop - start
            while left > 0:
                chunk = f.read(min(CHUNK_BYTES, left))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk

        return ObjectStream(info, start, stop, chunks(), f.close)

    def read(self, image_id: str) -> bytes:
        """The whole original. Raises :class:`app.errors.ImageNotFoundError`."""
        path = self.find(image_id)
        try:
            if path is None:
                raise FileNotFoundError
            return path.read_bytes()
        except FileNotFoundError:
            raise ImageNotFoundError(f"No image with id '{image_id[:80]}'.") from None

    def delete(self, image_id: str) -> bool:
        """Remove the original; ``True`` if a file was removed."""
        path = self.find(image_id)
        if path is None:
            return False
        path.unlink(missing_ok=True)
        return True

    # --- fsck -----------------------------------------------------------------------------------------------
    def walk(self) -> Iterator[StoreEntry]:
        """Every original and temporary upload file under ``root/ab/cd/``; other files are not the store's."""
        for d1 in sorted(self.root.iterdir()):
            if not (_HEX2.fullmatch(d1.name) and d1.is_dir()):
                continue
            for d2 in sorted(d1.iterdir()):
                if not (_HEX2.fullmatch(d2.name) and d2.is_dir()):
                    continue
                for entry in sorted(os.scandir(d2), key=lambda e: e.name):
                    try:
                        mtime = entry.stat(follow_symlinks=False).st_mtime
                    except FileNotFoundError:
                        continue  # removed while we looked
                    if entry.name.startswith(TEMP_PREFIX):
                        yield StoreEntry(entry.path, None, mtime)
                    elif (m := ORIGINAL_NAME.fullmatch(entry.name)) and m.group(1).startswith(d1.name + d2.name):
                        yield StoreEntry(entry.path, m.group(1), mtime)

    def discard(self, entry: StoreEntry) -> None:
        """Remove a file :meth:`walk` found (only one inside the store's root)."""
        path = Path(entry.location)
        if path.resolve().parent.parent.parent != self.root:
            raise ValueError(f"{entry.location} is not in the store")
        path.unlink(missing_ok=True)
