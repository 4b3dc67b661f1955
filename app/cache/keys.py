"""Cache keys and the byte format of cached embeddings.

A key names what was embedded and by which model, so two models (or two dimensions, or two value formats) never
share an entry::

    {prefix}:emb:v{KEY_VERSION}:{kind}:{model_id}:{dim}:{digest}

``kind`` is ``image`` (``digest`` = SHA-256 of the uploaded bytes, the image id) or ``text`` (SHA-256 of the
query's UTF-8 bytes, exactly as typed). Bump :data:`KEY_VERSION` whenever what a key maps to changes meaning
(preprocessing, normalisation, value layout): old entries then simply stop being found and expire (``CACHE_TTL_S``).

A value is ``MAGIC`` (4 bytes) + the dimension (uint32, little-endian) + ``D`` float32 little-endian: ``8 + 4·D``
bytes (5,128 bytes for EfficientNet-Lite2's 1280-d, 2,056 for CLIP ViT-B-32's 512-d). float32, not float16, so a
hit ranks and scores exactly like the embedding it stands for (float16 would halve the bytes but move scores by
about 1e-3). :func:`decode` trusts nothing it reads: wrong length, magic or dimension, non-finite values or a
vector that is not unit-length make it a miss.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Literal

import numpy as np

KEY_VERSION = 1
"""Version of the key namespace and value format; part of every key."""

MAGIC = b"ISE\x01"
"""First 4 bytes of every value: format 1 of this service's embeddings."""

_HEADER = struct.Struct("<4sI")
NORM_TOLERANCE = 1e-3
"""Largest accepted ``| ||v||_2 - 1 |`` of a decoded vector (every model here returns L2-normalised rows)."""

Kind = Literal["image", "text"]


def text_digest(text: str) -> str:
    """64-hex SHA-256 of ``text``'s UTF-8 bytes (no normalisation: only the very same query string hits)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_key(prefix: str, kind: Kind, model_id: str, dim: int, digest: str) -> str:
    """The key of one embedding, e.g. ``imgsearch:emb:v1:image:efficientnet-lite2:imagenet:1280:<sha256>``."""
    return f"{prefix}:emb:v{KEY_VERSION}:{kind}:{model_id}:{dim}:{digest}"


def encode(vector: np.ndarray) -> bytes:
    """The stored bytes of a ``(D,)`` embedding (any float dtype; written as float32 little-endian)."""
    values = np.ascontiguousarray(vector, dtype="<f4").reshape(-1)
    return _HEADER.pack(MAGIC, values.shape[0]) + values.tobytes()


def decode(raw: bytes, dim: int) -> np.ndarray | None:
    """The read-only ``(dim,)`` float32 L2-normalised vector in ``raw``, or ``None`` when ``raw`` is not one.

    ``None`` for anything not written by :func:`encode` for this dimension: too short or long, another magic,
    another dimension, NaN/inf, or a norm off 1 by more than :data:`NORM_TOLERANCE`. Never raises.
    """
    if not isinstance(raw, bytes | bytearray | memoryview) or len(raw) != _HEADER.size + 4 * dim:
        return None
    magic, stored_dim = _HEADER.unpack_from(raw)
    if magic != MAGIC or stored_dim != dim:
        return None
    vector = np.frombuffer(raw, dtype="<f4", count=dim, offset=_HEADER.size).astype(np.float32)
    if not np.all(np.isfinite(vector)) or abs(float(np.linalg.norm(vector)) - 1.0) > NORM_TOLERANCE:
        return None
    vector.setflags(write=False)
    return vector
