"""``EMBEDDER=none``: serve an existing collection without loading any model.

For collections filled elsewhere (embeddings computed by another system, or indexed on a GPU machine): the server
then answers ``POST /search_vector``, searches by already-indexed images, ``/stats``, ``/health`` and downloads,
uses no model memory and starts in seconds. Everything that needs a model (indexing, searching by a new image or
by text) answers 400 with :class:`app.errors.NoModelError`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from app.embedders.base import Embedder
from app.errors import NoModelError


class VectorOnlyEmbedder(Embedder):
    """Stands in for the model that filled the collection: its ``model_id`` and ``dim`` come from the database.

    Args:
        model_id: the collection's recorded model id. dim: its dimension ``D``.
    """

    supports_text = False
    device = "none"

    def __init__(self, model_id: str, dim: int) -> None:
        self.model_id = model_id
        self.dim = int(dim)

    def _refuse(self) -> NoModelError:
        return NoModelError(
            f"This server runs with EMBEDDER=none: it serves the collection of model '{self.model_id}' without "
            "loading it, so it cannot embed images or text. Search with POST /search_vector, or start the "
            "server with the model (EMBEDDER=auto, clip or efficientnet)."
        )

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Always raises :class:`NoModelError` (no model is loaded)."""
        raise self._refuse()

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Always raises :class:`NoModelError` (no model is loaded)."""
        raise self._refuse()
