"""Average query expansion with similarity weights (αQE).

Radenović, Tolias, Chum, "Fine-tuning CNN Image Retrieval with No Human Annotation", TPAMI 2019, section 4.3: the
query vector ``q`` is replaced by the L2-normalised, weighted sum of itself and its top ``n`` neighbours ``x_i``,
each weighted by ``(q . x_i)^α`` (the query's own weight is ``(q . q)^α = 1``); ``α = 0`` is plain average query
expansion (Chum et al., ICCV 2007). The defaults (``EXPAND_N``, ``EXPAND_ALPHA`` in :mod:`app.config`) were chosen
by measurement: ``docs/benchmarks.md``, "Query expansion".
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from app.vectordb.base import VectorDBHandler


def alpha_qe(query: np.ndarray, neighbours: np.ndarray, scores: np.ndarray, alpha: float) -> np.ndarray:
    """The αQE query: ``normalise(q + Σ_i max(s_i, 0)^α x_i)``.

    Args:
        query: ``(D,)`` float32, L2-normalised.
        neighbours: ``(N, D)`` float32, L2-normalised rows (``N`` may be 0: the query comes back unchanged).
        scores: ``(N,)`` cosine similarities of the neighbours to ``query`` (negative ones weigh 0, as a
            fractional power of a negative number is undefined).
        alpha: the exponent α ≥ 0.

    Returns:
        ``(D,)`` float32, L2-normalised. With weights summing to zero (all scores ≤ 0 and ``α > 0``) that is
        ``query`` itself.
    """
    q = np.asarray(query, dtype=np.float64)
    x = np.asarray(neighbours, dtype=np.float64).reshape(-1, q.shape[0])
    weights = np.power(np.clip(np.asarray(scores, dtype=np.float64), 0.0, None), alpha)
    expanded = q + weights @ x
    norm = float(np.linalg.norm(expanded))
    return (expanded / norm).astype(np.float32) if norm > 0 else np.asarray(query, dtype=np.float32)


def expand_query(
    db: VectorDBHandler, query: np.ndarray, n: int, alpha: float, exclude: Collection[str] = ()
) -> np.ndarray:
    """Search the ``n`` nearest stored images to ``query`` and return the αQE query built from them.

    ``exclude``: ids never used as neighbours (the query image itself when it is stored: it is already the
    ``q`` term). Cost: one search of ``n + len(exclude)`` results and ``n`` :meth:`VectorDBHandler.get` calls
    (search hits carry no vectors).

    Args:
        db: the collection. query: ``(D,)`` float32, L2-normalised. n: neighbours to use (0 returns ``query``).
        alpha: the exponent α ≥ 0.

    Returns:
        ``(D,)`` float32, L2-normalised. Raises :class:`app.errors.DatabaseUnavailableError` from ``db``.
    """
    if n <= 0:
        return np.asarray(query, dtype=np.float32)
    hits = [h for h in db.search(query, n + len(exclude)) if h.id not in exclude][:n]
    vectors, scores = [], []
    for hit in hits:
        record = db.get(hit.id)
        if record is not None and record.vector is not None:  # deleted since the search: skip it
            vectors.append(record.vector)
            scores.append(hit.score)
    if not vectors:
        return np.asarray(query, dtype=np.float32)
    return alpha_qe(query, np.stack(vectors), np.asarray(scores), alpha)
