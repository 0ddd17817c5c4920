"""Device choice (``auto``: CUDA when present) and the CPU fallback on CUDA out-of-memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from .errors import InputError, RegistrationFailure

T = TypeVar("T")


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


def with_cpu_fallback(
    run: Callable[[torch.device], T], device: torch.device, warnings: list[str]
) -> T:
    """``run(device)``; on CUDA out-of-memory, once more on the CPU with a warning.

    Raises ``RegistrationFailure`` when the CPU fails too.
    """
    try:
        return run(device)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        warnings.append(f"CUDA ran out of memory on {device}; fell back to the CPU")
        try:
            return run(torch.device("cpu"))
        except RuntimeError as error:
            raise RegistrationFailure(
                f"out of memory on CUDA, and the CPU failed too: {error}"
            ) from None
