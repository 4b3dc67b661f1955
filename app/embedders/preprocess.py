"""What a model sees: images as normalised pixel arrays, in pure functions over Pillow and numpy (no torch).

Both model families this service runs (EfficientNet-Lite2 and OpenCLIP ViTs) prepare an image the same way:
shorter side to the input size with bicubic resampling, centre crop, pixels scaled to 0..1, then
``(x - mean) / std`` per channel. :class:`PixelSpec` holds those numbers; :func:`to_pixels` applies them. The torch
embedders use torchvision for this; the ONNX Runtime embedder (:mod:`app.embedders.onnx_model`) uses these
functions, and the export checks that both give the same embedding (cosine >= 0.9999).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from app.imaging.prepare import fit_to_model


@dataclass(frozen=True, slots=True)
class PixelSpec:
    """How pixels are normalised for one model.

    Attributes:
        size: side of the square input in pixels (260 for EfficientNet-Lite2, 224 for ViT-B-32).
        mean, std: per-channel (R, G, B) values on the 0..1 scale, as torchvision's ``Normalize`` takes them.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def to_pixels(images: Sequence[Image.Image], spec: PixelSpec) -> np.ndarray:
    """Images of any size and mode -> ``(N, 3, size, size)`` float32, normalised as ``spec`` says.

    Each image is converted to RGB, fitted with :func:`app.imaging.prepare.fit_to_model` (a no-op for images the
    ingest workers already fitted), scaled to 0..1 as torchvision's ``ToTensor`` does (``/ 255`` in float32) and
    normalised per channel. ``N == 0`` gives ``(0, 3, size, size)``.
    """
    out = np.empty((len(images), 3, spec.size, spec.size), dtype=np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1)
    for i, image in enumerate(images):
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        fitted = fit_to_model(rgb, spec.size)
        chw = np.asarray(fitted, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
        out[i] = (chw - mean) / std
    return out


def l2_normalise(rows: np.ndarray) -> np.ndarray:
    """``(N, D)`` -> float32 rows of unit L2 norm (a zero row stays zero, as ``torch.nn.functional.normalize``)."""
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, np.float32(1e-12))
