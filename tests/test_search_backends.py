"""The search features of ``app/search/`` on every backend of the contract suite (pgvector, pgvector-halfvec,
Milvus Lite, and Manticore where an engine is reachable): they use only ``search`` and ``get``, so each backend
must give the ranking computed by hand with numpy from the vectors it stores.
"""

from __future__ import annotations

import numpy as np
import pytest

from app.embedders.none import VectorOnlyEmbedder
from app.errors import ImageNotFoundError, NoModelError
from app.search.expansion import expand_query
from app.search.paging import MAX_SEARCH_WINDOW, SearchOptions, search_page
from app.search.query import QueryTerm, combined_query
from tests.test_vectordb_contract import (  # noqa: F401 - make_handler and handler are fixtures used here
    DIM,
    _as_stored,
    _records,
    _unit,
    handler,
    make_handler,
)

pytestmark = pytest.mark.slow
N = 40


@pytest.fixture
def stored(handler):  # noqa: F811 - the contract suite's fixture
    """``(handler, ids, (N, D) vectors as stored)`` for 40 random unit vectors."""
    vectors = _unit(np.random.default_rng(9), N)
    records = _records(vectors)
    handler.upsert(records)
    return handler, [r.id for r in records], _as_stored(handler, vectors)


def by_hand(query: np.ndarray, ids: list[str], vectors: np.ndarray, leave_out=()) -> list[str]:
    q = query / np.linalg.norm(query)
    scores = vectors @ q
    return [ids[i] for i in np.argsort(-scores) if ids[i] not in leave_out]


def test_pages_thresholds_and_query_images(stored):
    db, ids, vectors = stored
    q = vectors[0]
    full = by_hand(q, ids, vectors, leave_out={ids[0]})
    pages = [search_page(db, q, 7, SearchOptions(offset=o), query_ids={ids[0]}) for o in range(0, N, 7)]
    assert [h.id for page in pages for h in page] == full  # 39 others, the last page short
    with_self = search_page(db, q, 3, SearchOptions(exclude_self=False), query_ids={ids[0]})
    assert [h.id for h in with_self] == [ids[0], *full[:2]] and with_self[0].score == pytest.approx(1.0, abs=1e-3)
    cut = float(vectors[ids.index(full[4])] @ q) - 1e-4  # keeps the first 5
    assert [h.id for h in search_page(db, q, 20, SearchOptions(min_score=cut), query_ids={ids[0]})] == full[:5]
    # The deepest window a page may ask for is served by every backend.
    assert len(db.search(q, MAX_SEARCH_WINDOW)) == N


def test_expansion_is_alpha_qe_by_hand(stored):
    db, ids, vectors = stored
    q = vectors[3]
    neighbours = [ids.index(i) for i in by_hand(q, ids, vectors, leave_out={ids[3]})[:3]]
    want = q + sum(float(vectors[i] @ q) ** 2 * vectors[i] for i in neighbours)
    got = expand_query(db, q, n=3, alpha=2.0, exclude={ids[3]})
    np.testing.assert_allclose(got, want / np.linalg.norm(want), atol=2e-3)  # halfvec rounds the stored vectors
    hits = search_page(db, q, 5, SearchOptions(expand=True), query_ids={ids[3]}, expand_n=3, expand_alpha=2.0)
    assert [h.id for h in hits] == by_hand(want, ids, vectors, leave_out={ids[3]})[:5]


def test_combined_query_by_hand(stored):
    db, ids, vectors = stored
    embedder = VectorOnlyEmbedder("test-model:v1", DIM)
    positive = [QueryTerm(image_id=ids[1], weight=2), QueryTerm(vector=(vectors[2] * 3).tolist())]
    negative = [QueryTerm(image_id=ids[4], weight=0.5)]
    vector, query_ids = combined_query(positive, negative, db, embedder)
    want = 2 * vectors[1] + vectors[2] - 0.5 * vectors[4]
    np.testing.assert_allclose(vector, want / np.linalg.norm(want), atol=1e-4)  # halfvec: float16 rounding
    assert query_ids == {ids[1]}
    hits = search_page(db, vector, 6, SearchOptions(), query_ids=query_ids)
    assert [h.id for h in hits] == by_hand(want, ids, vectors, leave_out={ids[1]})[:6]
    with pytest.raises(ImageNotFoundError):
        combined_query([QueryTerm(image_id="f" * 64)], [], db, embedder)
    with pytest.raises(NoModelError):  # a text term needs a model with a text tower
        combined_query([QueryTerm(text="a cat")], [], db, embedder)
