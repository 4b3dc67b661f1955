"""What each recent search filter matched: the row counts the pgvector handler plans its filtered searches with
(issue #29), kept for a short while so that a filter searched again is neither estimated nor counted again.

A filtered exact pass counts the rows it reads (so that a planner estimate that was too low cannot make it rank far
more rows than intended), and at a million rows the count was a third of its time (1M x 512-d, a filter keeping
2 %: the pass 20.7 ms counted, 11.4 ms not; docs/benchmarks.md, "A filter's rows counted once"). People search the
same folder or date range again and again (paging, "more like this", the next photo), so what a filter matched is
kept for :data:`FILTER_ROWS_TTL_S`. The count only chooses the plan: the exact pass of a filter counted before ranks
*every* row that matches when it runs, so rows written since make it slower, never wrong.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TTLCache

from app.vectordb.base import SearchFilter

#: seconds a filter's row count is reused: it only steers the plan (see the module docstring), and this bounds how
#: long a plan can lag behind a bulk import into the filtered folder (at most a few thousand rows at the ingest
#: rates of docs/benchmarks.md).
FILTER_ROWS_TTL_S = 30.0
#: filters remembered per handler (least recently used dropped first): a few hundred bytes each.
FILTER_ROWS_MAX = 1024


@dataclass(frozen=True, slots=True)
class FilterRows:
    """What is known of the rows a filter matches: the planner's ``estimate`` (it sizes the exact pass's re-ranked
    candidates the same way on every replica); when the exact pass counted them, ``matching``: their number, up to
    the pass's limit plus one (a larger number stops the count), else ``None``; ``estimate_holds``: the estimate
    could not be far enough off to pass the limit, so the rows were not counted (the pgvector handler's
    ``_estimate_holds``)."""

    estimate: float
    matching: int | None = None
    estimate_holds: bool = False

    @property
    def rows(self) -> float:
        """The best row count to plan with: ``matching`` where that is past the estimate, else the estimate."""
        return self.estimate if self.matching is None else max(self.estimate, float(self.matching))

    def within(self, limit: int) -> bool:
        """Whether the filter's rows are known to be at most ``limit``: counted so, or estimated so with
        ``estimate_holds``."""
        if self.matching is not None:
            return self.matching <= limit
        return self.estimate_holds and self.estimate <= limit


class FilterRowsCache:
    """Thread-safe map :class:`~app.vectordb.base.SearchFilter` -> :class:`FilterRows`, at most ``maxsize`` entries
    (the least recently used dropped first), each for ``ttl_s`` seconds of ``timer`` (``time.monotonic``).
    cachetools' ``TTLCache`` is not thread-safe, hence the lock."""

    def __init__(
        self,
        maxsize: int = FILTER_ROWS_MAX,
        ttl_s: float = FILTER_ROWS_TTL_S,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cache: TTLCache[SearchFilter, FilterRows] = TTLCache(maxsize=maxsize, ttl=ttl_s, timer=timer)
        self._lock = threading.Lock()

    def get(self, key: SearchFilter) -> FilterRows | None:
        """The rows known for ``key``, or ``None`` (never seen, or older than the TTL)."""
        with self._lock:
            return self._cache.get(key)

    def put(self, key: SearchFilter, value: FilterRows) -> None:
        """Remember ``value`` for ``key`` from now on, for the TTL."""
        with self._lock:
            self._cache[key] = value

    def clear(self) -> None:
        """Forget every filter (the collection's rows were replaced)."""
        with self._lock:
            self._cache.clear()
