"""The one interface every image embedder implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
from PIL import Image

from app.errors import NoTextTowerError


class Embedder(ABC):
    """Turns RGB images (and, for CLIP, texts) into L2-normalised float32 embeddings.

    Attributes:
        model_id: stable id of model + weights, stored with the collection, e.g.
            ``open_clip:ViT-B-32/laion2b_s34b_b79k`` or ``efficientnet-lite2:imagenet``.
        dim: embedding dimension ``D``.
        supports_text: whether :meth:`embed_texts` works.
        device: torch device string the model runs on (``cpu``, ``cuda``, ``mps``).
    """

    model_id: str
    dim: int
    supports_text: bool = False
    device: str = "cpu"

    @abstractmethod
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed RGB PIL images (any size; the embedder resizes).

        Returns ``(N, D)`` float32, each row L2-normalised. ``N == 0`` returns ``(0, D)``. Processes in batches of
        the configured batch size.
        """

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts into the image space: ``(N, D)`` float32, L2-normalised.

        Raises :class:`app.errors.NoTextTowerError` when the model has no text encoder.
        """
        raise NoTextTowerError(
            f"The model '{self.model_id}' has no text encoder, so text search is unavailable. "
            "Use a CLIP model (EMBEDDER=clip) for text search."
        )
