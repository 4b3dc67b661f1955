"""CPU encoder paths (CPU_ENCODER=torch|bf16|int8|onnx) on real images: same shapes and dtype, embeddings close to
fp32, the setting picks the path, and the ONNX export is cached on disk."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.config import Settings
from app.embedders import EfficientNetLiteEmbedder, OpenClipEmbedder, load_embedder
from app.embedders.cpu_encoder import OnnxEncoder, build_encoder, onnx_path
from tests.helpers import INSTANCE, assert_unit_rows, cosines, load_rgb

# Loads a model, a database or a server: left out of `make test-fast`.
pytestmark = pytest.mark.slow

FILES = [
    "pdq_bridge/aaa-orig.jpg",
    "exif_landscape/Landscape_3.jpg",
    "ukbench00120/ukbench00120_gray.jpg",
    "ocv_leuven_light/leuvenB.jpg",
    "single_chelsea/skimage_chelsea.png",
    "single_coffee/skimage_coffee.png",
]

# Worst row-wise cosine vs fp32 accepted per path. bf16: bench/encoder.py measured min 0.998 / mean 0.9995 over the
# 273 instance_small images (docs/benchmarks.md); int8 is fp32 on EfficientNet (no Linear layer); ONNX is the same
# fp32 maths re-associated.
EFFNET_MIN_COSINE = {"bf16": 0.995, "int8": 0.99999, "onnx": 0.9999}
# Random-init ViT-S-32 (the test CLIP): int8 really quantizes its Linear layers, so it moves most.
CLIP_ARCH = "ViT-S-32"
CLIP_MIN_COSINE = {"bf16": 0.999, "int8": 0.995, "onnx": 0.9999}


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [load_rgb(INSTANCE / rel) for rel in FILES]


@pytest.fixture(scope="module")
def fp32_effnet(images) -> np.ndarray:
    return EfficientNetLiteEmbedder(device="cpu", batch_size=4).embed_images(images)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.mark.parametrize("path", ["bf16", "int8", "onnx"])
def test_effnet_paths_close_to_fp32(path, images, fp32_effnet, model_cache):
    embedder = EfficientNetLiteEmbedder(device="cpu", batch_size=4, cpu_encoder=path, cache_dir=model_cache)
    assert embedder.encoder.name == path
    assert embedder.model_id == "efficientnet-lite2:imagenet"  # same weights, same space: same collection
    emb = embedder.embed_images(images)  # 6 images, batch 4: a full and a partial batch
    assert_unit_rows(emb, len(images), 1280)
    assert cosines(emb, fp32_effnet).min() >= EFFNET_MIN_COSINE[path]
    assert embedder.embed_images([]).shape == (0, 1280)


def test_effnet_int8_warns_it_has_nothing_to_quantize(caplog, model_cache):
    caplog.set_level(logging.WARNING)
    EfficientNetLiteEmbedder(device="cpu", cpu_encoder="int8")
    assert any("no nn.Linear layer" in r.getMessage() for r in caplog.records)


def test_onnx_export_is_cached(images, fp32_effnet, tmp_path):
    first = EfficientNetLiteEmbedder(device="cpu", batch_size=8, cpu_encoder="onnx", cache_dir=tmp_path)
    assert isinstance(first.encoder, OnnxEncoder) and first.encoder.exported
    path = first.encoder.path
    assert path.is_file() and path.parent == tmp_path / "onnx"
    assert f"torch{torch.__version__.replace('+', '_')}" in path.name and path.name.endswith("-260x260.onnx")
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    mtime = path.stat().st_mtime_ns

    second = EfficientNetLiteEmbedder(device="cpu", batch_size=8, cpu_encoder="onnx", cache_dir=tmp_path)
    assert isinstance(second.encoder, OnnxEncoder) and not second.encoder.exported
    assert second.encoder.path == path and path.stat().st_mtime_ns == mtime
    np.testing.assert_allclose(second.embed_images(images), first.embed_images(images), atol=1e-6)


def test_onnx_unreadable_cache_file_is_re_exported(tmp_path, caplog):
    probe = EfficientNetLiteEmbedder(device="cpu", cpu_encoder="torch")
    from app.embedders.efficientnet import _PooledFeatures

    target = onnx_path(_PooledFeatures(probe._model), (260, 260), probe.model_id, tmp_path)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not an onnx graph")
    caplog.set_level(logging.WARNING)
    embedder = EfficientNetLiteEmbedder(device="cpu", cpu_encoder="onnx", cache_dir=tmp_path)
    assert embedder.encoder.name == "onnx" and embedder.encoder.exported
    assert embedder.encoder.path == target and target.stat().st_size > 1_000_000
    assert any("Re-exporting" in r.getMessage() for r in caplog.records)


def test_setting_selects_the_path(tmp_path, model_cache):
    for path in ("torch", "bf16"):
        settings = Settings(
            _env_file=None,
            data_dir=tmp_path,
            model_cache_dir=model_cache,
            embedder="efficientnet",
            device="cpu",
            cpu_encoder=path,
        )
        embedder = load_embedder(settings)
        assert embedder.encoder.name == path
    with pytest.raises(ValueError):
        Settings(_env_file=None, cpu_encoder="fp8")
    with pytest.raises(ValueError, match="CPU_ENCODER"):
        EfficientNetLiteEmbedder(device="cpu", cpu_encoder="fp8")


def test_build_encoder_is_ignored_off_cpu():
    # On CUDA the fp16 path stays whatever CPU_ENCODER says (checked without a GPU: nothing runs here).
    tower = torch.nn.Linear(4, 2)
    encoder = build_encoder(
        tower, cpu_encoder="onnx", device="cuda", input_size=(1, 1), model_id="x", cache_dir=None, threads=1
    )
    assert encoder.name == "cuda-fp16"


# --- open_clip image tower (random weights, no download) -------------------------------------------------------


@pytest.fixture(scope="module")
def fp32_clip(images) -> np.ndarray:
    torch.manual_seed(0)
    return OpenClipEmbedder(CLIP_ARCH, pretrained=None, device="cpu", batch_size=4).embed_images(images)


@pytest.mark.parametrize("path", ["bf16", "int8", "onnx"])
def test_clip_image_tower_paths(path, images, fp32_clip, model_cache):
    torch.manual_seed(0)  # the same random weights as the fp32 reference
    clip = OpenClipEmbedder(
        CLIP_ARCH, pretrained=None, device="cpu", batch_size=4, cpu_encoder=path, cache_dir=model_cache
    )
    assert clip.encoder.name == path
    assert clip.model_id == f"open_clip:{CLIP_ARCH}/random-init"
    emb = clip.embed_images(images)
    assert_unit_rows(emb, len(images), 384)
    assert cosines(emb, fp32_clip).min() >= CLIP_MIN_COSINE[path]
    assert_unit_rows(clip.embed_texts(["a bridge"]), 1, 384)  # the text tower is untouched
