"""From an upload's bytes to what the model and the store need: the upload-size rule, draft decoding, the model fit.

This module owns the upload-size limit (``MAX_UPLOAD_MB``): every path that accepts bytes (REST routes, the UI,
the service, bulk ingest workers) checks it with :func:`check_upload_size`. It imports Pillow and numpy only, so a
spawned ingest worker stays small.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from PIL import Image

from app.errors import ImageTooLargeError
from app.ids import image_id_for
from app.imaging.decode import decode_image

__all__ = ["PreparedImage", "check_upload_size", "clean_filename", "fit_to_model", "prepare_bytes"]

MAX_FILENAME_CHARS = 1024


def clean_filename(name: str | None) -> str:
    """The client's file name made safe to store: NUL and control characters dropped, at most 1024 characters,
    ``"upload"`` when nothing is left. It is metadata only and never used as a path."""
    name = "".join(ch for ch in (name or "") if ch.isprintable())
    return name[:MAX_FILENAME_CHARS] or "upload"


def check_upload_size(size: int, max_bytes: int, *, what: str = "upload") -> None:
    """Refuse ``size`` bytes over ``max_bytes`` (``MAX_UPLOAD_MB`` in bytes).

    Raises:
        ImageTooLargeError: ``size > max_bytes``; the message names both sizes in MB and the setting.
    """
    if size > max_bytes:
        raise ImageTooLargeError(
            f"The {what} is {size / 1e6:.1f} MB; the limit is {max_bytes / 1e6:g} MB (MAX_UPLOAD_MB)."
        )


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """One decoded upload, ready to embed and to store.

    Attributes:
        image_id: SHA-256 hex of ``data`` (:func:`app.ids.image_id_for`), computed from the bytes actually read.
        name: filename to store (for bulk ingest, the path relative to the indexed folder).
        data: the original bytes, written unchanged to the image store.
        image: RGB PIL image, possibly decoded at a reduced JPEG scale (still >= the draft size on each side) and,
            when a fit size was given, already fitted to the model (:func:`fit_to_model`).
        format: decoder format name (``JPEG``, ``PNG``...); extension: storage extension without dot (``jpg``).
        width, height: size of the ORIGINAL picture in pixels, after EXIF orientation.
        taken_at: EXIF ``DateTimeOriginal`` (timezone-aware UTC), ``None`` without one.
    """

    image_id: str
    name: str
    data: bytes
    image: Image.Image
    format: str
    extension: str
    width: int
    height: int
    taken_at: datetime | None = None


def fit_to_model(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` px (bicubic, antialiased), then the centre ``size`` x ``size`` crop.

    Pixel for pixel what torchvision's ``Resize(size, BICUBIC)`` + ``CenterCrop(size)`` give on a PIL image (same
    output-size rounding, same crop offsets, same Pillow call), so an embedder whose transform is exactly that
    (:attr:`app.embedders.base.Embedder.fit_size`) passes the result through unchanged: doing it in a worker process
    takes that work off the thread that feeds the model. Returns an RGB image of ``size`` x ``size``.
    """
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)  # torchvision truncates too
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def prepare_bytes(
    data: bytes,
    name: str,
    *,
    max_pixels: int,
    max_bytes: int,
    draft_size: int | None,
    fit_size: int | None = None,
    image_id: str | None = None,
) -> PreparedImage:
    """Check, hash and decode one upload.

    Args:
        data: the raw file bytes. name: filename to store (cleaned by :func:`clean_filename`).
        max_pixels: ``MAX_IMAGE_PIXELS``.
        max_bytes: ``MAX_UPLOAD_MB`` in bytes. draft_size: see :func:`app.imaging.decode.decode_image`.
        fit_size: also apply :func:`fit_to_model` with this size (``None``: keep the decoded image).
        image_id: the SHA-256 hex of ``data`` when the caller already computed it (saves hashing it again).

    Raises:
        ImageTooLargeError: more than ``max_bytes`` bytes or ``max_pixels`` pixels.
        UnsupportedFormatError, CorruptImageError: as :func:`app.imaging.decode.decode_image`.
    """
    check_upload_size(len(data), max_bytes)
    decoded = decode_image(data, max_pixels=max_pixels, draft_size=draft_size)
    return PreparedImage(
        image_id=image_id or image_id_for(data),
        name=clean_filename(name),
        data=data,
        image=decoded.image if fit_size is None else fit_to_model(decoded.image, fit_size),
        format=decoded.format,
        extension=decoded.extension,
        width=decoded.width,
        height=decoded.height,
        taken_at=decoded.taken_at,
    )
