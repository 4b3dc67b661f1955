"""Move a collection's originals from one image store to another (disk to bucket, bucket to disk, bucket to
bucket): resumable and hash-verified. The logic of ``scripts/move_originals.py`` (app/cli/move_originals.py).

For each original the source's :meth:`~app.storage.base.ImageStore.walk` lists, under the id's write lock of the
source store (so a writer of the service using the source never interleaves with it):

1. if the target already holds the id (``head``), nothing is copied; with ``verify`` its bytes are read back and
   must hash (SHA-256) to the id, else the bad copy is replaced;
2. otherwise the source's bytes are read, must hash to the id (a source original that does not is reported and
   left alone), and are written to the target (an atomic put by content hash); what landed is read back and must
   hash to the id, else it is deleted again and reported;
3. only then, with ``delete_source``, the source's original is removed (always after a hash check of the
   target's copy, also when it was already there).

Resuming is the same call again: puts are atomic (a temporary file and a rename on disk, one ``PUT`` on S3), so
after a ``kill -9`` an original is either wholly in the target (step 1 finds it: not copied again) or not at all; a
temporary file a killed write left on disk is removed by ``fsck.py --repair`` or the service's start-up sweep.
Nothing is ever removed from the source before its copy was verified.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Literal

from app.errors import ImageNotFoundError
from app.ids import image_id_for
from app.storage.base import ImageStore, StoreEntry

__all__ = ["MoveResult", "Outcome", "move_originals", "sha256_of"]

Outcome = Literal["copied", "present", "replaced", "vanished", "failed"]
"""What happened to one original: copied into the target; already there; a bad copy in the target replaced; gone
from the source meanwhile (deleted through the service); not moved (see the failure's reason)."""


@dataclass
class MoveResult:
    """Counts of one run (originals), bytes copied, and ``failures``: ``(source location, reason)`` pairs of the
    originals left where they were."""

    copied: int = 0
    present: int = 0
    replaced: int = 0
    vanished: int = 0
    deleted: int = 0
    bytes_copied: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def done(self) -> int:
        """Originals looked at so far."""
        return self.copied + self.present + self.replaced + self.vanished + len(self.failures)


def sha256_of(store: ImageStore, image_id: str) -> str:
    """SHA-256 (64 lower-case hex) of the bytes ``store`` holds for ``image_id``, read as a stream (never whole in
    memory). Raises :class:`app.errors.ImageNotFoundError` and :class:`app.errors.StorageUnavailableError`."""
    digest = hashlib.sha256()
    for chunk in store.get(image_id):
        digest.update(chunk)
    return digest.hexdigest()


def _extension(name: str) -> str:
    return name.rsplit(".", 1)[1]


def _move_one(
    source: ImageStore, target: ImageStore, entry: StoreEntry, *, delete_source: bool, verify: bool
) -> tuple[Outcome, int, bool, str | None]:
    """``(outcome, bytes copied, source deleted, failure reason)`` for one original; holds its source lock."""
    image_id = entry.image_id
    assert image_id is not None
    outcome: Outcome = "copied"
    with source.locks.hold([image_id]):
        if source.head(image_id) is None:
            return "vanished", 0, False, None
        if target.head(image_id) is not None:
            if not (verify or delete_source) or sha256_of(target, image_id) == image_id:
                if delete_source:
                    source.delete(image_id)
                return "present", 0, delete_source, None
            target.delete(image_id)  # a copy that is not what its name says: replace it
            outcome = "replaced"
        try:
            stream = source.get(image_id)
        except ImageNotFoundError:
            return "vanished", 0, False, None
        data = stream.read()
        if image_id_for(data) != image_id:
            return "failed", 0, False, "the source's bytes do not hash to their name (left where it is)"
        target.ensure_space()
        target.put(image_id, data, _extension(stream.info.name))
        if sha256_of(target, image_id) != image_id:
            target.delete(image_id)
            return "failed", 0, False, "the copy read back from the target differs (removed from the target)"
        if delete_source:
            source.delete(image_id)
        return outcome, len(data), delete_source, None


def move_originals(
    source: ImageStore,
    target: ImageStore,
    *,
    delete_source: bool = False,
    verify: bool = False,
    workers: int = 4,
    progress: Callable[[MoveResult, str, Outcome], None] | None = None,
) -> MoveResult:
    """Copy every original of ``source`` that ``target`` lacks, verified by SHA-256; see the module docstring.

    Args:
        source, target: two different stores (their ``url`` differs).
        delete_source: remove each original from ``source`` once the target's copy hashed to its id.
        verify: also hash-check originals the target already held (without it, and without ``delete_source``,
            ``head`` finding one is enough: puts are atomic).
        workers: originals moved at once (threads; the work is I/O).
        progress: called after each original with the running result, the id and its outcome (from the worker
            threads, one at a time).

    Returns the :class:`MoveResult`. Raises ``ValueError`` when source and target are the same store, and the
    first :class:`app.errors.StorageUnavailableError` / :class:`app.errors.StorageFullError` of either store
    (the run stops; originals already moved stay moved, a re-run continues).
    """
    if source.url == target.url:
        raise ValueError(f"source and target are the same store ({source.url})")
    if workers < 1:
        raise ValueError("workers must be >= 1")
    result = MoveResult()
    lock = threading.Lock()

    def one(entry: StoreEntry) -> None:
        outcome, size, deleted, reason = _move_one(source, target, entry, delete_source=delete_source, verify=verify)
        with lock:
            if outcome == "failed":
                result.failures.append((entry.location, reason or "failed"))
            else:
                setattr(result, outcome, getattr(result, outcome) + 1)
            result.bytes_copied += size
            result.deleted += int(deleted)
            if progress is not None:
                progress(result, entry.image_id or "", outcome)

    in_flight: set[Future] = set()
    with ThreadPoolExecutor(workers, thread_name_prefix="move") as pool:
        try:
            for entry in source.walk():
                if entry.image_id is None:
                    continue  # a temporary upload file: not an original
                in_flight.add(pool.submit(one, entry))
                if len(in_flight) >= workers * 4:  # bounded: a million originals are not queued at once
                    finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                    for f in finished:
                        f.result()
            for f in in_flight:
                f.result()
        except BaseException:
            for f in in_flight:
                f.cancel()
            raise
    return result
