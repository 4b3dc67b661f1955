"""Choosing the torch device the embedders run on."""

from __future__ import annotations

import torch

_VALID = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    # torch.backends.mps exists on every build, but is_available() is only True on Apple silicon with MPS support.
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(setting: str) -> str:
    """Turn the DEVICE setting into a concrete torch device string.

    Args:
        setting: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"`` (case-insensitive). ``"auto"`` picks ``"cuda"`` when
            ``torch.cuda.is_available()``, else ``"mps"`` when available, else ``"cpu"``.

    Returns:
        ``"cpu"``, ``"cuda"`` or ``"mps"``.

    Raises:
        ValueError: the setting is none of the four values.
        RuntimeError: ``"cuda"`` or ``"mps"`` was asked for explicitly but this torch build or machine lacks it.
    """
    value = (setting or "auto").strip().lower()
    if value not in _VALID:
        raise ValueError(f"DEVICE must be one of {', '.join(_VALID)}; got {setting!r}.")
    if value == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if _mps_available():
            return "mps"
        return "cpu"
    if value == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"DEVICE=cuda was requested, but CUDA is not available to torch {torch.__version__} "
            f"(built with CUDA {torch.version.cuda or 'none'}; no usable GPU or driver found). "
            "Set DEVICE=auto or DEVICE=cpu."
        )
    if value == "mps" and not _mps_available():
        raise RuntimeError(
            "DEVICE=mps was requested, but the Apple MPS backend is not available on this machine. "
            "Set DEVICE=auto or DEVICE=cpu."
        )
    return value


def use_fp16(device: str) -> bool:
    """Whether to run the model under fp16 autocast: on CUDA only.

    CPU fp16 kernels are slow or missing, and MPS autocast support varies across torch versions, so both stay fp32.
    """
    return device == "cuda"
