"""The file store of originals, under the name it had before the store contract (:mod:`app.storage`).

``ImageStore`` here is :class:`app.storage.local.LocalImageStore`; code that works with any store takes an
:class:`app.storage.base.ImageStore` and gets one from :func:`app.storage.from_settings`.
"""

from __future__ import annotations

from app.storage.local import TEMP_PREFIX, LocalImageStore

ImageStore = LocalImageStore

__all__ = ["TEMP_PREFIX", "ImageStore", "LocalImageStore"]
