"""Whether an image held by library files is searchable, hidden or gone: the one rule, applied after every change.

For each image id (:func:`reconcile`), from what the library files and the image store say:

- **visible** when some library file of it is online, or the image store holds an uploaded original: its row is in
  the vector database (a hidden one is put back from ``library_hidden``, with no model call);
- **hidden** when every library file of it is offline and no original is stored: its vector and metadata move to
  ``library_hidden`` and its row leaves the vector database, so no search, ``/images/exists`` or
  ``/similar`` sees it, on every backend alike;
- **gone** when no library file holds it any more (purged, the library deleted, the file replaced by other bytes)
  and no original is stored: its row and hidden vector are deleted.

Every step is idempotent and ordered so that a ``kill -9`` between two writes leaves something the next call
repairs: a vector is copied to ``library_hidden`` before its row is deleted, and a row is written back before the
hidden copy is dropped. It runs under the ids' write locks (:attr:`app.storage.base.ImageStore.locks`), shared with
uploads, ``DELETE`` and the other scans, so an upload of the same bytes never interleaves with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from app.library.model import display_name
from app.library.state import LibraryState
from app.storage.base import ImageStore
from app.vectordb.base import DEFAULT_COLLECTION, ImageMetadata, ImageRecord, VectorDBHandler

__all__ = ["Reconciled", "metadata_from_json", "metadata_to_json", "reconcile"]

_LOCK_CHUNK = 200  # ids whose locks one step holds at once


@dataclass
class Reconciled:
    """What :func:`reconcile` changed, in images: ``restored`` (back from hidden), ``hidden``, ``removed`` (gone
    for good), ``renamed`` (the row's filename moved to another file of the same bytes) and ``unindexed``
    (visible by the rule but with neither a row nor a hidden vector: a rescan reads them again)."""

    restored: int = 0
    hidden: int = 0
    removed: int = 0
    renamed: int = 0
    unindexed: list[str] | None = None

    def add(self, other: Reconciled) -> None:
        """Add ``other``'s counts to these."""
        self.restored += other.restored
        self.hidden += other.hidden
        self.removed += other.removed
        self.renamed += other.renamed
        if other.unindexed:
            self.unindexed = [*(self.unindexed or []), *other.unindexed]


def metadata_to_json(m: ImageMetadata) -> str:
    """``m`` as JSON text (datetimes in ISO 8601 with their offset)."""
    return json.dumps(
        {
            "filename": m.filename,
            "format": m.format,
            "width": m.width,
            "height": m.height,
            "bytes": m.bytes,
            "indexed_at": m.indexed_at.isoformat(),
            "taken_at": None if m.taken_at is None else m.taken_at.isoformat(),
        }
    )


def metadata_from_json(text: str) -> ImageMetadata:
    """The inverse of :func:`metadata_to_json`."""
    d = json.loads(text)
    return ImageMetadata(
        filename=d["filename"],
        format=d["format"],
        width=d["width"],
        height=d["height"],
        bytes=d["bytes"],
        indexed_at=datetime.fromisoformat(d["indexed_at"]),
        taken_at=None if d["taken_at"] is None else datetime.fromisoformat(d["taken_at"]),
    )


def reconcile(
    db: VectorDBHandler,
    store: ImageStore,
    state: LibraryState,
    image_ids: Iterable[str],
    old_names: Mapping[str, str] | None = None,
) -> Reconciled:
    """Make each of ``image_ids`` visible, hidden or gone by the module's rule; returns what changed.

    Args:
        store: the image store of uploads (not the library view): an id it holds stays visible.
        old_names: ``image_id -> display name`` of a file that went offline or away: a visible row whose
            ``filename`` is that name is renamed to the id's first online file (results show where it is now).

    Raises :class:`app.errors.DatabaseUnavailableError` and :class:`app.errors.StorageUnavailableError`; what was
    done before stays done, and a repeat finishes the rest.
    """
    ids = sorted(set(image_ids))
    old_names = old_names or {}
    collection = getattr(db, "collection_name", DEFAULT_COLLECTION)
    total = Reconciled()
    for start in range(0, len(ids), _LOCK_CHUNK):
        chunk = ids[start : start + _LOCK_CHUNK]
        with store.locks.hold(chunk):
            total.add(_reconcile_chunk(db, store, state, collection, chunk, old_names))
    return total


def _reconcile_chunk(
    db: VectorDBHandler,
    store: ImageStore,
    state: LibraryState,
    collection: str,
    ids: list[str],
    old_names: Mapping[str, str],
) -> Reconciled:
    done = Reconciled()
    paths = state.paths_of(ids)
    rows = db.existing_ids(ids)
    hidden = state.hidden(collection, ids)
    restore: list[ImageRecord] = []
    drop_hidden: list[str] = []
    to_hide: list[tuple[str, bytes, str]] = []
    renamed: list[ImageRecord] = []
    unindexed: list[str] = []
    for image_id in ids:
        files = paths.get(image_id, [])
        online = [p for p in files if p.offline_since is None]
        visible = bool(online) or store.head(image_id) is not None
        if visible:
            if image_id in hidden and image_id not in rows:
                vector, meta = hidden[image_id]
                metadata = metadata_from_json(meta)
                if online and metadata.filename not in {display_name(p.library, p.path) for p in online}:
                    metadata = _renamed(metadata, display_name(online[0].library, online[0].path))
                restore.append(ImageRecord(image_id, np.frombuffer(vector, dtype=np.float32).copy(), metadata))
            elif image_id in hidden:
                drop_hidden.append(image_id)
            elif image_id not in rows:
                unindexed.append(image_id)
            elif online and image_id in old_names:
                record = db.get(image_id)
                if record is not None and record.metadata.filename == old_names[image_id]:
                    new_name = display_name(online[0].library, online[0].path)
                    if new_name != record.metadata.filename:
                        renamed.append(ImageRecord(image_id, record.vector, _renamed(record.metadata, new_name)))
        elif files:  # every file offline: hide (copy first, then delete the row)
            if image_id in rows:
                record = db.get(image_id)
                if record is not None and record.vector is not None:
                    to_hide.append(
                        (
                            image_id,
                            np.asarray(record.vector, dtype=np.float32).tobytes(),
                            metadata_to_json(record.metadata),
                        )
                    )
        else:  # gone: no file holds it and no original is stored
            if image_id in rows:
                db.delete(image_id)
                done.removed += 1
            if image_id in hidden:
                drop_hidden.append(image_id)
                if image_id not in rows:
                    done.removed += 1
    if renamed:  # one upsert (one transaction and commit) for the chunk, not one per moved file (bench/library.py)
        db.upsert(renamed)
        done.renamed = len(renamed)
    if restore:
        db.upsert(restore)
        state.unhide(collection, [r.id for r in restore])
        done.restored = len(restore)
    if to_hide:
        state.hide(collection, to_hide)
        for image_id, _, _ in to_hide:
            db.delete(image_id)
        done.hidden = len(to_hide)
    if drop_hidden:
        state.unhide(collection, drop_hidden)
    done.unindexed = unindexed or None
    return done


def _renamed(m: ImageMetadata, filename: str) -> ImageMetadata:
    return ImageMetadata(
        filename=filename,
        format=m.format,
        width=m.width,
        height=m.height,
        bytes=m.bytes,
        indexed_at=m.indexed_at,
        taken_at=m.taken_at,
    )
