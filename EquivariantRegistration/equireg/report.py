"""``report.json``: what ran, on what, how long, and how similar the images are before/after.

Similarity values use the names of the registry in ``similarity.py`` (higher is better), the
same names ``equireg evaluate`` reports.
"""

from __future__ import annotations

import platform
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__


def versions() -> dict[str, str]:
    return {
        "equireg": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "SimpleITK": sitk.Version_VersionString(),
        "numpy": np.__version__,
    }


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (MB, Unix only) and of CUDA when it was used."""
    peak: dict[str, float] = {}
    try:  # Unix only; Slicer on Windows runs the engine too
        import resource

        peak["cpu_max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except ImportError:
        pass
    if device.type == "cuda":
        peak["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


def model_report(card: Any) -> dict[str, Any]:
    """Which model ran and why (by name or the ``auto`` rule), its card's path, whether
    trained, the checksum of its weights."""
    return {
        "name": card.name,
        "chosen": card.chosen,
        "card": str(card.path),
        "trained": card.trained,
        "sha256": card.data.get("sha256"),
    }


def run_report(
    card: Any,
    given: tuple[Any, Any],
    inputs: Any,
    options: dict[str, Any],
    device: torch.device,
) -> dict[str, Any]:
    """Versions, model, inputs (paths as given, sizes), options, device and peak memory."""

    def name(value: Any) -> str:
        return "<image>" if isinstance(value, sitk.Image) else str(value)

    return {
        "equireg_version": __version__,
        "versions": versions(),
        "model": model_report(card),
        "inputs": {
            "fixed": name(given[0]),
            "moving": name(given[1]),
            "fixed_size": list(inputs.fixed.GetSize()),
            "moving_size": list(inputs.moving.GetSize()),
        },
        "options": options,
        "device": str(device),
        "peak_memory": peak_memory(device),
    }
