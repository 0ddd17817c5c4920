"""Training and instance-optimisation losses: similarity and regularisers (docs/architecture.md).

Images are ``(B, C, *S)`` tensors and maps follow ``maps.py`` (network coordinates, 1-, 2- or
3-D). Every function here is differentiable; each loss is 0 for a perfect result.

Regularisers measure derivatives in *voxel units* (positions and displacements counted in
voxels of the grid they are sampled on). A displacement gradient is then dimensionless, the
same for a smooth field whichever resolution samples it, and treats axes with different voxel
counts alike; in plain network coordinates an axis with twice the voxels would count a
one-voxel wobble four times less.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from .compose import RegistrationStep
from .maps import Map, evaluate, identity_grid, sample

_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _border_counts(length: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """How many of the ``width`` voxels around each of ``length`` positions are inside."""
    index = torch.arange(length, device=like.device, dtype=like.dtype)
    radius = width // 2
    return (index + radius).clamp(max=length - 1) - (index - radius).clamp(min=0) + 1


def box_sum(x: torch.Tensor, axis: int, width: int) -> torch.Tensor:
    """The sum over the ``width`` voxels around each position along ``axis`` (cropped at the
    borders). Up to ``SHIFTED_SUM_WIDTH`` voxels by adding shifted copies in place (MIND's
    3-voxel boxes on the brain volume 2–2.5× as fast as below, LNCC's 5-voxel ones a little);
    wider ones from a cumulative sum ``c``: ``c[min(i + r, n − 1)] − c[i − r − 1]`` (the second
    term 0 for ``i ≤ r``), ``O(1)`` work per voxel whatever the width. On a CPU, forward and
    backward of a 3-channel 90×102×84 field, the cumulative sum is 2.4× as fast as a depthwise
    convolution at 3 voxels, 3.4× at 5 and 5.5× at 9; in 2-D at 512², about 3× (equal within
    float32 rounding)."""
    return _BoxSum.apply(x, axis, width)


SHIFTED_SUM_WIDTH = 5  # measured on 90×102×84 volumes of 3 and 6 channels: slower from 7


class _BoxSum(torch.autograd.Function):
    """``box_sum`` and its gradient: the operator is symmetric (voxel ``j`` is in the box of
    ``i`` exactly when ``i`` is in the box of ``j``), so the backward pass is the same sum of
    the incoming gradient. Autograd through the slices of the forward pass would instead build
    a zero tensor of the full size for every slice and a reversed cumulative sum per step."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, axis: int, width: int):
        ctx.axis, ctx.width = axis, width
        length, radius = x.shape[axis], width // 2
        if width <= SHIFTED_SUM_WIDTH:
            out = x.clone()
            for shift in range(1, min(radius, length - 1) + 1):
                out.narrow(axis, shift, length - shift).add_(x.narrow(axis, 0, length - shift))
                out.narrow(axis, 0, length - shift).add_(x.narrow(axis, shift, length - shift))
            return out
        cumulative = torch.cumsum(x, dim=axis)
        if radius >= length - 1:  # every box holds the whole axis
            return cumulative.narrow(axis, length - 1, 1).expand_as(x).contiguous()
        out = torch.empty_like(x)
        out.narrow(axis, 0, length - radius).copy_(cumulative.narrow(axis, radius, length - radius))
        out.narrow(axis, length - radius, radius).copy_(cumulative.narrow(axis, length - 1, 1))
        inner = length - radius - 1
        out.narrow(axis, radius + 1, inner).sub_(cumulative.narrow(axis, 0, inner))
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor):
        return _BoxSum.apply(grad, ctx.axis, ctx.width), None, None


def _inverse_counts(
    shape: Sequence[int], window: Sequence[int], like: torch.Tensor
) -> torch.Tensor:
    """``(1, 1, *S)``: one over the number of voxels inside each cropped box (a product of
    intervals, so a product of one count per axis). Cached: an optimisation asks for the same
    few boxes at every step (in 2-D, where a step is a few milliseconds, 3 % of a run)."""
    return _cached_inverse_counts(tuple(shape), tuple(window), like.dtype, like.device)


@functools.lru_cache(maxsize=64)
def _cached_inverse_counts(
    shape: tuple[int, ...], window: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    like = torch.empty((), dtype=dtype, device=device)
    inverse = like.new_ones([1, 1] + [1] * len(shape))
    for axis, (length, width) in enumerate(zip(shape, window, strict=True)):
        if width > 1:
            view = [1, 1] + [1] * len(shape)
            view[2 + axis] = -1
            inverse = inverse / _border_counts(length, width, like).view(view)
    return inverse


def _box_sums(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """``box_sum`` along each spatial axis whose width is above 1."""
    for axis, width in enumerate(window):
        if width > 1:
            x = box_sum(x, 2 + axis, width)
    return x


class _BoxMean(torch.autograd.Function):
    """``box_mean`` as ``S(x) · n⁻¹`` (``S`` the separable box sum, ``n`` the voxels in each
    cropped box); its gradient is ``S(g · n⁻¹)``, ``S`` being symmetric. One multiplication
    each way instead of a division per axis forward and backward."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, window: tuple[int, ...]):
        ctx.window = window
        return _box_sums(x, window) * _inverse_counts(x.shape[2:], window, x)  # records no graph

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor):
        return box_mean_transpose(grad, ctx.window), None


def box_mean_transpose(grad: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """The transpose of ``box_mean`` applied to ``grad`` ``(B, C, *S)``: ``S(g · n⁻¹)``, for
    gradients written out by hand (``box_mean``'s own backward pass is this)."""
    window = tuple(int(w) for w in window)
    return _box_sums(grad * _inverse_counts(grad.shape[2:], window, grad), window)


def box_mean(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """Mean over the box around each voxel of ``x`` ``(B, C, *S)``, the box (odd ``window``
    voxels per spatial axis) cropped to the image at the border.

    One running sum per axis (``box_sum``: ``O(1)`` work per voxel whatever the window), then
    one multiplication by the inverse number of voxels inside, which is exact for the cropped
    box because it is a product of intervals.
    """
    return _BoxMean.apply(x, tuple(int(w) for w in window))


def _window(window: int | Sequence[int], dims: int) -> tuple[int, ...]:
    sizes = (window,) * dims if isinstance(window, int) else tuple(window)
    if len(sizes) != dims or any(w < 1 or w % 2 == 0 for w in sizes):
        raise ValueError(f"lncc window must be {dims} odd sizes, got {window!r}")
    return sizes


def local_moments(
    b: torch.Tensor, window: int | Sequence[int] = 5, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``local_correlation`` needs of its second image ``b`` ``(B, C, *S)``: ``b`` less
    its global mean, its local mean and its local variance (+ ``eps``). Computed once, they
    serve every step of an optimisation against a fixed image."""
    sizes = _window(window, b.dim() - 2)
    b = b - b.mean(dim=tuple(range(2, b.dim())), keepdim=True)
    mean_b, mean_bb = box_mean(torch.cat([b, b * b], dim=1), sizes).split(b.shape[1], dim=1)
    return b, mean_b, (mean_bb - mean_b * mean_b).clamp(min=0) + eps


def local_correlation(
    a: torch.Tensor,
    b: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    window: int | Sequence[int] = 5,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Local normalised cross-correlation of ``a`` and ``b`` ``(B, C, *S)`` per voxel, same shape.

    The correlation is taken over a box of odd ``window`` voxels (one size or one per axis)
    around each voxel, the box cropped at the border; ``eps`` is added to each local variance,
    so windows where either image is flat count as uncorrelated instead of dividing by zero.
    ``b`` may also be its ``local_moments`` (same ``window`` and ``eps``).
    """
    sizes = _window(window, a.dim() - 2)
    b, mean_b, var_b = local_moments(b, sizes, eps) if isinstance(b, torch.Tensor) else b
    # Removing each image's global mean first avoids cancellation in E[a²] − E[a]² (float32).
    a = a - a.mean(dim=tuple(range(2, a.dim())), keepdim=True)
    moments = box_mean(torch.cat([a, a * a, a * b], dim=1), sizes)
    mean_a, mean_aa, mean_ab = moments.split(a.shape[1], dim=1)
    var_a = (mean_aa - mean_a * mean_a).clamp(min=0) + eps
    covariance = mean_ab - mean_a * mean_b
    return covariance / torch.sqrt(var_a * var_b)


def lncc(
    a: torch.Tensor, b: torch.Tensor, window: int | Sequence[int] = 5, eps: float = 1e-5
) -> torch.Tensor:
    """``1 − mean local normalised cross-correlation`` of ``a`` and ``b`` ``(B, C, *S)``.

    0 for ``b = s·a + t`` (any ``s > 0``), about 1 for unrelated images, up to 2 for inverted
    contrast (``local_correlation`` gives the window and ``eps``).
    """
    return 1 - local_correlation(a, b, window, eps).mean()


def lncc_pyramid(
    a: torch.Tensor, b: torch.Tensor, window: int | Sequence[int] = 5, levels: int = 3
) -> torch.Tensor:
    """Mean of ``lncc`` at full resolution and ``levels - 1`` successive 2× average-poolings.

    Thin structures (vessels) give a single-resolution LNCC a basin of a voxel or two; the
    coarse levels widen it, so training from random weights gets a gradient from far off.
    """
    pool = _AVG_POOL[a.dim() - 2]
    total = lncc(a, b, window)
    for _ in range(levels - 1):
        a, b = pool(a, 2), pool(b, 2)
        total = total + lncc(a, b, window)
    return total / levels


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared intensity difference (for masks and same-contrast images)."""
    return (a - b).pow(2).mean()


def _voxels_per_unit(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """``(1, d, 1, …)``: multiplies network coordinates along each axis into voxels of ``shape``."""
    scale = torch.tensor(list(shape), device=like.device, dtype=like.dtype)
    return scale.view(1, len(shape), *([1] * len(shape)))


def diffusion(map_values: torch.Tensor) -> torch.Tensor:
    """Mean squared displacement gradient ``Σ_{i,j} (∂u_i/∂x_j)²`` of a map sampled on a grid.

    ``map_values`` ``(B, d, *S)`` are the map at the grid's voxel centres (``maps.evaluate``);
    ``u = map − identity`` and ``x`` are both in voxels of that grid, so the result is
    dimensionless: ``u = A·x`` gives ``‖A‖²_F`` on a cube grid. Forward differences, averaged over
    the voxel pairs of each axis and summed over axes.
    """
    shape = map_values.shape[2:]
    identity = identity_grid(shape, device=map_values.device, dtype=map_values.dtype)
    displacement = (map_values - identity) * _voxels_per_unit(shape, map_values)
    total = map_values.new_zeros(())
    for axis in range(len(shape)):
        total = total + torch.diff(displacement, dim=2 + axis).pow(2).sum(dim=1).mean()
    return total


def gradient_inverse_consistency(
    phi_ab: Map,
    phi_ba: Map,
    shape: Sequence[int],
    like: torch.Tensor,
    *,
    delta: float = 0.1,
    perturb: bool = True,
) -> torch.Tensor:
    """GradICON (Tian et al., 2023): mean of ``‖∇(φ_AB ∘ φ_BA) − I‖²_F`` over ``A``'s grid.

    ``φ_BA`` maps ``A``'s coordinates to ``B``'s and ``φ_AB`` back, so for exact inverses the
    round trip is the identity and its Jacobian ``I``; penalising only the Jacobian (not the
    round trip itself) leaves room for the registration to be off by a translation. ``shape`` is
    ``A``'s grid, ``like`` gives batch size, device and dtype. The Jacobian is taken by forward
    differences of ``delta`` voxels, in voxel units (module docstring). With ``perturb`` each
    point moves uniformly within its voxel (a fresh draw per call), so the points cover the
    domain and the loss does not see only the voxel centres, where linear interpolation kinks.
    """
    dims = len(shape)
    per_voxel = _voxels_per_unit(shape, like)
    points = identity_grid(shape, like.shape[0], device=like.device, dtype=like.dtype)
    if perturb:
        points = points + (torch.rand_like(points) - 0.5) / per_voxel
    eye = torch.eye(dims, device=like.device, dtype=like.dtype)
    offsets = [eye[axis].view(1, dims, *([1] * dims)) * delta / shape[axis] for axis in range(dims)]
    # Maps act pointwise, so the base points and the d offset copies go through in one call.
    all_points = torch.cat([points] + [points + offset for offset in offsets], dim=-1)
    base, *moved = phi_ab(phi_ba(all_points)).chunk(dims + 1, dim=-1)
    total = like.new_zeros(())
    for axis, column_points in enumerate(moved):
        column = (column_points - base) * per_voxel / delta
        identity_column = eye[axis].view(1, dims, *([1] * dims))
        total = total + (column - identity_column).pow(2).sum(dim=1).mean()
    return total


def map_error(map_values: torch.Tensor, true_map: torch.Tensor) -> torch.Tensor:
    """Mean distance in voxels between a map and the true one, over the fixed voxels whose true
    image lies inside the moving image (elsewhere the moving image holds no evidence)."""
    shape = map_values.shape[2:]
    inside = ((true_map >= 0) & (true_map <= 1)).all(dim=1).to(map_values.dtype)
    distance = ((map_values - true_map) * _voxels_per_unit(shape, map_values)).norm(dim=1)
    return (distance * inside).sum() / inside.sum().clamp(min=1)


def registration_loss(
    step: RegistrationStep,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    *,
    similarity: Literal["lncc", "lncc_pyramid", "mse", "mind", "nmi"] = "lncc",
    regulariser: Literal["diffusion", "gradicon"] = "diffusion",
    weight: float = 1.0,
    window: int | Sequence[int] = 5,
    true_map: torch.Tensor | None = None,
    map_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``similarity + weight · regulariser [+ map_weight · map_error]`` for one step on one
    batch; used by training and instance optimisation.

    With ``diffusion`` the step runs once (moving → fixed). With ``gradicon`` it also runs with
    the images swapped, as the regulariser needs both directions; the similarity is then the
    mean over the two directions. ``true_map`` (synthetic pairs only) adds the supervised
    ``map_error`` term of the moving → fixed direction. Returns the differentiable total and its
    parts as floats (``similarity``, ``regulariser``, ``map_error`` when used, ``total``).
    """
    from .similarity import SIMILARITIES  # the shared registry (it imports this module)

    measures = {
        "lncc": lambda a, b: lncc(a, b, window),
        "mse": mse,
        "lncc_pyramid": lambda a, b: lncc_pyramid(a, b, window),
        "mind": SIMILARITIES["mind"].loss,
        "nmi": SIMILARITIES["nmi"].loss,
    }
    if similarity not in measures:
        raise ValueError(f"unknown similarity {similarity!r}; expected one of {sorted(measures)}")
    if regulariser not in ("diffusion", "gradicon"):
        raise ValueError(f"unknown regulariser {regulariser!r}; expected 'diffusion' or 'gradicon'")

    similarity_of = measures[similarity]

    batch = fixed.shape[0]
    phi_ab = step(moving, fixed)  # A = moving, B = fixed: φ_AB maps B's coordinates to A's
    values_ab = evaluate(phi_ab, fixed.shape[2:], batch, fixed)
    similarity_loss = similarity_of(sample(moving, values_ab), fixed)
    if regulariser == "diffusion":
        regulariser_loss = diffusion(values_ab)
    else:
        phi_ba = step(fixed, moving)
        values_ba = evaluate(phi_ba, moving.shape[2:], batch, moving)
        similarity_loss = 0.5 * (similarity_loss + similarity_of(sample(fixed, values_ba), moving))
        regulariser_loss = gradient_inverse_consistency(phi_ab, phi_ba, moving.shape[2:], moving)
    total = similarity_loss + weight * regulariser_loss
    parts = {
        "similarity": float(similarity_loss.detach()),
        "regulariser": float(regulariser_loss.detach()),
    }
    if true_map is not None:
        supervised = map_error(values_ab, true_map)
        total = total + map_weight * supervised
        parts["map_error"] = float(supervised.detach())
    parts["total"] = float(total.detach())
    return total, parts
