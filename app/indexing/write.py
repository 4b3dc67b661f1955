"""Writing a batch of prepared images: originals first, then one upsert of their rows; all or nothing. And the
inverse, :func:`remove_image`: one image's row and original, under the same lock.

Crash safety (``kill -9`` at any moment): an original is written (atomically: temp file + rename on disk, one PUT in
an object store) BEFORE its row,
and a failed upsert deletes the originals it had just created. So the only thing a crash can leave is an original
without a row, which is never visible (search and ``/images/exists`` go by rows); re-indexing the same bytes finds
the id missing, re-embeds it, keeps the existing file and writes the row.

Races: the whole write holds the ids' locks (:class:`app.locks.IdLocks`, shared with ``DELETE`` and
``fsck.py --repair``, across processes), so an index and a delete of one id never interleave: either the row and
its original both exist afterwards, or neither does.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np

from app.errors import DatabaseTimeoutError, StorageUnavailableError
from app.imaging.prepare import PreparedImage
from app.storage.base import ImageStore
from app.vectordb.base import ImageMetadata, ImageRecord, VectorDBHandler

__all__ = ["remove_image", "write_batch"]


def write_batch(
    db: VectorDBHandler, store: ImageStore, items: Sequence[PreparedImage], vectors: np.ndarray
) -> set[str]:
    """Store a batch: every original first, then ONE upsert of all rows; all or nothing. Returns the ids written.

    Under the ids' locks, items whose row and original both exist already (another request with the same bytes got
    there first: the callers' own check ran before they waited for the lock) are left alone and not returned, so a
    caller tells truthfully which of simultaneous identical uploads indexed the image and which found it there.

    Args:
        items: prepared images with distinct ids. vectors: ``(len(items), D)`` float32 embeddings, same order.

    Raises whatever the store or the database raises (e.g. :class:`app.errors.DatabaseUnavailableError`,
    :class:`app.errors.StorageFullError` before anything is written when free space is under ``MIN_FREE_MB``, or
    when the disk fills up, :class:`app.errors.StorageUnavailableError` when the object store is down), after
    deleting the originals this call created, so no file is left without its row (an object store that went down
    meanwhile keeps them: invisible, and removed by fsck.py or the start-up sweep); except after
    :class:`app.errors.DatabaseTimeoutError`, when the rows may still be committed: the originals stay.
    Files that already existed (from an earlier, interrupted run) are kept: their rows may be the ones being written
    now. Holds the ids' locks from the first file to the upsert.
    """
    if not items:
        return set()
    store.ensure_space()
    now = datetime.now(UTC)
    with store.locks.hold(item.image_id for item in items):
        present = store.existing(db.existing_ids(item.image_id for item in items))
        pairs = [(item, vector) for item, vector in zip(items, vectors, strict=True) if item.image_id not in present]
        if not pairs:
            return set()
        # All or nothing by itself: a failed put removes the originals put_many had created.
        stored = store.put_many([(item.image_id, item.data, item.extension) for item, _ in pairs])
        created = [item.image_id for (item, _), new in zip(pairs, stored, strict=True) if new]
        try:
            records = [
                ImageRecord(
                    item.image_id,
                    np.asarray(vector, dtype=np.float32),
                    ImageMetadata(
                        filename=item.name,
                        format=item.format,
                        width=item.width,
                        height=item.height,
                        bytes=len(item.data),
                        indexed_at=now,
                        taken_at=item.taken_at,
                    ),
                )
                for item, vector in pairs
            ]
            db.upsert(records)
        except DatabaseTimeoutError:
            # The database stopped answering mid-upsert: the rows may still be committed when it resumes, and a row
            # must never point at a deleted original. An original without a row is invisible and harmless (the
            # start-up sweep and fsck remove it; re-indexing the bytes reuses it).
            raise
        except BaseException:
            for image_id in created:
                try:
                    store.delete(image_id)
                except StorageUnavailableError:
                    pass  # an original without a row is invisible; fsck.py and the start-up sweep remove it
            raise
        return {item.image_id for item, _ in pairs}


def remove_image(db: VectorDBHandler, store: ImageStore, image_id: str) -> bool:
    """Delete the row and the original of ``image_id`` under its lock; whether either existed.

    The lock keeps a delete from landing between another writer's original and its row. Raises
    :class:`app.errors.StorageUnavailableError` (an object store that is down, checked before anything changes) and
    the database's errors.
    """
    with store.locks.hold([image_id]):
        store.head(image_id)  # an object store that is down answers 503 here, before anything changes
        removed_row = db.delete(image_id)
        removed_file = store.delete(image_id)
    return removed_row or removed_file
