"""Per-id write locks that hold across threads and processes: ``fcntl.flock`` on one lock file per id shard.

Index, delete and re-index of one image id must not interleave (a DELETE between an index's "save the original"
and "write the row" left a row whose original was gone), whoever runs them: the API's worker threads,
``bulk_index.py --direct`` next to a running server, ``fsck.py --repair``. The lock lives with the image store
(under ``IMAGE_DIR/.locks``), so it works the same with every vector database backend.

``flock`` locks belong to an open file description, so two ``open()`` calls in one process exclude each other just
as two processes do, and the kernel drops a lock when its holder dies (``kill -9`` included): nothing goes stale.
Ids are sharded by their first two hex characters (256 lock files); ids in one shard share a lock, which only
serialises writes that are already rare to collide. Several ids are locked in shard order, so two batches can never
deadlock.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from app.ids import is_valid_image_id

__all__ = ["LOCK_DIR_NAME", "IdLocks"]

#: directory under the store root that holds the shard lock files; the store never names an original like this
LOCK_DIR_NAME = ".locks"


class IdLocks:
    """Exclusive locks on image ids, shared by every thread and process that uses the same ``root``.

    Args:
        root: the image store's root (``IMAGE_DIR``); lock files go to ``root/.locks/<2 hex>.lock``.
    """

    def __init__(self, root: Path) -> None:
        self.directory = Path(root) / LOCK_DIR_NAME
        self.directory.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def shard(image_id: str) -> str:
        """The shard of an id: its first two hex characters. Raises ``ValueError`` for an invalid id."""
        if not is_valid_image_id(image_id):
            raise ValueError("image id must be 64 lower-case hex characters")
        return image_id[:2]

    @contextmanager
    def hold(self, image_ids: Iterable[str]) -> Iterator[None]:
        """Hold the locks of every id in ``image_ids`` (blocking) until the block exits.

        Shards are taken in sorted order, so callers never deadlock. Not re-entrant: a thread that holds an id's
        shard and asks for it again waits forever. Raises ``ValueError`` for an invalid id and ``OSError`` when
        a lock file cannot be created.
        """
        shards = sorted({self.shard(i) for i in image_ids})
        with ExitStack() as stack:
            for shard in shards:
                fd = os.open(self.directory / f"{shard}.lock", os.O_RDWR | os.O_CREAT, 0o644)
                stack.callback(os.close, fd)  # closing the descriptor releases its flock
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
