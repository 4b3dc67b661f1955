"""One page of search results: ``offset``, ``min_score``, query images left out, optional query expansion.

No backend pages or thresholds natively through :class:`app.vectordb.base.VectorDBHandler`, so a page is cut from
one search for ``offset + top_k`` results (plus the ids to leave out): a page deep in the ranking costs a search of
that depth. HNSW returns at most ``ef_search`` candidates, and the backends raise ``ef_search`` to the number asked
for, so the cost grows with ``offset + top_k`` (see docs/search.md).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from app.errors import InvalidParameterError
from app.search.dba import DbaRerank
from app.search.expansion import expand_query
from app.vectordb.base import SearchFilter, SearchHit, VectorDBHandler

MAX_OFFSET = 1000
"""Largest ``offset`` (issue #9): a page starts at most 1000 results down the ranking."""

MAX_SEARCH_WINDOW = 1000
"""Most results one page may ask of the backend (``offset + top_k`` plus the ids left out).

pgvector refuses ``hnsw.ef_search`` above 1000 (its GUC's maximum) and HNSW returns at most ``ef_search`` rows, so
a deeper window cannot be served there; Milvus allows 16384 and Manticore more, but a page must not depend on the
backend.
"""


@dataclass(frozen=True, slots=True)
class SearchOptions:
    """How to cut and post-process a search, beside ``top_k``.

    Attributes:
        offset: results skipped before the page, ``0..MAX_OFFSET``.
        min_score: drop results whose cosine similarity to the (possibly expanded) query is below this, in
            ``[-1, 1]``; ``None`` keeps all.
        exclude_self: leave the query images out of the results (an uploaded image whose bytes are indexed, the
            ``image_id`` items of a combined query, the image of ``/image/{id}/similar``, which always leaves it out).
        expand: re-query with αQE (:mod:`app.search.expansion`) before cutting the page; the expansion
            neighbours come from the whole collection (they describe the query, not the results).
        filters: only images that pass (:class:`app.vectordb.base.SearchFilter`), applied inside the backend's
            index search; ``None`` or an empty filter keeps all.
    """

    offset: int = 0
    min_score: float | None = None
    exclude_self: bool = True
    expand: bool = False
    filters: SearchFilter | None = None

    def checked(self) -> SearchOptions:
        """``self`` when every field is in range; raises :class:`InvalidParameterError` otherwise."""
        if not 0 <= self.offset <= MAX_OFFSET:
            raise InvalidParameterError(f"offset must be between 0 and {MAX_OFFSET}, got {self.offset}.")
        if self.min_score is not None and not -1.0 <= self.min_score <= 1.0:
            raise InvalidParameterError(f"min_score is a cosine similarity in [-1, 1], got {self.min_score}.")
        return self


def search_page(
    db: VectorDBHandler,
    vector: np.ndarray,
    top_k: int,
    options: SearchOptions,
    *,
    query_ids: Collection[str] = (),
    expand_n: int = 0,
    expand_alpha: float = 0.0,
    dba: DbaRerank | None = None,
) -> list[SearchHit]:
    """Results ``offset + 1 .. offset + top_k`` of the ranking for ``vector``, best first.

    Args:
        db: the collection.
        vector: ``(D,)`` float32, L2-normalised query.
        top_k: page size, ``>= 1`` (the caller enforces ``MAX_TOP_K``).
        options: offset, threshold, self-exclusion and expansion (checked here).
        query_ids: ids of stored images the query was made from; left out of the results when
            ``options.exclude_self``, and never used as expansion neighbours.
        expand_n, expand_alpha: ``EXPAND_N`` and ``EXPAND_ALPHA``, used when ``options.expand``.
        dba: with ``DBA=true`` and a built graph: the candidates (``max(window, dba.depth)`` of them, at most
            :data:`MAX_SEARCH_WINDOW`) are re-ranked by cosine to their DBA vectors (:mod:`app.search.dba`)
            before the page is cut; scores are then those cosines.

    Returns:
        At most ``top_k`` hits (fewer at the end of the collection or under ``min_score``); scores are cosine
        similarity to the query actually searched (the expanded one with ``expand``).

    Raises:
        InvalidParameterError: options out of range, or ``offset + top_k`` (plus the ids left out) over
            :data:`MAX_SEARCH_WINDOW`.
        app.errors.DatabaseUnavailableError: from ``db``.
    """
    options.checked()
    query_ids = frozenset(query_ids)
    excluded = query_ids if options.exclude_self else frozenset()
    window = options.offset + top_k + len(excluded)
    if window > MAX_SEARCH_WINDOW:
        raise InvalidParameterError(
            f"offset + top_k must be at most {MAX_SEARCH_WINDOW - len(excluded)} here (got {options.offset} + "
            f"{top_k}): a page is cut from one search of at most {MAX_SEARCH_WINDOW} results."
        )
    if options.expand:
        vector = expand_query(db, vector, expand_n, expand_alpha, exclude=query_ids)
    depth = window if dba is None else min(max(window, dba.depth), MAX_SEARCH_WINDOW)
    hits = db.search(vector, depth, options.filters)  # every backend reads an empty filter as none
    if dba is not None:
        hits = dba.rerank(vector, hits)
    hits = [h for h in hits if h.id not in excluded]
    hits = hits[options.offset : options.offset + top_k]
    if options.min_score is not None:
        hits = [h for h in hits if h.score >= options.min_score]
    return hits
