"""Device choice: ``auto`` picks CUDA when present (the CPU fallback on CUDA OOM is in ``api``)."""

from __future__ import annotations

import torch

from .errors import InputError


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda[:N]`` must exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise InputError(f"--device {spec}: not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {spec}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise InputError(f"--device {spec}: only cpu and cuda devices are supported")
    return device
