"""The decode step of bulk ingest, run in worker processes: read a file, hash it, decode it.

Kept apart from :mod:`app.ingest` on purpose: a spawned worker imports only this module, Pillow and numpy, not
torch (about 700 MB per process) nor the database drivers.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from app.decoding import decode_image
from app.errors import ImageDecodeError, ImageTooLargeError
from app.ids import image_id_for

__all__ = ["FailedItem", "PreparedImage", "fit_to_model", "prepare_bytes", "prepare_file", "worker_init"]


def worker_init(parent_pid: int) -> None:
    """ProcessPoolExecutor initializer: exit as soon as the parent is gone.

    A parent killed with SIGKILL cannot stop its pool, and an idle worker blocked on its task queue would otherwise
    live on as an orphan holding memory. Polls ``os.getppid()`` once a second from a daemon thread.
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """One decoded file, ready to embed and to store.

    Attributes:
        image_id: SHA-256 hex of ``data`` (64 lower-case characters), computed from the bytes actually read.
        name: filename to store (for bulk ingest, the path relative to the indexed folder).
        data: the original bytes, written unchanged to the image store.
        image: RGB PIL image, possibly decoded at a reduced JPEG scale (still >= the draft size on each side).
        format: decoder format name (``JPEG``, ``PNG``...); extension: storage extension without dot (``jpg``).
        width, height: size of the ORIGINAL picture in pixels, after EXIF orientation.
    """

    image_id: str
    name: str
    data: bytes
    image: Image.Image
    format: str
    extension: str
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class FailedItem:
    """A file that cannot be indexed: ``reason`` in words; ``error`` the domain error (``None`` for OS errors)."""

    name: str
    image_id: str | None
    reason: str
    error: Exception | None = None


def fit_to_model(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` px (bicubic, antialiased), then the centre ``size`` x ``size`` crop.

    Pixel for pixel what torchvision's ``Resize(size, BICUBIC)`` + ``CenterCrop(size)`` give on a PIL image (same
    output-size rounding, same crop offsets, same Pillow call), so an embedder whose transform is exactly that
    passes the result through unchanged: doing it here, in a worker process, takes that work off the thread that
    feeds the model. Returns an RGB image of ``size`` x ``size``.
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
    """Hash and decode one upload.

    Args:
        data: the raw file bytes. name: filename to store. max_pixels: ``MAX_IMAGE_PIXELS``.
        max_bytes: ``MAX_UPLOAD_MB`` in bytes. draft_size: see :func:`app.decoding.decode_image`.

    Raises:
        ImageTooLargeError: more than ``max_bytes`` bytes or ``max_pixels`` pixels.
        UnsupportedFormatError, CorruptImageError: as :func:`app.decoding.decode_image`.

    ``fit_size``: also apply :func:`fit_to_model` with this size (``None``: keep the decoded image).
    ``image_id``: the SHA-256 hex of ``data`` when the caller already computed it (saves hashing it again).
    """
    if len(data) > max_bytes:
        raise ImageTooLargeError(
            f"The upload is {len(data) / 1e6:.1f} MB; the limit is {max_bytes / 1e6:g} MB (MAX_UPLOAD_MB)."
        )
    decoded = decode_image(data, max_pixels=max_pixels, draft_size=draft_size)
    return PreparedImage(
        image_id=image_id or image_id_for(data),
        name=name,
        data=data,
        image=decoded.image if fit_size is None else fit_to_model(decoded.image, fit_size),
        format=decoded.format,
        extension=decoded.extension,
        width=decoded.width,
        height=decoded.height,
    )


def prepare_file(
    path: str, name: str, max_pixels: int, max_bytes: int, draft_size: int | None, fit_size: int | None = None
) -> PreparedImage | FailedItem:
    """Read, hash and decode one file; runs in a worker process, so it returns failures instead of raising them.

    Returns a :class:`PreparedImage`, or a :class:`FailedItem` for unreadable files and images the decoder refuses.
    """
    try:
        size = os.path.getsize(path)
        if size > max_bytes:  # refuse before reading a huge file into memory
            raise ImageTooLargeError(
                f"The file is {size / 1e6:.1f} MB; the limit is {max_bytes / 1e6:g} MB (MAX_UPLOAD_MB)."
            )
        data = Path(path).read_bytes()
    except OSError as exc:
        return FailedItem(name, None, f"{type(exc).__name__}: {exc}")
    except ImageDecodeError as exc:
        return FailedItem(name, None, f"{type(exc).__name__}: {exc}", exc)
    try:
        return prepare_bytes(
            data, name, max_pixels=max_pixels, max_bytes=max_bytes, draft_size=draft_size, fit_size=fit_size
        )
    except ImageDecodeError as exc:
        return FailedItem(name, image_id_for(data), f"{type(exc).__name__}: {exc}", exc)
