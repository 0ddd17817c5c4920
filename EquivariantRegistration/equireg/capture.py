"""The network stage: the model's map at its own grid, in one physical frame for both images.

The network captures large and independent shifts of the two images, which no optimiser finds
from a cold start; its map is a *start* for the refinement (``refine.py``), which scores it
against the identity and the linear alignment before using it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk
import torch

from .device import with_cpu_fallback
from .maps import evaluate, sampled_map
from .models import ModelCard
from .preprocess import background_value, normalise_intensity, window_coverage
from .space import Grid, network_frames, network_map_points, resample_isotropic

PointMap = Callable[[np.ndarray], np.ndarray]  # (..., d) LPS mm -> (..., d) LPS mm

MIN_WINDOW_COVERAGE = 0.02  # below this fraction of voxels inside a model's window: no network


@dataclass
class Capture:
    """The network's map as a physical point map (fixed -> moving LPS mm), and where it ran."""

    map: PointMap
    device: torch.device


def _frame_input(
    image: sitk.Image, frame: Grid, card: ModelCard, mask: sitk.Image | None
) -> torch.Tensor:
    """``image`` on its network frame, padded with its background, normalised as the model was
    trained; voxels outside ``mask`` are zero. ``(1, 1, *shape)`` float32."""
    fill = background_value(sitk.GetArrayViewFromImage(image))
    values = sitk.GetArrayFromImage(resample_isotropic(image, frame, fill))
    values = normalise_intensity(values, card.preprocessing)
    if mask is not None:
        inside = resample_isotropic(mask, frame, 0, sitk.sitkNearestNeighbor)
        values = values * (sitk.GetArrayFromImage(inside) > 0)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None, None]


def unsuitable(card: ModelCard, images: dict[str, sitk.Image]) -> str | None:
    """Why ``card``'s intensity preprocessing cannot see these images (``None`` if it can).

    A model with a fixed window (CT in HU) leaves an MR, a label map or a CT without its rescale
    intercept nearly constant; its map would be noise, so the network step is skipped."""
    for name, image in images.items():
        coverage = window_coverage(sitk.GetArrayViewFromImage(image), card.preprocessing)
        if coverage < MIN_WINDOW_COVERAGE:
            spec = card.preprocessing
            return (
                f"{name}: only {100 * coverage:.1f}% of its voxels lie inside model "
                f"{card.name}'s intensity window ({spec['low']:g} to {spec['high']:g}); the "
                "network step is skipped (the input does not look like what the model was "
                "trained on)"
            )
    return None


class Pair(NamedTuple):
    """One registration the network runs on: fixed and moving image, optional masks."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_mask: sitk.Image | None = None
    moving_mask: sitk.Image | None = None


def capture_pairs(
    network: torch.nn.Module,
    card: ModelCard,
    pairs: Sequence[Pair],
    device: torch.device,
    warnings: list[str],
) -> list[Capture]:
    """Run ``network`` on every pair, each in its images' network frames
    (``space.network_frames``), as one batch: on the CPU two pairs in one batch take about the
    time of one alone (generic3d on the brain volume: 0.83 against 0.77 s; PyTorch picks
    oneDNN's convolutions for batches above one, and its slower own ones for a batch of one
    at the U-Net's deeper levels).

    Returns, per pair, the map from fixed to moving physical points; CUDA out-of-memory falls
    back to the CPU with a warning (``RegistrationFailure`` if that fails too).
    """
    frames = [
        network_frames(Grid.of(pair.fixed), Grid.of(pair.moving), card.input_shape)
        for pair in pairs
    ]
    inputs = [
        (
            _frame_input(p.fixed, f[0], card, p.fixed_mask),
            _frame_input(p.moving, f[1], card, p.moving_mask),
        )
        for p, f in zip(pairs, frames, strict=True)
    ]
    fixed_net = torch.cat([fixed for fixed, _ in inputs])
    moving_net = torch.cat([moving for _, moving in inputs])

    def run(on: torch.device) -> torch.Tensor:
        model = network.to(on)
        autocast = nullcontext()
        fixed_in, moving_in = fixed_net.to(on), moving_net.to(on)
        if on.type == "cuda":  # bf16 convolutions, TF32 matmuls; the map is kept in float32
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            autocast = torch.autocast("cuda", dtype=torch.bfloat16)
        with torch.no_grad(), autocast:
            phi = model(moving_in, fixed_in)
            return evaluate(phi, fixed_in.shape[2:], len(pairs), fixed_in).float()

    values = with_cpu_fallback(run, device, warnings)
    return [_capture(values[k : k + 1], frames[k][0], frames[k][1]) for k in range(len(pairs))]


def _capture(values: torch.Tensor, fixed_frame: Grid, moving_frame: Grid) -> Capture:
    phi = sampled_map(values)

    def point_map(points: np.ndarray) -> np.ndarray:
        return network_map_points(phi, fixed_frame, moving_frame, points, values)

    return Capture(point_map, values.device)


def capture(
    network: torch.nn.Module,
    card: ModelCard,
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: sitk.Image | None,
    moving_mask: sitk.Image | None,
    device: torch.device,
    warnings: list[str],
) -> Capture:
    """``capture_pairs`` for one pair."""
    pair = Pair(fixed, moving, fixed_mask, moving_mask)
    return capture_pairs(network, card, [pair], device, warnings)[0]
