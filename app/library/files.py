"""Library files as originals: read in place, never copied, through the image store contract.

:class:`LibraryFiles` answers :meth:`head` and :meth:`get` for the ids that library files hold: it finds an online
file of the id (:meth:`app.library.state.LibraryState.paths_of`), resolves it inside its root
(:func:`app.library.walk.resolve`: no ``..``, no symlink out of the root) and checks that its size and
modification time are still the ones recorded when it was hashed. A file that changed answers
:class:`app.errors.LibraryFileChangedError` (409) rather than bytes that may not be the image's any more; the next
scan of its library reads it again. A file the service may not read (permission denied, an I/O error on a network
mount) answers :class:`app.errors.StorageUnavailableError` (503, logged) naming the file and the reason, not a 404
for an image that search results show. It stores nothing: ``put``/``delete`` are not its job.

:class:`WithLibraries` is the store the service hands out: the image store of uploads first, then the library files,
so ``GET /image/{id}`` (Range and ETag included), thumbnails, the web UI's large view and download, ``reindex.py``
and ``fsck.py`` read a library photo exactly as an uploaded one. Every write goes to the store of uploads.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator

from app.config import Settings
from app.errors import ImageNotFoundError, LibraryFileChangedError, StorageUnavailableError
from app.ids import is_valid_image_id
from app.library.model import Library, display_name
from app.library.state import LibraryState, PathRow
from app.library.walk import resolve
from app.storage.base import CHUNK_BYTES, ImageStore, ObjectInfo, ObjectStream, StoreEntry, StoreHealth

log = logging.getLogger(__name__)

__all__ = ["LibraryFiles", "WithLibraries", "library_view"]

_EXTENSION = re.compile(rb"\.([A-Za-z0-9]{1,8})$")
_LIBRARIES_TTL_S = 5.0  # how long the roots of the libraries are cached: they change only on create/delete


class LibraryFiles:
    """Read access to library files by image id. Thread-safe; closes nothing.

    Args:
        state: ``() -> LibraryState | None``: the libraries' state, ``None`` while no library was ever created (then
            nothing is looked up).
        on_changed: called with ``(library, path)`` when a file no longer matches its record (logged, counted).
    """

    def __init__(
        self,
        state: Callable[[], LibraryState | None],
        on_changed: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self._state = state
        self._on_changed = on_changed
        self._libraries: dict[str, Library] = {}
        self._libraries_at = 0.0

    def _library(self, state: LibraryState, name: str) -> Library | None:
        if name not in self._libraries or time.monotonic() - self._libraries_at > _LIBRARIES_TTL_S:
            self._libraries = {row.name: row.library for row in state.libraries()}
            self._libraries_at = time.monotonic()
        return self._libraries.get(name)

    def locate(self, image_id: str) -> tuple[bytes, os.stat_result, PathRow] | None:
        """``(absolute path, stat, the file's record)`` of an online file of ``image_id`` that still matches its
        record, or ``None`` when no library file holds it (or every one is missing). Raises
        :class:`LibraryFileChangedError` when the only files found changed since they were hashed, and
        :class:`StorageUnavailableError` when the others cannot be reached (permission denied, I/O error)."""
        state = self._state()
        if state is None or not is_valid_image_id(image_id):
            return None
        changed: PathRow | None = None
        unreadable: tuple[PathRow, OSError] | None = None
        for row in state.paths_of([image_id]).get(image_id, []):
            if row.offline_since is not None:
                continue
            library = self._library(state, row.library)
            full = None if library is None else resolve(library, row.path)
            if full is None:
                continue
            try:
                st = os.stat(full)
            except (FileNotFoundError, NotADirectoryError):
                continue  # missing: the next scan marks it offline
            except OSError as exc:
                unreadable = unreadable or (row, exc)
                continue
            if st.st_size == row.size and st.st_mtime_ns == row.mtime_ns:
                return full, st, row
            changed = row
        if changed is not None:
            if self._on_changed is not None:
                self._on_changed(changed.library, changed.path)
            raise LibraryFileChangedError(
                f"{display_name(changed.library, changed.path)} changed since it was indexed; the next scan of "
                f"library '{changed.library}' reads it again."
            )
        if unreadable is not None:
            _unreadable(*unreadable)
        return None

    def existing(self, image_ids: Iterable[str]) -> set[str]:
        """Which of ``image_ids`` have an online file that still matches its record (one query for the batch, then
        a ``stat`` per file); a file that changed does not count (its next scan reads it again)."""
        ids = [i for i in set(image_ids) if is_valid_image_id(i)]
        if not ids:
            return set()  # asks nothing: an upload of new bytes never waits on the libraries' database
        state = self._state()
        if state is None:
            return set()
        found = set()
        for image_id, rows in state.paths_of(ids).items():
            for row in rows:
                library = None if row.offline_since is not None else self._library(state, row.library)
                full = None if library is None else resolve(library, row.path)
                try:
                    st = None if full is None else os.stat(full)
                except OSError:
                    continue
                if st is not None and st.st_size == row.size and st.st_mtime_ns == row.mtime_ns:
                    found.add(image_id)
                    break
        return found

    def head(self, image_id: str) -> ObjectInfo | None:
        """The file's :class:`ObjectInfo` (``<id>.<extension of the file>``, size, mtime), or ``None``."""
        found = self.locate(image_id)
        if found is None:
            return None
        _, st, row = found
        return _info(image_id, st, row)

    def get(self, image_id: str, start: int = 0, end: int | None = None) -> ObjectStream:
        """Bytes ``start``..``end`` (end exclusive) of the file, streamed in chunks. The open file is checked
        against the record once more (``fstat``), so a file replaced between the lookup and the open is refused.
        Raises :class:`ImageNotFoundError`, :class:`LibraryFileChangedError` and :class:`StorageUnavailableError`
        (a file the service may not read)."""
        found = self.locate(image_id)
        if found is None:
            raise ImageNotFoundError(f"No image with id '{image_id[:80]}'.")
        full, st, row = found
        info = _info(image_id, st, row)
        try:
            f = open(full, "rb")  # noqa: SIM115 - closed by the stream
        except (FileNotFoundError, NotADirectoryError):
            raise ImageNotFoundError(f"No image with id '{image_id[:80]}'.") from None
        except OSError as exc:
            _unreadable(row, exc)
        fst = os.fstat(f.fileno())
        if fst.st_size != row.size or fst.st_mtime_ns != row.mtime_ns:
            f.close()
            raise LibraryFileChangedError(
                f"{display_name(row.library, row.path)} changed since it was indexed; the next scan reads it again."
            )
        stop = st.st_size if end is None else min(end, st.st_size)

        def chunks() -> Iterator[bytes]:
            f.seek(start)
            left = stop - start
            while left > 0:
                chunk = f.read(min(CHUNK_BYTES, left))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk

        return ObjectStream(info, start, stop, chunks(), close=f.close)


def _unreadable(row: PathRow, exc: OSError) -> None:
    """Log and raise :class:`StorageUnavailableError` for a library file the service may not read."""
    shown = display_name(row.library, row.path)
    reason = exc.strerror or type(exc).__name__
    log.warning("Library %s: %s cannot be read (%s)", row.library, shown, reason)
    raise StorageUnavailableError(
        f"The library file {shown} cannot be read ({reason}): check its permissions and the mount of library "
        f"'{row.library}'."
    )


def _info(image_id: str, st: os.stat_result, row: PathRow) -> ObjectInfo:
    match = _EXTENSION.search(row.path)
    extension = match.group(1).decode().lower() if match else "bin"
    return ObjectInfo(image_id, f"{image_id}.{extension}", st.st_size, st.st_mtime)


class WithLibraries(ImageStore):
    """The store of uploads, with library files readable beside its originals (see the module docstring).

    Writes, walks and health are the store of uploads' (``uploads``); reads try it first, then ``files``.
    """

    def __init__(self, uploads: ImageStore, files: LibraryFiles) -> None:
        self.uploads = uploads
        self.files = files
        self.locks = uploads.locks
        self.url = uploads.url

    def put(self, image_id: str, data: bytes, extension: str) -> bool:
        """:meth:`ImageStore.put` on the store of uploads."""
        return self.uploads.put(image_id, data, extension)

    def put_many(self, items):  # noqa: ANN001, ANN201 - ImageStore.put_many's signature
        """:meth:`ImageStore.put_many` on the store of uploads."""
        return self.uploads.put_many(items)

    def head(self, image_id: str) -> ObjectInfo | None:
        """The uploaded original's info, else a library file's, else ``None``."""
        return self.uploads.head(image_id) or self.files.head(image_id)

    def get(self, image_id: str, start: int = 0, end: int | None = None) -> ObjectStream:
        """The uploaded original, else a library file (:meth:`LibraryFiles.get`)."""
        if self.uploads.head(image_id) is not None:
            return self.uploads.get(image_id, start, end)
        return self.files.get(image_id, start, end)

    def existing(self, image_ids: Iterable[str]) -> set[str]:
        """Which ids have an uploaded original or a matching online library file."""
        ids = set(image_ids)
        found = self.uploads.existing(ids)
        return found | self.files.existing(ids - found)

    def delete(self, image_id: str) -> bool:
        """Remove the uploaded original (library files are never touched)."""
        return self.uploads.delete(image_id)

    def walk(self) -> Iterator[StoreEntry]:
        """The store of uploads' originals and temporary files."""
        return self.uploads.walk()

    def discard(self, entry: StoreEntry) -> None:
        """:meth:`ImageStore.discard` on the store of uploads."""
        self.uploads.discard(entry)

    def ensure_space(self) -> None:
        """:meth:`ImageStore.ensure_space` of the store of uploads."""
        self.uploads.ensure_space()

    def health(self) -> StoreHealth:
        """The store of uploads' health (the libraries report theirs in ``/health``'s ``libraries``)."""
        return self.uploads.health()

    def close(self) -> None:
        """Close the store of uploads."""
        self.uploads.close()


def library_view(settings: Settings, uploads: ImageStore) -> tuple[ImageStore, LibraryState | None]:
    """For the maintenance tools (``fsck.py``, ``reindex.py``): the store of uploads with the library files beside
    it, and the libraries' state (close it after use), when libraries may exist; else ``(uploads, None)``. Raises
    :class:`app.errors.DatabaseUnavailableError` (the state's PostgreSQL)."""
    if not LibraryState.exists(settings):
        return uploads, None
    state = LibraryState.open(settings)
    return WithLibraries(uploads, LibraryFiles(lambda: state)), state
