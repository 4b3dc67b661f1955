"""Serving without torch: the ONNX exports of the offline model and of CLIP (both towers and the tokenizer) give the
torch model's embeddings on real images, and a server process never imports torch, open_clip or gradio for them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.config import Settings
from app.embedders import OnnxEmbedder, OpenClipEmbedder, load_embedder
from app.embedders.clip_tokenizer import ClipTokenizer
from app.embedders.export import CHECK_TEXTS, MIN_COSINE, export_embedder
from app.embedders.onnx_model import clip_model_id, export_key
from tests.helpers import DATASETS, INSTANCE, PROJECT_ROOT, load_rgb

# Loads a model, a database or a server: left out of `make test-fast`.
pytestmark = pytest.mark.slow

PROJECT = PROJECT_ROOT
CAPTIONS = DATASETS / "caltech101_subset" / "labels.csv"
FILES = [
    "pdq_bridge/aaa-orig.jpg",
    "exif_landscape/Landscape_3.jpg",
    "exif_portrait/Portrait_5.jpg",
    "ukbench00120/ukbench00120_gray.jpg",
    "single_chelsea/skimage_chelsea.png",
    "single_coffee/skimage_coffee.png",
]
CLIP_ARCH = "ViT-S-32"


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1)))


@pytest.fixture(scope="module")
def images(datasets) -> list[Image.Image]:
    return [load_rgb(INSTANCE / rel) for rel in FILES]


def run_python(code: str, cwd: Path) -> dict:
    """Run ``code`` in a fresh interpreter (the project importable) and return the JSON it prints last."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={"PYTHONPATH": str(PROJECT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_app_service_loads_no_torch_open_clip_or_gradio(tmp_path):
    loaded = run_python(
        "import json, sys, app.service, app.main, app.embedders\n"
        "print(json.dumps([m for m in ('torch', 'open_clip', 'gradio', 'torchvision') if m in sys.modules]))",
        tmp_path,
    )
    assert loaded == []


def test_offline_model_is_served_from_onnx_without_torch(offline_embedder, model_cache_dir, images, tmp_path):
    assert isinstance(offline_embedder, OnnxEmbedder)
    assert (offline_embedder.model_id, offline_embedder.dim) == ("efficientnet-lite2:imagenet", 1280)
    from app.embedders.efficientnet import EfficientNetLiteEmbedder

    reference = EfficientNetLiteEmbedder(device="cpu", cpu_encoder="torch").embed_images(images)
    assert min_cosine(offline_embedder.embed_images(images), reference) >= MIN_COSINE
    # Pre-fitted images (what ingest workers hand over) give the same embedding.
    from app.imaging.prepare import fit_to_model

    fitted = [fit_to_model(im, offline_embedder.fit_size) for im in images]
    np.testing.assert_allclose(offline_embedder.embed_images(fitted), offline_embedder.embed_images(images), atol=1e-6)

    # A fresh server process finds the export by name and never imports torch.
    result = run_python(
        "import json, sys\n"
        "from app.config import Settings\n"
        "from app.embedders import load_embedder\n"
        f"e = load_embedder(Settings(_env_file=None, embedder='auto', "
        f"model_cache_dir={str(model_cache_dir)!r}, data_dir={str(tmp_path)!r}), "
        "collection_model='efficientnet-lite2:imagenet')\n"
        "print(json.dumps({'model': e.model_id, 'torch': 'torch' in sys.modules, "
        "'open_clip': 'open_clip' in sys.modules}))",
        tmp_path,
    )
    assert result == {"model": "efficientnet-lite2:imagenet", "torch": False, "open_clip": False}


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory) -> tuple[Path, OpenClipEmbedder]:
    torch.manual_seed(1)
    model = OpenClipEmbedder(CLIP_ARCH, pretrained=None, device="cpu", batch_size=4)
    path = tmp_path_factory.mktemp("clip") / "checkpoint.pt"
    torch.save(model.model.state_dict(), path)
    return path, OpenClipEmbedder(CLIP_ARCH, pretrained=str(path), device="cpu", cpu_encoder="torch")


def test_clip_checkpoint_both_towers_served_from_onnx(clip_checkpoint, images, tmp_path):
    path, reference = clip_checkpoint
    settings = Settings(
        _env_file=None,
        embedder="clip",
        clip_model=CLIP_ARCH,
        clip_pretrained=str(path),
        device="cpu",
        data_dir=tmp_path,
        model_cache_dir=tmp_path / "models",
    )
    served = load_embedder(settings)  # exports in a child process, then loads the graphs here
    assert isinstance(served, OnnxEmbedder) and served.supports_text
    assert served.model_id == reference.model_id == clip_model_id(CLIP_ARCH, str(path))
    assert (tmp_path / "models" / "onnx" / export_key(served.model_id) / "text.onnx").is_file()
    assert min_cosine(served.embed_images(images), reference.embed_images(images)) >= MIN_COSINE
    texts = ["a photo of a bridge", "a grey cat on a sofa", "coffee", "x" * 500]
    assert min_cosine(served.embed_texts(texts), reference.embed_texts(texts)) >= MIN_COSINE
    assert served.embed_texts([]).shape == (0, reference.dim)
    # Only the finished export is left in the cache: no temporary folder of the child's.
    assert [p.name for p in (tmp_path / "models" / "onnx").iterdir()] == [export_key(served.model_id)]


def test_random_init_clip_export_matches_torch(images, tmp_path):
    torch.manual_seed(2)
    model = OpenClipEmbedder(CLIP_ARCH, pretrained=None, device="cpu", batch_size=4)
    manifest = export_embedder(model, tmp_path, images=images)  # checks cosine >= MIN_COSINE itself
    served = OnnxEmbedder(manifest, batch_size=3)
    assert min_cosine(served.embed_images(images), model.embed_images(images)) >= MIN_COSINE
    assert min_cosine(served.embed_texts(CHECK_TEXTS), model.embed_texts(CHECK_TEXTS)) >= MIN_COSINE


def test_torch_free_tokenizer_matches_open_clip_on_real_labels(clip_checkpoint, tmp_path):
    from open_clip.tokenizer import default_bpe

    _, reference = clip_checkpoint
    labels = sorted({line.split(",")[1].replace("_", " ") for line in CAPTIONS.read_text().splitlines()[1:]})
    texts = [*CHECK_TEXTS, *labels, *(f"a photo of a {label}, the kind seen in museums" for label in labels)]
    ours = ClipTokenizer(default_bpe())(texts)
    np.testing.assert_array_equal(ours, reference._tokenizer(texts).numpy())
