"""``register(fixed, moving, ...) -> Result``: the entry point behind the command and the module.

The result's transform maps fixed physical points (LPS mm) to moving physical points, the
resampling convention of ITK, elastix, ANTs and Slicer's "from parent" transforms; warping the
moving image with it onto the fixed grid gives ``Result.warped``.

The pipeline (docs/architecture.md): check inputs → load → (linear alignment) → network at its
grid in one physical frame (``capture.py``) → guarded start and refinement pyramid up to the
fixed image's spacing (``refine.py``) → outputs (``outputs.py``) → report (``report.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from . import affine
from .capture import Pair, PointMap, capture_pairs, unsuitable
from .device import resolve_device
from .evaluate import folding_fraction
from .io import read_image, read_mask
from .models import ModelCard, load_network, read_card
from .outputs import Result, lift_to_slice
from .preprocess import background_value, robust_range
from .refine import (
    QUALITY,
    ImagePair,
    Refined,
    coarsened,
    field_array,
    field_tensor,
    pyramid,
    refine,
    resize_field,
)
from .refine import score as level_score
from .report import model_report, run_report
from .similarity import Similarity
from .similarity import get as get_similarity
from .space import Grid, resample_to_grid
from .stages import Progress, Stages
from .validate import check_image, check_mask, check_pair, check_path_argument, check_run_options

ImageLike = str | os.PathLike | sitk.Image

# The linear alignment is a start that the refinement corrects, so it runs with fewer samples
# and iterations than ``affine.align``'s defaults, and each finer level starts with a smaller
# step (2.6 → 1.0 s on the brain volume, the same landmark error after refinement on every
# Testing/ and benchmark case within ±0.02 mm). In 3-D the alignment's own error is 1–3 mm on
# the benchmark cases whatever its samples, so 2^12 do; the finest 2-D level gets 2^14: the
# pure affine brain slices end at the alignment's precision, which its samples set.
ALIGNMENT_SAMPLES = {2: 1 << 14, 3: 1 << 12}
# The finest alignment level has at most 128 (2-D) or 64 (3-D) voxels along its longest side,
# half of ``affine.DEFAULT_MAX_SIZE``'s 256 and 2/3 of its 96: its spline and smoothing cost
# a fraction (brain volume alignment 0.8 → 0.5 s, 2-D 0.4–0.6 → 0.3–0.45 s), and the samples
# do not resolve more. Landmark error after refinement: 3-D cases within 0.003 mm; 2-D within
# 0.0003 mm except the multimodal brain slices, 0.235 / 0.235 → 0.238 / 0.241 mm, and the
# affine brain slices, 0.016 / 0.021 → 0.015 / 0.019. Rotations of 15–30° with 5–15 mm shifts
# of the brain volume and the chest CT are still recovered (0.15 / 0.25 mm by the alignment
# alone, against 0.12 / 0.32), and 20–40° of the fundus photograph (0.004 mm, against 0.001).
ALIGNMENT_MAX_SIZE = {2: 128, 3: 64}
ALIGNMENT_SCHEDULE = affine.Schedule(iterations=100, tolerance=0.01, patience=5, level_rate=0.4)


def _as_image(image: ImageLike, notify: Callable[[str], None], role: str) -> sitk.Image:
    """A checked float32 image (validate.check_image), from a path or from memory alike."""
    check_path_argument(image, role)
    if isinstance(image, sitk.Image):
        return check_image(image, f"{role} (in-memory image)", notify)
    return read_image(image, notify)


def _as_mask(mask: ImageLike | None, reference: sitk.Image, role: str) -> sitk.Image | None:
    if mask is None:
        return None
    check_path_argument(mask, f"{role}_mask")
    if isinstance(mask, sitk.Image):
        return check_mask(mask, reference, role, f"{role}_mask (in-memory image)")
    return read_mask(mask, reference, role)


@dataclass
class _Options:
    """What each direction's refinement needs of the checked run options, defaults resolved."""

    similarity: Similarity | None  # None: auto (refine.choose_similarity)
    quality: str
    steps: int


@dataclass
class _Direction:
    """One direction of the registration: what is registered to what, and its starts."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_mask: sitk.Image | None
    moving_mask: sitk.Image | None
    starts: dict[str, PointMap]


@dataclass
class _Inputs:
    """The checked images and masks of one registration."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_mask: sitk.Image | None
    moving_mask: sitk.Image | None


def _load(
    fixed: ImageLike,
    moving: ImageLike,
    fixed_mask: ImageLike | None,
    moving_mask: ImageLike | None,
    notices: list[str],
) -> _Inputs:
    """Read and check the images and masks (``validate.py``); notices go to ``notices``."""
    fixed_image = _as_image(fixed, notices.append, "fixed")
    moving_image = _as_image(moving, notices.append, "moving")
    check_pair(fixed_image, moving_image, "moving" if isinstance(moving, sitk.Image) else moving)
    return _Inputs(
        fixed_image,
        moving_image,
        _as_mask(fixed_mask, fixed_image, "fixed"),
        _as_mask(moving_mask, moving_image, "moving"),
    )


def _working(inputs: _Inputs, quality: str) -> _Inputs:
    """The images (and masks) no finer than the refinement's finest level: every stage before
    the outputs works on these, so a 512 × 512 × 133 CT is not smoothed and resampled in full
    by the alignment, the network frames and each pyramid level."""
    preset = QUALITY[quality]
    finest = pyramid(Grid.of(inputs.fixed), preset.budget[inputs.fixed.GetDimension()], 1)[-1]
    spacing = float(min(finest.spacing))

    def shrink(image: sitk.Image, mask: sitk.Image | None) -> tuple[sitk.Image, sitk.Image | None]:
        small = coarsened(image, spacing)
        if mask is None or small is image:
            return small, mask
        inside = resample_to_grid(mask, Grid.of(small), sitk.sitkNearestNeighbor)
        return small, sitk.Cast(inside > 0, sitk.sitkUInt8)

    fixed, fixed_mask = shrink(inputs.fixed, inputs.fixed_mask)
    moving, moving_mask = shrink(inputs.moving, inputs.moving_mask)
    return _Inputs(fixed, moving, fixed_mask, moving_mask)


def _align(
    inputs: _Inputs, mode: str, similarity: str, device: torch.device, stages: Stages
) -> tuple[affine.AffineResult, tuple[sitk.Image, sitk.Image | None]]:
    """The linear alignment (mutual information unless the similarity says one modality), and
    the moving image (and mask) seen through it on the fixed grid, padded with its background:
    what the network registers for the ``affine+network`` start."""
    alignment = affine.align(
        inputs.fixed,
        inputs.moving,
        mode,
        loss="ncc" if similarity in ("lncc", "mse") else "mi",
        max_size=ALIGNMENT_MAX_SIZE[inputs.fixed.GetDimension()],
        max_samples=ALIGNMENT_SAMPLES[inputs.fixed.GetDimension()],
        schedule=ALIGNMENT_SCHEDULE,
        fixed_mask=inputs.fixed_mask,
        moving_mask=inputs.moving_mask,
        device=device,
        progress=lambda fraction, message: stages.update("affine", fraction, message),
    )
    return alignment, alignment.resample(inputs.moving, inputs.moving_mask, inputs.fixed)


def _identity(points: np.ndarray) -> np.ndarray:
    return points


def _directions(
    inputs: _Inputs,
    network: torch.nn.Module | None,
    card: ModelCard,
    alignment: affine.AffineResult | None,
    aligned: tuple[sitk.Image, sitk.Image | None],
    device: torch.device,
    inverse: bool,
    warnings: list[str],
) -> tuple[_Direction, _Direction, torch.device]:
    """Both directions with their starts: ``identity``; with an alignment ``affine`` (and its
    inverse backwards); the network's map on the images as they are (``network``: large and
    independent shifts) and, with an alignment, on the moving image seen through it
    (``affine+network``: rotations and scalings the network does not model). No network
    start when the model's intensity window does not fit the images. Returns both directions
    and the device the network ran on."""
    forward = _Direction(
        inputs.fixed, inputs.moving, inputs.fixed_mask, inputs.moving_mask, {"identity": _identity}
    )
    backward = _Direction(
        inputs.moving, inputs.fixed, inputs.moving_mask, inputs.fixed_mask, {"identity": _identity}
    )
    if alignment is not None:
        forward.starts["affine"] = alignment.apply
        backward.starts["affine"] = _inverse_affine(alignment)
    skip = unsuitable(card, {"fixed image": inputs.fixed, "moving image": inputs.moving})
    if skip:
        warnings.append(skip)
    if network is None or skip:
        return forward, backward, device

    pairs = {"network": Pair(inputs.fixed, inputs.moving, inputs.fixed_mask, inputs.moving_mask)}
    if inverse:
        pairs["back"] = Pair(inputs.moving, inputs.fixed, inputs.moving_mask, inputs.fixed_mask)
    if alignment is not None:
        moving, moving_mask = aligned
        pairs["aligned"] = Pair(inputs.fixed, moving, inputs.fixed_mask, moving_mask)
        if inverse:
            pairs["back aligned"] = Pair(moving, inputs.fixed, moving_mask, inputs.fixed_mask)
    captured = capture_pairs(network, card, list(pairs.values()), device, warnings)
    runs = dict(zip(pairs, captured, strict=True))
    forward.starts["network"] = runs["network"].map
    if inverse:
        backward.starts["network"] = runs["back"].map
    if alignment is not None:
        linear, undo = alignment.apply, backward.starts["affine"]
        net_aligned = runs["aligned"].map
        forward.starts["affine+network"] = lambda points: linear(net_aligned(points))
        if inverse:
            back_aligned = runs["back aligned"].map
            backward.starts["affine+network"] = lambda points: back_aligned(undo(points))
    return forward, backward, runs["network"].device


def _displacement_on(point_map: PointMap) -> Callable[[Grid], np.ndarray]:
    def on(grid: Grid) -> np.ndarray:
        points = grid.physical_points()
        return point_map(points) - points

    return on


def _inverse_affine(alignment: affine.AffineResult) -> PointMap:
    inverse = np.linalg.inv(alignment.matrix)

    def apply(points: np.ndarray) -> np.ndarray:
        shifted = np.asarray(points) - alignment.centre - alignment.translation
        return shifted @ inverse.T + alignment.centre

    return apply


def _solve(
    direction: _Direction,
    options: _Options,
    output_grid: Callable[[Grid | None], Grid],
    device: torch.device,
    progress: Callable[[float, str], None] = lambda _f, _m: None,
) -> tuple[sitk.Image, Refined, dict[str, Any]]:
    """Refine one direction; returns its displacement image on ``output_grid(finest level)``
    (``None`` without refinement), the refinement and the similarity before/after."""
    pair = ImagePair(
        direction.fixed,
        direction.moving,
        direction.fixed_mask,
        direction.moving_mask,
        (
            robust_range(sitk.GetArrayViewFromImage(direction.fixed)),
            robust_range(sitk.GetArrayViewFromImage(direction.moving)),
        ),
        device,
    )
    starts = {name: _displacement_on(point_map) for name, point_map in direction.starts.items()}
    refined = refine(
        pair, starts, options.similarity, QUALITY[options.quality], options.steps, progress
    )
    grid = output_grid(refined.grid if options.steps else None)
    if options.steps == 0 or refined.start_returned:
        values = starts[refined.start](grid)
    else:
        values = field_array(resize_field(refined.displacement, grid.shape))
    image = grid.stamp(sitk.GetImageFromArray(values.astype(np.float64), isVector=True))

    level, zero = refined.level, torch.zeros_like(refined.displacement)
    measures = {"lncc": get_similarity("lncc"), refined.similarity.name: refined.similarity}
    quality: dict[str, Any] = {
        key: {name: level_score(level, field, m) for name, m in measures.items()}
        for key, field in (("similarity_before", zero), ("similarity_after", refined.displacement))
    }
    if "affine" in starts:
        affine_field = field_tensor(starts["affine"](level.grid), device)
        quality["similarity_after_initial"] = {
            name: level_score(level, affine_field, m) for name, m in measures.items()
        }
    return image, refined, quality


def _with_total(timings: dict[str, float]) -> dict[str, float]:
    """Each stage's wall time (s) and their sum as ``total``."""
    return {**timings, "total": round(sum(timings.values()), 3)}


def _field_transform(displacement: sitk.Image) -> sitk.DisplacementFieldTransform:
    # DisplacementFieldTransform takes ownership of (and empties) the image it is given.
    return sitk.DisplacementFieldTransform(sitk.Image(displacement))


def _with_linear(
    displacement: sitk.Image, linear: sitk.Transform | None, undo: PointMap | None
) -> sitk.Transform:
    """The total field ``x + u(x)`` as a transform; with a linear stage ``L`` (``undo`` = its
    inverse), ``L ∘ (x + r(x))`` with the residual ``r = L⁻¹(x + u(x)) − x``, so that points
    outside the field's grid still get ``L`` rather than no motion at all."""
    if linear is None or undo is None:
        return _field_transform(displacement)
    grid = Grid.of(displacement)
    points = grid.physical_points()
    residual = undo(points + sitk.GetArrayFromImage(displacement)) - points
    residual_image = grid.stamp(sitk.GetImageFromArray(residual, isVector=True))
    # CompositeTransform applies the last added first: x ↦ L(x + r(x)) = x + u(x).
    return sitk.CompositeTransform([linear, _field_transform(residual_image)])


def _output_grid(field_grid: str, fixed: sitk.Image, card: ModelCard) -> Callable:
    """Where the field is written: the fixed image's own grid, the model's grid over the fixed
    extent, or (``auto``) the finest refinement level (the model's grid without refinement)."""

    def choose(finest: Grid | None) -> Grid:
        if field_grid == "fixed":
            return Grid.of(fixed)
        if field_grid == "network" or finest is None:
            return Grid.of(fixed).resized(card.input_shape)
        return finest

    return choose


def _folding(displacement: sitk.Image, warnings: list[str]) -> float:
    grid = Grid.of(displacement)
    fraction = folding_fraction(sitk.GetArrayFromImage(displacement), grid.spacing, grid.direction)
    if fraction > 0.01:
        warnings.append(f"{100 * fraction:.1f}% of the field folds (Jacobian det ≤ 0)")
    return fraction


def register(
    fixed: ImageLike,
    moving: ImageLike,
    *,
    model: str = "auto",
    device: str = "auto",
    initial: str = "affine",
    similarity: str = "auto",
    quality: str = "balanced",
    refine_steps: int | None = None,
    fixed_mask: ImageLike | None = None,
    moving_mask: ImageLike | None = None,
    inverse: bool = False,
    field_grid: str = "auto",
    progress: Progress | None = None,
) -> Result:
    """Register ``moving`` to ``fixed`` (paths or SimpleITK images, 2-D or 3-D).

    Args:
        model: ``auto`` (the bundled model for the dimension), a preset name or a ``.pt`` path.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        initial: ``affine`` (default), ``rigid``, ``translation`` or ``none``: a linear
            alignment in physical space (``affine.align``), one of the refinement's starts
            (``affine``, and ``affine+network``: the network on the aligned images).
        similarity: ``auto`` (``lncc``, or ``mind`` when the two images' intensities are not
            linearly related: ``refine.choose_similarity``), ``lncc``, ``mind``, ``nmi`` or
            ``mse`` (``similarity.SIMILARITIES``): the measure of the guarded start and the
            refinement (``mind``/``nmi`` across modalities).
        quality: ``fast``, ``balanced`` or ``best`` (``refine.QUALITY``): the pyramid's finest
            voxel budget, levels and steps.
        refine_steps: steps per pyramid level (``None``: the quality preset's); 0 keeps the best
            start (identity, alignment or network) without refinement.
        fixed_mask, moving_mask: 0/non-0 images on their image's grid; only voxels inside count.
        inverse: also compute the moving → fixed transform (the pipeline with swapped inputs).
        field_grid: grid of ``Result.displacement`` and the transform's field: ``auto`` (the
            finest refinement level; the model's grid over the fixed extent without
            refinement), ``network`` or ``fixed`` (the fixed image's own grid).
        progress: ``progress(stage, fraction, message)`` called as work proceeds.

    Returns:
        ``Result``: transform (fixed → moving LPS mm), displacement field (LPS mm vectors on a
        grid with the fixed image's direction over its extent), warped moving image on the fixed
        grid (padded with the moving image's background), report, optional inverse.

    Raises:
        InputError: unreadable, empty, constant or non-finite images, masks off their grid,
            images of different dimension, invalid options or model.
        RegistrationFailure: CUDA ran out of memory and the CPU fallback failed too.
    """
    check_run_options(
        model=model,
        device=device,
        initial=initial,
        refine_steps=refine_steps,
        field_grid=field_grid,
        similarity=similarity,
        quality=quality,
        inverse=inverse,
    )
    steps = QUALITY[quality].steps if refine_steps is None else refine_steps
    measure = None if similarity == "auto" else get_similarity(similarity)
    options = _Options(measure, quality, steps)
    options_report = {
        "initial": initial,
        "similarity": similarity,
        "quality": quality,
        "refine_steps": steps,
        "field_grid": field_grid,
        "inverse": inverse,
        "fixed_mask": fixed_mask is not None,
        "moving_mask": moving_mask is not None,
    }
    stage_list = ["load"] + (["affine"] if initial != "none" else []) + ["network"]
    stage_list += (["refine"] if steps else []) + ["field", "warp"] + (["inverse"] * inverse)
    stages = Stages(progress, stage_list)
    notices: list[str] = []
    warnings: list[str] = []

    stages.enter("load", "reading images and model")
    torch_device = resolve_device(device)
    inputs = _load(fixed, moving, fixed_mask, moving_mask, notices)
    card = read_card(
        model,
        inputs.fixed.GetDimension(),
        [sitk.GetArrayViewFromImage(image) for image in (inputs.fixed, inputs.moving)],
    )
    network = load_network(card)
    if not card.trained:
        notices.append(f"model {card.name} is UNTRAINED (random weights): its map is not used")
        network = None
    work = _working(inputs, quality)
    alignment, network_moving = None, (work.moving, work.moving_mask)
    if initial != "none":
        stages.enter("affine", f"{initial} alignment")
        alignment, network_moving = _align(work, initial, similarity, torch_device, stages)

    stages.enter("network", f"running {card.name} ({card.chosen}) on {torch_device}")
    forward, backward, compute = _directions(
        work, network, card, alignment, network_moving, torch_device, inverse, warnings
    )

    if steps:
        stages.enter("refine", f"refinement ({similarity}, {quality})")
    displacement, refined, quality_report = _solve(
        forward,
        options,
        _output_grid(field_grid, inputs.fixed, card),
        compute,
        lambda fraction, message: stages.update("refine", fraction, message) if steps else None,
    )
    warnings += refined.warnings
    stages.enter("field", "writing the displacement field")
    linear = alignment.transform() if alignment is not None else None
    transform = _with_linear(displacement, linear, backward.starts.get("affine"))
    quality_report["folding_fraction"] = _folding(displacement, warnings)

    stages.enter("warp", "resampling the moving image")
    fill = background_value(sitk.GetArrayViewFromImage(inputs.moving))
    warped = sitk.Resample(inputs.moving, inputs.fixed, transform, sitk.sitkLinear, fill)

    inverse_transform, inverse_report = None, {}
    if inverse:
        stages.enter("inverse", "registering with swapped inputs for the inverse")
        inverse_field, inverse_refined, inverse_quality = _solve(
            backward, options, _output_grid(field_grid, inputs.moving, card), compute
        )
        warnings += inverse_refined.warnings
        inverse_linear = linear.GetInverse() if linear is not None else None
        inverse_transform = _with_linear(
            inverse_field, inverse_linear, forward.starts.get("affine")
        )
        inverse_report = {"inverse": {**inverse_quality, "refinement": inverse_refined.report}}

    report = {
        **run_report(card, (fixed, moving), inputs, options_report, compute),
        "model": {**model_report(card), "used": "network" in forward.starts},
        **quality_report,
        "refinement": refined.report,
        **inverse_report,
        **({"affine": alignment.report()} if alignment is not None else {}),
        "timings_s": _with_total(stages.finish()),
        "warnings": notices + warnings,
    }
    if progress is not None:
        for message in notices + warnings:
            progress("warning", 1.0, message)
    result = Result(transform, displacement, warped, report, inverse_transform)
    return lift_to_slice(result, inputs.fixed, inputs.moving)  # one-slice 3-D inputs: 3-D outputs
