"""Instance optimisation at increasing resolution, up to the fixed image's own spacing.

The network captures large and independent shifts at its coarse grid; this pyramid makes the
result accurate. At each level a dense displacement field ``u`` (LPS mm, on a grid over the
fixed image's extent with the fixed image's direction) is optimised with Adam so that the
moving image read at ``x + u(x)`` matches the fixed image by a registered similarity
(``similarity.py``), with a diffusion penalty on ``∇u``; each level starts from the previous
one upsampled. The moving image is read in its own voxel frame through its own geometry, so
any orientation, spacing or field of view works; voxels whose target falls outside the moving
image do not count.

Fields are ``(1, d, *S)`` tensors: channel ``k`` is the ``k``-th LPS component (ITK order)
in mm, spatial axes in tensor order (z, y, x) of the level grid.

Instance optimisation after a learnt registration follows Balakrishnan et al., "VoxelMorph",
IEEE TMI 2019 and Tian et al., "GradICON", CVPR 2023; the smoothed-field Adam scheme is in the
spirit of Siebert et al., "ConvexAdam", MICCAI 2021 (our own implementation).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .errors import InputError
from .losses import box_mean
from .options import QUALITY_PRESETS
from .preprocess import robust_normalise
from .similarity import Similarity, intensity_relation, local_agreement
from .similarity import get as get_similarity
from .space import Grid, physical_bounds, resample_to_grid

Displacement = Callable[[Grid], np.ndarray]  # a start: its field (*shape, d) mm on a grid


@dataclass(frozen=True)
class Quality:
    """A preset of the pyramid: the finest level's voxel budget, levels and steps per level."""

    budget: dict[int, int]  # voxels of the finest level, per dimension
    levels: int
    steps: int


QUALITY = {  # the numbers live in options.py (torch-free), which the command's help states
    name: Quality({2: p.edge_2d**2, 3: p.edge_3d**3}, p.levels, p.steps)
    for name, p in QUALITY_PRESETS.items()
}

# Adam's step at the start of each level, in level voxels (0.5 before commit cd78f39: every
# Testing/ and benchmark case ended as well or better at 0.25, docs/benchmarks.md) ...
LEARNING_RATE = 0.25
FINAL_RATE = 0.05  # ... decayed (cosine) to this fraction of it at the level's last step


@dataclass(frozen=True)
class FieldPrior:
    """How a level's field is regularised and optimised.

    The field's parameter is low-passed before use by ``passes`` box filters of ``width``
    voxels along the level's finest axis and the same length in mm along coarser ones (about a
    Gaussian of σ = √(passes·(width² − 1)/12) voxels; ``prior_window``); the similarity's
    diffusion weight is scaled by ``diffusion_scale``. With ``smooth_network_start`` a start
    that contains the network's map is low-passed by the same filter on the coarsest level
    first: a prior that adds only smooth corrections cannot remove the noise of the network's
    coarse grid. With ``finest_on_coarser_grid`` the finest level's field lives on the previous
    level's grid (low-passed there over the same length in mm, then upsampled linearly for the
    similarity, which is still measured on the finest grid): a field that smooth has nothing
    the finer grid could add, and the prior, the diffusion penalty and Adam cost an eighth.
    The finest level runs ``finest_steps`` of the steps of the others.
    """

    passes: int
    width: int
    diffusion_scale: float
    smooth_network_start: bool
    finest_on_coarser_grid: bool
    finest_steps: float


# ``smooth`` (σ ≈ 4.5 voxels, a quarter of the diffusion weight) in 3-D, ``diffusion`` in 2-D,
# where the low-pass cost the vessel mask (0.019 → 0.032 mm) and the multimodal slices (0.25 →
# 0.33 mm). Chosen on the regression and benchmark cases (docs/benchmarks.md, "Refinement
# prior"), with the slab and re-stored CTs of tests/test_pipeline.py. The finest 3-D level on
# the coarser grid takes 40 % less time per step, and with 35 steps instead of 25 it ended as
# well or better on every 3-D case; 35 steps made the 2-D multimodal slices worse (0.232 →
# 0.241 mm), so 2-D keeps 25.
PRIORS = {
    "smooth": FieldPrior(3, 9, 0.25, True, finest_on_coarser_grid=True, finest_steps=0.7),
    "diffusion": FieldPrior(1, 3, 1.0, False, finest_on_coarser_grid=False, finest_steps=0.5),
}


def field_prior(dim: int) -> str:
    """The ``PRIORS`` name for a ``dim``-D pair."""
    return "smooth" if dim == 3 else "diffusion"


def prior_window(prior: FieldPrior, grid: Grid, level: Grid | None = None) -> tuple[int, ...]:
    """The box of ``prior`` in voxels of ``grid``, tensor-axis order: ``prior.width`` voxels
    of ``level``'s (default: ``grid``'s) finest axis, the same length in mm along every axis
    (odd, at least 1), so that 10 mm slices are not smoothed over three times the in-plane
    distance (the lung case: 0.41 → 0.28 mm, its shifted twin 0.70 → 0.35) and a parameter on
    a coarser grid than its level's is smoothed over the same length."""
    length = prior.width * min((level or grid).spacing)
    spacing = np.asarray(grid.spacing[::-1], dtype=np.float64)
    return tuple(int(max(1, 2 * (n // 2) + 1)) for n in length / spacing)


def pyramid(fixed: Grid, budget: int, levels: int) -> list[Grid]:
    """Level grids, coarse to fine, over ``fixed``'s extent with its direction.

    The finest level has the fixed image's spacing, or the isotropic spacing that keeps it
    within ``budget`` voxels; each coarser level doubles it. An axis is never finer than the
    fixed image's own voxels (thick slices stay thick), and levels coarser than 8 voxels along
    an axis that has more, or with fewer than 4 voxels along every axis, are dropped (a 4×4×4
    image once got levels of one and two voxels, where no similarity can be measured).
    """
    spacing = np.asarray(fixed.spacing, dtype=np.float64)
    extent = spacing * np.asarray(fixed.size)
    finest = max(float(spacing.min()), float((np.prod(extent) / budget) ** (1 / fixed.dim)))
    grids = []
    for k in range(levels):
        target = finest * 2 ** (levels - 1 - k)
        size = np.maximum(1, np.round(extent / np.maximum(spacing, target))).astype(int)
        size = np.minimum(size, fixed.size)
        too_coarse = np.any((size < 8) & (np.asarray(fixed.size) >= 8)) or np.all(size < 4)
        if k < levels - 1 and too_coarse:
            continue
        grids.append(fixed.resized(tuple(int(n) for n in reversed(size))))
    return grids


def coarsened(image: sitk.Image, spacing: float) -> sitk.Image:
    """``image`` smoothed and resampled on its own extent and direction to voxels no finer
    than ``spacing`` mm (itself when none is finer)."""
    grid = Grid.of(image)
    sizes = np.asarray(grid.spacing) * np.asarray(grid.size)
    size = np.minimum(grid.size, np.maximum(2, np.round(sizes / np.maximum(grid.spacing, spacing))))
    if tuple(int(n) for n in size) == grid.size:
        return image
    return resample_to_grid(image, grid.resized(tuple(int(n) for n in reversed(size))))


HULL_TOLERANCE = 0.01  # moving voxels beyond the first and last centres that still count
EDGE_MARGIN = 2  # level voxels a similarity reads around a voxel (LNCC's 5-voxel box; MIND)


def _eroded(inside: torch.Tensor, margin: int) -> torch.Tensor:
    """``inside`` ``(1, 1, *S)`` (bool, or 0/1 of the returned dtype) less the voxels within
    ``margin`` of a 0: one separable pass per axis, the union of ``2·margin + 1`` shifted
    copies of the outside in bytes (several times cheaper than max pooling in float). An axis
    whose pass would remove more than half of what is left is not eroded: a slab of a few
    thick slices keeps its voxels rather than leaving no voxel to measure."""
    outside = inside <= 0
    for axis in range(2, inside.dim()):
        length = outside.shape[axis]
        eroded = outside.clone()
        for shift in range(1, min(margin, length - 1) + 1):
            eroded.narrow(axis, shift, length - shift).logical_or_(
                outside.narrow(axis, 0, length - shift)
            )
            eroded.narrow(axis, 0, length - shift).logical_or_(
                outside.narrow(axis, shift, length - shift)
            )
        keep = 2 * (~eroded).sum() >= (~outside).sum()  # a tensor: no device sync
        outside = torch.where(keep, eroded, outside)
    return (~outside).to(inside.dtype)


class _MovingSampler:
    """Reads the moving image (and its mask) at physical points, in its own voxel frame.

    A point counts only where the similarity there reads real moving voxels: between the first
    and last voxel centres (beyond them linear interpolation fades into the zero padding, an
    edge the fixed image does not have; ``HULL_TOLERANCE`` voxels beyond them still count, so
    that a level grid whose border points lie on those centres, as at the identity when both
    images share a grid, does not lose or keep its border ring by float rounding) and
    ``EDGE_MARGIN`` level voxels inside. Without this a moving slab pulled the fixed image into
    itself (8.1 against 0.87 mm on the slab of tests/test_pipeline.py).
    """

    def __init__(self, image: sitk.Image, mask: sitk.Image | None, device: torch.device):
        grid = Grid.of(image)
        values = sitk.GetArrayFromImage(image)
        self.image = torch.from_numpy(values)[None, None].to(device)
        self.mask = None
        if mask is not None:
            inside = sitk.GetArrayFromImage(resample_to_grid(mask, grid, sitk.sitkNearestNeighbor))
            self.mask = torch.from_numpy((inside > 0).astype(np.float32))[None, None].to(device)
        # Sampling coordinates are ``grid_sample``'s (channels x, y, z, the image's extent
        # from −1 to 1): 2 · (network coordinate) − 1 in ITK axis order, so that no per-step
        # reordering or rescaling of a fine grid's coordinates is needed.
        # coordinate = matrix · (p − origin) + offset
        size = np.asarray(grid.size, dtype=np.float64)
        to_index = np.linalg.inv(grid.direction_matrix @ np.diag(grid.spacing))
        self.matrix = torch.as_tensor(
            2 * np.diag(1 / size) @ to_index, dtype=torch.float32, device=device
        )
        self.origin = torch.as_tensor(grid.origin, dtype=torch.float32, device=device)
        self.offset = torch.as_tensor(1 / size - 1, dtype=torch.float32, device=device)
        # the first voxel centre less HULL_TOLERANCE voxels (−1 + (1 − 2·tolerance) / n)
        rim = (1 - 2 * HULL_TOLERANCE) / size - 1
        self.rim = torch.as_tensor(rim, dtype=torch.float32, device=device)

    def coords(self, points: torch.Tensor) -> torch.Tensor:
        """``(1, d, *S)`` LPS mm -> ``(1, d, *S)`` sampling coordinates."""
        shape = [1, -1] + [1] * (points.dim() - 2)
        return self.shift(points - self.origin.view(shape)) + self.offset.view(shape)

    def shift(self, displacement: torch.Tensor) -> torch.Tensor:
        """``(1, d, *S)`` LPS mm -> the change of sampling coordinates it makes (linear:
        applied to a coarse field before upsampling, it costs a fraction)."""
        return torch.einsum("ij,bj...->bi...", self.matrix, displacement)

    def __call__(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The moving image at ``points`` and the weight of each point (inside image and mask)."""
        return self.read(self.coords(points))

    def read(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The moving image at ``coords`` (``coords``' output) and each point's weight."""
        grid = coords.movedim(1, -1)  # a view: grid_sample reads it through its strides
        values = _grid_sample(self.image, grid, "bilinear")
        rim = self.rim.view([1, -1] + [1] * (coords.dim() - 2))
        inside = ((coords >= rim) & (coords <= -rim)).all(dim=1, keepdim=True)
        return values, self._masked(_eroded(inside, EDGE_MARGIN).to(values.dtype), grid)

    def covers(self, coords: torch.Tensor) -> torch.Tensor:
        """Whether each point of ``coords`` lies in the moving image (within its voxels' outer
        edges, and its mask): coverage as the user means it, without ``read``'s hull and edge
        margin."""
        inside = (coords.abs() <= 1).all(dim=1, keepdim=True).to(self.image.dtype)
        return self._masked(inside, coords.movedim(1, -1))

    def _masked(self, inside: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return inside
        return inside * _grid_sample(self.mask, grid, "nearest")


def _grid_sample(image: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    """``F.grid_sample`` of a one-channel ``image`` ``(1, 1, *M)`` at ``grid`` ``(1, *S, d)``,
    on the CPU with the points cut into one batch per thread: PyTorch's CPU kernels share
    out the work by batch only, so one image used one core (two threads on the brain volume's
    finest grid: 47 → 25 ms forward and backward). Returns ``(1, 1, *S)``."""
    parts = torch.get_num_threads() if grid.device.type == "cpu" else 1
    size = grid.shape[1:-1]
    if parts > 1 and size[0] % parts == 0:
        grid = grid.reshape(parts, size[0] // parts, *size[1:], grid.shape[-1])  # a view
    elif parts > 1 and grid[0, ..., 0].numel() % parts == 0:
        grid = grid.reshape(parts, -1, *[1] * (len(size) - 1), grid.shape[-1])
    else:
        parts = 1
    values = F.grid_sample(
        image.expand(parts, *image.shape[1:]), grid, mode=mode, align_corners=False
    )
    return values.reshape(1, 1, *size)


@dataclass
class Level:
    """One level's data: the fixed image, its weight and the points of its grid."""

    grid: Grid
    fixed: torch.Tensor  # (1, 1, *S) normalised
    weight: torch.Tensor  # (1, 1, *S) fixed mask (1 everywhere without one)
    points: torch.Tensor  # (1, d, *S) LPS mm of the voxel centres
    moving: _MovingSampler


def _tensor(values: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(device)


def points_of(grid: Grid, device: torch.device) -> torch.Tensor:
    """``(1, d, *S)`` LPS mm of ``grid``'s voxel centres (channels in ITK order)."""
    points = grid.physical_points()  # (*S, d)
    return _tensor(np.moveaxis(points, -1, 0)[None], device)


def field_tensor(displacement: np.ndarray, device: torch.device) -> torch.Tensor:
    """A field ``(*S, d)`` (as ``Displacement`` returns it) as ``(1, d, *S)`` float32."""
    return _tensor(np.moveaxis(displacement, -1, 0)[None], device)


def field_array(displacement: torch.Tensor) -> np.ndarray:
    """``(1, d, *S)`` -> ``(*S, d)`` float64 (for SimpleITK vector images)."""
    return np.moveaxis(displacement[0].detach().double().cpu().numpy(), 0, -1)


def resize_field(displacement: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A field on a grid over the same extent with ``shape`` voxels (linear interpolation,
    network-coordinate convention: ``align_corners=False``)."""
    shape = tuple(shape)
    if tuple(displacement.shape[2:]) == shape:
        return displacement
    if all(n in (m, 2 * m) for n, m in zip(shape, displacement.shape[2:], strict=True)):
        return _Doubled.apply(displacement, shape)
    return _interpolate(displacement, shape)


def _interpolate(values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(values, size=shape, mode=mode, align_corners=False)


class _Doubled(torch.autograd.Function):
    """Linear upsampling by exactly 2 (or 1) along each axis, with its transpose written out
    separably: along a doubled axis, output ``2k`` is ``¾ x[k] + ¼ x[k − 1]`` and ``2k + 1`` is
    ``¾ x[k] + ¼ x[k + 1]`` (indices clamped), so the gradient of ``x[k]`` is ``¾ (g[2k] +
    g[2k + 1]) + ¼ (g[2k + 2] + g[2k − 1])`` with the clamped ends folded back. PyTorch's own
    backward pass scatters per output voxel: on the finest 3-D level it was 10 % of a step,
    this a third of that."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        ctx.doubled = [n != m for n, m in zip(shape, values.shape[2:], strict=True)]
        return _interpolate(values, shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        for axis, doubled in enumerate(ctx.doubled, start=2):
            if not doubled:
                continue
            n = grad.shape[axis] // 2
            pairs = grad.unflatten(axis, (n, 2))
            even, odd = pairs.select(axis + 1, 0), pairs.select(axis + 1, 1)
            out = (even + odd).mul_(0.75)
            out.narrow(axis, 0, n - 1).add_(even.narrow(axis, 1, n - 1), alpha=0.25)
            out.narrow(axis, 1, n - 1).add_(odd.narrow(axis, 0, n - 1), alpha=0.25)
            out.narrow(axis, 0, 1).add_(even.narrow(axis, 0, 1), alpha=0.25)
            out.narrow(axis, n - 1, 1).add_(odd.narrow(axis, n - 1, 1), alpha=0.25)
            grad = out
        return grad, None


class ImagePair:
    """The fixed and moving images (robustly normalised) and their masks, for the pyramid."""

    def __init__(
        self,
        fixed: sitk.Image,
        moving: sitk.Image,
        fixed_mask: sitk.Image | None,
        moving_mask: sitk.Image | None,
        bounds: tuple[tuple[float, float], tuple[float, float]],
        device: torch.device,
    ):
        self.fixed = _normalised(fixed, bounds[0])
        self.moving = _normalised(moving, bounds[1])
        self.fixed_mask, self.moving_mask = fixed_mask, moving_mask
        self.device = device

    def coarsen(self, spacing: float) -> None:
        """Keep both images only as fine as ``spacing`` mm (the finest level's): every level
        is then resampled from these, not from a full-resolution CT each time."""
        self.fixed = coarsened(self.fixed, spacing)
        self.moving = coarsened(self.moving, spacing)

    def level(self, grid: Grid) -> Level:
        fixed = sitk.GetArrayFromImage(resample_to_grid(self.fixed, grid))
        weight = np.ones_like(fixed)
        if self.fixed_mask is not None:
            inside = resample_to_grid(self.fixed_mask, grid, sitk.sitkNearestNeighbor)
            weight = (sitk.GetArrayFromImage(inside) > 0).astype(np.float32)
        moving = coarsened(self.moving, float(min(grid.spacing)))
        return Level(
            grid,
            _tensor(fixed, self.device)[None, None],
            _tensor(weight, self.device)[None, None],
            points_of(grid, self.device),
            _MovingSampler(moving, self.moving_mask, self.device),
        )


def _normalised(image: sitk.Image, bounds: tuple[float, float]) -> sitk.Image:
    values = robust_normalise(sitk.GetArrayFromImage(image), bounds)
    out = sitk.GetImageFromArray(values)
    out.CopyInformation(image)
    return out


def _smooth(displacement: torch.Tensor, window: tuple[int, ...], passes: int) -> torch.Tensor:
    """``passes`` box means of ``window`` voxels over a ``(1, d, *S)`` field (a low-pass, exact
    at the borders)."""
    for _ in range(passes):
        displacement = box_mean(displacement, window)
    return displacement


def diffusion_mm(displacement: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Mean ``‖∇u‖²_F`` of a field in mm over a grid's axes in mm (dimensionless)."""
    total = displacement.new_zeros(())
    for axis, spacing in enumerate(reversed(grid.spacing)):
        if displacement.shape[2 + axis] > 1:
            gradient = torch.diff(displacement, dim=2 + axis) / spacing
            total = total + gradient.pow(2).sum(dim=1).mean()
    return total


MIN_OVERLAP = 0.01  # a start whose moving image covers less of the fixed image scores −∞


def overlap(level: Level, displacement: torch.Tensor) -> float:
    """The fraction of the fixed image (inside its mask) whose target lies in the moving image
    (within its voxels' outer edges, and its mask): what the user means by coverage, not the
    similarity's counted region, whose hull and edge margin leave out two of a thin volume's
    five slices (a newcomer's 5-slice pair, shifted by 1 mm, was said to be 36 % covered)."""
    with torch.no_grad():
        inside = level.moving.covers(level.moving.coords(level.points + displacement))
        return float((level.weight * inside).sum() / level.weight.sum().clamp(min=1))


def score(level: Level, displacement: torch.Tensor, similarity: Similarity) -> float:
    """``similarity`` of the moving image through ``displacement`` and the fixed image; −∞
    where they (almost) do not overlap, since a measure over no voxels says nothing."""
    with torch.no_grad():
        warped, inside = level.moving(level.points + displacement)
        weight = level.weight * inside
        if float(weight.sum()) < MIN_OVERLAP * float(level.weight.sum()):
            return float("-inf")
        return similarity.score(warped, level.fixed, weight)


@dataclass
class LevelReport:
    shape: list[int]  # the level grid, where the similarity is measured
    field_shape: list[int]  # the grid the field lives on (coarser at the finest 3-D level)
    spacing_mm: list[float]
    steps: int
    similarity_start: float
    similarity_end: float
    time_s: float


def optimise_level(
    level: Level,
    start: torch.Tensor,
    similarity: Similarity,
    steps: int,
    prior: FieldPrior,
    report_step: Callable[[int], None] = lambda _step: None,
    control: Grid | None = None,
) -> tuple[torch.Tensor, LevelReport]:
    """Adam on the level's field from ``start`` ``(1, d, *S)`` mm on ``control`` (a grid over
    the same extent, coarser than the level's; default the level's own); returns the field on
    the level's grid (linearly upsampled from ``control``) and a report. The parameter is
    low-passed before use (``prior``), which spreads each update over neighbouring voxels: a
    B-spline-like parameterisation that keeps noise out of the field without the bias a
    strong diffusion penalty puts on a real deformation (in the spirit of the Gaussian-smoothed
    updates of Demons and SyN: Vercauteren et al., NeuroImage 2009; Avants et al., Med. Image
    Anal. 2008). The diffusion penalty is ``prior.diffusion_scale`` times the similarity's
    weight, measured on ``control``.

    The step decays from ``LEARNING_RATE`` to ``FINAL_RATE`` of it (cosine), so that the
    level ends settled rather than oscillating by a fraction of a voxel.
    """
    began = time.perf_counter()
    grid = control or level.grid
    scale = float(min(level.grid.spacing))  # Adam's step in the level's voxels, on any grid
    window = prior_window(prior, grid, level.grid)
    residual = torch.zeros_like(start, requires_grad=True)

    def field(parameter: torch.Tensor) -> torch.Tensor:  # on ``grid``
        return start + scale * _smooth(parameter, window, prior.passes)

    optimiser = torch.optim.Adam([residual], lr=LEARNING_RATE)
    before = score(level, resize_field(start, level.grid.shape), similarity)
    against_fixed = similarity.bind(level.fixed)
    weight = similarity.diffusion_weight * prior.diffusion_scale
    base = level.moving.coords(level.points)
    with torch.enable_grad():
        for step in range(steps):
            decay = 0.5 * (1 + np.cos(np.pi * step / max(1, steps - 1)))  # 1 -> 0
            rate = FINAL_RATE + (1 - FINAL_RATE) * decay
            optimiser.param_groups[0]["lr"] = LEARNING_RATE * rate
            optimiser.zero_grad(set_to_none=True)
            displacement = field(residual)
            shift = resize_field(level.moving.shift(displacement), level.grid.shape)
            warped, inside = level.moving.read(base + shift)
            loss = -against_fixed(warped, level.weight * inside)
            loss = loss + weight * diffusion_mm(displacement, grid)
            loss.backward()
            optimiser.step()
            report_step(step)
    with torch.no_grad():
        result = resize_field(field(residual.detach()), level.grid.shape)
    after = score(level, result, similarity)
    return result, LevelReport(
        shape=list(level.grid.shape),
        field_shape=list(grid.shape),
        spacing_mm=[round(s, 4) for s in level.grid.spacing],
        steps=steps,
        similarity_start=before,
        similarity_end=after,
        time_s=round(time.perf_counter() - began, 3),
    )


# A later start (in ``starts``' order: identity, alignment, network, both) must score more than
# this above an earlier one to be chosen: closer scores are interpolation noise (an identity
# network composed with the affine start scored 2·10⁻⁵ above the affine start alone).
START_MARGIN = 1e-3

MULTIMODAL_RATIO = 0.85  # r² below this share of η²: the intensities are not linearly related
MIN_RELATION = 0.75  # ... provided η² shows a strong relation (a misaligned pair shows none)
MIN_AGREEMENT = 0.9  # local correlations less consistently positive: contrasts invert


def choose_similarity(
    level: Level, starts: dict[str, torch.Tensor]
) -> tuple[Similarity, dict[str, Any]]:
    """``lncc`` for a pair of one modality, ``mind`` for two (``--similarity auto``).

    The best start by MIND (contrast-invariant) aligns the pair roughly; there, intensities of
    one modality are related linearly and positively (Pearson ``r² ≈ η²``, the correlation
    ratio), and their local correlations over 3-voxel boxes are positive almost everywhere
    (``local_agreement`` near 1); those of two modalities are not (T1/T2 inversions, CT/MR:
    ``r`` small or negative, or ``r²`` well below a strong ``η²``, or local correlations of
    both signs). Measured on the Testing/ and benchmark cases: every pair of one modality has
    ``r²/η²`` ≥ 0.9 and an agreement ≥ 0.979; T1 against a T2-like contrast has ``r²/η²``
    0.71–0.76 and an agreement of −0.35 to −0.47 on brain slices, but on the brain volume,
    where the brain against its empty background dominates ``r``, ``r²/η²`` 0.85–0.87 (the
    ratio alone chose LNCC with ``--quality fast``: 12 mm instead of 0.4) and an agreement
    of 0.29–0.50. Two unrelated random volumes give ``r²/η²`` 0.80 with ``η²`` 0.68.
    """
    mind = get_similarity("mind")
    best = max(starts, key=lambda name: score(level, starts[name], mind))
    with torch.no_grad():
        warped, inside = level.moving(level.points + starts[best])
        weight = level.weight * inside
        r, eta_fixed = intensity_relation(level.fixed, warped, weight)
        _, eta_moving = intensity_relation(warped, level.fixed, weight)
        agreement = local_agreement(warped, level.fixed, weight)
    eta = max(eta_fixed, eta_moving)
    multimodal = (
        r < 0.3
        or (eta > MIN_RELATION and r * r < MULTIMODAL_RATIO * eta)
        or agreement < MIN_AGREEMENT
    )
    reason = {
        "pearson_r": round(r, 4),
        "correlation_ratio": round(eta, 4),
        "local_agreement": round(agreement, 4),
        "start": best,
    }
    return get_similarity("mind" if multimodal else "lncc"), reason


def _extent(image: sitk.Image) -> str:
    """The image's bounding box in LPS mm, for messages: ``x −10…250, y …``."""
    low, high = physical_bounds(Grid.of(image))
    return ", ".join(
        f"{a} {lo:.1f}…{hi:.1f} mm" for a, lo, hi in zip("xyz", low, high, strict=False)
    )


@dataclass
class Refined:
    """The refined field on the finest level's grid, the start it came from, and the report."""

    grid: Grid
    displacement: torch.Tensor  # (1, d, *S) LPS mm
    start: str
    start_returned: bool  # the guard replaced a worse result by the start
    level: Level  # the finest level that ran (the coarsest without refinement)
    similarity: Similarity  # the one used (``auto``: the one chosen)
    report: dict[str, Any]
    warnings: list[str]


def refine(
    pair: ImagePair,
    starts: dict[str, Displacement],
    similarity: Similarity | None,
    quality: Quality,
    steps: int,
    progress: Callable[[float, str], None] = lambda _f, _m: None,
) -> Refined:
    """The guarded start and the pyramid.

    ``similarity`` ``None`` chooses one (``choose_similarity``). Each start (identity, the
    linear alignment, the network's map: name -> field on a grid) is scored by the similarity
    on the coarsest level; the first in ``starts``' order within ``START_MARGIN`` of the best is
    refined level by level (``steps`` per level, none with 0). If the result scores worse than
    its start on the finest level, the start is returned with a warning, so the result is
    never worse than the identity by the user's own measure.
    """
    dim = pair.fixed.GetDimension()
    grids = pyramid(Grid.of(pair.fixed), quality.budget[dim], quality.levels)
    pair.coarsen(float(min(grids[-1].spacing)))
    coarse = pair.level(grids[0])
    fields = {name: field_tensor(start(grids[0]), pair.device) for name, start in starts.items()}
    choice: dict[str, Any] | None = None
    warnings: list[str] = []
    if similarity is None:
        similarity, choice = choose_similarity(coarse, fields)
    elif similarity.name in ("lncc", "mse"):  # the user's choice assumes one modality
        suggested, reason = choose_similarity(coarse, fields)
        if suggested.name != "lncc":
            warnings.append(
                f"the images look like two modalities or inverted contrasts (Pearson r "
                f"{reason['pearson_r']:.2f}, local agreement {reason['local_agreement']:.2f}), "
                f"which {similarity.name} counts as a mismatch; --similarity mind (or auto) "
                "registers such pairs"
            )
    scores = {name: score(coarse, field, similarity) for name, field in fields.items()}
    best = max(scores.values())
    if best == float("-inf"):
        raise InputError(
            f"the fixed image ({_extent(pair.fixed)}) and the moving image "
            f"({_extent(pair.moving)}) do not overlap in physical space from any start "
            f"({', '.join(scores)}); check their origins, spacings and directions"
        )
    chosen = next(name for name in starts if scores[name] >= best - START_MARGIN)
    levels: list[LevelReport] = []
    prior = field_prior(dim)
    settings = PRIORS[prior]
    displacement = fields[chosen]
    if settings.smooth_network_start and "network" in chosen:
        displacement = _smooth(displacement, prior_window(settings, coarse.grid), settings.passes)
    level = coarse
    start_returned = False
    if steps > 0:
        for k, grid in enumerate(grids):
            last = k == len(grids) - 1
            coarser = last and k > 0 and settings.finest_on_coarser_grid
            control = grids[k - 1] if coarser else None
            if k > 0:
                level = pair.level(grid)
                displacement = resize_field(displacement, (control or grid).shape)
            level_steps = max(1, round(steps * settings.finest_steps)) if last else steps

            def report_step(step: int, k: int = k, n: int = level_steps) -> None:
                done = (k + (step + 1) / n) / len(grids)
                progress(done, f"level {k + 1}/{len(grids)}, step {step + 1}/{n}")

            displacement, summary = optimise_level(
                level, displacement, similarity, level_steps, settings, report_step, control
            )
            levels.append(summary)
        finest = level
        start_field = field_tensor(starts[chosen](finest.grid), pair.device)
        start_score = score(finest, start_field, similarity)
        final_score = score(finest, displacement, similarity)
        if final_score < start_score:
            shown = [
                f"{v:.4f}" if np.isfinite(v) else "no overlap" for v in (start_score, final_score)
            ]
            warnings.append(
                f"refinement made {similarity.name} worse ({shown[0]} -> {shown[1]}); the "
                f"{chosen} start is returned instead"
            )
            displacement, start_returned = start_field, True
    covered = overlap(level, displacement)
    if covered < 0.5:
        warnings.append(
            f"the moving image covers only {100 * covered:.0f}% of the fixed image after "
            "registration: outside it the displacement is extrapolated, not measured"
        )
    report = {
        "overlap": round(covered, 4),
        "similarity": similarity.name,
        **({"similarity_choice": choice} if choice is not None else {}),
        "start": {"chosen": chosen, "scores": scores},
        "prior": prior,
        "levels": [vars(summary) for summary in levels],
    }
    return Refined(
        level.grid, displacement, chosen, start_returned, level, similarity, report, warnings
    )
