"""Intensity preprocessing named by a model card, background and robust ranges: NumPy only.

No SimpleITK here: the training path (``data/``, ``train.py``) imports this module, and must run
where only torch and NumPy are installed (a lent GPU machine's image).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def normalise_intensity(values: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Map intensities to [0, 1] as the model was trained.

    ``{"kind": "percentile", "low": 1, "high": 99}`` clips to the image's own percentiles
    (photographs, MR: no absolute scale); ``{"kind": "window", "low": -1000, "high": 0}`` clips
    to fixed values (CT in HU); ``{"kind": "foreground"}`` (the generic models) clips to the
    1st and 99th percentiles of the foreground (``robust_range``), whatever the modality and
    however much background or padding surrounds it.
    """
    kind = spec["kind"]
    if kind == "percentile":
        low, high = np.percentile(values, [spec["low"], spec["high"]])
    elif kind == "foreground":
        low, high = robust_range(values)
    elif kind == "window":
        low, high = float(spec["low"]), float(spec["high"])
    else:
        raise ValueError(f"unknown intensity preprocessing {kind!r}")
    if high <= low:  # almost constant after clipping: fall back to the full range
        low, high = float(values.min()), float(values.max())
    return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)


FOREGROUND_PERCENTILES = {"kind": "foreground"}  # the generic models' preprocessing (any modality)
_PERCENTILE_SAMPLES = 1 << 20  # voxels a percentile is taken over (evenly strided), for speed


def _sample(values: np.ndarray) -> np.ndarray:
    flat = np.asarray(values).reshape(-1)
    stride = max(1, flat.size // _PERCENTILE_SAMPLES)
    return flat[::stride]


def background_value(values: np.ndarray) -> float:
    """The image's background intensity (its 0.5th percentile): what padding takes, so that
    padding looks like the outside of the image (−1024 HU for CT, not 0 HU)."""
    return float(np.percentile(_sample(values), 0.5))


def robust_range(values: np.ndarray) -> tuple[float, float]:
    """The 1st and 99th percentile of the foreground: the voxels brighter than the background
    by more than 1 % of the image's range (all voxels when that leaves too few)."""
    sample = _sample(values)
    low, high = np.percentile(sample, [0.5, 99.9])
    foreground = sample[sample > low + 0.01 * (high - low)]
    if foreground.size < 0.01 * sample.size:
        foreground = sample
    lower, upper = np.percentile(foreground, [1, 99])
    if upper <= lower:
        lower, upper = float(sample.min()), float(sample.max())
    return float(lower), float(upper)


def robust_normalise(values: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """``values`` mapped linearly so that ``bounds`` (``robust_range``) become 0 and 1, clipped
    to [−0.5, 1.5]: any modality lands on one scale, outliers (metal, hot spots) are tamed."""
    low, high = bounds
    scale = max(high - low, 1e-6)
    return np.clip((values - low) / scale, -0.5, 1.5).astype(np.float32)


def fraction_within(values: np.ndarray, low: float, high: float) -> float:
    """Fraction of voxels strictly between ``low`` and ``high`` (an even sample of them)."""
    sample = _sample(values)
    return float(((sample > low) & (sample < high)).mean())


def window_coverage(values: np.ndarray, spec: dict[str, Any]) -> float:
    """Fraction of voxels inside a ``window`` preprocessing's range, 1 % of its width in from
    each end (1 for other preprocessing).

    A CT window on an image that is not CT in HU (MR, a CT stored without its rescale
    intercept, a label map) leaves almost every voxel clipped: the network would see a
    constant image."""
    if spec["kind"] != "window":
        return 1.0
    low, high = float(spec["low"]), float(spec["high"])
    margin = 0.01 * (high - low)  # smoothing rings: a 0 background becomes −1e-5, not tissue
    return fraction_within(values, low + margin, high - margin)
