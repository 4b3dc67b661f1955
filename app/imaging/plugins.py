"""The optional Pillow decoders (HEIF/HEIC, AVIF, JPEG XL), registered once per process.

Everything in :mod:`app.imaging` that opens image bytes needs them first: the decoder (:mod:`app.imaging.decode`)
and the EXIF date reader (:mod:`app.imaging.exif`). Both import this module, so neither has to import the other
for it; it needs nothing but Pillow.
"""

from __future__ import annotations

import importlib
import logging
import threading

from PIL import Image, features

log = logging.getLogger(__name__)

__all__ = ["register_plugins"]

_plugins_lock = threading.Lock()
_plugins_registered = False


def register_plugins() -> None:
    """Register the optional Pillow decoders once per process; later calls return at once (thread-safe).

    Registers HEIF/HEIC (``pillow_heif``), AVIF (Pillow's own plugin when this Pillow was built with libavif, else
    ``pillow_avif`` if installed) and JPEG XL (``pillow_jxl`` or ``jxlpy`` if installed). A missing optional
    package only means its format is reported as unsupported; this function raises nothing for it.
    """
    global _plugins_registered
    if _plugins_registered:
        return
    with _plugins_lock:
        if _plugins_registered:
            return
        try:
            import pillow_heif

            pillow_heif.register_heif_opener()
        except ImportError:
            log.warning("pillow-heif is not installed: HEIC/HEIF uploads will be refused")
        # pillow_avif registers its own "AVIF" opener on import, which would replace Pillow's native one.
        if not features.check_module("avif"):
            _import_first("pillow_avif")
        _import_first("pillow_jxl", "jxlpy.JXLImagePlugin")
        # Image.open only falls back to init() when given no format list; the decoder always passes one
        # (app/imaging/decode.py, _allowed_formats).
        Image.init()
        _plugins_registered = True


def _import_first(*modules: str) -> bool:
    # These plugins register their openers as an import side effect.
    for name in modules:
        try:
            importlib.import_module(name)
            return True
        except ImportError:
            continue
    return False
