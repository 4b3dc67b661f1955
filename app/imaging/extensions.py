"""Which file names are images worth reading: the one list ``bulk_index.py`` and the library scans share."""

from __future__ import annotations

__all__ = ["IMAGE_EXTENSIONS", "is_image_name"]

IMAGE_EXTENSIONS = frozenset(
    "jpg jpeg jpe jfif png apng gif webp bmp dib tif tiff heic heif avif jxl jp2 j2k "
    "ppm pgm pbm pnm psd ico qoi mpo tga".split()
)
"""Lower-case extensions (no dot) of the formats the decoders read (:mod:`app.imaging.plugins`); other files are
not opened by a folder walk."""


def is_image_name(name: str) -> bool:
    """``True`` when ``name``'s extension (case-insensitive) is in :data:`IMAGE_EXTENSIONS`."""
    _, dot, extension = name.rpartition(".")
    return bool(dot) and extension.lower() in IMAGE_EXTENSIONS
