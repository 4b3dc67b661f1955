"""Consistency between the image store (file store or object store, app/storage/) and the database: check, repair,
and the start-up sweep.

What can disagree, and how it is fixed:

- a **row without its original** (searchable, but ``GET /image`` is 404): the row is deleted;
- an **original without a row** (invisible, what a ``kill -9`` between the two writes leaves): ``fsck.py --repair``
  indexes it again; the start-up :func:`sweep` removes it once older than ``ORPHAN_GRACE_S``, and so does the
  periodic one every ``ORPHAN_SWEEP_INTERVAL_S`` while the service runs (:func:`start_sweep`);
- a **temporary upload file** (``.upload-*``, what a ``kill -9`` during a file write leaves): removed.

:func:`backfill_taken_at` (``fsck.py --backfill``) fills ``taken_at`` into rows indexed before it was stored, from
the EXIF of their originals, without re-embedding.

Every fix re-checks its finding under the id's lock (:class:`app.locks.IdLocks`), so a check or a repair
may run next to a live server or ``bulk_index.py --direct``: a write in progress is never mistaken for a mismatch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace

from app.errors import ImageDecodeError, ImageNotFoundError
from app.ids import image_id_for
from app.imaging.exif import read_taken_at
from app.storage.base import ImageStore, StoreEntry
from app.vectordb.base import ImageRecord, VectorDBHandler

log = logging.getLogger(__name__)

__all__ = [
    "BackfillResult",
    "FsckReport",
    "StoreFile",
    "backfill_taken_at",
    "check",
    "repair",
    "start_sweep",
    "sweep",
    "walk_store",
]

_CHUNK = 1000  # ids per existing_ids() query

StoreFile = StoreEntry
"""What the store holds: an original (``image_id`` set) or a temporary upload file; ``location`` names it."""


def walk_store(store: ImageStore) -> Iterator[StoreFile]:
    """Every original and temporary upload file of the store (:meth:`app.storage.base.ImageStore.walk`)."""
    return store.walk()


@dataclass
class FsckReport:
    """Mismatches found by :func:`check` (and, after :func:`repair`, what was done about them)."""

    rows_without_original: list[str] = field(default_factory=list)
    originals_without_row: list[StoreFile] = field(default_factory=list)
    temp_files: list[StoreFile] = field(default_factory=list)
    rows: int = 0
    originals: int = 0
    library_rows: int = 0
    #: rows whose original was not in the store's listing but was there when looked up: written during the check.
    rows_written_during: int = 0
    #: originals whose row the database scan did not see but which had one afterwards: written during the check.
    originals_written_during: int = 0
    #: rows seen without their original, and originals seen without their row, whose other half and themselves
    #: were both gone when re-checked: deleted during the check (a delete removes the row and the original one
    #: after the other), so no mismatch.
    rows_deleted_during: int = 0
    originals_deleted_during: int = 0

    def count_difference(self) -> str | None:
        """Why ``rows`` and ``originals`` differ although no mismatch was found (photo-library rows, writes and
        deletes that ran during the check), for people; ``None`` when there is nothing to explain."""
        parts = []
        if self.library_rows:
            parts.append(f"{self.library_rows} rows are photo-library files, read in place: no original to check")
        if self.rows_written_during:
            parts.append(
                f"{self.rows_written_during} rows were written during the check (their originals after the store "
                "was listed)"
            )
        if self.originals_written_during:
            parts.append(
                f"{self.originals_written_during} originals were written during the check (their rows after the "
                "database was read)"
            )
        if self.rows_deleted_during or self.originals_deleted_during:
            parts.append(
                f"{self.rows_deleted_during} rows and {self.originals_deleted_during} originals were deleted during "
                "the check (seen without their other half, then both gone)"
            )
        return "; ".join(parts) or None

    @property
    def clean(self) -> bool:
        """``True`` when store and database agree."""
        return not (self.rows_without_original or self.originals_without_row or self.temp_files)

    def lines(self) -> list[str]:
        """One line per mismatch, for people."""
        out = [f"row without original: {i}" for i in self.rows_without_original]
        out += [f"original without row: {f.location}" for f in self.originals_without_row]
        out += [f"temporary upload file: {f.location}" for f in self.temp_files]
        return out


def _missing_rows(db: VectorDBHandler, ids: Sequence[str]) -> set[str]:
    missing: set[str] = set()
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        missing |= set(chunk) - db.existing_ids(chunk)
    return missing


def check(db: VectorDBHandler, store: ImageStore, library_ids: Collection[str] = ()) -> FsckReport:
    """Compare every row with every file of the store; read-only.

    ``library_ids``: image ids that photo libraries hold (:meth:`app.library.state.LibraryState.held_ids`): their
    rows have no original in the store by design, and their library's scans keep them right; they are counted in
    ``library_rows`` and not checked.

    Holds the store's ids in memory (about 100 bytes per original). With writers running, a write in progress
    can show up as a mismatch; :func:`repair` re-checks each under the id's lock. What makes ``rows`` and
    ``originals`` differ without a mismatch is counted: ``library_rows``, ``rows_written_during``,
    ``originals_written_during``, ``rows_deleted_during``, ``originals_deleted_during`` (so that ``rows`` less
    those of its side and ``rows_without_original`` equals ``originals`` less those of its side and
    ``originals_without_row``: the pairs found). Raises
    :class:`app.errors.DatabaseUnavailableError` when the database cannot be read.
    """
    report = FsckReport()
    originals: dict[str, StoreFile] = {}
    for f in walk_store(store):
        if f.image_id is None:
            report.temp_files.append(f)
        else:
            originals[f.image_id] = f
    report.originals = len(originals)
    matched = 0
    for batch in db.scan(batch_size=_CHUNK):
        for record in batch:
            report.rows += 1
            if record.id in originals:
                matched += 1
            elif record.id in library_ids:
                report.library_rows += 1
            elif store.head(record.id) is None:
                report.rows_without_original.append(record.id)
            else:
                report.rows_written_during += 1
    missing = _missing_rows(db, sorted(originals))
    report.originals_written_during = len(originals) - matched - len(missing)
    # A delete running during the check removes the row and the original one after the other: what it left half
    # seen is gone entirely when looked at again, and is no mismatch.
    gone_rows = _missing_rows(db, report.rows_without_original)
    report.rows_without_original = [i for i in report.rows_without_original if i not in gone_rows]
    still = [originals[i] for i in sorted(missing) if store.head(i) is not None]
    report.rows_deleted_during = len(gone_rows)
    report.originals_deleted_during = len(missing) - len(still)
    report.originals_without_row = still
    return report


def _remove_if_orphan(db: VectorDBHandler, store: ImageStore, f: StoreFile) -> bool:
    assert f.image_id is not None
    with store.locks.hold([f.image_id]):
        if store.head(f.image_id) is None or db.existing_ids([f.image_id]):
            return False  # gone, or a writer finished it meanwhile
        store.discard(f)
        return True


ReindexFn = Callable[[list[tuple[bytes, str]]], list[str | None]]
"""``reindex([(bytes, filename), ...])`` indexes files again and returns, per file, ``None`` or why it failed."""


def repair(db: VectorDBHandler, store: ImageStore, report: FsckReport, reindex: ReindexFn) -> list[str]:
    """Fix what :func:`check` found; returns one line per action, for people.

    Rows without an original are deleted; originals without a row are indexed again through ``reindex`` (their
    bytes must still hash to their name; one that does not, or that no longer decodes, is removed); temporary
    upload files are removed. Each finding is re-checked under its id's lock first.
    """
    actions: list[str] = []
    for image_id in report.rows_without_original:
        with store.locks.hold([image_id]):
            if store.head(image_id) is None and db.delete(image_id):
                actions.append(f"deleted row without original: {image_id}")
    todo: list[tuple[StoreFile, bytes]] = []
    for f in report.originals_without_row:
        assert f.image_id is not None
        try:
            data = store.read(f.image_id)
        except ImageNotFoundError:
            continue
        if image_id_for(data) != f.image_id:
            if _remove_if_orphan(db, store, f):
                actions.append(f"removed original whose bytes do not match its name: {f.location}")
            continue
        todo.append((f, data))
    for start in range(0, len(todo), 32):
        chunk = todo[start : start + 32]
        still = _missing_rows(db, [f.image_id for f, _ in chunk if f.image_id])
        chunk = [(f, data) for f, data in chunk if f.image_id in still]  # a writer may have finished meanwhile
        failures = reindex([(data, f.location.rsplit("/", 1)[-1]) for f, data in chunk])
        for (f, _), failure in zip(chunk, failures, strict=True):
            if failure is None:
                actions.append(f"indexed original without row again: {f.image_id}")
            elif _remove_if_orphan(db, store, f):
                actions.append(f"removed original that cannot be indexed ({failure}): {f.location}")
    for f in report.temp_files:
        store.discard(f)
        actions.append(f"removed temporary upload file: {f.location}")
    return actions


@dataclass
class SweepResult:
    """What :func:`sweep` removed."""

    temp_files: int = 0
    originals_without_row: int = 0


def _other_collections(db: VectorDBHandler) -> list[VectorDBHandler]:
    """Handlers on the database's collections other than ``db``'s (``scripts/reindex.py`` keeps the old one until
    it is dropped, and the originals are shared): an original one of them still has a row for is not an orphan."""
    try:
        names = [name for name in db.list_collections() if name != db.collection_name]
    except NotImplementedError:  # a handler that holds one collection only
        return []
    return [db.open_collection(name) for name in names]


def sweep(db: VectorDBHandler, store: ImageStore, grace_s: float, stop: threading.Event | None = None) -> SweepResult:
    """Remove temporary upload files and originals without a row that are older than ``grace_s`` seconds.

    What a ``kill -9`` during a write leaves behind. Each original is re-checked under its id's lock. An original
    with a row in another collection of the database (the one a re-index switched away from) is kept. Stops early
    when ``stop`` is set. Raises :class:`app.errors.DatabaseUnavailableError` when the database cannot be read.
    """
    others: list[VectorDBHandler] = []
    try:
        return _sweep(db, others, store, grace_s, stop)
    finally:
        for other in others:
            other.close()


def _sweep(
    db: VectorDBHandler,
    others: list[VectorDBHandler],
    store: ImageStore,
    grace_s: float,
    stop: threading.Event | None,
) -> SweepResult:
    result = SweepResult()
    cutoff = time.time() - grace_s
    candidates: list[StoreFile] = []
    opened = False

    def flush() -> None:
        nonlocal opened
        missing = _missing_rows(db, [f.image_id for f in candidates if f.image_id])
        if missing and not opened:  # only now: opening loads a collection (Milvus) and there is rarely a need
            others.extend(_other_collections(db))
            opened = True
        for other in others:
            missing -= other.existing_ids(missing) if missing else set()
        for f in candidates:
            if f.image_id in missing and _remove_if_orphan(db, store, f):
                result.originals_without_row += 1
                log.warning("Removed original without a database row: %s", f.location)
        candidates.clear()

    for f in walk_store(store):
        if stop is not None and stop.is_set():
            break
        if f.mtime > cutoff:
            continue
        if f.image_id is None:
            store.discard(f)
            result.temp_files += 1
            continue
        candidates.append(f)
        if len(candidates) >= _CHUNK:
            flush()
    flush()
    return result


def start_sweep(
    db: VectorDBHandler,
    store: ImageStore,
    grace_s: float,
    stop: threading.Event,
    *,
    interval_s: float = 0.0,
    lease: Callable[[], AbstractContextManager[bool]] | None = None,
) -> threading.Thread:
    """Run :func:`sweep` on a daemon thread (start-up must not wait for a walk of a million files), then again every
    ``interval_s`` seconds until ``stop`` is set (0: once). Logs a summary and never raises.

    Why again while the service runs: an object store that hung may complete an upload the service already gave up
    on (it answered 503), which leaves an original without a row; a conditional PUT cannot prevent that (the store
    had the whole request) and a multipart upload only narrows the window to its last request, so the sweep
    removes what is left, after the same ``grace_s``. ``lease``: a context manager factory yielding whether this
    process may sweep now (:func:`app.locks.pg_try_lease` when replicas share a database: one of them sweeps per
    interval); the start-up sweep takes it too."""

    def once(when: str) -> None:
        try:
            with lease() if lease is not None else nullcontext(True) as mine:
                if not mine:
                    log.debug("%s sweep of %s skipped: another replica holds the lease", when, store.url)
                    return
                result = sweep(db, store, grace_s, stop)
        except Exception as exc:  # noqa: BLE001 - a sweep that fails is retried at the next one (or start)
            log.error("%s sweep of %s failed: %s", when, store.url, exc)
            return
        if result.temp_files or result.originals_without_row:
            log.warning(
                "%s sweep removed %d temporary upload files and %d originals without a row",
                when,
                result.temp_files,
                result.originals_without_row,
            )

    def run() -> None:
        once("Start-up")
        while interval_s > 0 and not stop.wait(interval_s):
            once("Periodic")

    thread = threading.Thread(target=run, name="store-sweep", daemon=True)
    thread.start()
    return thread


def reindex_with(embed: Callable, prepare: Callable[[bytes, str], object], db, store) -> ReindexFn:
    """A :data:`ReindexFn` from an ``embed(images) -> vectors`` and a ``prepare(bytes, name) -> PreparedImage``
    (which raises :class:`app.errors.ImageDecodeError` for files it refuses)."""
    from app.indexing.write import write_batch

    def reindex(files: list[tuple[bytes, str]]) -> list[str | None]:
        failures: list[str | None] = []
        prepared = []
        for data, name in files:
            try:
                prepared.append(prepare(data, name))
                failures.append(None)
            except ImageDecodeError as exc:
                failures.append(str(exc))
        if prepared:
            write_batch(db, store, prepared, embed([p.image for p in prepared]))
        return failures

    return reindex


@dataclass
class BackfillResult:
    """What :func:`backfill_taken_at` did: rows read, rows given a ``taken_at``, rows whose original has no EXIF
    date (or is gone)."""

    rows: int = 0
    filled: int = 0
    without_date: int = 0


def backfill_taken_at(db: VectorDBHandler, store: ImageStore, batch_size: int = 500) -> BackfillResult:
    """Give ``taken_at`` (EXIF ``DateTimeOriginal``, :mod:`app.imaging.exif`) to every row that has none yet and
    whose original carries one; the vectors are written back unchanged (no model is loaded).

    Each row is re-read and rewritten under its id's lock, so it may run next to a live server: a row deleted or
    re-indexed meanwhile is left as it is. Only the originals' headers are read. Raises
    :class:`app.errors.DatabaseUnavailableError` from ``db``; safe to interrupt and run again.
    """
    result = BackfillResult()
    for batch in db.scan(batch_size):
        result.rows += len(batch)
        updates: list[ImageRecord] = []
        for record in batch:
            if record.metadata.taken_at is not None:
                continue
            try:
                taken_at = read_taken_at(store.read(record.id))
            except ImageNotFoundError:
                taken_at = None
            if taken_at is None:
                result.without_date += 1
                continue
            updates.append(replace(record, metadata=replace(record.metadata, taken_at=taken_at)))
        if not updates:
            continue
        with store.locks.hold(r.id for r in updates):
            current = {r.id for r in updates if (row := db.get(r.id)) is not None and row.metadata.taken_at is None}
            fresh = [r for r in updates if r.id in current]
            db.upsert(fresh)
        result.filled += len(fresh)
    return result
