"""Combined and negative queries: several images, texts and vectors, each weighted, some subtracted.

The arithmetic is rclip's (``rclip/model.py``, ``Model.compute_features_for_queries``): every term is embedded and
L2-normalised, the query is ``Σ w_i p_i − Σ w_j n_j`` over the positive terms ``p_i`` and the negative terms
``n_j``, and the result is L2-normalised again, so that cosine similarity to it ranks the collection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from app.embedders.base import Embedder
from app.errors import ImageNotFoundError, InvalidParameterError, InvalidVectorError
from app.ids import is_valid_image_id
from app.vectordb.base import VectorDBHandler

MAX_TERMS = 32
"""Most positive, and most negative, terms in one combined query (each text term is one model call's input)."""

ZERO_TOLERANCE = 1e-6
"""A combined vector shorter than this times the sum of the weights counts as zero: its terms cancel, and its
direction would be float32 rounding noise."""


@dataclass(frozen=True, slots=True)
class QueryTerm:
    """One term of a combined query: exactly one of ``image_id`` (a stored image), ``text`` (needs a model with a
    text tower) or ``vector`` (an embedding of the collection's model, any scale), with a ``weight`` > 0."""

    image_id: str | None = None
    text: str | None = None
    vector: Sequence[float] | None = None
    weight: float = 1.0


def unit_vector(values: Sequence[float], dim: int, model_id: str) -> np.ndarray:
    """``values`` as a ``(dim,)`` float32, L2-normalised query vector.

    Raises:
        InvalidVectorError: a length other than ``dim``, NaN/infinite values or values beyond float32's range (they
            would become infinite when stored), or all zeros (cosine similarity is undefined for it).
    """
    vector = np.asarray(values, dtype=np.float64)
    if vector.shape != (dim,):
        raise InvalidVectorError(
            f"The vector must have {dim} values (the dimension of model '{model_id}'), got {vector.size}."
        )
    if not np.all(np.isfinite(vector)) or np.abs(vector).max() > np.finfo(np.float32).max:
        raise InvalidVectorError("The vector must contain finite float32 values only (no NaN or infinity).")
    norm = float(np.linalg.norm(vector))
    if norm == 0.0 or not np.isfinite(norm):
        raise InvalidVectorError("The vector must not be all zeros: cosine similarity is undefined for it.")
    return (vector / norm).astype(np.float32)


def combine(
    positive: Sequence[tuple[np.ndarray, float]], negative: Sequence[tuple[np.ndarray, float]] = ()
) -> np.ndarray:
    """``normalise(Σ w_i p_i − Σ w_j n_j)`` (rclip's arithmetic).

    Args:
        positive: ``(vector, weight)`` pairs, at least one; each vector ``(D,)`` float32, L2-normalised.
        negative: the same, subtracted.

    Returns:
        ``(D,)`` float32, L2-normalised.

    Raises:
        InvalidParameterError: no positive term, or a weight that is not a finite number > 0.
        InvalidVectorError: the terms cancel (norm below :data:`ZERO_TOLERANCE` times the sum of the weights).
    """
    if not positive:
        raise InvalidParameterError("A combined query needs at least one positive term.")
    total = None
    weight_sum = 0.0
    for terms, sign in ((positive, 1.0), (negative, -1.0)):
        for vector, weight in terms:
            if not (np.isfinite(weight) and weight > 0):
                raise InvalidParameterError(f"Every weight must be a finite number > 0, got {weight}.")
            term = sign * float(weight) * np.asarray(vector, dtype=np.float64)
            total = term if total is None else total + term
            weight_sum += float(weight)
    norm = float(np.linalg.norm(total))
    if not norm > ZERO_TOLERANCE * weight_sum:
        raise InvalidVectorError(
            "The positive and negative terms cancel out: the combined query vector is zero, so nothing can be "
            "ranked by it."
        )
    return (total / norm).astype(np.float32)


def embed_terms(
    terms: Sequence[QueryTerm],
    db: VectorDBHandler,
    embedder: Embedder,
    embed_texts: Callable[[list[str]], np.ndarray] | None = None,
) -> list[np.ndarray]:
    """One ``(D,)`` float32, L2-normalised vector per term, in order; all texts share one model call.

    ``embed_texts`` (``list[str] -> (N, D)`` float32) replaces ``embedder.embed_texts``: the service passes its
    embedding cache's (:meth:`app.cache.EmbeddingCache.texts`).

    Raises:
        InvalidParameterError: a term without exactly one of image_id/text/vector.
        ImageNotFoundError: an ``image_id`` that is not stored (or is malformed).
        app.errors.NoTextTowerError, app.errors.NoModelError: a text term with an image-only model, or with
            ``EMBEDDER=none``.
        InvalidVectorError: a bad ``vector`` (see :func:`unit_vector`).
    """
    vectors: list[np.ndarray | None] = [None] * len(terms)
    texts: list[tuple[int, str]] = []
    for i, term in enumerate(terms):
        given = [v is not None for v in (term.image_id, term.text, term.vector)]
        if sum(given) != 1:
            raise InvalidParameterError("Each query term needs exactly one of image_id, text or vector.")
        if term.image_id is not None:
            record = db.get(term.image_id) if is_valid_image_id(term.image_id) else None
            if record is None or record.vector is None:
                raise ImageNotFoundError(f"No image with id '{term.image_id[:80]}'.")
            vectors[i] = np.asarray(record.vector, dtype=np.float32)
        elif term.text is not None:
            texts.append((i, term.text))
        else:
            vectors[i] = unit_vector(term.vector, embedder.dim, embedder.model_id)
    if texts:
        embedded = (embed_texts or embedder.embed_texts)([t for _, t in texts])
        for (i, _), vector in zip(texts, embedded, strict=True):
            vectors[i] = vector
    return [v for v in vectors if v is not None]


def combined_query(
    positive: Sequence[QueryTerm],
    negative: Sequence[QueryTerm],
    db: VectorDBHandler,
    embedder: Embedder,
    embed_texts: Callable[[list[str]], np.ndarray] | None = None,
) -> tuple[np.ndarray, frozenset[str]]:
    """The query vector of a combined query, and the stored images among its positive terms (text terms through
    ``embed_texts`` when given, see :func:`embed_terms`).

    Returns:
        ``((D,) float32 L2-normalised vector, ids of the positive image_id terms)``; the ids are the query images
        that ``exclude_self`` leaves out of the results.

    Raises:
        InvalidParameterError: no positive term, more than :data:`MAX_TERMS` on a side, or a bad term or weight.
        And everything :func:`embed_terms` and :func:`combine` raise.
    """
    if not positive:
        raise InvalidParameterError("A combined query needs at least one positive term.")
    if len(positive) > MAX_TERMS or len(negative) > MAX_TERMS:
        raise InvalidParameterError(f"At most {MAX_TERMS} positive and {MAX_TERMS} negative terms.")
    vectors = embed_terms([*positive, *negative], db, embedder, embed_texts)
    pairs = list(zip(vectors, [t.weight for t in (*positive, *negative)], strict=True))
    vector = combine(pairs[: len(positive)], pairs[len(positive) :])
    return vector, frozenset(t.image_id for t in positive if t.image_id is not None)
