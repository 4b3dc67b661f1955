"""When a photo was taken: the EXIF ``DateTimeOriginal`` of the original file, read at ingest and stored as
``taken_at`` (:class:`app.vectordb.base.ImageMetadata`), for the ``taken_after`` / ``taken_before`` filters.

EXIF 2.32 (CIPA DC-008-2019), section 4.6.5: ``DateTimeOriginal`` (tag 0x9003) is ``"YYYY:MM:DD HH:MM:SS"`` in the
camera's local time, with the fraction of a second in ``SubSecTimeOriginal`` (0x9291) and, since EXIF 2.31, the
offset from UTC in ``OffsetTimeOriginal`` (0x9011, ``"+HH:MM"``). Without an offset the time is taken to be UTC
(the project's rule for naive times, :mod:`app.ids`): most cameras record none, and a fixed rule keeps the filter
predictable. Unknown parts ("0000:00:00 00:00:00", blanks) and anything unparsable mean "no date" rather than an
error: a broken EXIF block must never stop an image from being indexed.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta, timezone
from io import BytesIO

from PIL import ExifTags, Image

from app.imaging.plugins import register_plugins

log = logging.getLogger(__name__)

__all__ = ["parse_exif_datetime", "read_taken_at", "taken_at_of"]

_DATETIME_ORIGINAL = 0x9003
_OFFSET_TIME_ORIGINAL = 0x9011
_SUBSEC_TIME_ORIGINAL = 0x9291
_DATETIME_RE = re.compile(r"\s*(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_OFFSET_RE = re.compile(r"\s*([+-])(\d{2}):(\d{2})\s*$")


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    return value.strip("\x00 ") if isinstance(value, str) else None


def parse_exif_datetime(value: object, offset: object = None, subsec: object = None) -> datetime | None:
    """The timezone-aware datetime of EXIF ``DateTimeOriginal``-style fields, or ``None``.

    Args:
        value: ``"YYYY:MM:DD HH:MM:SS"`` (``str`` or ``bytes``; a ``T`` or trailing characters are tolerated).
        offset: ``OffsetTimeOriginal`` ``"+HH:MM"``/``"-HH:MM"``; missing or malformed: UTC.
        subsec: ``SubSecTimeOriginal``, the digits of the fraction of a second (``"123"`` = 0.123 s).

    Returns:
        The time converted to UTC, or ``None`` for a missing, zeroed or impossible date.
    """
    text = _text(value)
    match = _DATETIME_RE.match(text) if text else None
    if match is None:
        return None
    try:
        naive = datetime(*(int(g) for g in match.groups()))
    except ValueError:  # "0000:00:00 00:00:00" and other impossible dates
        return None
    fraction = _text(subsec)
    if fraction and fraction.isdigit():
        naive += timedelta(microseconds=int(fraction[:6].ljust(6, "0")))
    zone = UTC
    offset_text = _text(offset)
    offset_match = _OFFSET_RE.match(offset_text) if offset_text else None
    if offset_match is not None:
        sign, hours, minutes = offset_match.groups()
        delta = timedelta(hours=int(hours), minutes=int(minutes))
        if delta < timedelta(hours=24):
            zone = timezone(-delta if sign == "-" else delta)
    return naive.replace(tzinfo=zone).astimezone(UTC)


def taken_at_of(image: Image.Image) -> datetime | None:
    """The ``DateTimeOriginal`` of an opened image (any format whose EXIF Pillow or pillow-heif reads), or
    ``None``; never raises."""
    try:
        exif = image.getexif()
        ifd = exif.get_ifd(ExifTags.IFD.Exif)
        return parse_exif_datetime(
            ifd.get(_DATETIME_ORIGINAL), ifd.get(_OFFSET_TIME_ORIGINAL), ifd.get(_SUBSEC_TIME_ORIGINAL)
        )
    except Exception as exc:  # any broken EXIF block: the image is still indexed, without a date
        log.debug("ignoring unreadable EXIF date: %r", exc)
        return None


def read_taken_at(data: bytes) -> datetime | None:
    """:func:`taken_at_of` for a file's bytes, reading the header only (no pixels are decoded); ``None`` for any
    file Pillow cannot open. Used by ``fsck --backfill`` on stored originals."""
    register_plugins()
    try:
        with Image.open(BytesIO(data)) as image:
            return taken_at_of(image)
    except Exception as exc:
        log.debug("no EXIF date: %r", exc)
        return None
