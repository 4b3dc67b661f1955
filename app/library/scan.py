"""One scan of one library: walk its roots, compare with what the database holds, and apply the difference.

::

    check roots --> walk (scandir + stat, no content) --> diff with library_files (one query, in memory)
      --> unchanged: nothing            back (offline, same size+mtime): online again, no read, no model call
      --> new or changed: hash (threads) --> bytes already known: record the path (move, rename, copy: no model
                                             call) | new bytes: ingest (app.indexing.pipeline, as bulk_index
                                             --direct: decode in processes, embed in batches, one upsert per batch)
      --> missing: offline (hidden from results, vector kept) unless mount safety says the roots cannot be trusted
      --> offline longer than LIBRARY_OFFLINE_GRACE: purged

Everything an image's visibility depends on goes through :func:`app.library.visibility.reconcile`.

Crash safety (``kill -9`` at any moment): a new image's row is written before its file's record (both under the
id's lock), so a record never points at a row that was not written; a file not recorded yet is simply read again by
the next scan, which finds its bytes known and records it with no model call. Nothing a scan does is lost by
stopping it, so "resume" is "scan again".

Mount safety: if a root is missing, unreadable, not a folder, or empty while the library knew files in it, the scan
changes nothing and says why (:attr:`ScanResult.warning`); the roots are checked again after the walk and after the
files were read, so a root that goes away mid-scan marks nothing offline either. If more than
``LIBRARY_MAX_OFFLINE_FRACTION`` of the library's online files are missing (and at least
:data:`MASS_CHECK_MIN_FILES`), new files are still indexed but nothing is marked offline, unless the scan was started
with ``force``. Folders that could not be listed never make their files offline.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat as stat_module
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from app.embedders.base import Embedder
from app.imaging.prepare import PreparedImage
from app.indexing.pipeline import IngestItem, IngestPipeline
from app.library.model import Library, display_name
from app.library.state import FileRow, LibraryState
from app.library.visibility import Reconciled, reconcile
from app.library.walk import check_roots, resolve, walk_library
from app.storage.base import ImageStore
from app.vectordb.base import DEFAULT_COLLECTION, ImageMetadata, ImageRecord, VectorDBHandler

log = logging.getLogger(__name__)

__all__ = ["MASS_CHECK_MIN_FILES", "ScanContext", "ScanResult", "ScanStopped", "scan_library"]

MASS_CHECK_MIN_FILES = 20
"""Below this many online files the mass-disappearance check is off: deleting 3 of 4 photos is a normal edit."""
_HASH_CHUNK = 256  # files hashed, then looked up, per step
_OS_ERRORS = frozenset(c.__name__ for c in (OSError, *OSError.__subclasses__()))


class ScanStopped(Exception):
    """The service is stopping: the scan ended between two steps (what was done stays done)."""


@dataclass(frozen=True)
class ScanContext:
    """What a scan works with.

    Attributes:
        db: the vector database (collection ensured for ``embedder``). uploads: the image store of uploads (its
            originals keep an image visible; its locks are the ids' write locks). state: the libraries' tables.
        embedder: the loaded model, or ``None`` (``EMBEDDER=none``: new images cannot be indexed, and say so).
        extra_excludes: ``LIBRARY_EXCLUDE``'s globs. max_offline_fraction: ``LIBRARY_MAX_OFFLINE_FRACTION``.
        offline_grace_s: ``LIBRARY_OFFLINE_GRACE`` in seconds. workers: decoding processes. batch_size: images per
        model call and upsert. hash_threads: files hashed at once. max_pixels, max_bytes: ``MAX_IMAGE_PIXELS``,
        ``MAX_UPLOAD_MB`` in bytes (a larger file is recorded as failed without being read).
    """

    db: VectorDBHandler
    uploads: ImageStore
    state: LibraryState
    embedder: Embedder | None
    extra_excludes: tuple[str, ...] = ()
    max_offline_fraction: float = 0.5
    offline_grace_s: float = 30 * 86400
    workers: int = 2
    batch_size: int = 32
    hash_threads: int = 4
    max_pixels: int = 100_000_000
    max_bytes: int = 50_000_000


@dataclass
class ScanResult:
    """What one scan found and did (``GET /libraries/{name}``'s ``last_scan``). Counts of files unless said.

    Attributes:
        files: image files found. unchanged: same size and mtime as recorded (not read). new, changed: files read
            (hashed) because they were unknown or their size or mtime differed. indexed: images embedded (model
            calls, one per new content). linked: files recorded for bytes already known (moved, renamed, copied,
            touched: no model call). back_online: offline files found again. offline: files newly marked offline.
            moved_away: missing files whose bytes are online elsewhere (forgotten). purged: offline files past
            the grace, forgotten. failed: files that cannot be indexed (``errors`` holds the first reasons).
            deferred: files that changed while being read (read again by the next scan). skipped: entries the walk
            left out for safety (symlinks leaving the root, loops, special files).
        images_restored, images_hidden, images_removed, images_renamed: what :func:`reconcile` did, in images.
        warning: why nothing was marked offline, or ``None``. unreadable_dirs: folders that could not be listed.
        seconds: wall time.
    """

    files: int = 0
    unchanged: int = 0
    new: int = 0
    changed: int = 0
    indexed: int = 0
    linked: int = 0
    back_online: int = 0
    offline: int = 0
    moved_away: int = 0
    purged: int = 0
    failed: int = 0
    deferred: int = 0
    skipped: int = 0
    images_restored: int = 0
    images_hidden: int = 0
    images_removed: int = 0
    images_renamed: int = 0
    warning: str | None = None
    unreadable_dirs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def note(self, r: Reconciled) -> None:
        """Add what a reconcile did."""
        self.images_restored += r.restored
        self.images_hidden += r.hidden
        self.images_removed += r.removed
        self.images_renamed += r.renamed

    def error(self, text: str) -> None:
        """Count a failed file and keep its reason (the first 20)."""
        self.failed += 1
        if len(self.errors) < 20:
            self.errors.append(text[:300])

    def as_dict(self) -> dict:
        """The result as plain JSON-able values."""
        return asdict(self)


Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: phases ``walk``, ``hash``, ``index``, ``offline``, ``purge``."""


def scan_library(
    ctx: ScanContext,
    library: Library,
    *,
    force: bool = False,
    settle_s: float = 0.0,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
) -> ScanResult:
    """Scan ``library`` once (see the module docstring); returns what it found and did.

    Args:
        force: mark missing files offline even past ``max_offline_fraction`` (the files really were deleted).
        settle_s: leave new or changed files modified less than this many seconds ago for the next scan
            (``deferred``): watching and periodic scans pass ``LIBRARY_SETTLE_S``, so a file still being copied
            is not indexed half-written; a scan someone asked for passes 0 (a file that changes while it is read
            is deferred either way).
        stop: set to end the scan between two steps (raises :class:`ScanStopped`).
        progress: told each phase's progress.

    Raises :class:`ScanStopped`, :class:`app.errors.DatabaseUnavailableError` and
    :class:`app.errors.StorageUnavailableError` (the caller retries later: a repeat resumes).
    """
    started = time.monotonic()
    stop = stop or threading.Event()
    report = progress or (lambda phase, done, total: None)
    result = ScanResult()
    name = library.name

    def check_stop() -> None:
        if stop.is_set():
            raise ScanStopped

    known = ctx.state.files(name)
    problem = _root_problem(library, known, force)
    if problem:
        result.warning = problem
        result.seconds = round(time.monotonic() - started, 3)
        return result
    report("walk", 0, 0)
    walk = walk_library(library, ctx.extra_excludes, progress=lambda n: report("walk", n, 0), stop=stop.is_set)
    check_stop()
    problem = _root_problem(library, known, force)  # a root that went away during the walk
    if problem:
        result.warning = problem
        result.seconds = round(time.monotonic() - started, 3)
        return result
    result.files, result.skipped = len(walk.files), walk.skipped
    result.unreadable_dirs = [display_name(name, d) + "/" for d in sorted(walk.failed_dirs)][:20]

    to_read: list[tuple[bytes, int, int]] = []
    back: list[tuple[bytes, FileRow]] = []
    settled_before_ns = time.time_ns() - int(settle_s * 1e9)
    for path, (size, mtime) in walk.files.items():
        row = known.get(path)
        if settle_s > 0 and mtime > settled_before_ns and (row is None or (row.size, row.mtime_ns) != (size, mtime)):
            result.deferred += 1  # modified moments ago: maybe still being written
        elif row is None:
            result.new += 1
            to_read.append((path, size, mtime))
        elif row.size != size or row.mtime_ns != mtime:
            result.changed += 1
            to_read.append((path, size, mtime))
        elif row.offline_since is not None:
            back.append((path, row))
        else:
            result.unchanged += 1
    missing = [
        (p, row)
        for p, row in known.items()
        if p not in walk.files and row.offline_since is None and not walk.under_failed_dir(p)
    ]

    # Offline files found again with the size and mtime they had: the same bytes, online again, nothing read.
    old_names: dict[str, str] = {}  # ids a changed file no longer holds -> the name it had
    to_index: dict[str, list[tuple[bytes, int, int]]] = {}
    if back:
        ctx.state.put_files(name, [(p, row.image_id, row.size, row.mtime_ns, row.error) for p, row in back])
        result.back_online = len(back)
        done = reconcile(ctx.db, ctx.uploads, ctx.state, [r.image_id for _, r in back if r.image_id])
        result.note(done)
        for image_id in done.unindexed or ():  # hidden in another collection (re-indexed since): embed them
            to_index[image_id] = [(p, row.size, row.mtime_ns) for p, row in back if row.image_id == image_id]
    check_stop()

    # New and changed files: hash, then record known bytes at once and ingest the rest.
    with ThreadPoolExecutor(max_workers=max(1, ctx.hash_threads), thread_name_prefix="library-hash") as pool:
        for start in range(0, len(to_read), _HASH_CHUNK):
            check_stop()
            report("hash", start, len(to_read))
            chunk = to_read[start : start + _HASH_CHUNK]
            hashed = list(pool.map(lambda item: _hash(library, item, ctx.max_bytes), chunk))
            _record_hashed(ctx, name, hashed, known, to_index, old_names, result)
    report("hash", len(to_read), len(to_read))
    check_stop()

    if to_index:
        _ingest(ctx, name, library, to_index, result, stop, report)
    if old_names:
        result.note(reconcile(ctx.db, ctx.uploads, ctx.state, old_names, old_names))
    check_stop()
    # A root that went away while the files were read (a share unmounted mid-scan): what could not be read is left
    # for the next scan, and nothing is marked offline or purged on the word of a root that cannot be trusted now.
    problem = _root_problem(library, known, force, "it went away during the scan: no file was marked offline")
    if problem:
        result.warning = problem
        log.warning("Library %s: %s", name, problem)
        result.seconds = round(time.monotonic() - started, 3)
        return result

    # Missing files: offline (vector kept, hidden from results) unless the roots cannot be trusted.
    report("offline", 0, len(missing))
    with_ids = [(p, row) for p, row in missing if row.image_id is not None]
    ctx.state.delete_files(name, [p for p, row in missing if row.image_id is None])  # nothing to keep of them
    online_known = sum(1 for row in known.values() if row.offline_since is None and row.image_id is not None)
    fraction = len(with_ids) / online_known if online_known else 0.0
    if with_ids and not force and online_known >= MASS_CHECK_MIN_FILES and fraction > ctx.max_offline_fraction:
        result.warning = (
            f"{len(with_ids)} of {online_known} files ({fraction:.0%}) are missing, more than "
            f"LIBRARY_MAX_OFFLINE_FRACTION ({ctx.max_offline_fraction:.0%}): a share that is only partly mounted "
            "looks like this, so nothing was marked offline. If they were really deleted, scan with force."
        )
        log.warning("Library %s: %s", name, result.warning)
    elif with_ids:
        ctx.state.set_offline(name, [p for p, _ in with_ids], time.time())
        names = {row.image_id: display_name(name, p) for p, row in with_ids}
        result.note(reconcile(ctx.db, ctx.uploads, ctx.state, names, names))
        # A missing file whose bytes are online elsewhere in the library was moved or renamed: forget the old path.
        elsewhere = ctx.state.paths_of(names)
        moved = [
            p
            for p, row in with_ids
            if any(q.library == name and q.offline_since is None for q in elsewhere.get(row.image_id, []))
        ]
        ctx.state.delete_files(name, moved)
        result.moved_away = len(moved)
        result.offline = len(with_ids) - len(moved)
    report("offline", len(missing), len(missing))
    check_stop()

    # Offline past the grace: forgotten, and their images with them unless held elsewhere.
    expired = ctx.state.expired(name, time.time() - ctx.offline_grace_s)
    if expired:
        report("purge", 0, len(expired))
        ctx.state.delete_files(name, [p for p, _ in expired])
        result.purged = len(expired)
        result.note(reconcile(ctx.db, ctx.uploads, ctx.state, [i for _, i in expired if i]))
    result.seconds = round(time.monotonic() - started, 3)
    return result


def purge_offline(ctx: ScanContext, library: Library, older_than_s: float = 0.0) -> tuple[int, Reconciled]:
    """Forget library files offline for more than ``older_than_s`` seconds (0: every offline file) and remove
    their images unless held elsewhere: the explicit purge. Returns ``(files forgotten, what reconcile did)``."""
    expired = ctx.state.expired(library.name, time.time() - older_than_s + 1e-3)
    ctx.state.delete_files(library.name, [p for p, _ in expired])
    return len(expired), reconcile(ctx.db, ctx.uploads, ctx.state, [i for _, i in expired if i])


def _root_problem(
    library: Library,
    known: dict[bytes, FileRow],
    force: bool = False,
    outcome: str = "nothing was changed (no file was marked offline)",
) -> str | None:
    """Why the roots cannot be trusted (missing, unreadable, or empty while files were known there), followed by
    ``outcome`` (what the scan did about it), or ``None``. With ``force``, an empty root is believed (its files
    really were deleted); a missing one never is."""
    problems = []
    prefixes = dict(library.root_prefixes())
    for p in check_roots(library):
        prefix = prefixes.get(p.root, b"")
        knew_files = any(row.offline_since is None and path.startswith(prefix) for path, row in known.items())
        if p.empty and (force or not knew_files):
            continue  # an empty root of a library that knows nothing there is just empty
        problems.append(f"root {p.root} {p.reason}")
    if not problems:
        return None
    return "; ".join(problems) + f": {outcome}."


def _hash(library: Library, item: tuple[bytes, int, int], max_bytes: int) -> tuple[bytes, str | None, int, int, str]:
    """``(path, image id or None, size, mtime_ns, status)``: status ``ok``, ``deferred`` (changed while read),
    ``gone`` (deleted, or no longer a regular file), ``failed: <reason>`` (recorded: the same file will fail
    again) or ``error: <reason>`` (not recorded: permission or I/O, worth trying again)."""
    path, size, mtime = item
    full = resolve(library, path)
    if full is None:
        return path, None, size, mtime, "gone"
    try:
        # O_NONBLOCK: a FIFO put in the file's place since the walk must not block the open, nor the read (refused
        # below: not a regular file); the flag changes nothing for a regular file.
        with open(os.open(full, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            before = os.fstat(f.fileno())
            if not stat_module.S_ISREG(before.st_mode):
                return path, None, size, mtime, "gone"  # no longer a file: the next walk skips it
            if before.st_size > max_bytes:
                reason = f"over MAX_UPLOAD_MB ({before.st_size:,} bytes)"
                return path, None, before.st_size, before.st_mtime_ns, f"failed: {reason}"
            image_id = hashlib.file_digest(f, "sha256").hexdigest()  # as app.ids.image_id_of_file
            after = os.stat(full)
    except FileNotFoundError:
        return path, None, size, mtime, "gone"
    except OSError as exc:
        return path, None, size, mtime, f"error: {type(exc).__name__}: {exc.strerror or exc}"
    if (before.st_ino, before.st_size, before.st_mtime_ns) != (after.st_ino, after.st_size, after.st_mtime_ns):
        return path, None, size, mtime, "deferred"  # still being written: the next scan (or watch) reads it
    return path, image_id, after.st_size, after.st_mtime_ns, "ok"


def _record_hashed(
    ctx: ScanContext,
    name: str,
    hashed: list[tuple[bytes, str | None, int, int, str]],
    known: dict[bytes, FileRow],
    to_index: dict[str, list[tuple[bytes, int, int]]],
    old_names: dict[str, str],
    result: ScanResult,
) -> None:
    """Record the hashed files whose bytes are already in the collection (or hidden); queue the rest to index."""
    collection = getattr(ctx.db, "collection_name", DEFAULT_COLLECTION)
    ok = [(p, i, s, m) for p, i, s, m, status in hashed if status == "ok" and i is not None]
    failed = [
        (p, None, s, m, status[len("failed: ") :]) for p, _, s, m, status in hashed if status.startswith("failed")
    ]
    for p, _, _, _, status in hashed:
        if status in ("deferred", "gone"):
            result.deferred += 1  # changed, replaced or deleted since the walk: the next scan sees what it is now
        elif status.startswith(("failed", "error")):
            result.error(f"{display_name(name, p)}: {status.split(': ', 1)[1]}")
    if failed:
        ctx.state.put_files(name, failed)
    for p, image_id, _, _ in ok:
        old = known.get(p)
        if old is not None and old.image_id and old.image_id != image_id:
            old_names[old.image_id] = display_name(name, p)
    ids = sorted({i for _, i, _, _ in ok})
    if not ids:
        return
    with ctx.uploads.locks.hold(ids):
        present = ctx.db.existing_ids(ids) | set(ctx.state.hidden(collection, ids))
        linked = [(p, i, s, m, None) for p, i, s, m in ok if i in present]
        ctx.state.put_files(name, linked)
    result.linked += len(linked)
    for p, image_id, s, m in ok:
        if image_id not in present:
            to_index.setdefault(image_id, []).append((p, s, m))
    linked_ids = {i for _, i, _, _, _ in linked}
    if linked_ids:
        result.note(reconcile(ctx.db, ctx.uploads, ctx.state, linked_ids))  # hidden ones come back


def _ingest(
    ctx: ScanContext,
    name: str,
    library: Library,
    to_index: dict[str, list[tuple[bytes, int, int]]],
    result: ScanResult,
    stop: threading.Event,
    report: Progress,
) -> None:
    """Embed and store the new images through the bulk pipeline, one file per image (its other copies are
    recorded with it). A file whose bytes at the decode are not the ones hashed (rewritten, truncated, replaced in
    between) is written nowhere and counted ``deferred``: the next scan reads it as it is then.

    The pipeline's item names are keys of our own (``"0"``, ``"1"``...), not the display names: two files may show
    alike (a non-UTF-8 name and its escaped spelling), and the pipeline stores a name cleaned of control characters
    and cut to 1,024 characters, which would then name no file here."""
    by_key: dict[str, tuple[str, str, list[tuple[bytes, int, int]]]] = {}  # key -> (shown, hashed id, files)
    items: list[IngestItem] = []
    for image_id, files in to_index.items():
        files.sort()
        path = files[0][0]
        full = resolve(library, path)
        if full is None:
            continue
        key = str(len(items))
        by_key[key] = (display_name(name, path), image_id, files)
        items.append(IngestItem(Path(os.fsdecode(full)), key))
    if ctx.embedder is None:
        for shown, _, _ in by_key.values():
            result.error(f"{shown}: no model is loaded (EMBEDDER=none), so new images cannot be indexed")
        return
    done = [0]
    report("index", 0, len(items))

    def write(db: VectorDBHandler, store: ImageStore, batch: list[PreparedImage], vectors: object) -> None:
        done[0] += len(batch)
        pairs = [(item, vector) for item, vector in zip(batch, vectors, strict=True)]  # type: ignore[call-overload]
        same = [(item, vector) for item, vector in pairs if item.image_id == by_key[item.name][1]]
        result.deferred += len(pairs) - len(same)  # changed since the hash: nothing of it is written
        if not same:
            report("index", done[0], len(items))
            return
        ids = sorted({item.image_id for item, _ in same})
        now = datetime.now(UTC)
        with ctx.uploads.locks.hold(ids):
            present = db.existing_ids(ids)
            records = [
                ImageRecord(
                    item.image_id,
                    np.asarray(vector, dtype=np.float32),
                    ImageMetadata(
                        by_key[item.name][0], item.format, item.width, item.height, len(item.data), now, item.taken_at
                    ),
                )
                for item, vector in same
                if item.image_id not in present
            ]
            if records:
                db.upsert(records)  # the rows first: a file record never points at a row that was not written
            rows = []
            for item, _ in same:
                rows.extend((p, item.image_id, s, m, None) for p, s, m in by_key[item.name][2])
            ctx.state.put_files(name, rows)
        result.indexed += len(records)
        result.linked += sum(len(by_key[item.name][2]) for item, _ in same) - len(records)
        report("index", done[0], len(items))

    def on_result(key: str, status: str, reason: str | None) -> None:
        if status != "failed":
            return
        shown, _, files = by_key[key]
        result.error(f"{shown}: {reason}")
        result.failed += len(files) - 1  # every file of these bytes failed (counts are of files)
        if reason and reason.split(":", 1)[0] in _OS_ERRORS:
            return  # unreadable now (permission, I/O): tried again by the next scan
        ctx.state.put_files(name, [(p, None, s, m, (reason or "")[:500]) for p, s, m in files])
        done[0] += 1

    def items_until_stopped():
        for item in items:
            if stop.is_set():
                return
            yield item

    pipeline = IngestPipeline(
        ctx.embedder,
        ctx.db,
        ctx.uploads,
        workers=max(1, ctx.workers),
        batch_size=max(1, ctx.batch_size),
        max_pixels=ctx.max_pixels,
        max_bytes=ctx.max_bytes,
        on_result=on_result,
        write=write,
    )
    pipeline.run(items_until_stopped())
    if stop.is_set():
        raise ScanStopped
