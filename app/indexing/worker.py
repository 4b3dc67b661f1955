"""The decode step of bulk ingest, run in worker processes: read a file, hash it, decode it.

A spawned worker imports only this module, :mod:`app.imaging` (Pillow, numpy) and :mod:`app.ids`: not torch, ONNX
Runtime nor the database drivers.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from dataclasses import dataclass

from app.errors import ImageDecodeError
from app.ids import image_id_for
from app.imaging.prepare import PreparedImage, check_upload_size, prepare_bytes

__all__ = ["FailedItem", "prepare_data", "prepare_file", "worker_init"]


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
class FailedItem:
    """A file that cannot be indexed: ``reason`` in words; ``error`` the domain error (``None`` for OS errors)."""

    name: str
    image_id: str | None
    reason: str
    error: Exception | None = None


def prepare_file(
    path: str, name: str, max_pixels: int, max_bytes: int, draft_size: int | None, fit_size: int | None = None
) -> PreparedImage | FailedItem:
    """Read, hash and decode one file; runs in a worker process, so it returns failures instead of raising them.

    Returns a :class:`app.imaging.prepare.PreparedImage`, or a :class:`FailedItem` for unreadable files and images
    the decoder refuses (the upload-size rule is checked on the file size before the file is read).
    """
    try:
        # O_NONBLOCK and the S_ISREG check: a FIFO (or a device) put in the file's place since it was listed must
        # not block the worker for ever, in the open or in the read; the flag changes nothing for a regular file.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            check_upload_size(st.st_size, max_bytes, what="file")
            data = f.read()
    except OSError as exc:
        return FailedItem(name, None, f"{type(exc).__name__}: {exc}")
    except ImageDecodeError as exc:
        return FailedItem(name, None, f"{type(exc).__name__}: {exc}", exc)
    return prepare_data(data, name, max_pixels, max_bytes, draft_size, fit_size)


def prepare_data(
    data: bytes, name: str, max_pixels: int, max_bytes: int, draft_size: int | None, fit_size: int | None = None
) -> PreparedImage | FailedItem:
    """Hash and decode bytes already read (an original from an object store); failures returned, as
    :func:`prepare_file`."""
    try:
        return prepare_bytes(
            data, name, max_pixels=max_pixels, max_bytes=max_bytes, draft_size=draft_size, fit_size=fit_size
        )
    except ImageDecodeError as exc:
        return FailedItem(name, image_id_for(data), f"{type(exc).__name__}: {exc}", exc)
