"""The one interface every image embedder implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
from PIL import Image

from app.errors import NoTextTowerError

DEFAULT_DRAFT_SIZE = 320
"""JPEG draft target when the embedder does not say its input size: at least every common model input (224-288)."""


class Embedder(ABC):
    """Turns RGB images (and, for CLIP, texts) into L2-normalised float32 embeddings.

    Attributes:
        model_id: stable id of model + weights, stored with the collection, e.g.
            ``open_clip:ViT-B-32/laion2b_s34b_b79k`` or ``efficientnet-lite2:imagenet``.
        dim: embedding dimension ``D``.
        supports_text: whether :meth:`embed_texts` works.
        device: where the model runs (``cpu``, ``cuda``, ``mps``; ``none`` when no model is loaded).
        input_size: side in pixels of the square the model sees, or ``None`` when unknown / not square.
        fits_by_centre_crop: ``True`` declares that the preprocessing is exactly "shorter side to ``input_size``
            (bicubic), centre crop" (:func:`app.imaging.prepare.fit_to_model`), so that images pre-fitted in
            decode workers give the same embedding.
    """

    model_id: str
    dim: int
    supports_text: bool = False
    device: str = "cpu"
    input_size: int | None = None
    fits_by_centre_crop: bool = False

    @property
    def draft_size(self) -> int:
        """Pixels each side a JPEG must keep when decoded in draft mode for this model.

        ``input_size`` when known, else :data:`DEFAULT_DRAFT_SIZE`. The model resizes the shorter side to its input
        size anyway, and draft mode never goes below the requested size, so the model sees (nearly) the same pixels.
        """
        return self.input_size or DEFAULT_DRAFT_SIZE

    @property
    def fit_size(self) -> int | None:
        """The size decode workers fit images to (:func:`app.imaging.prepare.fit_to_model`), or ``None`` when the
        preprocessing is not the plain "resize shorter side + centre crop" that makes pre-fitting exact."""
        return self.input_size if self.fits_by_centre_crop else None

    def close(self) -> None:  # noqa: B027 - optional hook, most embedders hold nothing to release
        """Release what the model holds (sessions, threads); the default does nothing."""

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
