"""The neighbour-graph job runner: one job at a time, on a background thread the service owns.

:class:`NeighbourJobs` is created by :class:`app.service.SearchService`; ``POST /jobs/neighbours`` calls
:meth:`NeighbourJobs.start`, ``GET /jobs/{id}`` :meth:`NeighbourJobs.job`, ``GET /duplicates``
:meth:`NeighbourJobs.duplicates`, and searches with ``DBA=true`` re-rank through :meth:`NeighbourJobs.dba_rerank`.
:meth:`NeighbourJobs.close` (from ``SearchService.close``) stops the thread between two batches; the job is then
``interrupted`` and resumes, skipping the images already done, when the service starts again (a ``kill -9`` leaves it
``running`` in the file, which the next start reads the same way).

Where the graph lives (``NEIGHBOURS_STORE``): with a ``DATABASE_URL`` (``Settings.shared_state_url``, with every
``VECTOR_DB``), in PostgreSQL tables every replica shares (:class:`app.neighbours.pgstore.PgGraphStore`): one
replica builds at a time, holding a lease (an advisory lock) that a killed replica loses; every replica serves the
same groups and shows the same job progress, and a job whose builder died shows ``interrupted`` everywhere until a
``POST /jobs/neighbours`` on any replica resumes it. Otherwise in a SQLite file under ``DATA_DIR``
(:class:`app.neighbours.store.GraphStore`), one machine.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from app.config import Settings
from app.errors import DatabaseUnavailableError, GraphNotBuiltError, InvalidParameterError, JobNotFoundError
from app.neighbours.duplicates import DuplicateGroup, duplicate_groups
from app.neighbours.graph import JobStopped, build_dba, build_graph
from app.neighbours.store import FILENAME, GraphStore, JobRecord, utc_now
from app.search.dba import DbaRerank
from app.vectordb.base import DEFAULT_COLLECTION, VectorDBHandler

if TYPE_CHECKING:
    from app.neighbours.pgstore import PgGraphStore

log = logging.getLogger(__name__)

KIND = "neighbours"
MAX_DUPLICATES_LIMIT = 1000
"""Most groups one ``GET /duplicates`` page returns."""


@dataclass(frozen=True, slots=True)
class DuplicatePage:
    """One page of near-duplicate groups (``GET /duplicates``).

    Attributes:
        groups: the page, largest groups first; ``filenames[i]`` is the stored filename of ``group.ids[i]``.
        total: groups at this threshold in all. threshold: the cosine threshold used.
        graph_built_at: when the graph they come from was completed (UTC).
    """

    groups: list[tuple[DuplicateGroup, list[str]]]
    total: int
    threshold: float
    graph_built_at: datetime


class NeighbourJobs:
    """Builds and serves the neighbour graph of one collection; see the module docstring. Thread-safe."""

    def __init__(self, settings: Settings, db: VectorDBHandler) -> None:
        """Nothing is opened here: the graph file is created by the first job.

        One file per collection, since a graph belongs to one model's vectors: ``DATA_DIR/neighbours.sqlite3`` for
        the default collection, ``DATA_DIR/neighbours.<collection>.sqlite3`` for one made by ``scripts/reindex.py``
        (after a switch the new collection has no graph until the job runs again). In PostgreSQL (``shared``), the
        tables hold every collection's graph, by name.
        """
        self.settings = settings
        self.db = db
        collection = getattr(db, "collection_name", DEFAULT_COLLECTION)
        self.collection = collection
        #: the graph lives in PostgreSQL, shared by every replica (see the module docstring)
        self.shared = settings.neighbours_store == "auto" and bool(settings.shared_state_url)
        name = FILENAME if collection == DEFAULT_COLLECTION else FILENAME.replace(".sqlite3", f".{collection}.sqlite3")
        self.path: Path = settings.data_dir.resolve() / name
        self._store: GraphStore | PgGraphStore | None = None
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running: JobRecord | None = None
        self._current: JobRecord | None = None  # the served graph, cached (this process is the only writer)
        self._current_loaded = False
        self._closed = False

    # --- the file -----------------------------------------------------------------------------------------
    def _open_store(self, create: bool) -> GraphStore | PgGraphStore | None:
        with self._lock:
            if self._store is None and not self._closed:
                if self.shared:
                    from app.neighbours.pgstore import PgGraphStore

                    assert self.settings.shared_state_url is not None
                    # Bounded like a request's database calls: a database that is down answers 503 within ~2 s.
                    wait_s = self.settings.shared_state_wait_s
                    self._store = PgGraphStore(self.settings.shared_state_url, self.collection, wait_s=wait_s)
                elif create or self.path.exists():
                    self._store = GraphStore(self.path)
            return self._store

    def _served(self) -> JobRecord | None:
        if self.shared:  # another replica may complete a graph at any time: always ask (one indexed lookup)
            store = self._open_store(create=False)
            return None if store is None else store.current_graph()
        if not self._current_loaded:
            store = self._open_store(create=False)
            self._current = None if store is None else store.current_graph()
            self._current_loaded = True
        return self._current

    # --- jobs ---------------------------------------------------------------------------------------------
    def resume_interrupted(self) -> JobRecord | None:
        """At service start: resume the job a stop or ``kill -9`` interrupted, if any; returns it (or ``None``)."""
        try:
            store = self._open_store(create=False)
            if store is None:
                return None
            with self._start_lock, store.start_lock():
                lease = store.acquire_lease()
                if lease is None:
                    return None  # another replica builds
                store.mark_unfinished_interrupted()  # we hold the lease: no one else runs them
                job = store.unfinished_job(KIND)
                if job is None or job.state != "interrupted":
                    lease.close()
                    return None
                log.info(
                    "Resuming neighbour-graph job %d (%s phase, %d/%d done)", job.id, job.phase, job.done, job.total
                )
                return self._launch(job, lease)
        except sqlite3.DatabaseError:  # a damaged graph file must not keep the service from starting
            log.exception("Cannot read %s; POST /jobs/neighbours builds the graph again", self.path)
            return None
        except DatabaseUnavailableError as exc:  # nor a database that is down: the next POST resumes it
            log.error("Cannot resume the neighbour-graph job: %s", exc)
            return None

    def start(self) -> tuple[JobRecord, bool]:
        """Start a graph build, or report the one already running.

        Returns ``(job, started)``: ``started`` is ``False`` when a job was already running (that job is returned).
        An unfinished job (interrupted or failed) with the same parameters (``NEIGHBOURS_K``, and ``DBA_N`` /
        ``DBA_ALPHA`` when ``DBA`` is on) is resumed under its id; otherwise a new job starts and the old one's
        partial work is discarded. A completed graph keeps being served until the new one completes. With a shared
        store, a job another replica runs is answered the same way (``started`` ``False``); one whose replica died
        is resumed here. Raises :class:`app.errors.DatabaseUnavailableError` (shared store).
        """
        with self._start_lock:  # two concurrent POSTs must not launch two threads on one job
            return self._start()

    def _start(self) -> tuple[JobRecord, bool]:
        store = self._open_store(create=True)
        if store is None:
            raise RuntimeError("the service is closing")
        with store.start_lock():  # one replica at a time decides (a no-op for the SQLite file)
            with self._lock:
                if self._thread is not None and self._thread.is_alive() and self._running is not None:
                    return store.job(self._running.id) or self._running, False
            lease = store.acquire_lease()
            if lease is None:  # another replica builds: answer its job
                running = store.unfinished_job(KIND) or store.latest_job(KIND)
                if running is None:
                    raise DatabaseUnavailableError("Another replica holds the graph's lease; try again shortly.")
                return running, False
            try:
                store.mark_unfinished_interrupted()  # "running" without the lease: its replica died
                s = self.settings
                dba_n, dba_alpha = (s.dba_n, s.dba_alpha) if s.dba else (None, None)
                job = store.unfinished_job(KIND)
                if job is not None and (job.k, job.dba_n, job.dba_alpha) != (s.neighbours_k, dba_n, dba_alpha):
                    store.discard_job(job.id)
                    job = None
                if job is None:
                    job = store.create_job(KIND, s.neighbours_k, dba_n, dba_alpha)
                    store.update_job(job.id, total=self.db.count())  # so the first answer already shows the size
                return self._launch(job, lease), True
            except BaseException:
                lease.close()
                raise

    def _launch(self, job: JobRecord, lease) -> JobRecord:  # noqa: ANN001 - the store's lease
        """Run ``job`` on a new thread that holds ``lease`` until it ends."""
        store = self._store
        assert store is not None
        store.update_job(job.id, state="running", started_at=utc_now(), error=None)
        job = store.job(job.id)
        with self._lock:
            self._stop.clear()
            self._running = job
            self._thread = threading.Thread(
                target=self._run, args=(job, lease), name=f"job-neighbours-{job.id}", daemon=True
            )
            self._thread.start()
        return job

    def _run(self, job: JobRecord, lease) -> None:  # noqa: ANN001 - the store's lease
        store = self._store
        assert store is not None
        try:
            if job.phase == "graph":
                build_graph(
                    self.db,
                    store,
                    job,
                    self._stop,
                    self.settings.neighbours_threads,
                    ef_search=max(self.settings.neighbours_ef_search, job.k + 1),
                )
                if job.dba_n is not None:
                    store.update_job(job.id, phase="dba", done=0, total=store.count_nodes(job.id))
            job = store.job(job.id)
            if job.phase == "dba":
                total = store.count_nodes(job.id)
                store.update_job(job.id, total=total, done=total - store.count_nodes(job.id, without_dba=True))
                build_dba(store, job, self._stop)
            store.complete(job.id)
            self._current = store.job(job.id)
            self._current_loaded = True
            log.info("Neighbour graph %d completed: %d images", job.id, self._current.done)
        except JobStopped:
            store.update_job(job.id, state="interrupted")
            log.info("Neighbour-graph job %d interrupted; it resumes on the next start", job.id)
        except Exception as exc:  # the job reports it (GET /jobs/{id}); the service keeps serving
            log.exception("Neighbour-graph job %d failed", job.id)
            store.update_job(job.id, state="failed", error=f"{type(exc).__name__}: {exc}"[:1000])
        finally:
            lease.close()  # before _running is cleared: a new start here must find the lease free
            with self._lock:
                self._running = None

    def job(self, job_id: int) -> JobRecord:
        """The job with this id (from any replica, with a shared store); raises :class:`JobNotFoundError` (also for an
        id no job can have: integer keys are 64-bit signed and start at 1, and a larger one would overflow the query)
        and :class:`app.errors.DatabaseUnavailableError`.

        A shared job shown ``running`` while no replica holds the lease was cut short (its replica was killed):
        it is answered as ``interrupted``, as it is after the next start."""
        if not 1 <= job_id <= 2**63 - 1:
            raise JobNotFoundError(f"No job with id {str(job_id)[:40]}.")
        store = self._open_store(create=False)
        job = None if store is None else store.job(job_id)
        if job is None:
            raise JobNotFoundError(f"No job with id {job_id}.")
        if store.shared and job.state == "running" and not store.lease_held():
            job = replace(job, state="interrupted")
        return job

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the running job's thread to end; ``True`` when none runs any more (tests, scripts)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def close(self) -> None:
        """Stop the running job between two batches (it becomes ``interrupted``) and close the graph file."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=60)
            if thread.is_alive():
                log.warning("The neighbour-graph job did not stop within 60 s; closing anyway")
        with self._lock:
            self._closed = True
            if self._store is not None:
                self._store.close()
                self._store = None

    # --- serving ------------------------------------------------------------------------------------------
    def duplicates(self, threshold: float | None, offset: int = 0, limit: int = 100) -> DuplicatePage:
        """Near-duplicate groups of the served graph (:func:`app.neighbours.duplicates.duplicate_groups`), largest
        first, images deleted since the build left out; ``threshold`` ``None`` = ``DUPLICATE_THRESHOLD``.

        Raises:
            GraphNotBuiltError: no graph was completed yet.
            InvalidParameterError: threshold outside ``[-1, 1]``, ``offset < 0`` or ``limit`` outside
                ``1..MAX_DUPLICATES_LIMIT``.
            app.errors.DatabaseUnavailableError: checking which images still exist.
        """
        threshold = self.settings.duplicate_threshold if threshold is None else threshold
        if not -1.0 <= threshold <= 1.0:
            raise InvalidParameterError(f"threshold is a cosine similarity in [-1, 1], got {threshold}.")
        if offset < 0 or not 1 <= limit <= MAX_DUPLICATES_LIMIT:
            raise InvalidParameterError(f"offset must be >= 0 and limit between 1 and {MAX_DUPLICATES_LIMIT}.")
        graph = self._served()
        store = self._store
        if graph is None or store is None:
            raise GraphNotBuiltError(
                "No neighbour graph has been built yet: start one with POST /jobs/neighbours, wait until "
                "GET /jobs/{id} says completed, then ask again."
            )
        edges = store.edges_at_least(graph.id, threshold)
        ends = sorted({e.src for e in edges} | {e.dst for e in edges})
        alive: set[str] = set()
        for start in range(0, len(ends), 1000):
            alive |= self.db.existing_ids(ends[start : start + 1000])
        groups = duplicate_groups(edges, threshold, alive)
        page = groups[offset : offset + limit]
        names = store.filenames(graph.id, {i for g in page for i in g.ids})
        return DuplicatePage(
            groups=[(g, [names.get(i, "") for i in g.ids]) for g in page],
            total=len(groups),
            threshold=threshold,
            graph_built_at=graph.finished_at,
        )

    def dba_rerank(self) -> DbaRerank | None:
        """The DBA re-ranker of searches when ``DBA=true`` and the served graph has DBA vectors; ``None`` otherwise
        (searches then rank by the original vectors)."""
        if not self.settings.dba:
            return None
        graph = self._served()
        store = self._store
        if graph is None or graph.dba_n is None or store is None:
            return None
        job_id = graph.id
        return DbaRerank(lambda ids: store.vectors(job_id, ids, "dba"), self.settings.dba_depth)
