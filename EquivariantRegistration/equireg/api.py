"""``register(fixed, moving, ...) -> Result``: the entry point behind the command and the module.

The result's transform maps fixed physical points (LPS mm) to moving physical points, the
resampling convention of ITK, elastix, ANTs and Slicer's "from parent" transforms; warping the
moving image with it onto the fixed grid gives ``Result.warped``.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__, affine, losses
from .device import resolve_device
from .errors import RegistrationFailure
from .evaluate import folding_fraction
from .io import read_image, read_mask
from .maps import Map, compose, displacement_map, evaluate, identity_grid, sampled_map, warp
from .models import ModelCard, load_network, read_card
from .outputs import Result, lift_to_slice
from .preprocess import network_input, network_mask, normalise_intensity
from .space import Grid, physical_displacement, resample_to_grid
from .validate import check_image, check_mask, check_pair, check_path_argument, check_run_options

Progress = Callable[[str, float, str], None]
ImageLike = str | os.PathLike | sitk.Image

REFINE_DIFFUSION_WEIGHT = 2.0  # LNCC + this × diffusion (voxel units) in instance optimisation


class _Stages:
    """Turns per-stage progress into one overall fraction and records each stage's wall time."""

    WEIGHTS = {
        "load": 1,
        "affine": 3,
        "network": 3,
        "refine": 6,
        "field": 2,
        "warp": 1,
        "inverse": 6,
    }

    def __init__(self, progress: Progress | None, stages: list[str]):
        self.progress = progress or (lambda *_: None)
        self._plan(stages)
        self.timings: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def _plan(self, stages: list[str]) -> None:
        self.total = sum(self.WEIGHTS[s] for s in stages)
        self.start: dict[str, float] = {}
        offset = 0.0
        for stage in stages:
            self.start[stage] = offset
            offset += self.WEIGHTS[stage] / self.total

    def skip(self, stage: str) -> None:
        """Leave out a stage that turned out not to run (call before any later stage starts)."""
        self._plan([s for s in self.start if s != stage])

    def enter(self, stage: str, message: str) -> None:
        self._close()
        self._current = (stage, time.perf_counter())
        self.progress(stage, self.start[stage], message)

    def update(self, stage: str, fraction: float, message: str) -> None:
        done = self.start[stage] + fraction * self.WEIGHTS[stage] / self.total
        self.progress(stage, min(done, 1.0), message)

    def _close(self) -> None:
        if self._current is not None:
            stage, began = self._current
            self.timings[stage] = round(
                self.timings.get(stage, 0.0) + time.perf_counter() - began, 3
            )
            self._current = None

    def finish(self) -> dict[str, float]:
        self._close()
        return self.timings


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


def _refine(
    base: Map,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    steps: int,
    fixed_mask: torch.Tensor | None,
    report_step: Callable[[int], None],
) -> Map:
    """Instance optimisation: a displacement ψ (in voxels) composed after the network's map.

    Minimises LNCC(moving ∘ Φ ∘ ψ, fixed) + λ·diffusion(ψ) with Adam; the network's map is
    kept as it is, so the [W, U] equivariance of Φ carries over (the optimisation of ψ only
    sees the already aligned pair).
    """
    shape = fixed.shape[2:]
    scale = torch.tensor(shape, dtype=fixed.dtype, device=fixed.device).view(
        1, -1, *[1] * len(shape)
    )
    voxels = torch.zeros(1, len(shape), *shape, device=fixed.device, requires_grad=True)
    identity = identity_grid(shape, device=fixed.device)
    optimiser = torch.optim.Adam([voxels], lr=0.1)
    weight = fixed_mask if fixed_mask is not None else 1.0
    with torch.enable_grad():
        for step in range(steps):
            optimiser.zero_grad()
            phi = compose(base, displacement_map(voxels / scale))
            moved = warp(moving, phi, shape)
            smoothness = losses.diffusion(identity + voxels / scale)
            loss = (
                losses.lncc(moved * weight, fixed * weight) + REFINE_DIFFUSION_WEIGHT * smoothness
            )
            loss.backward()
            optimiser.step()
            report_step(step)
    refined = compose(base, displacement_map(voxels.detach() / scale))
    return sampled_map(evaluate(refined, shape, 1, fixed))


def _network_map(
    network: torch.nn.Module,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    """Φ[moving, fixed] on the fixed network grid, float32 ``(1, d, *shape)``."""
    network = network.to(device)
    moving, fixed = moving.to(device), fixed.to(device)
    autocast = nullcontext()
    if device.type == "cuda":  # bf16 convolutions, TF32 matmuls; attention keeps float32 maps
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    with torch.no_grad(), autocast:
        phi = network(moving, fixed)
        values = evaluate(phi, fixed.shape[2:], 1, fixed)
    return values.float()


def _similarity(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> dict[str, float]:
    weight = mask if mask is not None else 1.0
    with torch.no_grad():
        return {
            "lncc": round(1.0 - float(losses.lncc(a * weight, b * weight)), 5),
            "mse": round(float(losses.mse(a * weight, b * weight)), 6),
        }


def _displacement_image(values: np.ndarray, grid: Grid) -> sitk.Image:
    image = sitk.GetImageFromArray(values.astype(np.float64), isVector=True)
    return grid.stamp(image)


def _one_direction(
    network: torch.nn.Module,
    card: ModelCard,
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: sitk.Image | None,
    moving_mask: sitk.Image | None,
    device: torch.device,
    refine_steps: int,
    field_grid: str,
    stages: _Stages,
    stage_names: tuple[str, str, str],
    unaligned: sitk.Image | None = None,
) -> tuple[sitk.Image, dict[str, Any], list[str]]:
    """Run the network (and refinement) for one direction; returns the physical field.

    ``unaligned`` is the moving image before an initial alignment (``moving`` is then its
    resampling onto the fixed grid): "similarity_before" is measured on it.
    """
    network_stage, refine_stage, field_stage = stage_names
    warnings: list[str] = []
    shape = card.input_shape
    fixed_net, fixed_grid = network_input(fixed, shape, card.preprocessing, fixed_mask)
    moving_net, moving_grid = network_input(moving, shape, card.preprocessing, moving_mask)
    mask_net = network_mask(fixed_mask, shape) if fixed_mask is not None else None

    stages.enter(network_stage, f"running {card.name} on {device}")
    try:
        values = _network_map(network, moving_net, fixed_net, device)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        warnings.append(f"CUDA ran out of memory on {device}; fell back to the CPU")
        device = torch.device("cpu")
        try:
            values = _network_map(network, moving_net, fixed_net, device)
        except RuntimeError as error:
            raise RegistrationFailure(
                f"out of memory on CUDA, and the CPU failed too: {error}"
            ) from None
    compute = values.device
    fixed_net, moving_net = fixed_net.to(compute), moving_net.to(compute)
    mask_net = mask_net.to(compute) if mask_net is not None else None
    phi = sampled_map(values)

    if refine_steps > 0:
        stages.enter(refine_stage, f"instance optimisation, {refine_steps} steps")

        def report_step(step: int) -> None:
            stages.update(
                refine_stage, (step + 1) / refine_steps, f"step {step + 1}/{refine_steps}"
            )

        phi = _refine(phi, moving_net, fixed_net, refine_steps, mask_net, report_step)

    stages.enter(field_stage, "computing the displacement field")

    def on_fixed_grid(image: sitk.Image) -> torch.Tensor:
        values = sitk.GetArrayFromImage(resample_to_grid(image, fixed_grid))
        return torch.from_numpy(normalise_intensity(values, card.preprocessing))[None, None]

    after = warp(moving_net, phi, shape)
    quality = {
        "similarity_before": _similarity(
            on_fixed_grid(moving if unaligned is None else unaligned).to(compute),
            fixed_net,
            mask_net,
        ),
        "similarity_after": _similarity(after, fixed_net, mask_net),
        "device": str(device),
    }
    if unaligned is not None:
        quality["similarity_after_initial"] = _similarity(
            on_fixed_grid(moving).to(compute), fixed_net, mask_net
        )
    output_grid = fixed_grid if field_grid == "network" else Grid.of(fixed)
    field_values = physical_displacement(phi, fixed_grid, moving_grid, output_grid, like=values)
    quality["folding_fraction"] = folding_fraction(
        field_values, output_grid.spacing, output_grid.direction
    )
    if quality["folding_fraction"] > 0.01:
        warnings.append(
            f"{100 * quality['folding_fraction']:.1f}% of the field folds (Jacobian det ≤ 0)"
        )
    return _displacement_image(field_values, output_grid), quality, warnings


def _field_transform(displacement: sitk.Image) -> sitk.DisplacementFieldTransform:
    # DisplacementFieldTransform takes ownership of (and empties) the image it is given.
    return sitk.DisplacementFieldTransform(sitk.Image(displacement))


def _peak_memory(device: torch.device) -> dict[str, float]:
    peak: dict[str, float] = {}
    try:  # Unix only; Slicer on Windows runs the engine too
        import resource

        peak["cpu_max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except ImportError:
        pass
    if device.type == "cuda":
        peak["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


def register(
    fixed: ImageLike,
    moving: ImageLike,
    *,
    model: str = "auto",
    device: str = "auto",
    initial: str = "none",
    refine_steps: int | None = None,
    fixed_mask: ImageLike | None = None,
    moving_mask: ImageLike | None = None,
    inverse: bool = False,
    field_grid: str = "auto",
    similarity: str = "lncc",
    quality: str = "balanced",
    progress: Progress | None = None,
) -> Result:
    """Register ``moving`` to ``fixed`` (paths or SimpleITK images) with a bundled model.

    ``model`` is ``auto`` (by dimension), a preset name or a weights path; ``refine_steps`` adds
    instance optimisation (``None``: the number the model card recommends, 0 if it names none);
    masks (on their image's grid) restrict what the network and the
    similarity see; ``inverse`` also computes the moving -> fixed transform by running the
    network with swapped inputs; ``field_grid`` is ``network`` (the model's resolution over the
    fixed extent, default) or ``fixed`` (the fixed image's own grid). ``progress(stage,
    fraction, message)`` is called as work proceeds. Raises ``InputError`` for bad input.

    ``initial`` (``translation``, ``rigid`` or ``affine``) first aligns the images in physical
    space (``affine.align``); the network then registers the fixed image to the moving image
    resampled through that alignment, and the result is their composition.
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
    if field_grid == "auto":
        field_grid = "network"
    notices: list[str] = []
    stage_list = ["load"] + (["affine"] if initial != "none" else []) + ["network"]
    stage_list += (["refine"] if refine_steps != 0 else []) + ["field", "warp"]
    stage_list += ["inverse"] if inverse else []
    stages = _Stages(progress, stage_list)
    stages.enter("load", "reading images and model")

    torch_device = resolve_device(device)
    fixed_image = _as_image(fixed, notices.append, "fixed")
    moving_image = _as_image(moving, notices.append, "moving")
    check_pair(fixed_image, moving_image, "moving" if isinstance(moving, sitk.Image) else moving)
    fixed_mask_image = _as_mask(fixed_mask, fixed_image, "fixed")
    moving_mask_image = _as_mask(moving_mask, moving_image, "moving")
    card = read_card(model, fixed_image.GetDimension())
    network = load_network(card)
    if refine_steps is None:
        refine_steps = int(card.data.get("refine_steps", 0))
        if refine_steps == 0:
            stages.skip("refine")
    if not card.trained:
        notices.append(
            f"model {card.name} is UNTRAINED (random weights): results are not meaningful"
        )

    alignment, network_moving, network_moving_mask = None, moving_image, moving_mask_image
    if initial != "none":
        stages.enter("affine", f"{initial} alignment")
        alignment = affine.align(
            fixed_image,
            moving_image,
            initial,
            fixed_mask=fixed_mask_image,
            moving_mask=moving_mask_image,
            device=torch_device,
            progress=lambda fraction, message: stages.update("affine", fraction, message),
        )
        network_moving, network_moving_mask = alignment.resample(
            moving_image, moving_mask_image, fixed_image
        )

    displacement, quality, warnings = _one_direction(
        network,
        card,
        fixed_image,
        network_moving,
        fixed_mask_image,
        network_moving_mask,
        torch_device,
        refine_steps,
        field_grid,
        stages,
        ("network", "refine", "field"),
        unaligned=moving_image if alignment is not None else None,
    )
    transform = _field_transform(displacement)
    if alignment is not None:  # x ↦ T(x + u(x)): CompositeTransform applies the last added first
        transform = sitk.CompositeTransform([alignment.transform(), transform])
        displacement = alignment.compose_displacement(displacement)

    stages.enter("warp", "resampling the moving image")
    warped = sitk.Resample(moving_image, fixed_image, transform, sitk.sitkLinear, 0.0)

    inverse_transform = None
    if inverse:
        stages.enter("inverse", "registering with swapped inputs for the inverse")
        inverse_stages = _Stages(None, ["network", "refine", "field"])
        inverse_field, _, inverse_warnings = _one_direction(
            network,
            card,
            network_moving,
            fixed_image,
            network_moving_mask,
            fixed_mask_image,
            torch_device,
            refine_steps,
            field_grid,
            inverse_stages,
            ("network", "refine", "field"),
        )
        warnings += inverse_warnings
        inverse_transform = _field_transform(inverse_field)
        if alignment is not None:  # y ↦ v(T⁻¹ y): the alignment's inverse is applied first
            inverse_transform = sitk.CompositeTransform(
                [inverse_transform, alignment.transform().GetInverse()]
            )

    timings = stages.finish()
    report = {
        "equireg_version": __version__,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "SimpleITK": sitk.Version_VersionString(),
            "numpy": np.__version__,
        },
        "model": {"name": card.name, "trained": card.trained, "sha256": card.data.get("sha256")},
        "inputs": {
            "fixed": str(fixed) if not isinstance(fixed, sitk.Image) else "<image>",
            "moving": str(moving) if not isinstance(moving, sitk.Image) else "<image>",
            "fixed_size": list(fixed_image.GetSize()),
            "moving_size": list(moving_image.GetSize()),
        },
        "options": {
            "initial": initial,
            "refine_steps": refine_steps,
            "field_grid": field_grid,
            "inverse": inverse,
            "fixed_mask": fixed_mask is not None,
            "moving_mask": moving_mask is not None,
        },
        **quality,
        **({"affine": alignment.report()} if alignment is not None else {}),
        "timings_s": timings,
        "peak_memory": _peak_memory(torch.device(quality["device"])),
        "warnings": notices + warnings,
    }
    if progress is not None:
        for message in notices + warnings:
            progress("warning", 1.0, message)
    result = Result(transform, displacement, warped, report, inverse_transform)
    return lift_to_slice(result, fixed_image, moving_image)  # one-slice 3-D inputs: 3-D outputs
