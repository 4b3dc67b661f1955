"""Re-ranking search candidates by their DBA vectors: how a search serves database-side augmentation.

DBA (database-side augmentation) replaces each stored vector, for search only, by the αQE average of itself and its
nearest neighbours; the neighbour-graph job computes those vectors and keeps them beside the graph
(:mod:`app.neighbours.dba`, :mod:`app.neighbours.store`). Serving needs no backend schema change: the ANN search of
the (possibly expanded) query returns a candidate set, which :func:`rerank` orders by cosine similarity to the
candidates' DBA vectors; a candidate without one (indexed after the last build) keeps its search score, the cosine to
its original vector. ``DBA_DEPTH`` was chosen by measurement (``bench/dba_grid.py``, docs/benchmarks.md "DBA").

Where it sits: a search feature beside paging and expansion, over the :class:`app.vectordb.base.VectorDBHandler`
hits. It reads the DBA vectors through a lookup function (:data:`DbaLookup`) that whoever holds the neighbour store
(:meth:`app.neighbours.jobs.NeighbourJobs.dba_rerank`) hands in, so search never imports the neighbour graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from app.vectordb.base import SearchHit

__all__ = ["DbaLookup", "DbaRerank", "rerank"]

#: ``{id: (D,) DBA vector}`` for some of the ids asked for (missing ones have none).
DbaLookup = Callable[[Sequence[str]], Mapping[str, np.ndarray]]


def rerank(query: np.ndarray, hits: Sequence[SearchHit], lookup: DbaLookup) -> list[SearchHit]:
    """``hits`` re-scored by cosine similarity of ``query`` to each hit's DBA vector, best first.

    Args:
        query: ``(D,)`` float32, L2-normalised: the query that was searched (the expanded one with ``expand``).
        hits: the candidates from the ANN search of ``query``; their ``score`` is the cosine to the original vector.
        lookup: gives the DBA vectors of the ids it has (the neighbour store's ``vectors(job, ids, "dba")``).

    Returns:
        New :class:`SearchHit` objects (same ids and metadata), sorted by the new score, ties broken by the old
        order. A hit without a DBA vector (indexed after the last build) keeps its original score.
    """
    if not hits:
        return []
    vectors = lookup([h.id for h in hits])
    q = np.asarray(query, dtype=np.float32)
    rescored = []
    for position, hit in enumerate(hits):
        v = vectors.get(hit.id)
        usable = v is not None and np.shape(v) == q.shape  # another model's vector (never served) counts as none
        score = float(np.dot(q, np.asarray(v, dtype=np.float32))) if usable else hit.score
        rescored.append((-score, position, SearchHit(hit.id, score, hit.metadata)))
    rescored.sort(key=lambda t: (t[0], t[1]))
    return [t[2] for t in rescored]


@dataclass(frozen=True, slots=True)
class DbaRerank:
    """What :func:`app.search.paging.search_page` needs to serve DBA: where the DBA vectors are, and how deep to
    re-rank (``DBA_DEPTH``: the search asks for ``max(page window, depth)`` candidates, at most 1000)."""

    lookup: DbaLookup
    depth: int

    def rerank(self, query: np.ndarray, hits: Sequence[SearchHit]) -> list[SearchHit]:
        """:func:`rerank` with this lookup."""
        return rerank(query, hits, self.lookup)
