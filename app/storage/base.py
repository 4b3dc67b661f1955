"""The contract of an image store: originals addressed by content hash (SHA-256 of their bytes, 64 hex).

Every store keeps an original under ``ab/cd/<sha256>.<ext>`` (two levels of 256 fan-out) and meets the same rules,
checked for each by ``tests/test_image_store_contract.py``:

- :meth:`ImageStore.put` is idempotent: the same id twice stores once (``False`` the second time); a write is
  atomic (no reader ever sees part of an original);
- :meth:`ImageStore.get` streams an original, whole or a byte range, without holding it in memory;
- :meth:`ImageStore.head` and :meth:`ImageStore.delete` answer ``None`` / ``False`` for what is not stored;
- :meth:`ImageStore.walk` lists every original (and leftover temporary file) for ``fsck.py`` and the sweep;
- a store that has no room raises :class:`app.errors.StorageFullError` (HTTP 507) and keeps nothing of the write;
  one that cannot be reached or refuses raises :class:`app.errors.StorageUnavailableError` (HTTP 503 +
  ``Retry-After``) within a bounded time. No error message holds credentials.

Writers of one id (save + row, delete) serialise on :attr:`ImageStore.locks` (app/locks.py).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from app.ids import is_valid_image_id
from app.locks import IdLocks

__all__ = ["CHUNK_BYTES", "ImageStore", "ObjectInfo", "ObjectStream", "StoreEntry", "StoreHealth", "key_for"]

#: bytes per chunk of a streamed original
CHUNK_BYTES = 256 * 1024
_EXTENSION = re.compile(r"[a-z0-9]{1,8}")
ORIGINAL_NAME = re.compile(r"([0-9a-f]{64})\.([a-z0-9]{1,8})")


def check_id(image_id: str) -> None:
    """Raise ``ValueError`` unless ``image_id`` is 64 lower-case hex characters (so no id names a path outside)."""
    if not is_valid_image_id(image_id):
        raise ValueError("image id must be 64 lower-case hex characters")


def check_extension(extension: str) -> None:
    """Raise ``ValueError`` unless ``extension`` is 1-8 lower-case alphanumerics without a dot (``jpg``, ``heic``)."""
    if not _EXTENSION.fullmatch(extension):
        raise ValueError(f"bad extension {extension!r}")


def shard_dir(image_id: str) -> str:
    """``ab/cd``: the folder (or key prefix) of an id's original."""
    return f"{image_id[:2]}/{image_id[2:4]}"


def key_for(image_id: str, extension: str) -> str:
    """``ab/cd/<id>.<ext>``: where an original lives, relative to the store's root or prefix."""
    return f"{shard_dir(image_id)}/{image_id}.{extension}"


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """A stored original: ``name`` is ``<id>.<ext>``, ``size`` in bytes, ``mtime`` seconds since the epoch."""

    image_id: str
    name: str
    size: int
    mtime: float


@dataclass(frozen=True, slots=True)
class StoreEntry:
    """What :meth:`ImageStore.walk` finds: an original (``image_id`` set) or a temporary upload file (``None``).

    ``location``: where it is, for people and for :meth:`ImageStore.discard` (a path, or ``s3://bucket/key``).
    ``mtime``: seconds since the epoch.
    """

    location: str
    image_id: str | None
    mtime: float


@dataclass(frozen=True, slots=True)
class StoreHealth:
    """``state``: ``ok``; ``low`` (under ``MIN_FREE_MB``: writes answer 507); ``degraded`` (the object store does
    not answer: writes answer 503, reads of originals fail, searches work). ``problem``: why, in words, or ``None``."""

    state: Literal["ok", "low", "degraded"]
    problem: str | None = None


class ObjectStream:
    """An open original, or a byte range of it: iterate for its chunks (``bytes``, at most :data:`CHUNK_BYTES`
    each); :meth:`close` releases it (also done when the iteration ends).

    ``info``: the whole original's :class:`ObjectInfo`; ``start``/``end``: the byte range streamed, end exclusive.
    """

    def __init__(self, info: ObjectInfo, start: int, end: int, chunks: Iterator[bytes], close=None) -> None:  # noqa: ANN001
        self.info, self.start, self.end = info, start, end
        self._chunks = chunks
        self._close = close

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._chunks
        finally:
            self.close()

    def read(self) -> bytes:
        """Every byte of the range at once."""
        return b"".join(self)

    def close(self) -> None:
        """Release the file or connection; idempotent."""
        close, self._close = self._close, None
        if close is not None:
            close()


class ImageStore(ABC):
    """Content-addressed store of the uploaded originals (see the module docstring for the rules).

    Thread-safe. ``locks``: the per-id write locks every writer of the store holds; ``url``: where the store is,
    for logs and messages (never with credentials).
    """

    locks: IdLocks
    url: str

    @abstractmethod
    def put(self, image_id: str, data: bytes, extension: str) -> bool:
        """Store ``data`` as ``<id>.<extension>`` atomically; ``False`` if the id was already stored under this
        extension (nothing is written then). Callers pass the extension the bytes decode to, so one id has one
        extension (the file store also refuses the id under another one; the object store does not look, to save a
        request, and :meth:`delete` removes every copy).

        Raises ``ValueError`` for a malformed id or extension, :class:`app.errors.StorageFullError` (nothing kept)
        and :class:`app.errors.StorageUnavailableError`. Callers hold ``locks.hold([image_id])``.
        """

    @abstractmethod
    def head(self, image_id: str) -> ObjectInfo | None:
        """The stored original's :class:`ObjectInfo`, or ``None`` (also for a malformed id).

        Raises :class:`app.errors.StorageUnavailableError`."""

    @abstractmethod
    def get(self, image_id: str, start: int = 0, end: int | None = None) -> ObjectStream:
        """Open the original (bytes ``start`` to ``end``, end exclusive; ``None``: to the end) as a stream.

        The range must lie within the object (the caller checks it against :meth:`head`'s size). Raises
        :class:`app.errors.ImageNotFoundError` when it is not stored and
        :class:`app.errors.StorageUnavailableError`.
        """

    @abstractmethod
    def delete(self, image_id: str) -> bool:
        """Remove the original; ``True`` if one was removed. Raises :class:`app.errors.StorageUnavailableError`."""

    @abstractmethod
    def walk(self) -> Iterator[StoreEntry]:
        """Every original and temporary upload file of the store, in key order; other files are not the store's.

        Raises :class:`app.errors.StorageUnavailableError`."""

    @abstractmethod
    def discard(self, entry: StoreEntry) -> None:
        """Remove what :meth:`walk` found (missing is fine). Callers re-check an original under its id's lock."""

    def put_many(self, items: Sequence[tuple[str, bytes, str]]) -> list[bool]:
        """:meth:`put` of each ``(image_id, data, extension)``; one ``bool`` per item, in order. All or nothing: on
        an error, the originals this call created are deleted again (as far as the store still answers) and the
        first error is raised. Callers hold the ids' locks."""
        done: list[tuple[str, bool]] = []
        try:
            for image_id, data, extension in items:
                done.append((image_id, self.put(image_id, data, extension)))
        except BaseException:
            self._undo([i for i, created in done if created])
            raise
        return [created for _, created in done]

    def _undo(self, image_ids: Iterable[str]) -> None:
        """Delete what a failed :meth:`put_many` created; a store that no longer answers keeps them (invisible
        without rows; fsck.py and the start-up sweep remove them)."""
        from app.errors import StorageUnavailableError

        for image_id in image_ids:
            try:
                self.delete(image_id)
            except StorageUnavailableError:
                pass

    def read(self, image_id: str) -> bytes:
        """The whole original. Raises :class:`app.errors.ImageNotFoundError` and
        :class:`app.errors.StorageUnavailableError`."""
        return self.get(image_id).read()

    def existing(self, image_ids: Iterable[str]) -> set[str]:
        """Which of ``image_ids`` are stored (malformed ids never are)."""
        return {i for i in image_ids if self.head(i) is not None}

    def ensure_space(self) -> None:  # noqa: B027 - optional hook
        """Refuse a write before it starts: :class:`app.errors.StorageFullError` under ``MIN_FREE_MB``,
        :class:`app.errors.StorageUnavailableError` while the store is known to be down. Default: no check."""

    @abstractmethod
    def health(self) -> StoreHealth:
        """Whether writes can go ahead; never raises, waits at most about a second."""

    def close(self) -> None:
        """Release clients and connections (the locks' too, when they have any)."""
        close = getattr(self.locks, "close", None)
        if close is not None:
            close()
