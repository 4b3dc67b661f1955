"""Originals on disk, addressed by content hash: ``IMAGE_DIR/ab/cd/<sha256>.<ext>``.

Two levels of 256 fan-out keep directories small at a million files. Ids are validated against
:func:`app.ids.is_valid_image_id` before any path is built, so no id can name a file outside the store.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from app.ids import is_valid_image_id


class ImageStore:
    """Content-addressed file store of the uploaded originals under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

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
        """
        if not re.fullmatch(r"[a-z0-9]{1,8}", extension):
            raise ValueError(f"bad extension {extension!r}")
        if self.find(image_id) is not None:
            return False
        directory = self._dir(image_id)
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, directory / f"{image_id}.{extension}")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return True

    def delete(self, image_id: str) -> bool:
        """Remove the original; ``True`` if a file was removed."""
        path = self.find(image_id)
        if path is None:
            return False
        path.unlink(missing_ok=True)
        return True
