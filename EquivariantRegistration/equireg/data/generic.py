"""Training pairs for the generic models: random label maps rendered with random contrasts.

A network trained on one kind of image fails on the next; the field's answer is to train on
synthetic images of random shapes with random intensities, so that no shape, contrast or
texture is special (SynthMorph: Hoffmann et al., IEEE TMI 2022). Here:

- a **label map** is a Voronoi-like partition of smooth random fields (blobs with smooth,
  irregular borders), usually inside a deformed ellipsoidal "body" with a rim label (nested
  structures, like skull or skin) and background outside, plus thin branching tubes;
- a **view** of a label map gets a random intensity per label, texture, blur, a multiplicative
  bias field, a random loss of resolution along one axis (thick slices), gamma and noise, then
  the foreground-percentile normalisation the generic models use at inference
  (``preprocess.FOREGROUND_PERCENTILES``);
- a **pair** is ``moving = labels ∘ ψ_m``, ``fixed = labels ∘ ψ_m ∘ ψ`` with independent random
  diffeomorphisms and independent translations (up to ``max_shift`` of the field of view) for
  each image, as the equivariant design needs, each view rendered on its own; with probability
  ``multimodal`` the two views get independent intensities per label (T1 vs T2, CT vs MR).

A ``real_fraction`` of the pairs comes instead from the procedural images of the specialised
models (retina photographs and vessel masks in 2-D, chest phantoms in 3-D), through
``pairs.random_pairs``. Everything is drawn from the step's ``torch.Generator``, so training
stays resumable bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..maps import identity_grid, sample
from ..preprocess import FOREGROUND_PERCENTILES, normalise_intensity
from .pairs import TrainingBatch, random_map, random_pairs
from .synthetic import draw_segment, smooth_noise, vessel_tree


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _numpy_rng(generator: torch.Generator) -> np.random.Generator:
    return np.random.default_rng(int(torch.randint(2**31 - 1, (), generator=generator)))


def _tubes(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of thin branching tubes (vessels, airways, nerves)."""
    if len(shape) == 2:
        return vessel_tree(shape, rng, depth=int(rng.integers(3, 7)))[0] > 0.5
    canvas = np.zeros(shape)
    size = max(shape)
    branches = [
        (rng.uniform(0.3, 0.7, 3) * np.array(shape), rng.normal(size=3), 0.25 * size, 1.6, 0)
        for _ in range(int(rng.integers(1, 4)))
    ]
    while branches:
        start, direction, length, radius, level = branches.pop()
        for _ in range(3):
            direction = direction / np.linalg.norm(direction) + rng.normal(0, 0.25, 3)
            direction /= np.linalg.norm(direction)
            end = start + length / 3 * direction
            draw_segment(canvas, start, end, radius)
            start = end
        if level < 3:
            for _ in range(2):
                branches.append(
                    (
                        start,
                        direction + rng.normal(0, 0.8, 3),
                        length * 0.7,
                        max(radius * 0.75, 0.6),
                        level + 1,
                    )
                )
    return canvas > 0.5


def label_map(
    shape: tuple[int, ...], spec: dict[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """A random label map ``(1, 1, *shape)`` (float values 0, 1, …, at most ``labels + 2``).

    0 is the background outside the body (when there is one), ``1…labels`` the blobs,
    ``labels + 1`` the body's rim and ``labels + 2`` the tubes.
    """
    dims = len(shape)
    count = int(
        torch.randint(
            spec.get("labels_min", 4), spec.get("labels_max", 12) + 1, (), generator=generator
        )
    )
    features = _uniform(2.0, 10.0, generator)  # blobs across the field of view
    fields = smooth_noise(shape, count, max(shape) / features, generator)
    labels = fields.argmax(dim=1, keepdim=True) + 1
    if float(torch.rand((), generator=generator)) < spec.get("body_probability", 0.8):
        grid = identity_grid(shape)
        centre = torch.tensor([_uniform(0.4, 0.6, generator) for _ in range(dims)])
        radii = torch.tensor([_uniform(0.25, 0.48, generator) for _ in range(dims)])
        offset = (grid - centre.view(1, -1, *[1] * dims)) / radii.view(1, -1, *[1] * dims)
        radius = offset.norm(dim=1, keepdim=True)
        radius = radius + 0.15 * smooth_noise(shape, 1, max(shape) / 3, generator)
        rim = _uniform(0.0, 0.12, generator)
        labels[(radius > 1 - rim) & (radius <= 1)] = count + 1
        labels[radius > 1] = 0
    if float(torch.rand((), generator=generator)) < spec.get("tube_probability", 0.5):
        tubes = torch.from_numpy(_tubes(shape, _numpy_rng(generator)))
        labels[0, 0][tubes & (labels[0, 0] > 0)] = count + 2
    return labels.float()


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma < 0.3:
        return image
    radius = max(1, math.ceil(2.5 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1.0) / sigma) ** 2)
    taps = taps / taps.sum()
    dims = image.dim() - 2
    convolve = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    for axis in range(dims):
        view = [1] * dims
        view[axis] = taps.numel()
        padding = [0] * dims
        padding[axis] = radius
        image = convolve(image, taps.view(1, 1, *view), padding=padding)
    return image


def _thick_slices(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Lose resolution along one random axis by a factor 2–4 (thick slices), then resample."""
    dims = image.dim() - 2
    axis = int(torch.randint(dims, (), generator=generator))
    factor = int(torch.randint(2, 5, (), generator=generator))
    kernel = [1] * dims
    kernel[axis] = factor
    pooled = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1](image, kernel, ceil_mode=True)
    mode = ("linear", "bilinear", "trilinear")[dims - 1]
    return F.interpolate(pooled, size=image.shape[2:], mode=mode, align_corners=False)


def random_contrast(count: int, generator: torch.Generator) -> torch.Tensor:
    """An intensity per label ``(count,)``; the background (label 0) is usually dark."""
    table = torch.rand(count, generator=generator)
    if float(torch.rand((), generator=generator)) < 0.85:
        table[0] = 0.1 * float(torch.rand((), generator=generator))
    return table


def render(
    labels: torch.Tensor, table: torch.Tensor, spec: dict[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """One view ``(1, 1, *S)`` of ``labels`` with intensities ``table``, normalised to [0, 1] as
    the generic models' inputs are at inference (``preprocess.FOREGROUND_PERCENTILES``)."""
    shape = tuple(labels.shape[2:])
    image = table[labels.long().clamp(max=table.numel() - 1)]
    texture = smooth_noise(shape, 1, _uniform(0.5, 2.0, generator), generator)
    image = image + _uniform(0.0, 0.08, generator) * texture
    image = _gaussian_blur(image, _uniform(0.0, 1.2, generator))
    bias = smooth_noise(shape, 1, max(shape) / 2, generator)
    image = image * torch.exp(_uniform(0.0, spec.get("bias", 0.3), generator) * bias)
    if float(torch.rand((), generator=generator)) < spec.get("thick_slice_probability", 0.25):
        image = _thick_slices(image, generator)
    gamma = math.exp(0.25 * float(torch.randn((), generator=generator)))
    image = image.clamp(min=0) ** gamma
    image = image + torch.randn(image.shape, generator=generator) * _uniform(
        0.0, spec.get("noise", 0.04), generator
    )
    return torch.from_numpy(normalise_intensity(image.numpy(), FOREGROUND_PERCENTILES))


def generic_pairs(
    pool: torch.Tensor,
    batch: int,
    spec: dict[str, Any],
    shape: tuple[int, ...],
    generator: torch.Generator,
) -> TrainingBatch:
    """``batch`` pairs ``(moving, fixed, true_map)``: label-map pairs, and a ``real_fraction``
    from ``pool`` (procedural images of the specialised models) as ``pairs.random_pairs``."""
    identity = identity_grid(shape)
    moving, fixed, true_maps = [], [], []
    for _ in range(batch):
        if len(pool) and float(torch.rand((), generator=generator)) < spec.get("real_fraction", 0):
            pair = random_pairs(pool, 1, spec, generator)
            moving.append(pair.moving)
            fixed.append(pair.fixed)
            true_maps.append(pair.true_map)
            continue
        labels = label_map(shape, spec, generator)
        moving_map = random_map(shape, spec, generator)
        relative = random_map(shape, spec, generator)
        fixed_map = sample(moving_map - identity, relative, padding="border") + relative
        count = int(labels.max()) + 1
        table = random_contrast(count, generator)
        multimodal = float(torch.rand((), generator=generator)) < spec.get("multimodal", 0.5)
        moving_table = random_contrast(count, generator) if multimodal else table
        moving_labels = sample(labels, moving_map, mode="nearest", padding="border")
        fixed_labels = sample(labels, fixed_map, mode="nearest", padding="border")
        moving.append(render(moving_labels, moving_table, spec, generator))
        fixed.append(render(fixed_labels, table, spec, generator))
        true_maps.append(relative)
    return TrainingBatch(torch.cat(moving), torch.cat(fixed), torch.cat(true_maps))
