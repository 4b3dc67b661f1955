"""Image (and text) embedders, and the one model lifecycle: :func:`load_embedder` picks, exports and loads;
:func:`embedder_for_collection` does so for an existing collection (``EMBEDDER=none`` included).

On a CPU with ``CPU_ENCODER=onnx`` (the default) the server runs the model from its ONNX export with ONNX Runtime
(:class:`app.embedders.onnx_model.OnnxEmbedder`) and never imports torch or open_clip: the export is made once, in
a child process (:mod:`app.embedders.export`), and found again by name in ``MODEL_CACHE_DIR/onnx``. On a GPU, or with
another ``CPU_ENCODER``, the torch embedders run in process (:mod:`app.embedders.torch_loader`; fp16 on CUDA).

Importing this package imports neither torch nor open_clip; ``EfficientNetLiteEmbedder`` and ``OpenClipEmbedder``
are importable from it and load torch when first named.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.config import Settings
from app.embedders.base import Embedder
from app.embedders.onnx_model import (
    EFFICIENTNET_MODEL_ID,
    Manifest,
    OnnxEmbedder,
    clip_model_id,
    export_key,
    find_export,
)

if TYPE_CHECKING:
    from app.embedders.clip import OpenClipEmbedder
    from app.embedders.efficientnet import EfficientNetLiteEmbedder
    from app.vectordb.base import CollectionInfo

__all__ = [
    "EfficientNetLiteEmbedder",
    "Embedder",
    "OnnxEmbedder",
    "OpenClipEmbedder",
    "embedder_for_collection",
    "load_embedder",
]

logger = logging.getLogger(__name__)

# Settings the export child needs; it gets them explicitly, so that settings built in code (tests, scripts) and
# settings from the environment behave the same.
_CHILD_FIELDS = {"embedder", "clip_model", "clip_pretrained", "data_dir", "model_cache_dir", "embed_batch_size"}


def __getattr__(name: str) -> Any:
    """The torch embedder classes, imported (with torch) only when named."""
    if name == "EfficientNetLiteEmbedder":
        from app.embedders.efficientnet import EfficientNetLiteEmbedder

        return EfficientNetLiteEmbedder
    if name == "OpenClipEmbedder":
        from app.embedders.clip import OpenClipEmbedder

        return OpenClipEmbedder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _accelerator_possible() -> bool:
    """Whether this machine might have a GPU torch could use; ``False`` is certain (no driver device nodes, not a
    Mac), so ``DEVICE=auto`` can pick the CPU without importing torch."""
    dev = Path("/dev")
    return (
        sys.platform == "darwin"
        or (dev / "nvidiactl").exists()
        or any(dev.glob("nvidia[0-9]*"))
        or (dev / "kfd").exists()  # ROCm
        or (dev / "dxg").exists()  # WSL's GPU paravirtualisation
    )


def serves_with_onnx(settings: Settings) -> bool:
    """Whether the model runs from its ONNX export (CPU, ``CPU_ENCODER=onnx``), decided without importing torch
    when the device is certain to be the CPU."""
    if settings.cpu_encoder != "onnx":
        return False
    if settings.device == "cpu" or (settings.device == "auto" and not _accelerator_possible()):
        return True
    from app.embedders.device import resolve_device

    return resolve_device(settings.device) == "cpu"


def load_embedder(settings: Settings, collection_model: str | None = None) -> Embedder | None:
    """Load the model the settings ask for; ``None`` for ``EMBEDDER=none``.

    ``EMBEDDER=auto`` tries CLIP and falls back to the offline model with one WARNING naming the reason; when the
    existing collection was filled by the offline model (``collection_model``), that model is loaded directly, since
    a CLIP collection could not be searched with it anyway.

    Args:
        settings: uses ``embedder``, ``clip_model``, ``clip_pretrained``, ``device``, ``cpu_encoder``,
            ``embed_batch_size``, ``torch_threads`` and ``resolved_model_cache_dir``.
        collection_model: the ``model_id`` the existing collection records, ``None`` when there is none yet.

    Returns:
        An :class:`OnnxEmbedder` when :func:`serves_with_onnx` (the export is made first if it is not cached, in a
        child process), else the torch embedder.

    Raises:
        RuntimeError / ValueError: ``EMBEDDER=clip`` and the CLIP weights cannot be loaded (the message names the
            model, the weights and the cause), or the requested DEVICE is unavailable.
    """
    if settings.embedder == "none":
        return None
    family = settings.embedder
    if family == "auto" and collection_model == EFFICIENTNET_MODEL_ID:
        family = "efficientnet"
    if not serves_with_onnx(settings):
        from app.embedders.torch_loader import load_torch_embedder

        return load_torch_embedder(settings.model_copy(update={"embedder": family}), collection_model)

    wanted = EFFICIENTNET_MODEL_ID if family == "efficientnet" else clip_model_id(*_clip(settings))
    manifest = find_export(settings.resolved_model_cache_dir, export_key(wanted))
    if manifest is None:
        manifest = _export_in_child(settings, family)
        if manifest is None:  # a model with no torch-free form: serve it with torch after all
            from app.embedders.torch_loader import load_torch_embedder

            return load_torch_embedder(settings.model_copy(update={"embedder": family}), collection_model)
    return OnnxEmbedder(manifest, batch_size=settings.embed_batch_size, threads=settings.torch_threads)


def embedder_for_collection(settings: Settings, collection: CollectionInfo | None) -> Embedder:
    """The model that serves ``collection`` (``None``: the database has none yet): :func:`load_embedder`'s, or with
    ``EMBEDDER=none`` a :class:`app.embedders.none.VectorOnlyEmbedder` that stands in for whichever model filled it.

    Raises ``RuntimeError`` for ``EMBEDDER=none`` with no collection yet, and what :func:`load_embedder` raises.
    """
    embedder = load_embedder(settings, collection_model=None if collection is None else collection.model_id)
    if embedder is not None:
        return embedder
    from app.embedders.none import VectorOnlyEmbedder

    if collection is None:
        raise RuntimeError(
            "EMBEDDER=none serves an existing collection, but the database has none yet: index "
            "images first with a model (EMBEDDER=auto, clip or efficientnet)."
        )
    return VectorOnlyEmbedder(collection.model_id, collection.dim)


def _clip(settings: Settings) -> tuple[str, str]:
    return settings.clip_model, settings.clip_pretrained


def _export_in_child(settings: Settings, family: str) -> Manifest | None:
    """Run :mod:`app.embedders.export` in a child process; the manifest it made, or ``None`` (no torch-free form).

    The child's log goes to this process's stderr; the auto fallback's WARNING is logged here, once.
    Raises RuntimeError with the child's message when it fails.
    """
    fields = settings.model_dump(mode="json", include=_CHILD_FIELDS)
    fields["model_cache_dir"] = str(settings.resolved_model_cache_dir)
    fields["embedder"] = family
    logger.info("Preparing the ONNX export of the %s model in a child process (once per model)", family)
    # The child must import this same source tree, wherever the current directory is.
    project = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [project, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "app.embedders.export", "--settings", json.dumps(fields)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        text=True,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"error": f"the export child exited with status {proc.returncode}"}
    if "unsupported" in result:
        logger.info("No ONNX form for this model (%s); it runs with torch", result["unsupported"])
        return None
    if "error" in result:
        raise RuntimeError(result["error"])
    if result.get("warning"):
        logger.warning("%s", result["warning"])
    return Manifest.read(Path(result["export"]))
