"""Re-index from the stored originals: re-embed every image with another model into a new collection, then switch.

The service keeps every original in the image store (:mod:`app.indexing.store`), so changing the model needs no
access to the photo folders: :func:`reindex` walks the active collection (the *source*) with ``scan()``, reads
each row's original from the store, decodes it with the ingest pipeline
(:class:`app.indexing.pipeline.IngestPipeline`: :func:`app.imaging.prepare.prepare_bytes` in worker processes,
batched embedding, a writer thread), and upserts it into the *target* collection with the source row's metadata
unchanged (filename, format, size, ``indexed_at``, ``taken_at``; a row without ``taken_at`` gets the one its
original's EXIF holds). When every source row is in the target, the database's active-collection pointer is
switched in one atomic step (:meth:`app.vectordb.base.VectorDBHandler.activate_collection`); the source collection
stays until it is dropped.

Resumable after ``kill -9`` at any moment: a target row is written only after its embedding, in one upsert per
batch, and a re-run skips the ids the target already holds. Rows added to or deleted from the source while it runs
are caught by the check at the end (missing rows are embedded in another round, target rows whose source row is
gone are deleted), so the switch happens only when the two hold the same ids.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from app.embedders.base import Embedder
from app.errors import ImageNotFoundError, LibraryFileChangedError, ServiceError
from app.imaging.prepare import PreparedImage
from app.indexing.pipeline import IngestItem, IngestPipeline
from app.storage.base import ImageStore
from app.storage.local import LocalImageStore
from app.vectordb.base import ImageMetadata, ImageRecord, VectorDBHandler, collection_name_for

__all__ = ["NothingToReindex", "ReindexError", "ReindexFailure", "ReindexResult", "reindex"]

log = logging.getLogger(__name__)

#: rows per source ``scan()`` page and per ``existing_ids`` look-up in the target
SCAN_BATCH = 1000
#: passes over the source after the first, for rows written into it while the re-index ran
CATCH_UP_ROUNDS = 3


class ReindexError(ServiceError):
    """The re-index cannot start: no collection to re-index, a target that is the source, no model loaded."""


class NothingToReindex(ReindexError):
    """The active collection already holds the model the settings name (e.g. the re-index finished before)."""


@dataclass(frozen=True, slots=True)
class ReindexFailure:
    """A source row that could not be re-embedded: its id, its stored filename and why."""

    image_id: str
    filename: str
    reason: str


@dataclass
class ReindexResult:
    """What one :func:`reindex` run did.

    ``source``/``target`` are collection names, ``*_model`` their model ids. ``source_count``: source rows at the
    end; ``already``: rows the target held when this run started (an earlier, interrupted run wrote them);
    ``embedded``: rows this run embedded and wrote; ``removed``: target rows deleted because their source row was
    deleted meanwhile; ``skipped``: (catch-up) rows whose original was deleted since; ``failures``: rows left
    out. ``complete``: the target holds exactly the source's ids (catch-up: every source row it could).
    ``switched``: the target is now the active collection; ``dropped``: the source was dropped afterwards.
    """

    source: str
    target: str
    source_model: str
    target_model: str
    source_count: int = 0
    already: int = 0
    embedded: int = 0
    removed: int = 0
    skipped: int = 0
    failures: list[ReindexFailure] = field(default_factory=list)
    complete: bool = False
    switched: bool = False
    dropped: bool = False


class _Run:
    """One pass of re-embedding: the walk over the source, the pipeline's callbacks, the writer."""

    def __init__(
        self, source: VectorDBHandler, target: VectorDBHandler, store: ImageStore, advance, skip_gone: bool = False
    ) -> None:
        self.source, self.target, self.store = source, target, store
        self.advance = advance
        self.skip_gone = skip_gone  # a catch-up: a row whose original is gone was deleted since, not a failure
        self.gone: set[str] = set()
        self.metadata: dict[str, ImageMetadata] = {}  # rows in flight, by id: what the writer stores with them
        self.failures: dict[str, ReindexFailure] = {}
        self.embedded = 0

    def fail(self, image_id: str, reason: str, metadata: ImageMetadata | None = None) -> None:
        metadata = metadata or self.metadata.pop(image_id, None)
        self.failures[image_id] = ReindexFailure(image_id, metadata.filename if metadata else "?", reason)

    def missing(self, *, count_already: list[int] | None = None) -> Iterator[tuple[str, ImageMetadata]]:
        """Source rows the target lacks (and that did not fail), page by page; counts and advances past the others."""
        for page in self.source.scan(SCAN_BATCH):
            have = self.target.existing_ids(r.id for r in page)
            for record in page:
                if record.id in have:
                    if count_already is not None:
                        count_already[0] += 1
                        self.advance(1)
                elif record.id not in self.failures and record.id not in self.gone:
                    yield record.id, record.metadata

    def items(self, rows: Iterable[tuple[str, ImageMetadata]]) -> Iterator[IngestItem]:
        """The pipeline's input: each row's original from the store, named by its id (the key of ``metadata``)."""
        for image_id, metadata in rows:
            # The file store's decode workers read the file themselves; an object store's bytes are read here.
            path, data = None, None
            # The store of uploads inside a store that also reads photo-library files (app/library/files.py).
            local = getattr(self.store, "uploads", self.store)
            if isinstance(local, LocalImageStore):
                path = local.find(image_id)
            if (path is None and local is not self.store) or not isinstance(local, LocalImageStore):
                try:
                    data = self.store.read(image_id)
                except (ImageNotFoundError, LibraryFileChangedError):
                    pass  # a library file that changed since its scan: the scan re-reads it
            if path is None and data is None and self.skip_gone:
                self.gone.add(image_id)
                self.advance(1)
                continue
            if path is None and data is None:
                self.fail(image_id, "its original is missing from the image store (scripts/fsck.py lists it)", metadata)
                self.advance(1)
                continue
            self.metadata[image_id] = metadata
            yield IngestItem(path, image_id, data)

    def on_result(self, name: str, status: str, reason: str | None) -> None:
        if status == "failed":
            self.fail(name, reason or "unknown error")
        self.advance(1)

    def write(self, db: VectorDBHandler, store: ImageStore, items: list[PreparedImage], vectors) -> None:
        """Upsert the batch with each source row's own metadata; under the ids' locks, so a delete through the
        service cannot fall between the check that the original still exists and the row."""
        with store.locks.hold(item.name for item in items):
            records = []
            for item, vector in zip(items, vectors, strict=True):
                metadata = self.metadata.pop(item.name, None)
                if metadata is None:
                    continue
                if item.image_id != item.name:  # the stored bytes no longer hash to their id
                    self.fail(item.name, "its stored original does not match its id (damaged file)", metadata)
                elif store.head(item.name) is not None:  # else: deleted through the service meanwhile
                    if metadata.taken_at is None and item.taken_at is not None:
                        # A row from before taken_at was stored: the decode just read it (as fsck.py --backfill).
                        metadata = replace(metadata, taken_at=item.taken_at)
                    records.append(ImageRecord(item.name, np.asarray(vector, dtype=np.float32), metadata))
            db.upsert(records)
            self.embedded += len(records)


def reindex(
    db: VectorDBHandler,
    embedder: Embedder,
    store: ImageStore,
    *,
    target_name: str | None = None,
    source_name: str | None = None,
    workers: int = 1,
    batch_size: int = 32,
    max_pixels: int,
    max_bytes: int,
    allow_missing: bool = False,
    drop_old: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ReindexResult:
    """Re-embed the active collection into ``target_name`` with ``embedder``, then switch to it.

    With ``source_name`` (a collection that is not the active one), catch up instead: re-embed the rows of that
    collection that the active one lacks into the active one (which must hold ``embedder``'s model), e.g. images
    indexed through a service that still served the old collection after the switch. No switch, nothing deleted;
    rows whose original is gone (deleted since) are skipped.

    Args:
        db: a handler on the database's active collection (``create_handler(settings)``); not closed here.
        embedder: the new model. store: the image store holding every original (``IMAGE_DIR``).
        target_name: the new collection's name; ``None``: derived from the model id
            (:func:`app.vectordb.base.collection_name_for`).
        source_name: the collection to catch up from (see above); ``None``: re-index the active collection.
        workers, batch_size: decode processes and images per model call / upsert, as ``bulk_index.py --direct``.
        max_pixels, max_bytes: ``MAX_IMAGE_PIXELS`` and ``MAX_UPLOAD_MB`` in bytes.
        allow_missing: switch even when some rows failed (they are left out of the new collection).
        drop_old: drop the source collection after a successful switch.
        progress: ``progress(done, total)`` after each row (skipped, embedded or failed), total = source rows.

    Returns the :class:`ReindexResult`; ``switched`` is ``False`` when rows failed (without ``allow_missing``) or
    the source kept changing, and always for a catch-up.

    Raises:
        NothingToReindex: the active collection already holds ``embedder``'s model and no ``target_name`` was given.
        ReindexError: the source has no collection, ``target_name`` is the source itself, or (catch-up) the active
            collection holds another model.
        app.errors.CollectionMismatchError: the target exists with another model.
        app.errors.DatabaseUnavailableError: the database failed; a re-run resumes.
    """
    catch_up = source_name is not None and source_name != db.collection_name
    if catch_up:
        return _catch_up(db, embedder, store, source_name, workers, batch_size, max_pixels, max_bytes, progress)
    source = db
    info = source.collection_info()
    if info is None:
        raise ReindexError("the database has no collection yet: index images first (scripts/bulk_index.py)")
    if target_name is None and (info.model_id, info.dim) == (embedder.model_id, embedder.dim):
        raise NothingToReindex(
            f"the active collection '{source.collection_name}' already holds model '{info.model_id}': nothing to "
            "re-index (name another model with EMBEDDER / CLIP_MODEL / CLIP_PRETRAINED, or pass --target NAME to "
            "re-embed into another collection anyway)"
        )
    name = target_name or collection_name_for(embedder.model_id)
    if name == source.collection_name:
        raise ReindexError(f"the target '{name}' is the active collection itself: choose another --target")
    result = ReindexResult(source.collection_name, name, info.model_id, embedder.model_id)
    target = source.open_collection(name)
    try:
        target.ensure_collection(embedder.model_id, embedder.dim)
        run = _Run(source, target, store, _counter(progress, source.count()))
        _embed_missing(run, embedder, workers, batch_size, max_pixels, max_bytes, result)
        result.removed = _remove_extra(source, target)  # rows deleted through the service meanwhile
        result.embedded = run.embedded
        result.failures = sorted(run.failures.values(), key=lambda f: f.filename)
        result.source_count = source.count()
        late = sum(1 for _ in run.missing())
        result.complete = late == 0 and not run.failures and target.count() == result.source_count
        if result.complete or (allow_missing and late == 0):
            source.activate_collection(name)
            result.switched = True
    finally:
        target.close()
    if result.switched and drop_old:
        result.dropped = source.drop_collection(result.source)
    return result


def _counter(progress: Callable[[int, int], None] | None, total: int) -> Callable[[int], None]:
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], total)

    return advance


def _embed_missing(
    run: _Run, embedder: Embedder, workers: int, batch_size: int, max_pixels: int, max_bytes: int, result
) -> None:
    """Embed every source row the target lacks, then (up to :data:`CATCH_UP_ROUNDS` times) the rows written into
    the source meanwhile; sets ``result.already``."""
    pipeline = IngestPipeline(
        embedder,
        run.target,
        run.store,
        workers=workers,
        batch_size=batch_size,
        max_pixels=max_pixels,
        max_bytes=max_bytes,
        on_result=run.on_result,
        write=run.write,
    )
    already = [0]
    pipeline.run(run.items(run.missing(count_already=already)))
    result.already = already[0]
    for _ in range(CATCH_UP_ROUNDS):
        late = list(run.missing())
        if not late:
            break
        log.info("%d rows were added to '%s' while it was re-indexed: embedding them", len(late), result.source)
        pipeline.run(run.items(late))


def _catch_up(
    db: VectorDBHandler,
    embedder: Embedder,
    store: ImageStore,
    source_name: str,
    workers: int,
    batch_size: int,
    max_pixels: int,
    max_bytes: int,
    progress: Callable[[int, int], None] | None,
) -> ReindexResult:
    """The ``source_name`` mode of :func:`reindex`: the rows of ``source_name`` the active collection lacks."""
    active = db.collection_info()
    if active is None or (active.model_id, active.dim) != (embedder.model_id, embedder.dim):
        raise ReindexError(
            f"the active collection '{db.collection_name}' holds model "
            f"'{active.model_id if active else None}', not '{embedder.model_id}': a catch-up (--from) embeds with "
            "the active collection's model; set EMBEDDER / CLIP_MODEL / CLIP_PRETRAINED to it"
        )
    if source_name not in db.list_collections():
        raise ReindexError(f"there is no collection '{source_name}' to catch up from")
    source = db.open_collection(source_name)
    try:
        info = source.collection_info()
        result = ReindexResult(source_name, db.collection_name, info.model_id, embedder.model_id)
        run = _Run(source, db, store, _counter(progress, source.count()), skip_gone=True)
        _embed_missing(run, embedder, workers, batch_size, max_pixels, max_bytes, result)
        result.embedded, result.skipped = run.embedded, len(run.gone)
        result.failures = sorted(run.failures.values(), key=lambda f: f.filename)
        result.source_count = source.count()
        result.complete = not run.failures and not any(True for _ in run.missing())
    finally:
        source.close()
    return result


def _remove_extra(source: VectorDBHandler, target: VectorDBHandler) -> int:
    """Delete target rows whose source row is gone (deleted through the service during the run); how many."""
    extra: list[str] = []
    for page in target.scan(SCAN_BATCH):
        have = source.existing_ids(r.id for r in page)
        extra.extend(r.id for r in page if r.id not in have)
    for image_id in extra:
        target.delete(image_id)
    return len(extra)
