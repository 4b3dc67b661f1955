"""Database-side augmentation (DBA): the DBA vector of each stored image, which the neighbour-graph job computes.

DBA replaces each stored vector, for search only, by the L2-normalised weighted sum of itself and its ``n`` nearest
neighbours, each weighted by its cosine similarity to the vector raised to ``α``:
``dba(x) = normalise(x + Σ_{i≤n} max(s_i, 0)^α x_i)``. This is the αQE formula of Radenović, Tolias, Chum,
"Fine-tuning CNN Image Retrieval with No Human Annotation", TPAMI 2019, section 4.3, applied to the database side
(Arandjelović & Zisserman, CVPR 2012; Gordo et al., "End-to-end learning of deep visual representations for image
retrieval", IJCV 2017). The original embeddings stay in the backend untouched; the DBA vectors are kept beside the
neighbour graph (:mod:`app.neighbours.store`), so they can be rebuilt after the collection grows.

``DBA_N``/``DBA_ALPHA`` were chosen by measurement (``bench/dba_grid.py``, docs/benchmarks.md "DBA").

Where it sits: with the graph job that computes the vectors (:mod:`app.neighbours.graph`), above the search
features, whose αQE formula it applies (:func:`app.search.expansion.alpha_qe`). Searches re-rank by these vectors
in :mod:`app.search.dba`, which reads them through a lookup and so never imports this package.
"""

from __future__ import annotations

import numpy as np

from app.search.expansion import alpha_qe

__all__ = ["dba_matrix", "dba_vector"]


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
