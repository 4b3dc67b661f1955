"""Every kind of search behind one object: by uploaded image, text, vector, stored image ("more like this") and
combined positive/negative terms.

:class:`Searcher` turns each query into a ``(D,)`` float32, L2-normalised vector (through the embedding cache,
:mod:`app.cache`, for images and texts; :mod:`app.search.query` for vectors and combined terms) and cuts one page
of hits from it (:func:`app.search.paging.search_page`: ``offset``, ``min_score``, ``exclude_self``, ``expand``,
DBA). Hits are best first, scored by cosine similarity to the query searched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from app.cache import EmbeddingCache
from app.config import Settings
from app.embedders.base import Embedder
from app.errors import ImageNotFoundError
from app.ids import image_id_for, is_valid_image_id
from app.imaging.prepare import check_upload_size
from app.search.paging import SearchOptions, search_page
from app.search.query import QueryTerm, combined_query, unit_vector
from app.vectordb.base import SearchHit, VectorDBHandler

if TYPE_CHECKING:
    from app.search.dba import DbaRerank

__all__ = ["Searcher"]


class Searcher:
    """Search one collection with one embedder.

    Args:
        settings: ``MAX_UPLOAD_MB``, ``EXPAND_N`` and ``EXPAND_ALPHA``.
        embedder, db, cache: the model, the collection and the query-embedding cache (its keys are this model's).
        embed_upload: ``bytes -> (D,)`` embedding of an upload by decode + model, under the decode admission; called
            only when no cache layer has the bytes.
        dba: the DBA re-ranking in force now (``DBA=true`` with a built graph), else ``None``; asked at every search.

    Thread-safe, as its parts are; owns nothing it must close.
    """

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        db: VectorDBHandler,
        cache: EmbeddingCache,
        embed_upload: Callable[[bytes], np.ndarray],
        dba: Callable[[], DbaRerank | None],
    ) -> None:
        self.settings = settings
        self.embedder = embedder
        self.db = db
        self.cache = cache
        self.embed_upload = embed_upload
        self.dba = dba

    def _page(
        self, vector: np.ndarray, top_k: int, options: SearchOptions | None, query_ids: Iterable[str] = ()
    ) -> list[SearchHit]:
        return search_page(
            self.db,
            vector,
            top_k,
            options or SearchOptions(),
            query_ids=frozenset(query_ids),
            expand_n=self.settings.expand_n,
            expand_alpha=self.settings.expand_alpha,
            dba=self.dba(),
        )

    def by_image(self, data: bytes, top_k: int, options: SearchOptions | None = None) -> list[SearchHit]:
        """The ``top_k`` most similar indexed images to the uploaded one, best first (cosine similarity).

        The upload's embedding comes from the cache (memory, then Redis, then the stored vector of an indexed image
        with the same bytes), and only then from decode + model. The upload counts as a query image: when its bytes
        are indexed it is left out of the results unless ``options.exclude_self`` is false (so it takes one place
        of the MAX_SEARCH_WINDOW of a page, indexed or not).
        Raises the decoding errors for bad input (nothing is cached then) and
        :class:`app.errors.InvalidParameterError`.
        """
        check_upload_size(len(data), self.settings.max_upload_bytes)
        image_id = image_id_for(data)
        return self._page(self.embed_image(data, image_id), top_k, options, query_ids=[image_id])

    def embed_image(self, data: bytes, image_id: str | None = None) -> np.ndarray:
        """The ``(D,)`` float32, L2-normalised embedding of uploaded image bytes through the embedding cache (memory,
        Redis, the stored vector of the same bytes, then the model); nothing is stored. ``image_id``: the bytes'
        SHA-256 if known.

        Raises the decoding errors (nothing is cached then) and :class:`app.errors.ServiceBusyError`.
        """
        check_upload_size(len(data), self.settings.max_upload_bytes)
        image_id = image_id or image_id_for(data)

        def stored() -> np.ndarray | None:
            record = self.db.get(image_id)
            return None if record is None else record.vector

        return self.cache.image(image_id, lambda: self.embed_upload(data), stored).vector

    def by_text(self, query: str, top_k: int, options: SearchOptions | None = None) -> list[SearchHit]:
        """The ``top_k`` images that best match a text description (CLIP models only).

        The text's embedding is cached like an image's (by the exact string). Raises
        :class:`app.errors.NoTextTowerError` when the model has no text encoder.
        """
        if not self.embedder.supports_text:
            self.embedder.embed_texts([query])  # raises NoTextTowerError / NoModelError, without a cache lookup
        vector = self.cache.text(query, lambda: self.embedder.embed_texts([query])[0]).vector
        return self._page(vector, top_k, options)

    def by_vector(self, values: Sequence[float], top_k: int, options: SearchOptions | None = None) -> list[SearchHit]:
        """The ``top_k`` images nearest to an embedding computed elsewhere (same model as the collection).

        ``values`` must have ``D`` (the collection's dimension) finite values, not all zero; they are L2-normalised
        here (as float32), so any scale works. Raises :class:`app.errors.InvalidVectorError` otherwise.
        """
        return self._page(unit_vector(values, self.embedder.dim, self.embedder.model_id), top_k, options)

    def similar(self, image_id: str, top_k: int, options: SearchOptions | None = None) -> list[SearchHit]:
        """More like this: the neighbours of a stored image by its stored vector, the image itself left out.

        Raises :class:`app.errors.ImageNotFoundError` for an unknown or malformed id.
        """
        stored = self.db.get(image_id) if is_valid_image_id(image_id) else None
        if stored is None or stored.vector is None:
            raise ImageNotFoundError(f"No image with id '{image_id[:80]}'.")
        options = replace(options or SearchOptions(), exclude_self=True)
        return self._page(stored.vector, top_k, options, query_ids=[image_id])

    def combined(
        self,
        positive: Sequence[QueryTerm],
        negative: Sequence[QueryTerm],
        top_k: int,
        options: SearchOptions | None = None,
    ) -> list[SearchHit]:
        """Search by weighted images, texts and vectors minus weighted negative ones (:mod:`app.search.query`).

        The positive ``image_id`` terms are the query images ``exclude_self`` leaves out; texts go through the
        embedding cache when the model has a text tower. Raises :class:`app.errors.ImageNotFoundError`,
        :class:`app.errors.NoTextTowerError`, :class:`app.errors.InvalidParameterError` and
        :class:`app.errors.InvalidVectorError` (see :func:`app.search.query.combined_query`).
        """
        embed_texts = self.embedder.embed_texts
        if self.embedder.supports_text:
            embed_texts = partial(self.cache.texts, compute=self.embedder.embed_texts)
        vector, query_ids = combined_query(positive, negative, self.db, self.embedder, embed_texts)
        return self._page(vector, top_k, options, query_ids=query_ids)
