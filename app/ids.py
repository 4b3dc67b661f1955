"""The image id and the stored time format: the one owner of both rules.

* An image id is the SHA-256 of the file's bytes as 64 lower-case hex characters. Every store, backend and route
  validates ids with :func:`is_valid_image_id` before an id reaches a path, a filter expression or SQL.
* Timestamps are stored as integer microseconds since the Unix epoch, UTC (Milvus and Manticore have no
  microsecond-exact time type). A naive ``datetime`` is taken to be UTC: EXIF times carry no zone, and the
  service's own times are always timezone-aware.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

IMAGE_ID_RE = re.compile(r"[0-9a-f]{64}")
"""Exactly what :func:`image_id_for` produces; match with ``fullmatch``."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def image_id_for(data: bytes) -> str:
    """The image id of a file's bytes: SHA-256 as 64 lower-case hex characters."""
    return hashlib.sha256(data).hexdigest()


def image_id_of_file(path: str | Path) -> str:
    """The image id of a file on disk, read in chunks (the whole file is never held in memory).

    Raises ``OSError`` when the file cannot be read.
    """
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def is_valid_image_id(image_id: object) -> bool:
    """``True`` for a ``str`` of exactly 64 lower-case hex characters, the only ids ever stored."""
    return isinstance(image_id, str) and IMAGE_ID_RE.fullmatch(image_id) is not None


def as_utc(value: datetime) -> datetime:
    """``value`` as a timezone-aware UTC datetime; a naive one is taken to be UTC already."""
    if value.tzinfo is None or value.utcoffset() is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def to_epoch_us(value: datetime) -> int:
    """Microseconds since the Unix epoch (integer arithmetic, exact); a naive datetime is taken as UTC."""
    return (as_utc(value) - _EPOCH) // timedelta(microseconds=1)


def from_epoch_us(value: int) -> datetime:
    """The timezone-aware UTC datetime of a microseconds-since-epoch integer."""
    return _EPOCH + timedelta(microseconds=int(value))
