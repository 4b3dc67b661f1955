"""Database-side augmentation (DBA) and the re-ranking that serves it.

DBA replaces each stored vector, for search only, by the L2-normalised weighted sum of itself and its ``n`` nearest
neighbours, each weighted by its cosine similarity to the vector raised to ``α``:
``dba(x) = normalise(x + Σ_{i≤n} max(s_i, 0)^α x_i)``. This is the αQE formula of Radenović, Tolias, Chum,
"Fine-tuning CNN Image Retrieval with No Human Annotation", TPAMI 2019, section 4.3, applied to the database side
(Arandjelović & Zisserman, CVPR 2012; Gordo et al., "End-to-end learning of deep visual representations for image
retrieval", IJCV 2017). The original embeddings stay in the backend untouched; the DBA vectors are kept beside the
neighbour graph (:mod:`app.neighbours.store`), so they can be rebuilt after the collection grows.

Serving without a backend schema change: the ANN search of the (possibly expanded) query returns a candidate set,
which :func:`rerank` orders by cosine similarity to the candidates' DBA vectors; a candidate without one (indexed
after the last build) keeps its search score, the cosine to its original vector. ``DBA_N``/``DBA_ALPHA``/``DBA_DEPTH``
were chosen by measurement (``bench/dba_grid.py``, docs/benchmarks.md "DBA").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from app.search.expansion import alpha_qe
from app.vectordb.base import SearchHit

#: ``{id: (D,) DBA vector}`` for some of the ids asked for (missing ones have none).
DbaLookup = Callable[[Sequence[str]], Mapping[str, np.ndarray]]


def dba_vector(vector: np.ndarray, neighbours: np.ndarray, scores: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """The DBA vector of one stored vector: αQE (:func:`app.search.expansion.alpha_qe`) over its first ``n`` neighbours.

    Args:
        vector: ``(D,)`` float32, L2-normalised original embedding.
        neighbours: ``(M, D)`` its nearest stored vectors (itself excluded), best first; only the first ``n`` count.
        scores: ``(M,)`` their cosine similarities to ``vector`` (negative ones weigh 0).
        n: neighbours to add, ``>= 0`` (0 returns ``vector``). alpha: the exponent ``α >= 0``.

    Returns:
        ``(D,)`` float32, L2-normalised.
    """
    if n <= 0 or len(neighbours) == 0:
        return np.asarray(vector, dtype=np.float32)
    return alpha_qe(vector, np.asarray(neighbours)[:n], np.asarray(scores)[:n], alpha)


def dba_matrix(x: np.ndarray, nbr_rows: np.ndarray, nbr_scores: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """DBA of a whole ``(N, D)`` matrix at once (the offline grid in ``bench/dba_grid.py``; same formula).

    Args:
        x: ``(N, D)`` float32 unit rows. nbr_rows: ``(N, M)`` int row indices of each row's neighbours, best first,
            itself excluded, ``M >= n``. nbr_scores: ``(N, M)`` their cosine similarities. n, alpha: as
            :func:`dba_vector`.

    Returns:
        ``(N, D)`` float32 unit rows.
    """
    if n <= 0:
        return np.asarray(x, dtype=np.float32)
    w = np.power(np.clip(nbr_scores[:, :n].astype(np.float64), 0.0, None), alpha)  # (N, n)
    out = x.astype(np.float64) + np.einsum("nk,nkd->nd", w, x[nbr_rows[:, :n]].astype(np.float64))
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out.astype(np.float32)


def rerank(query: np.ndarray, hits: Sequence[SearchHit], lookup: DbaLookup) -> list[SearchHit]:
    """``hits`` re-scored by cosine similarity of ``query`` to each hit's DBA vector, best first.

    Args:
        query: ``(D,)`` float32, L2-normalised: the query that was searched (the expanded one with ``expand``).
        hits: the candidates from the ANN search of ``query``; their ``score`` is the cosine to the original vector.
        lookup: gives the DBA vectors of the ids it has (:meth:`app.neighbours.store.GraphStore.dba_vectors`).

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
