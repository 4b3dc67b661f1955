"""How an image tower runs: fp32 torch, bf16 autocast, int8 dynamic quantization or ONNX Runtime (``CPU_ENCODER``).

An *image tower* is any ``nn.Module`` mapping a preprocessed float32 batch ``(N, 3, H, W)`` to raw (not yet
normalised) embeddings ``(N, D)``. :func:`build_encoder` wraps it into an :class:`ImageEncoder` that runs it one of
four ways. The choice applies on CPU only: on CUDA the tower always runs under fp16 autocast, on MPS in fp32.

All four paths run the same weights, so the embeddings live in the same space and the collection's ``model_id`` does
not depend on the path. How close each path is to fp32 was measured by ``bench/encoder.py`` (docs/benchmarks.md,
"CPU encoder paths"); the per-path notes below quote it for EfficientNet-Lite2 on ``instance_small``.

* ``torch``: eager fp32 (channels-last where the embedder asks for it). The reference.
* ``bf16``: ``torch.autocast("cpu", torch.bfloat16)``; the output is cast back to float32. Fast only on CPUs with
  native bf16 instructions (AVX512-BF16 / AMX); elsewhere oneDNN emulates bf16 and it can be *slower* than fp32.
  **Changes the embeddings materially**: bf16 keeps 8 mantissa bits; on EfficientNet-Lite2 over the 273
  ``instance_small`` images the cosine vs fp32 is 0.9986 on average but as low as 0.983 for one image (retrieval
  mAP unchanged there). Do not mix bf16 and fp32 vectors in a collection where that matters.
* ``int8``: ``torch.ao.quantization.quantize_dynamic`` on ``nn.Linear`` layers (weights int8, activations quantized
  per batch). Dynamic quantization covers Linear/LSTM only, so a convolutional network such as EfficientNet has
  nothing to quantize and runs as fp32 (a WARNING says so); a ViT (CLIP) gets its MLP / projection layers quantized.
* ``onnx``: the tower is exported once with ``torch.onnx.export`` (TorchScript exporter, dynamic batch axis) to
  ``<cache_dir>/onnx/<model>-torch<version>-<weights fingerprint>-<H>x<W>.onnx`` and run with ONNX Runtime's
  ``CPUExecutionProvider``. Later loads reuse the file. Same fp32 maths, fused by ONNX Runtime's graph optimiser:
  cosine vs torch fp32 > 0.9999.

A path that cannot be set up (onnxruntime missing, the export failing, its output not matching torch) logs one
WARNING and falls back to ``torch``: a faster encoder is an optimisation, never a reason for the service not to start.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import threading
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

CpuEncoderName = Literal["torch", "bf16", "int8", "onnx"]
CPU_ENCODERS: tuple[str, ...] = get_args(CpuEncoderName)

# An exported graph whose output differs more than this from torch's (1 - cosine, worst row of the probe batch) is
# not trusted. fp32 re-association alone stays below 1e-6; a wrong export is off by far more.
_ONNX_MAX_COSINE_GAP = 1e-4

_EXPORT_LOCK = threading.Lock()  # two embedders built at once in one process export the same file only once


class ImageEncoder(ABC):
    """Runs an image tower on preprocessed batches.

    Attributes:
        name: the path actually in use: ``torch``, ``bf16``, ``int8``, ``onnx``, or ``cuda-fp16`` / ``mps-fp32``
            off CPU. After a fallback it is ``torch``, whatever was asked for.
    """

    name: str

    @abstractmethod
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` float32 on the tower's device -> ``(N, D)`` float32 on CPU or that device, unnormalised."""


class TorchEncoder(ImageEncoder):
    """Eager torch: fp32 on CPU/MPS, fp16 autocast on CUDA, or bf16 autocast on CPU (``bf16=True``)."""

    def __init__(self, tower: nn.Module, device: str, memory_format: torch.memory_format, bf16: bool = False) -> None:
        self.tower = tower
        self.device = device
        self.memory_format = memory_format
        if device == "cuda":
            self.name, self._autocast = "cuda-fp16", (lambda: torch.autocast("cuda", dtype=torch.float16))
        elif bf16:
            self.name, self._autocast = "bf16", (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        else:
            self.name, self._autocast = ("torch" if device == "cpu" else f"{device}-fp32"), contextlib.nullcontext

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, memory_format=self.memory_format)
        with self._autocast():
            out = self.tower(batch)
        return out.float()


class OnnxEncoder(ImageEncoder):
    """ONNX Runtime (CPUExecutionProvider) on an exported copy of the tower.

    Attributes:
        path: the ``.onnx`` file in the cache directory.
        exported: whether this instance exported the file (False: an earlier load's file was reused).
        session: the ``onnxruntime.InferenceSession``; its ``run`` is thread-safe.
    """

    name = "onnx"

    def __init__(self, path: Path, exported: bool, threads: int) -> None:
        from app.embedders.onnx_model import ort_session

        self.session = ort_session(path, threads)
        self._input = self.session.get_inputs()[0].name
        self.path = path
        self.exported = exported

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        pixels = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self._input: pixels})[0])


def build_encoder(
    tower: nn.Module,
    *,
    cpu_encoder: str,
    device: str,
    input_size: tuple[int, int],
    model_id: str,
    cache_dir: str | os.PathLike[str] | None,
    threads: int = 0,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> ImageEncoder:
    """Wrap ``tower`` for the asked path.

    Args:
        tower: eval-mode module on ``device``: ``(N, 3, H, W)`` float32 -> ``(N, D)`` float (unnormalised).
        cpu_encoder: ``torch``, ``bf16``, ``int8`` or ``onnx``; ignored unless ``device == "cpu"``.
        device: the resolved torch device (``cpu``, ``cuda``, ``mps``).
        input_size: ``(H, W)`` the preprocessing produces; the ONNX probe and file name use it.
        model_id: the embedder's model id, part of the ONNX file name (with the torch version and a fingerprint of
            the tower's weights, so random-init or retrained weights never reuse another model's file).
        cache_dir: directory of the ONNX file (``MODEL_CACHE_DIR``); None: a folder in the system temp directory.
        threads: ONNX Runtime intra-op threads; 0 = ``torch.get_num_threads()`` (TORCH_THREADS, or one per core).
        memory_format: layout the torch paths feed the tower (channels-last for the EfficientNet).

    Returns:
        An :class:`ImageEncoder`; see the module docstring for each path's speed and accuracy.

    Raises:
        ValueError: ``cpu_encoder`` is not one of :data:`CPU_ENCODERS`. Set-up failures of ``onnx`` / ``int8`` do not
            raise: they log a WARNING and return the fp32 torch encoder.
    """
    if cpu_encoder not in CPU_ENCODERS:
        raise ValueError(f"CPU_ENCODER must be one of {', '.join(CPU_ENCODERS)}; got {cpu_encoder!r}.")
    # Eval mode for the whole tree, wrapper included: the ONNX exporter restores the wrapper's own training flag
    # *recursively* afterwards, which would put BatchNorm layers of an eval-mode child back into training mode.
    tower.eval()
    if device != "cpu" or cpu_encoder == "torch":
        return TorchEncoder(tower, device, memory_format)
    if cpu_encoder == "bf16":
        if not _cpu_has_native_bf16():
            logger.warning(
                "CPU_ENCODER=bf16: this CPU has no native bf16 instructions, so bf16 may be slower than fp32"
            )
        return TorchEncoder(tower, device, memory_format, bf16=True)
    if cpu_encoder == "int8":
        return _int8_dynamic(tower, memory_format)
    try:
        return _onnx(tower, input_size, model_id, cache_dir, threads or torch.get_num_threads())
    except Exception as exc:  # noqa: BLE001 - any failure here only costs speed
        logger.warning("CPU_ENCODER=onnx could not be set up for %s (%s); using torch fp32 instead", model_id, exc)
        return TorchEncoder(tower, device, memory_format)


def onnx_path(
    tower: nn.Module, input_size: tuple[int, int], model_id: str, cache_dir: str | os.PathLike | None
) -> Path:
    """Where the ONNX export of ``tower`` is cached (see :func:`build_encoder`)."""
    root = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir()) / "image-search-models"
    safe_id = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("_")
    torch_version = re.sub(r"[^A-Za-z0-9._-]+", "_", torch.__version__)
    h, w = input_size
    return root / "onnx" / f"{safe_id}-torch{torch_version}-{_weights_fingerprint(tower)}-{h}x{w}.onnx"


# --- helpers ---------------------------------------------------------------------------------------------------


def _int8_dynamic(tower: nn.Module, memory_format: torch.memory_format) -> ImageEncoder:
    # quantize_dynamic copies the module (inplace=False), so the fp32 tower stays intact for other users.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's "migrate to torchao" deprecation notice, once per call
        quantized = torch.ao.quantization.quantize_dynamic(tower, {nn.Linear}, dtype=torch.qint8)
    n_quantized = sum(1 for m in quantized.modules() if type(m).__module__.startswith("torch.ao.nn.quantized"))
    if n_quantized == 0:
        logger.warning(
            "CPU_ENCODER=int8: dynamic quantization found no nn.Linear layer in this model (a convolutional network), "
            "so it runs in fp32 - use CPU_ENCODER=onnx or bf16 for speed"
        )
    encoder = TorchEncoder(quantized, "cpu", memory_format)
    encoder.name = "int8"
    return encoder


def _onnx(
    tower: nn.Module, input_size: tuple[int, int], model_id: str, cache_dir: str | os.PathLike | None, threads: int
) -> OnnxEncoder:
    import onnxruntime  # noqa: F401 - fail before exporting when the runtime is not installed

    path = onnx_path(tower, input_size, model_id, cache_dir)
    # A fixed pseudo-random probe: in [-1, 1] like normalised pixels, two rows so the batch axis stays symbolic.
    probe = torch.rand(2, 3, *input_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with _EXPORT_LOCK:
        exported = False
        if not path.is_file():
            export_graph(tower, probe, path)
            exported = True
        try:
            encoder = OnnxEncoder(path, exported, threads)
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: export again, once
            if exported:
                raise
            logger.warning("Re-exporting the unreadable ONNX file %s (%s)", path, exc)
            export_graph(tower, probe, path)
            encoder = OnnxEncoder(path, True, threads)
    with torch.inference_mode():
        expected = F.normalize(tower(probe).float(), dim=1)
    got = F.normalize(encoder(probe), dim=1)
    gap = float((1 - (expected * got).sum(dim=1)).max())
    if gap > _ONNX_MAX_COSINE_GAP:
        raise RuntimeError(f"the ONNX graph {path} disagrees with torch (1 - cosine = {gap:.2e})")
    logger.info("CPU encoder: ONNX Runtime on %s (%s, %d threads)", path, "exported" if exported else "cached", threads)
    return encoder


def export_graph(
    tower: nn.Module, probe: torch.Tensor, path: Path, input_name: str = "pixels", output_name: str = "embedding"
) -> None:
    """Export to a temporary file next to ``path`` and rename it: readers never see a half-written graph."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # Traced with autograd on: under no_grad nn.MultiheadAttention takes its fused fast path
        # (aten::_native_multi_head_attention), which has no ONNX symbolic. Nothing is trained or stored.
        with warnings.catch_warnings(), torch.inference_mode(False), torch.enable_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
            # dynamo=False: the TorchScript exporter needs no onnxscript and handles these towers as they are.
            torch.onnx.export(
                tower,
                (probe,),
                tmp,
                input_names=[input_name],
                output_names=[output_name],
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("Exported %s to %s (%.1f MB)", type(tower).__name__, path, path.stat().st_size / 1e6)


def _weights_fingerprint(tower: nn.Module) -> str:
    """First 16 hex digits of a SHA-256 over the tower's parameter and buffer names, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in tower.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _cpu_has_native_bf16() -> bool:
    """Whether the CPU has bf16 arithmetic (AVX512-BF16 or AMX-BF16) per /proc/cpuinfo; True when unknown."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: no cheap way to tell, so no warning
    return "avx512_bf16" in flags or "amx_bf16" in flags
