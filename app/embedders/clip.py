"""CLIP embedder (open_clip): images and texts in one space, so text search works.

Weights come from a pretrained tag (downloaded once from the Hugging Face Hub into the model cache directory), from
a local checkpoint file, or - for tests only - from random initialisation.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from app.embedders.base import Embedder
from app.embedders.cpu_encoder import ImageEncoder, build_encoder
from app.embedders.device import resolve_device, use_fp16

logger = logging.getLogger(__name__)

# Approximate download sizes of the weights, for the "first run downloads ..." message only.
_APPROX_DOWNLOAD = {"ViT-B-32": "~600 MB", "ViT-B-16": "~600 MB", "ViT-L-14": "~1.7 GB", "ViT-H-14": "~3.9 GB"}

# A TCP connect to the weights host, bounded so that a machine without network learns it in seconds rather than
# after huggingface_hub's retry loop (5 retries per file with 1-8 s back-off, two files: ~46 s measured).
_PROBE_TIMEOUT_S = 3.0

_OFFLINE_LOCK = threading.Lock()


class OpenClipEmbedder(Embedder):
    """Image and text embeddings from an open_clip model.

    Embeddings are ``(N, D)`` float32 with L2-normalised rows (``D`` = the model's joint embedding size, e.g. 512
    for ViT-B-32), so image-image and text-image dot products are cosine similarities.

    ``model_id`` identifies architecture + weights, so a collection is never searched with another model's vectors:

    * tag: ``open_clip:<model>/<tag>``, e.g. ``open_clip:ViT-B-32/laion2b_s34b_b79k``;
    * local checkpoint file: ``open_clip:<model>/file-<first 16 hex of the file's SHA-256>``;
    * ``pretrained=None`` (random weights, tests only): ``open_clip:<model>/random-init``.

    Attributes:
        model: the open_clip ``CLIP`` module, in eval mode on :attr:`device`.
        preprocess: the model's validation transform (PIL -> ``(3, H, W)`` float tensor).
        batch_size: images or texts per forward pass.
        encoder: how the image tower runs (:mod:`app.embedders.cpu_encoder`); ``encoder.name`` is the path in use.
            The text tower always runs in torch (fp32 on CPU, fp16 autocast on CUDA).
    """

    supports_text = True

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | os.PathLike[str] | None = "laion2b_s34b_b79k",
        device: str = "auto",
        batch_size: int = 32,
        cache_dir: str | os.PathLike[str] | None = None,
        cpu_encoder: str = "torch",
        threads: int = 0,
    ) -> None:
        """Build the model and load its weights.

        Args:
            model_name: open_clip architecture name (``open_clip.list_models()``), e.g. ``"ViT-B-32"``.
            pretrained: a pretrained tag of that architecture (``open_clip.list_pretrained_tags_by_model``), a path
                to a local checkpoint file (a state dict as saved by ``torch.save`` or an open_clip release file),
                or ``None`` for random weights (tests only; the embeddings are meaningless).
            device: ``auto``/``cpu``/``cuda``/``mps``; on CUDA the forward passes run under fp16 autocast.
            batch_size: images or texts per forward pass (>= 1).
            cache_dir: where tag weights are downloaded to and looked up (Hugging Face cache layout);
                default: huggingface_hub's own default cache. ``cpu_encoder=onnx`` keeps its exported graph under
                ``<cache_dir>/onnx`` (default: the system temp directory).
            cpu_encoder: ``torch``, ``bf16``, ``int8`` or ``onnx`` for the image tower on CPU (see
                :func:`app.embedders.cpu_encoder.build_encoder`); ignored on CUDA/MPS. ``int8`` quantizes the
                ViT's Linear layers and moves its embeddings more than the other paths: check its cosine vs fp32
                (bench/encoder.py) before using it with real weights.
            threads: ONNX Runtime intra-op threads; 0 = ``torch.get_num_threads()``.

        Raises:
            ValueError: unknown architecture, or ``pretrained`` is neither a known tag nor an existing file,
                or ``batch_size < 1``.
            RuntimeError: the tag's weights are not cached and cannot be downloaded (no network, hub unreachable),
                or the device is unavailable. Without network this is raised within a few seconds.
            Exception: whatever open_clip / torch raise for a corrupt or mismatching checkpoint.
        """
        import open_clip

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # open_clip's own spelling: "ViT-B/32" is looked up as "ViT-B-32"; tags are case-insensitive with "_".
        arch = model_name.replace("/", "-")
        if arch not in open_clip.list_models():
            raise ValueError(f"Unknown open_clip architecture {model_name!r}; see open_clip.list_models().")

        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self._fp16 = use_fp16(self.device)
        cache = str(Path(cache_dir).expanduser().resolve()) if cache_dir is not None else None

        load_arg: str | None
        unreachable: str | None = None  # "host:port" of the weights when it cannot be reached
        if pretrained is None:
            load_arg, self.model_id = None, f"open_clip:{arch}/random-init"
        else:
            pretrained = str(pretrained)
            tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
            if tag_cfg:
                tag = pretrained.strip().lower().replace("-", "_")
                load_arg, self.model_id = tag, f"open_clip:{arch}/{tag}"
                unreachable = self._announce_tag_download(arch, tag, tag_cfg, cache)
            elif Path(pretrained).expanduser().is_file():
                path = Path(pretrained).expanduser().resolve()
                load_arg, self.model_id = str(path), f"open_clip:{arch}/file-{_sha256_prefix(path)}"
                logger.info("Loading CLIP %s from the checkpoint file %s", arch, path)
            else:
                tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
                raise ValueError(
                    f"CLIP_PRETRAINED={pretrained!r} is neither a pretrained tag of {arch} (known tags: {tags}) "
                    "nor an existing checkpoint file."
                )

        with _hf_hub_offline(unreachable is not None):
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(
                    arch, pretrained=load_arg, cache_dir=cache, device=self.device
                )
                # Some architectures (SigLIP, multilingual) fetch a Hugging Face tokenizer: same offline rule.
                tokenizer = open_clip.get_tokenizer(arch, cache_dir=cache)
            except Exception as exc:
                if unreachable is not None:
                    raise RuntimeError(
                        f"the weights of {arch}/{load_arg} are not in the cache {cache or '(huggingface_hub default)'}"
                        f", and {unreachable} is unreachable from this machine, so they cannot be downloaded"
                    ) from exc
                raise
        self.model = model.eval()
        self.preprocess = preprocess
        self._tokenizer = tokenizer
        self.dim = self._output_dim()
        size = getattr(self.model.visual, "image_size", 224)
        square = size if isinstance(size, int) else (size[0] if len(set(size)) == 1 else None)
        # open_clip's eval transform resizes with its own rules (resize_mode, squash): JPEG drafts at the input size
        # are safe, pre-fitting is not declared.
        self.input_size = int(square) if square else None
        self.encoder: ImageEncoder = build_encoder(
            # encode_image(x) is visual(x) in every open_clip model class; the tower alone keeps the text weights
            # out of the int8 copy, the ONNX graph and the weights fingerprint.
            self.model.visual,
            cpu_encoder=cpu_encoder,
            device=self.device,
            input_size=tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size)),
            model_id=self.model_id,
            cache_dir=cache,
            threads=threads,
        )

    # --- public API -------------------------------------------------------------------------------------------

    @classmethod
    def from_settings(cls, settings) -> OpenClipEmbedder:  # noqa: ANN001 - avoid importing Settings here
        """Build from :class:`app.config.Settings` (clip_model, clip_pretrained, device, embed_batch_size,
        resolved_model_cache_dir, cpu_encoder, torch_threads)."""
        return cls(
            model_name=settings.clip_model,
            pretrained=settings.clip_pretrained,
            device=settings.device,
            batch_size=settings.embed_batch_size,
            cache_dir=settings.resolved_model_cache_dir,
            cpu_encoder=settings.cpu_encoder,
            threads=settings.torch_threads,
        )

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed PIL images (any size; converted to RGB) into ``(N, D)`` float32, L2-normalised rows.

        Uses the model's validation transform (resize + centre crop + CLIP normalisation), ``batch_size`` at a time.
        ``N == 0`` returns ``(0, D)``.
        """
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            batch = torch.stack([self.preprocess(im if im.mode == "RGB" else im.convert("RGB")) for im in chunk])
            out[start : start + len(chunk)] = F.normalize(self.encoder(batch), dim=-1).cpu().numpy()
        return out

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts into the image space: ``(N, D)`` float32, L2-normalised rows.

        Texts longer than the model's context (77 tokens for the standard CLIP tokenizer) are truncated by the
        tokenizer. ``N == 0`` returns ``(0, D)``.
        """
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            tokens = self._tokenizer(chunk).to(self.device)
            with self._autocast():
                emb = self.model.encode_text(tokens)
            out[start : start + len(chunk)] = F.normalize(emb.float(), dim=-1).cpu().numpy()
        return out

    # --- helpers ----------------------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(device_type="cuda", dtype=torch.float16, enabled=self._fp16)

    def _output_dim(self) -> int:
        dim = getattr(self.model.visual, "output_dim", None)
        if isinstance(dim, int):
            return dim
        # Towers without output_dim (some timm / HF configs): measure it on one blank image.
        with torch.inference_mode(), self._autocast():
            probe = self.preprocess(Image.new("RGB", (64, 64))).unsqueeze(0).to(self.device)
            return int(self.model.encode_image(probe).shape[-1])

    @staticmethod
    def _announce_tag_download(arch: str, tag: str, tag_cfg: dict, cache: str | None) -> str | None:
        """Log where the weights come from; return ``"host:port"`` when that host is unreachable (then only the
        cache is tried), else None."""
        host, port = _weights_host(tag_cfg)
        reachable = _reachable(host, port)
        where = cache or "the huggingface_hub default cache"
        if reachable:
            size = _APPROX_DOWNLOAD.get(arch, "several hundred MB")
            logger.info(
                "Loading CLIP %s (%s); the first run downloads the weights (%s) from %s into %s; "
                "later runs read them from there.",
                arch,
                tag,
                size,
                host,
                where,
            )
        else:
            logger.info(
                "Loading CLIP %s (%s) from the cache %s only: %s:%d is unreachable from this machine.",
                arch,
                tag,
                where,
                host,
                port,
            )
        return None if reachable else f"{host}:{port}"


def _sha256_prefix(path: Path) -> str:
    """First 16 hex digits of the SHA-256 of the file's bytes: two different checkpoints never share a model_id."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def _weights_host(tag_cfg: dict) -> tuple[str, int]:
    """Host and port the tag's weights are fetched from: the Hugging Face endpoint, or the release URL's host."""
    if tag_cfg.get("hf_hub"):
        from huggingface_hub import constants

        url = constants.ENDPOINT  # honours HF_ENDPOINT (mirrors)
    else:
        url = tag_cfg.get("url", "")
    parsed = urllib.parse.urlsplit(url)
    return parsed.hostname or "huggingface.co", parsed.port or (80 if parsed.scheme == "http" else 443)


def _reachable(host: str, port: int) -> bool:
    """Whether a TCP connection to ``host:port``, name lookup included, opens within ``_PROBE_TIMEOUT_S`` (3 s).

    Behind an HTTP(S) proxy a direct connect proves nothing, so the hub is assumed reachable and huggingface_hub's
    own retries decide. Offline mode requested by the user (HF_HUB_OFFLINE=1) counts as unreachable.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    proxies = urllib.request.getproxies()
    if proxies.get("https") or proxies.get("http"):
        return True
    # create_connection's timeout does not cover the DNS lookup, which took 10 s inside a Compose network with no
    # outside DNS (make test-docker): the whole probe runs on a daemon thread and is abandoned after the timeout.
    outcome: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    worker = threading.Thread(target=probe, name="weights-host-probe", daemon=True)
    worker.start()
    worker.join(_PROBE_TIMEOUT_S)
    return bool(outcome and outcome[0])


@contextlib.contextmanager
def _hf_hub_offline(enabled: bool) -> Iterator[None]:
    """Switch huggingface_hub to offline mode for the duration, so a cached file is used at once and a missing one
    fails at once instead of after the retry loop.

    huggingface_hub reads HF_HUB_OFFLINE into ``constants.HF_HUB_OFFLINE`` at import and checks that attribute
    on every request; setting it is the only switch open_clip's download path leaves us.
    """
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    with _OFFLINE_LOCK:
        previous = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = previous
