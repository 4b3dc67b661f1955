"""The torch models the settings name: on a GPU, with ``CPU_ENCODER`` other than ``onnx``, and in the export child.

``EMBEDDER=clip``: OpenCLIP (:class:`OpenClipEmbedder`), text search included; errors loading it propagate.
``EMBEDDER=efficientnet``: the offline ImageNet EfficientNet-Lite2 (:class:`EfficientNetLiteEmbedder`), image-only.
``EMBEDDER=auto`` (default): CLIP when its weights load, otherwise the offline model with one WARNING line.
Importing this module imports torch (about 700 MB resident).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from app.config import Settings
from app.embedders.base import Embedder
from app.embedders.clip import OpenClipEmbedder
from app.embedders.efficientnet import MODEL_ID as EFFICIENTNET_MODEL_ID
from app.embedders.efficientnet import EfficientNetLiteEmbedder

__all__ = ["fallback_message", "load_torch_embedder"]

logger = logging.getLogger(__name__)


def fallback_message(settings: Settings, reason: str) -> str:
    """The one WARNING line of ``EMBEDDER=auto`` falling back from CLIP to the offline model."""
    return (
        f"CLIP weights {settings.clip_model}/{settings.clip_pretrained} could not be loaded ({reason}); using the "
        f"offline image-only model {EFFICIENTNET_MODEL_ID} - text search is disabled. Set EMBEDDER=efficientnet to "
        "skip this attempt."
    )


def load_torch_embedder(
    settings: Settings, collection_model: str | None = None, on_fallback: Callable[[str], None] | None = None
) -> Embedder:
    """Load the torch embedder the settings ask for.

    Applies ``settings.torch_threads`` (``torch.set_num_threads``) first when it is > 0.

    Args:
        settings: uses ``embedder``, ``clip_model``, ``clip_pretrained``, ``device``, ``embed_batch_size``,
            ``torch_threads`` and ``resolved_model_cache_dir``.

    Returns:
        ``EMBEDDER=clip``: an :class:`OpenClipEmbedder`. ``EMBEDDER=efficientnet``: an
        :class:`EfficientNetLiteEmbedder`. ``EMBEDDER=auto``: the CLIP model if it loads, otherwise the
        EfficientNet one, after logging a single WARNING that names the reason and that text search is off;
        but when ``collection_model`` says the existing collection was filled by the offline model, that model
        directly (a CLIP attempt could only end in a model mismatch).

    Args:
        collection_model: the ``model_id`` the existing collection records, ``None`` when there is none yet.
        on_fallback: receives the fallback message instead of it being logged as a WARNING (the export child
            hands it to the server, which logs it).

    Raises:
        RuntimeError / ValueError: ``EMBEDDER=clip`` and the CLIP weights cannot be loaded (message names the model,
            the weights and the cause), or the requested DEVICE is unavailable.
    """
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)

    if settings.embedder == "efficientnet" or (
        settings.embedder == "auto" and collection_model == EFFICIENTNET_MODEL_ID
    ):
        return EfficientNetLiteEmbedder.from_settings(settings)

    weights = f"{settings.clip_model}/{settings.clip_pretrained}"
    if settings.embedder == "clip":
        try:
            return OpenClipEmbedder.from_settings(settings)
        except Exception as exc:
            raise RuntimeError(
                f"EMBEDDER=clip, but the CLIP weights {weights} could not be loaded: {exc}. "
                "Check CLIP_MODEL / CLIP_PRETRAINED and network access (or MODEL_CACHE_DIR), "
                "or set EMBEDDER=efficientnet to use the offline image-only model."
            ) from exc

    # auto
    capture = _CaptureLibraryLogs()
    root = logging.getLogger()
    root.addFilter(capture)
    try:
        embedder: Embedder = OpenClipEmbedder.from_settings(settings)
    except Exception as exc:
        # The reason is in our WARNING below; open_clip's own root-logger error line would only repeat it.
        root.removeFilter(capture)
        (on_fallback or logger.warning)(fallback_message(settings, _one_line(exc)))
        return EfficientNetLiteEmbedder.from_settings(settings)
    root.removeFilter(capture)
    capture.replay(root)  # loaded fine: open_clip's warnings (e.g. QuickGELU mismatch) still deserve to be seen
    return embedder


class _CaptureLibraryLogs(logging.Filter):
    """Holds back WARNING+ records that open_clip logs through the *root* logger while CLIP loads.

    open_clip calls ``logging.error(...)`` directly, so it cannot be silenced by logger name; its records are
    recognised by the source file instead.
    """

    def __init__(self) -> None:
        super().__init__()
        import open_clip

        self._prefix = str(Path(open_clip.__file__).resolve().parent)
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and str(Path(record.pathname).resolve()).startswith(self._prefix):
            self.held.append(record)
            return False
        return True

    def replay(self, target: logging.Logger) -> None:
        for record in self.held:
            target.handle(record)
        self.held.clear()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."
