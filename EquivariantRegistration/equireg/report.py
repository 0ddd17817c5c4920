"""``report.json``: what ran, on what, how long, and how similar the images are before/after.

Similarity values use the names of the registry in ``similarity.py`` (higher is better), the
same names ``equireg evaluate`` reports.
"""

from __future__ import annotations

import platform

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
