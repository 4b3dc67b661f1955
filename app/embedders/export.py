"""Export a model once to ONNX, so that the server runs it with ONNX Runtime and never imports torch.

The server (:func:`app.embedders.load_embedder`) runs ``python -m app.embedders.export`` in a CHILD process when the
export it needs is not in ``MODEL_CACHE_DIR/onnx`` yet: torch (about 700 MB resident) and open_clip are imported
there and leave with the child. The child loads the model with torch exactly as the torch path would (``EMBEDDER=auto``
falls back from CLIP to the offline model with one warning), exports the image tower (and CLIP's text tower plus its
tokenizer's merges file), checks the exported graphs against torch, and prints one JSON line:
``{"export": "<folder>", "warning": "..." | null}``, or ``{"error": "..."}`` with exit status 1.

Checks (an export that fails one is deleted and never served): image embeddings of the ONNX path, with the
torch-free preprocessing of :mod:`app.embedders.preprocess`, against torch fp32 on a set of test images: cosine
>= :data:`MIN_COSINE` (0.9999) for every image; CLIP: :class:`app.embedders.clip_tokenizer.ClipTokenizer` gives the
same token ids as open_clip's tokenizer on :data:`CHECK_TEXTS`, and the text embeddings meet the same cosine.
The folder is written under a temporary name and renamed when complete: a failed or killed export leaves nothing a
later start would use, and its temporary folder is removed.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.config import Settings
from app.embedders.base import Embedder
from app.embedders.cpu_encoder import export_graph
from app.embedders.onnx_model import MANIFEST, MANIFEST_FORMAT, Manifest, OnnxEmbedder, export_key, find_export

logger = logging.getLogger(__name__)

MIN_COSINE = 0.9999
"""Worst row-wise cosine between the exported graph and torch fp32 that is accepted (fp32 re-association alone
stays above 0.99999; a wrong export or a preprocessing mismatch is far below)."""

CHECK_TEXTS = [
    "a photo of a cat",
    "A Bridge over the RIVER at night!",
    "café, naïve résumé — 東京 2024",
    "",
    "don't stop   the   &amp; music's 'quoted' words",
    "x" * 400,
]


class UnsupportedExport(RuntimeError):
    """The model's preprocessing or tokenizer is not one the torch-free path reproduces; serve it with torch."""


def check_images() -> list[Image.Image]:
    """Deterministic test images with structure at several scales and aspect ratios (no files needed)."""
    rng = np.random.default_rng(0)
    images = []
    for w, h in [(320, 240), (240, 400), (260, 260), (1000, 300), (64, 64)]:
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([(x * 255 / w), (y * 255 / h), ((x + y) % 64) * 4], axis=-1)
        noise = rng.normal(0, 20, size=(h, w, 3))
        images.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB"))
    return images


class _TextTower(torch.nn.Module):
    """CLIP's text tower as one module: ``(N, context_length)`` int64 token ids -> ``(N, D)`` unnormalised."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1)))


def export_embedder(embedder: Embedder, cache_dir: Path, images: Sequence[Image.Image] | None = None) -> Manifest:
    """Export a loaded torch embedder into ``cache_dir/onnx/<key>`` and check it; returns its manifest.

    Args:
        embedder: an :class:`app.embedders.efficientnet.EfficientNetLiteEmbedder` or
            :class:`app.embedders.clip.OpenClipEmbedder` on the CPU. Random-init weights (tests) all share the key
            ``open_clip:<arch>/random-init``: export them only into an empty ``cache_dir``.
            images: extra images to check on (tests pass real photos); :func:`check_images` always.

    Raises:
        UnsupportedExport: the model's preprocessing or tokenizer is not reproduced without torch.
        RuntimeError: a check failed (the export is deleted).
    """
    from app.embedders.clip import OpenClipEmbedder
    from app.embedders.efficientnet import MEAN, STD, EfficientNetLiteEmbedder, _PooledFeatures

    if isinstance(embedder, EfficientNetLiteEmbedder):
        tower, size, mean, std = _PooledFeatures(embedder._model).eval(), embedder.input_size, MEAN, STD
        text_tower = tokenizer = None
    elif isinstance(embedder, OpenClipEmbedder):
        cfg = getattr(embedder.model.visual, "preprocess_cfg", {})
        if (
            cfg.get("resize_mode", "shortest") != "shortest"
            or cfg.get("interpolation", "bicubic") != "bicubic"
            or not embedder.input_size
        ):
            raise UnsupportedExport(f"preprocessing {cfg} is not 'shortest side, bicubic, square centre crop'")
        size, mean, std = embedder.input_size, tuple(cfg["mean"]), tuple(cfg["std"])
        tower, text_tower, tokenizer = embedder.model.visual, _TextTower(embedder.model).eval(), embedder._tokenizer
        if type(tokenizer).__name__ != "SimpleTokenizer" or getattr(tokenizer, "reduction_fn", None) is not None:
            raise UnsupportedExport(f"tokenizer {type(tokenizer).__name__} is not CLIP's BPE tokenizer")
    else:
        raise UnsupportedExport(f"no ONNX export for {type(embedder).__name__}")

    key = export_key(embedder.model_id)
    existing = find_export(Path(cache_dir), key)
    if existing is not None:  # made by an earlier run (e.g. auto fell back to a model exported before)
        return existing
    root = Path(cache_dir) / "onnx"
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        probe = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        export_graph(tower, probe, tmp / "image.onnx")
        manifest = {
            "format": MANIFEST_FORMAT,
            "model_id": embedder.model_id,
            "dim": embedder.dim,
            "pixels": {"size": size, "mean": list(mean), "std": list(std)},
            "text_graph": None,
            "merges": None,
            "context_length": None,
            "exported_with": {"torch": torch.__version__},
        }
        if text_tower is not None:
            context = int(tokenizer.context_length)
            tokens = torch.zeros(2, context, dtype=torch.long)
            tokens[:, 0], tokens[:, 1], tokens[:, 2] = tokenizer.sot_token_id, 320, tokenizer.eot_token_id
            export_graph(text_tower, tokens, tmp / "text.onnx", input_name="tokens")
            from open_clip.tokenizer import default_bpe

            shutil.copyfile(default_bpe(), tmp / "merges.txt.gz")
            manifest.update(text_graph="text.onnx", merges="merges.txt.gz", context_length=context)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _check(embedder, OnnxEmbedder(Manifest.read(tmp), batch_size=4), [*check_images(), *(images or [])])
        if final.exists():  # an older or concurrent export of the same key: the checked new one wins
            shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    found = find_export(Path(cache_dir), key)
    if found is None:
        raise RuntimeError(f"the export {final} could not be read back")
    return found


def _check(reference: Embedder, exported: OnnxEmbedder, images: Sequence[Image.Image]) -> None:
    """Raise RuntimeError unless the exported model matches torch fp32 (see the module docstring)."""
    worst = _min_cosine(exported.embed_images(images), reference.embed_images(images))
    if worst < MIN_COSINE:
        raise RuntimeError(f"the exported image tower disagrees with torch: worst cosine {worst:.6f} < {MIN_COSINE}")
    if exported.supports_text:
        ours = exported._tokenizer(CHECK_TEXTS)
        theirs = reference._tokenizer(CHECK_TEXTS).numpy()
        if not np.array_equal(ours, theirs):
            raise RuntimeError("the torch-free CLIP tokenizer gives other token ids than open_clip's")
        worst_text = _min_cosine(exported.embed_texts(CHECK_TEXTS), reference.embed_texts(CHECK_TEXTS))
        if worst_text < MIN_COSINE:
            raise RuntimeError(f"the exported text tower disagrees with torch: worst cosine {worst_text:.6f}")
    logger.info("Checked the export of %s against torch: worst image cosine %.6f", reference.model_id, worst)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m app.embedders.export [--settings JSON]``: prepare the export the settings ask for.

    Prints one JSON line (see the module docstring); exit status 0 on success, 1 on failure, 3 when the model has
    no torch-free form (the caller then serves it with torch).
    """
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    # "--settings JSON": the fields the server resolved (app.embedders._CHILD_FIELDS); otherwise the environment.
    fields = json.loads(argv[argv.index("--settings") + 1]) if argv and "--settings" in argv else {}
    settings = Settings(**fields).model_copy(update={"cpu_encoder": "torch", "device": "cpu"})
    from app.embedders.torch_loader import load_torch_embedder

    warnings: list[str] = []
    try:
        embedder = load_torch_embedder(settings, on_fallback=warnings.append)
        manifest = export_embedder(embedder, settings.resolved_model_cache_dir)
    except UnsupportedExport as exc:
        print(json.dumps({"unsupported": str(exc)}), flush=True)
        return 3
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it there
        print(json.dumps({"error": " ".join(str(exc).split()) or type(exc).__name__}), flush=True)
        return 1
    print(json.dumps({"export": str(manifest.folder), "warning": warnings[0] if warnings else None}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
