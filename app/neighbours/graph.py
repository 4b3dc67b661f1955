"""The neighbour-graph job's work: every stored image's ``k`` nearest neighbours, then (with DBA) its DBA vector.

Graph phase: walk the collection with :meth:`VectorDBHandler.scan` (every record once, vector included) and search
each vector's ``k + 1`` nearest neighbours through the backend's ANN index (:meth:`VectorDBHandler.search`, so it
works on every backend), dropping the image itself. Searches run on ``threads`` threads: each one waits on the
database most of the time. Results are committed per scan batch, so an interrupted job skips every image already
done when it resumes (the scan itself is cheap to repeat). Scores are the backend's cosine similarities; the graph
is as exact as the ANN search (HNSW recall, docs/benchmarks.md).

DBA phase: for each walked image, the αQE average of its original vector and its first ``DBA_N`` neighbours' vectors
(:func:`app.neighbours.dba.dba_vector`), read back from the graph file (the graph phase kept them as float16), so it
needs no second pass over the database. Committed per batch; resumable the same way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from app.neighbours.dba import dba_vector
from app.neighbours.store import GraphStore, JobRecord
from app.vectordb.base import ImageRecord, VectorDBHandler

log = logging.getLogger(__name__)

SCAN_BATCH = 256
"""Images per scan page and per committed batch: small enough that an interruption loses little work, large enough
that the per-batch SQLite commit is negligible."""

DBA_BATCH = 512
"""Images per DBA batch."""


class JobStopped(Exception):
    """The job was asked to stop (the service is closing); its committed work stays for the resume."""


def nearest(db: VectorDBHandler, record: ImageRecord, k: int, ef_search: int | None = None) -> list[tuple[str, float]]:
    """``[(id, cosine), ...]``: the ``k`` nearest stored images to ``record`` (itself left out), best first.

    ``ef_search``: the HNSW beam width of the search (``NEIGHBOURS_EF_SEARCH``; ``None``: the handler's).
    Raises :class:`app.errors.DatabaseUnavailableError` from ``db``.
    """
    hits = db.search(record.vector, k + 1, ef_search=ef_search)
    return [(h.id, h.score) for h in hits if h.id != record.id][:k]


def build_graph(
    db: VectorDBHandler,
    store: GraphStore,
    job: JobRecord,
    stop: threading.Event,
    threads: int,
    progress: Callable[[int], None] = lambda done: None,
    ef_search: int | None = None,
) -> None:
    """The graph phase of ``job``: store the ``job.k`` nearest neighbours of every stored image not yet done.

    Args:
        db: the collection. store: the graph file. job: the job (its ``k`` and whether it keeps vectors for DBA).
        stop: set to stop between batches (raises :class:`JobStopped`). threads: concurrent searches, ``>= 1``.
        progress: called with the job's ``done`` after each committed batch.
        ef_search: the searches' HNSW beam width (``NEIGHBOURS_EF_SEARCH``; ``None``: the handler's).

    Raises:
        JobStopped: ``stop`` was set. app.errors.DatabaseUnavailableError: from ``db``.
    """
    keep_vectors = job.dba_n is not None
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"neighbours-{job.id}") as pool:
        for batch in db.scan(SCAN_BATCH):
            if stop.is_set():
                raise JobStopped
            done = store.done_ids(job.id, [r.id for r in batch])
            todo = [r for r in batch if r.id not in done and r.vector is not None]
            if not todo:
                continue
            results = list(pool.map(lambda r: nearest(db, r, job.k, ef_search), todo))
            n_done = store.add_nodes(
                job.id,
                [
                    (r.id, r.metadata.filename, r.vector if keep_vectors else None, found)
                    for r, found in zip(todo, results, strict=True)
                ],
            )
            progress(n_done)


def build_dba(
    store: GraphStore,
    job: JobRecord,
    stop: threading.Event,
    progress: Callable[[int], None] = lambda done: None,
) -> None:
    """The DBA phase of ``job``: the DBA vector of every walked image that has none yet (``job.dba_n``,
    ``job.dba_alpha``). A neighbour that was never walked (indexed during the graph phase) is left out of the sum.

    Raises :class:`JobStopped` when ``stop`` is set.
    """
    assert job.dba_n is not None and job.dba_alpha is not None
    while True:
        if stop.is_set():
            raise JobStopped
        batch = store.nodes_without_dba(job.id, DBA_BATCH)
        if not batch:
            return
        ids = [i for i, _ in batch]
        neighbours = store.neighbours_of(job.id, ids, job.dba_n)
        vectors = store.vectors(job.id, {dst for found in neighbours.values() for dst, _ in found})
        out = {}
        for image_id, vector in batch:
            found = [(dst, s) for dst, s in neighbours[image_id] if dst in vectors]
            x = np.stack([vectors[d] for d, _ in found]) if found else np.zeros((0, vector.shape[0]), np.float32)
            out[image_id] = dba_vector(vector, x, np.array([s for _, s in found]), job.dba_n, job.dba_alpha)
        store.set_dba(job.id, out)
        progress(len(out))
