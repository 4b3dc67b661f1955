"""Originals on disk, addressed by content hash: ``IMAGE_DIR/ab/cd/<sha256>.<ext>``.

Two levels of 256 fan-out keep directories small at a million files. Ids are validated against
:func:`app.ids.is_valid_image_id` before any path is built, so no id can name a file outside the store.
Writers of one id (save + row, delete) serialise on :attr:`ImageStore.locks` (app/indexing/locks.py).
A write that does not fit on the disk raises :class:`app.errors.StorageFullError` and leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from app.errors import StorageFullError
from app.ids import is_valid_image_id
from app.indexing.locks import IdLocks

#: prefix of the temporary files a save writes before renaming them (what a kill -9 mid-write leaves behind)
TEMP_PREFIX = ".upload-"
# "No space left" and "quota exceeded": both mean this write cannot be stored.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class ImageStore:
    """Content-addressed file store of the uploaded originals under ``root``."""

    def __init__(self, root: Path, *, min_free_bytes: int = 0) -> None:
        """``min_free_bytes``: free space (bytes) under ``root`` below which :meth:`ensure_space` refuses writes
        (``MIN_FREE_MB``); 0 disables that check."""
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.min_free_bytes = int(min_free_bytes)
        self.locks = IdLocks(self.root)

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

    def _dir(self, image_id: str) -> Path:
        if not is_valid_image_id(image_id):
            raise ValueError("image id must be 64 lower-case hex characters")
        return self.root / image_id[:2] / image_id[2:4]

    def find(self, image_id: str) -> Path | None:
        """Path of the stored original, or ``None`` (also for ids that are not 64 hex characters)."""
        if not is_valid_image_id(image_id):
            return None
        matches = sorted(self._dir(image_id).glob(f"{image_id}.*"))
        return matches[0] if matches else None

    def save(self, image_id: str, data: bytes, extension: str) -> bool:
        """Write the original atomically (temporary file + rename); ``False`` if it was already stored.

        ``extension`` is lower-case alphanumeric without a dot (``jpg``, ``heic``); raises ``ValueError`` otherwise.
        Raises :class:`app.errors.StorageFullError` when the disk is full (the temporary file is removed) and
        ``OSError`` for other file-system failures. Callers hold ``locks.hold([image_id])``.
        """
        if not re.fullmatch(r"[a-z0-9]{1,8}", extension):
            raise ValueError(f"bad extension {extension!r}")
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

    def delete(self, image_id: str) -> bool:
        """Remove the original; ``True`` if a file was removed."""
        path = self.find(image_id)
        if path is None:
            return False
        path.unlink(missing_ok=True)
        return True
