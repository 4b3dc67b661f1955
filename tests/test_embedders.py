"""Embedders on real images: the offline EfficientNet-Lite2 model, the open_clip code path (random weights and
local checkpoints, no downloads) and load_embedder's choice and fallback."""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.config import Settings
from app.embedders import EfficientNetLiteEmbedder, Embedder, OnnxEmbedder, OpenClipEmbedder, load_embedder
from app.embedders.device import resolve_device
from app.errors import NoTextTowerError
from tests.helpers import INSTANCE, assert_unit_rows, load_rgb

# Loads a model, a database or a server: left out of `make test-fast`.
pytestmark = pytest.mark.slow

# A few instance_small groups whose members are edits / re-encodes / EXIF rotations / relighting of one scene,
# plus unrelated distractor photos.
GROUPS = {
    "pdq_bridge": ["aaa-orig.jpg", "blur-a-little.jpg", "bridge-5-flipx.jpg", "mode_L.png"],
    "exif_landscape": ["Landscape_0.jpg", "Landscape_3.jpg", "Landscape_6.jpg"],
    "ukbench00120": ["ukbench00120.jpg", "ukbench00120_gray.jpg", "ukbench00120_hflip.jpg", "ukbench00120_resize.jpg"],
    "ocv_leuven_light": ["leuvenA.jpg", "leuvenB.jpg"],
}
DISTRACTORS = [
    "single_chelsea/skimage_chelsea.png",
    "single_coffee/skimage_coffee.png",
    "single_rocket/skimage_rocket.jpg",
    "single_astronaut/skimage_astronaut.png",
    "single_china/sklearn_china.jpg",
]
CLIP_ARCH = "ViT-S-32"  # smallest built-in ViT with the standard CLIP tokenizer: ~0.3 s to build on CPU
UNDOWNLOADABLE = ("ViT-B-32", "laion2b_s34b_b79k")  # a real tag; its weights are never in the tests' cache dir


def make_settings(tmp_path: Path, **fields) -> Settings:
    """Settings isolated from any .env file or MODEL_CACHE_DIR: the model cache is an empty folder unless given."""
    fields.setdefault("model_cache_dir", tmp_path / "models")
    return Settings(_env_file=None, data_dir=tmp_path, device="cpu", **fields)


def hub_reachable() -> bool:
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=3):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def retrieval_set() -> tuple[list[Image.Image], list[str]]:
    images, labels = [], []
    for group, files in GROUPS.items():
        for name in files:
            images.append(load_rgb(INSTANCE / group / name))
            labels.append(group)
    for i, rel in enumerate(DISTRACTORS):
        images.append(load_rgb(INSTANCE / rel))
        labels.append(f"distractor{i}")
    return images, labels


@pytest.fixture(scope="module")
def effnet() -> EfficientNetLiteEmbedder:
    return EfficientNetLiteEmbedder(device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def effnet_embeddings(effnet, retrieval_set) -> np.ndarray:
    return effnet.embed_images(retrieval_set[0])


@pytest.fixture(scope="module")
def clip_random() -> OpenClipEmbedder:
    torch.manual_seed(0)
    return OpenClipEmbedder(CLIP_ARCH, pretrained=None, device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def clip_checkpoint(clip_random, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "random.pt"
    torch.save(clip_random.model.state_dict(), path)
    return path


# --- device --------------------------------------------------------------------------------------------------


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in {"cpu", "cuda", "mps"}
    with pytest.raises(ValueError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


# --- EfficientNet-Lite2 --------------------------------------------------------------------------------------


def test_effnet_shape_dtype_norm(effnet, effnet_embeddings, retrieval_set):
    assert isinstance(effnet, Embedder)
    assert (effnet.model_id, effnet.dim, effnet.supports_text) == ("efficientnet-lite2:imagenet", 1280, False)
    assert_unit_rows(effnet_embeddings, len(retrieval_set[0]), 1280)
    assert effnet.embed_images([]).shape == (0, 1280)


def test_effnet_deterministic_and_batch_independent(effnet, effnet_embeddings, retrieval_set):
    images = retrieval_set[0][:5]  # batch_size 4: one full batch and one partial one
    first = effnet.embed_images(images)
    np.testing.assert_array_equal(effnet.embed_images(images), first)
    # Same images grouped into other batches: equal up to float summation order.
    np.testing.assert_allclose(first, effnet_embeddings[:5], atol=1e-5)
    single = EfficientNetLiteEmbedder(device="cpu", batch_size=1)
    np.testing.assert_allclose(single.embed_images(images[2:3])[0], effnet_embeddings[2], atol=1e-5)


def test_effnet_accepts_non_rgb(effnet, retrieval_set):
    rgb = retrieval_set[0][0]
    gray_as_l = rgb.convert("L")
    gray_as_rgb = gray_as_l.convert("RGB")
    np.testing.assert_allclose(effnet.embed_images([gray_as_l]), effnet.embed_images([gray_as_rgb]), atol=1e-6)


def test_effnet_retrieval_top1_in_group(effnet_embeddings, retrieval_set):
    labels = retrieval_set[1]
    sims = effnet_embeddings @ effnet_embeddings.T
    np.fill_diagonal(sims, -np.inf)
    for i, label in enumerate(labels):
        if label.startswith("distractor"):
            continue
        best = int(np.argmax(sims[i]))
        assert labels[best] == label, f"query {i} ({label}) got {labels[best]} as nearest neighbour"


def test_effnet_has_no_text_tower(effnet):
    with pytest.raises(NoTextTowerError):
        effnet.embed_texts(["a bridge"])


# --- open_clip, no downloads ---------------------------------------------------------------------------------


def test_clip_random_init_shapes(clip_random, retrieval_set):
    assert isinstance(clip_random, Embedder)
    assert clip_random.model_id == f"open_clip:{CLIP_ARCH}/random-init"
    assert clip_random.supports_text is True
    assert clip_random.dim == 384
    images = retrieval_set[0][:5]
    assert_unit_rows(clip_random.embed_images(images), 5, 384)
    texts = clip_random.embed_texts(["a photo of a cat", "a bridge over a river", "", "x" * 1000, "café"])
    assert_unit_rows(texts, 5, 384)
    assert not np.allclose(texts[0], texts[1])
    assert clip_random.embed_images([]).shape == (0, 384)
    assert clip_random.embed_texts([]).shape == (0, 384)


def test_clip_checkpoint_file_matches_in_memory_model(clip_random, clip_checkpoint, retrieval_set, tmp_path):
    loaded = OpenClipEmbedder(CLIP_ARCH, pretrained=str(clip_checkpoint), device="cpu", batch_size=4)
    digest = hashlib.sha256(clip_checkpoint.read_bytes()).hexdigest()[:16]
    assert loaded.model_id == f"open_clip:{CLIP_ARCH}/file-{digest}"

    images = retrieval_set[0][:5]
    texts = ["a photo of a cat", "a bridge"]
    np.testing.assert_allclose(loaded.embed_images(images), clip_random.embed_images(images), rtol=0, atol=1e-6)
    np.testing.assert_allclose(loaded.embed_texts(texts), clip_random.embed_texts(texts), rtol=0, atol=1e-6)

    state = clip_random.model.state_dict()
    state["logit_scale"] = state["logit_scale"] + 1.0
    other_path = tmp_path / "other.pt"
    torch.save(state, other_path)
    other = OpenClipEmbedder(CLIP_ARCH, pretrained=other_path, device="cpu")
    assert other.model_id.startswith(f"open_clip:{CLIP_ARCH}/file-")
    assert other.model_id != loaded.model_id


def test_clip_rejects_unknown_pretrained_value():
    with pytest.raises(ValueError, match="neither a pretrained tag"):
        OpenClipEmbedder(CLIP_ARCH, pretrained="no_such_tag_or_file", device="cpu")


# huggingface_hub's own retry loop would take about 46 s (5 retries per file, 1-8 s back-off, two files); the probe
# of the weights host must fail well before that. The server's load runs in a child process that also imports torch
# and open_clip (several seconds on a busy 2-core machine), hence the larger bound there.
RETRY_LOOP_S = 46


@pytest.mark.skipif(hub_reachable(), reason="checks the no-network path; huggingface.co is reachable here")
def test_clip_tag_without_network_fails_fast(tmp_path, caplog, offline_embedder, model_cache_dir):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="unreachable"):
        OpenClipEmbedder(*UNDOWNLOADABLE, device="cpu", cache_dir=tmp_path)
    assert time.monotonic() - start < 15

    caplog.clear()  # the direct construction above lets open_clip log its own error; load_embedder must not
    caplog.set_level(logging.INFO)
    start = time.monotonic()
    embedder = load_embedder(make_settings(tmp_path, embedder="auto", model_cache_dir=model_cache_dir))
    assert isinstance(embedder, OnnxEmbedder) and embedder.model_id == "efficientnet-lite2:imagenet"
    assert time.monotonic() - start < RETRY_LOOP_S
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    assert any("unreachable" in r.getMessage() for r in caplog.records)


# --- load_embedder -------------------------------------------------------------------------------------------


@pytest.fixture
def hub_offline(monkeypatch):
    """No download, whether or not this machine has network: HF_HUB_OFFLINE=1 makes the tag cache-only."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_load_embedder_auto_falls_back_with_one_warning(tmp_path, caplog, hub_offline, model_cache_dir):
    model, tag = UNDOWNLOADABLE
    settings = make_settings(
        tmp_path, embedder="auto", clip_model=model, clip_pretrained=tag, model_cache_dir=model_cache_dir
    )
    caplog.set_level(logging.WARNING)
    start = time.monotonic()
    embedder = load_embedder(settings)
    elapsed = time.monotonic() - start

    assert isinstance(embedder, OnnxEmbedder) and embedder.model_id == "efficientnet-lite2:imagenet"
    assert embedder.supports_text is False
    assert elapsed < RETRY_LOOP_S, f"fallback took {elapsed:.1f} s"
    # The failed CLIP attempt left no export behind, finished or half-made.
    assert sorted(p.name for p in (model_cache_dir / "onnx").iterdir()) == [
        p.name for p in (model_cache_dir / "onnx").iterdir() if p.name.startswith("efficientnet-lite2")
    ]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert warnings[0].levelno == logging.WARNING
    assert f"{model}/{tag}" in message
    assert "efficientnet-lite2:imagenet" in message
    assert "text search is disabled" in message
    assert "EMBEDDER=efficientnet" in message
    with pytest.raises(NoTextTowerError):
        embedder.embed_texts(["a bridge"])


def test_load_embedder_clip_with_checkpoint(clip_checkpoint, tmp_path):
    settings = make_settings(
        tmp_path, embedder="clip", clip_model=CLIP_ARCH, clip_pretrained=str(clip_checkpoint), cpu_encoder="torch"
    )
    embedder = load_embedder(settings)
    assert isinstance(embedder, OpenClipEmbedder)
    assert embedder.model_id.startswith(f"open_clip:{CLIP_ARCH}/file-")
    assert embedder.supports_text is True


@pytest.mark.parametrize("cpu_encoder", ["torch", "onnx"])
def test_load_embedder_clip_errors_propagate(tmp_path, hub_offline, cpu_encoder):
    model, tag = UNDOWNLOADABLE
    settings = make_settings(tmp_path, embedder="clip", clip_model=model, clip_pretrained=tag, cpu_encoder=cpu_encoder)
    with pytest.raises(RuntimeError, match="EMBEDDER=efficientnet"):
        load_embedder(settings)
    assert not (tmp_path / "models" / "onnx").exists() or not any((tmp_path / "models" / "onnx").iterdir())


def test_load_embedder_efficientnet_and_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        settings = make_settings(tmp_path, embedder="efficientnet", torch_threads=1, cpu_encoder="torch")
        embedder = load_embedder(settings)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert isinstance(embedder, EfficientNetLiteEmbedder)
    assert embedder.model_id == "efficientnet-lite2:imagenet"
    with pytest.raises(NoTextTowerError):
        embedder.embed_texts(["a bridge"])
