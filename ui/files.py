"""Files the web UI hands to Gradio: thumbnails, large views, query previews and originals to download.

Gradio serves only files inside its upload folder (``GRADIO_TEMP_DIR``, by default ``<tmp>/gradio``) or in
``allowed_paths``; a returned file elsewhere is first copied into it. Passing the image store as an
``allowed_paths`` entry would expose every original by path to anyone who can reach the UI (gradio-app/gradio#9766),
so every file is written into :func:`ui_folder` instead, under names derived from the image id (the SHA-256 of the
original's bytes): a file never goes stale, and a second search reuses it without decoding the original again.
Gradio's ``delete_cache`` (set in :func:`ui.app.build_ui`) removes them when they age.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from gradio.utils import get_upload_folder

if TYPE_CHECKING:
    from app.service import SearchService

#: Longest side of a results thumbnail, pixels: sharp on a 2x screen at the gallery's column width.
THUMBNAIL_SIZE = 384
#: Longest side of the JPEG shown in the large view for formats browsers cannot show (HEIC, TIFF...), pixels.
LARGE_SIZE = 1600
#: Longest side of the query photo's preview, pixels.
PREVIEW_SIZE = 512

_FOLDER = "image-search"


def ui_folder(*parts: str) -> Path:
    """``<Gradio upload folder>/image-search/<parts...>``, created; Gradio serves what is in it."""
    path = Path(get_upload_folder(), _FOLDER, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_once(path: Path, data: bytes) -> str:
    # Write then rename: a concurrent request never serves a half-written file.
    part = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    part.write_bytes(data)
    os.replace(part, path)
    return str(path)


def thumbnail_file(service: SearchService, image_id: str, size: int = THUMBNAIL_SIZE) -> str:
    """Path of a JPEG of a stored image, at most ``size`` x ``size`` pixels (``SearchService.thumbnail``), made on
    first use. Raises :class:`app.errors.ImageNotFoundError` and the decode errors."""
    path = ui_folder("thumbs") / f"{image_id}-{size}.jpg"
    if path.is_file():
        return str(path)
    return _write_once(path, service.thumbnail(image_id, size))


def preview_file(service: SearchService, data: bytes) -> str:
    """Path of a JPEG preview of uploaded bytes (``SearchService.preview``: any decodable format, EXIF orientation
    applied), so a HEIC or TIFF query shows in the browser. Raises the decode errors."""
    from app.ids import image_id_for

    path = ui_folder("previews") / f"{image_id_for(data)}-{PREVIEW_SIZE}.jpg"
    if path.is_file():
        return str(path)
    return _write_once(path, service.preview(data, PREVIEW_SIZE))


def original_file(service: SearchService, image_id: str, filename: str) -> str:
    """Path of the stored original under its original base name (``trips/IMG_0001.HEIC`` -> ``IMG_0001.HEIC``),
    for "Download original": the browser saves a file under the name its URL ends with.

    Written once (``SearchService.save_original``): a hard link to the file store's file when both are on one file
    system (no copy, even for a 50 MB TIFF), else one copy; from an object store, one stream from the store into
    this file. Raises :class:`app.errors.ImageNotFoundError` and :class:`app.errors.StorageUnavailableError`.
    """
    name = Path(filename.replace("\\", "/")).name or service.original_info(image_id).name
    if name.startswith("."):
        name = "_" + name[1:]  # Gradio refuses to serve dot files
    target = ui_folder("originals", image_id) / name
    if not target.is_file():
        service.save_original(image_id, target)
    return str(target)
