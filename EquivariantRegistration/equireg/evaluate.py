"""Metrics for reports, tests and benchmarks: folding, equivariance, similarity, TRE."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .compose import RegistrationStep
from .losses import lncc, mse
from .maps import identity_grid

# Voxels per slab when differentiating a large field, so a full-resolution CT grid does not
# need the whole (*shape, d, d) Jacobian in memory at once.
_SLAB_VOXELS = 1 << 20


def jacobian_determinant(
    displacement_mm: np.ndarray,
    spacing: Sequence[float],
    direction: Sequence[float] | None = None,
) -> np.ndarray:
    """``det(I + ∂u/∂x)`` of a physical displacement field ``u``, per voxel: ``(*shape)``.

    ``displacement_mm`` is ``(*shape, d)`` in tensor-axis order (z, y, x arrays, as NumPy sees
    an ITK image) with vectors in ITK (x, y, z) order, LPS mm; ``spacing`` and ``direction``
    (row-major, identity when omitted) are ITK's. The direction matters because the vectors are
    in LPS: for an oblique grid, ``∂u/∂index`` must be rotated with the grid, not read as if the
    grid axes were L, P, S. Central differences, one-sided at the border.

    With ``D`` the grid's index → LPS matrix (direction · spacing) and ``G = ∂u/∂index``,
    ``I + G D⁻¹ = (D + G) D⁻¹``: the determinant is ``det(D + G) / det(D)``, so no per-voxel
    matrix product is formed (float64, on torch's threads).
    """
    displacement = torch.from_numpy(np.asarray(displacement_mm, dtype=np.float64))
    dims = displacement.shape[-1]
    if displacement.dim() != dims + 1 or len(spacing) != dims:
        raise ValueError(
            f"displacement of shape {tuple(displacement.shape)} and spacing {tuple(spacing)} do "
            f"not describe a {dims}-D field of {dims}-vectors"
        )
    rotation = np.eye(dims) if direction is None else np.asarray(direction).reshape(dims, dims)
    index_to_physical = rotation @ np.diag(np.asarray(spacing, dtype=np.float64))
    scale = 1.0 / np.linalg.det(index_to_physical)
    # Slabs along the first axis with a one-voxel halo give the same central differences.
    slices = displacement.shape[0]
    per_slab = max(1, _SLAB_VOXELS // max(1, int(np.prod(displacement.shape[1:-1]))))
    determinant = torch.empty(displacement.shape[:-1], dtype=torch.float64)
    for start in range(0, slices, per_slab):
        stop = min(start + per_slab, slices)
        low, high = max(start - 1, 0), min(stop + 1, slices)
        slab = displacement[low:high]
        columns = []  # ∂u/∂index_j, j in ITK order, each (*slab, d)
        for itk_axis in range(dims):
            tensor_axis = dims - 1 - itk_axis
            if slab.shape[tensor_axis] > 1:
                columns.append(torch.gradient(slab, dim=tensor_axis)[0])
            else:  # a single slice: nothing varies along this axis
                columns.append(torch.zeros_like(slab))
        core = slice(start - low, start - low + stop - start)
        rows = [
            [columns[j][core][..., i] + index_to_physical[i, j] for j in range(dims)]
            for i in range(dims)
        ]
        determinant[start:stop] = _determinant(rows) * scale
    return determinant.numpy()


def _determinant(m: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """``det`` of matrices given entry by entry (``m[i][j]``, each an array of any shape),
    written out for ``d ≤ 3`` (a batched LU is several times slower on a volume's 3 × 3
    Jacobians)."""
    if len(m) == 2:
        return m[0][0] * m[1][1] - m[0][1] * m[1][0]
    if len(m) == 3:
        a, b, c = m[0]
        d, e, f = m[1]
        g, h, i = m[2]
        return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    return torch.linalg.det(torch.stack([torch.stack(list(row), -1) for row in m], -2))


def folding_fraction(
    displacement_mm: np.ndarray,
    spacing: Sequence[float],
    direction: Sequence[float] | None = None,
) -> float:
    """Fraction of voxels whose Jacobian determinant is ``≤ 0`` (the map folds or collapses)."""
    return float(np.mean(jacobian_determinant(displacement_mm, spacing, direction) <= 0))


def map_jacobian_determinant(phi_values: torch.Tensor) -> torch.Tensor:
    """``det ∇φ`` of a map sampled on a grid, ``(B, d, *S)`` -> ``(B, *S)``.

    In network coordinates; the determinant does not change when both sides are counted in
    voxels instead (``D J D⁻¹``), so it is also the voxel-unit one. Central differences.
    """
    shape = phi_values.shape[2:]
    dims = len(shape)
    columns = torch.gradient(
        phi_values, spacing=[1.0 / n for n in shape], dim=list(range(2, 2 + dims))
    )
    jacobian = torch.stack(columns, dim=2)  # (B, d_out, d_in, *S)
    return torch.linalg.det(jacobian.movedim((1, 2), (-2, -1)))


def map_folding_fraction(phi_values: torch.Tensor) -> float:
    """Fraction of grid voxels where the sampled map ``(B, d, *S)`` has ``det ∇φ ≤ 0``."""
    return float((map_jacobian_determinant(phi_values) <= 0).double().mean())


# Normalised intensity above which a voxel of a model-grid image counts as content, not
# background, for the equivariance error (docs/equivariance.md, "Measuring it on real images").
FOREGROUND = 0.1


def shifted(image: torch.Tensor, shift: Sequence[int], fill: str) -> torch.Tensor:
    """``image ∘ T`` for ``T(x) = x + shift`` (whole voxels): content moved by ``−shift``.

    ``fill="zero"``: what leaves the grid is lost and zeros enter, as when content moves inside
    a fixed field of view over a zero background; ``fill="roll"``: it wraps around.
    """
    axes = tuple(range(2, image.dim()))
    if fill == "roll":
        return torch.roll(image, [-s for s in shift], dims=axes)
    if fill != "zero":
        raise ValueError(f"fill must be 'roll' or 'zero', got {fill!r}")
    out = torch.zeros_like(image)
    source, target = [slice(None)] * 2, [slice(None)] * 2
    for s, n in zip(shift, image.shape[2:], strict=True):
        source.append(slice(min(max(s, 0), n), max(min(n + s, n), 0)))
        target.append(slice(min(max(-s, 0), n), max(min(n - s, n), 0)))
    out[tuple(target)] = image[tuple(source)]
    return out


def equivariance_error(
    step: RegistrationStep,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    shift_moving: tuple[int, ...],
    shift_fixed: tuple[int, ...],
    margin: int,
    fill: str = "roll",
    mask: torch.Tensor | None = None,
) -> float:
    """How far ``Φ[A∘W, B∘U]`` is from ``W⁻¹ ∘ Φ[A, B] ∘ U``: mean Euclidean error in voxels.

    ``A`` = ``moving``, ``B`` = ``fixed`` ``(B, C, *S)``; ``W(x) = x + w`` and ``U(x) = x + u``
    shift by whole voxels (``w = shift_moving / n`` per axis), so ``A∘W`` is ``A`` with its
    content moved by ``−shift_moving``, rolled or zero-filled (``fill``, see :func:`shifted`).
    The difference is counted in moving-image voxels, averaged over the fixed voxels that are
    at least ``margin`` from every border, whose expected value ``W⁻¹∘Φ[A, B]∘U`` lies in the
    moving grid (the shifted image still holds that content where it should be) and, if given,
    inside ``mask`` (``(B, 1, *S)`` or ``(*S)`` on the fixed grid, e.g. the fixed image's
    foreground: in a constant background every map is as good as any other, docs/equivariance.md).
    ``nan`` when no voxel is left. Runs without gradients; put ``step`` in eval mode first if it
    has dropout or batch-norm.
    """
    shape = fixed.shape[2:]
    dims = len(shape)
    if len(shift_moving) != dims or len(shift_fixed) != dims:
        raise ValueError(f"shifts must have {dims} entries, got {shift_moving} and {shift_fixed}")
    if margin < 0 or 2 * margin >= min(shape):
        raise ValueError(f"margin {margin} leaves no voxels of a {tuple(shape)} grid")
    if mask is not None and tuple(mask.shape[-dims:]) != tuple(shape):
        raise ValueError(f"mask of shape {tuple(mask.shape)} is not on the {tuple(shape)} grid")

    def as_coordinates(shift: Sequence[int], grid_shape: Sequence[int]) -> torch.Tensor:
        values = [s / n for s, n in zip(shift, grid_shape, strict=True)]
        offset = torch.tensor(values, device=fixed.device, dtype=fixed.dtype)
        return offset.view(1, dims, *([1] * dims))

    w = as_coordinates(shift_moving, moving.shape[2:])
    u = as_coordinates(shift_fixed, shape)
    grid = identity_grid(shape, fixed.shape[0], device=fixed.device, dtype=fixed.dtype)
    with torch.no_grad():
        shifted_moving = shifted(moving, shift_moving, fill)
        shifted_fixed = shifted(fixed, shift_fixed, fill)
        of_shifted = step(shifted_moving, shifted_fixed)(grid)
        expected = step(moving, fixed)(grid + u) - w
    moving_voxels = torch.tensor(list(moving.shape[2:]), device=fixed.device, dtype=fixed.dtype)
    error = ((of_shifted - expected) * moving_voxels.view(1, dims, *([1] * dims))).norm(dim=1)
    counted = ((expected >= 0) & (expected <= 1)).all(dim=1)
    border = torch.zeros_like(counted)
    border[(slice(None), *(slice(margin, n - margin) for n in shape))] = True
    counted &= border
    if mask is not None:
        counted &= mask.to(device=counted.device, dtype=torch.bool).reshape(-1, *shape)
    return float(error[counted].mean()) if counted.any() else float("nan")


def _as_batch(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A tensor ``(B, C, *S)`` as it is; a NumPy image ``(*S)`` (``GetArrayFromImage``) as one."""
    if isinstance(image, torch.Tensor):
        return image
    return torch.as_tensor(np.asarray(image, dtype=np.float64))[None, None]


def similarity_report(
    fixed: torch.Tensor | np.ndarray,
    moving: torch.Tensor | np.ndarray,
    warped: torch.Tensor | np.ndarray,
    window: int = 5,
) -> dict[str, float]:
    """LNCC and MSE to ``fixed`` of ``moving`` (before) and ``warped`` (after), for report.json.

    All three must be on the fixed grid (``moving`` resampled there without registration).
    ``lncc_*`` is the local correlation itself (1 = perfect), i.e. ``1 − losses.lncc``; MSE is
    in the images' own intensity units. Tensors are ``(B, C, *S)``, arrays a single ``(*S)``.
    """
    fixed_t, moving_t, warped_t = (_as_batch(image) for image in (fixed, moving, warped))
    with torch.no_grad():
        return {
            "lncc_before": float(1 - lncc(moving_t, fixed_t, window)),
            "lncc_after": float(1 - lncc(warped_t, fixed_t, window)),
            "mse_before": float(mse(moving_t, fixed_t)),
            "mse_after": float(mse(warped_t, fixed_t)),
        }


def target_registration_error(
    fixed_points_mm: np.ndarray,
    moving_points_mm: np.ndarray,
    transform: sitk.Transform,
) -> tuple[np.ndarray, dict[str, float]]:
    """Distance (mm) from ``T(fixed_i)`` to ``moving_i`` per landmark pair, and a summary.

    ``transform`` maps fixed physical points to moving ones (our convention, README); points
    are ``(N, d)`` LPS mm in ITK order. The summary has ``mean``, ``median``, ``p90``, ``max``.
    """
    fixed_points = np.asarray(fixed_points_mm, dtype=np.float64)
    moving_points = np.asarray(moving_points_mm, dtype=np.float64)
    if fixed_points.ndim != 2 or fixed_points.shape != moving_points.shape or not len(fixed_points):
        raise ValueError(
            f"landmarks must be two non-empty (N, d) arrays of the same shape, got "
            f"{fixed_points.shape} and {moving_points.shape}"
        )
    mapped = np.array([transform.TransformPoint([float(v) for v in p]) for p in fixed_points])
    distances = np.linalg.norm(mapped - moving_points, axis=1)
    summary = {
        "mean": float(np.mean(distances)),
        "median": float(np.median(distances)),
        "p90": float(np.percentile(distances, 90)),
        "max": float(np.max(distances)),
    }
    return distances, summary


def dice(fixed_labels: sitk.Image, warped_labels: sitk.Image) -> dict[str, float]:
    """Dice overlap per label present in either image (label 0 is background), and ``mean``.

    Both label maps must be on the fixed grid (warp the moving labels with nearest neighbour).
    """
    a = sitk.GetArrayViewFromImage(fixed_labels)
    b = sitk.GetArrayViewFromImage(warped_labels)
    if a.shape != b.shape:
        raise ValueError(f"label maps of shapes {a.shape} and {b.shape} are not on one grid")
    scores = {}
    for label in sorted((set(np.unique(a)) | set(np.unique(b))) - {0}):
        in_a, in_b = a == label, b == label
        scores[str(int(label))] = float(2 * np.sum(in_a & in_b) / (np.sum(in_a) + np.sum(in_b)))
    scores["mean"] = float(np.mean(list(scores.values()))) if scores else float("nan")
    return scores


def transform_field(transform: sitk.Transform, reference: sitk.Image) -> np.ndarray:
    """``T(x) − x`` (LPS mm) at every voxel ``x`` of ``reference``: ``(*S, d)``, vectors in ITK
    order; how any tool's transform is compared with a truth or checked for folding."""
    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
    to_field.SetReferenceImage(reference)
    return sitk.GetArrayFromImage(to_field.Execute(transform))


def dense_field_error(
    transform: sitk.Transform,
    truth: sitk.Transform,
    reference: sitk.Image,
    mask: sitk.Image | None = None,
) -> dict[str, float]:
    """Distance (mm) between ``T(x)`` and ``truth(x)`` over the voxels ``x`` of ``reference``
    (the fixed grid), inside ``mask`` when given: ``mean``, ``p90``, ``max``."""
    difference = transform_field(transform, reference) - transform_field(truth, reference)
    distances = np.linalg.norm(difference, axis=-1)
    if mask is not None:
        distances = distances[sitk.GetArrayViewFromImage(mask) > 0]
    return {
        "mean": float(np.mean(distances)),
        "p90": float(np.percentile(distances, 90)),
        "max": float(np.max(distances)),
    }


def overlap_mask(truth: sitk.Transform, fixed: sitk.Image, moving: sitk.Image) -> sitk.Image:
    """Fixed voxels whose true position ``truth(x)`` lies inside the moving image: where the
    moving image holds evidence, so where a dense-field error can be asked of any method."""
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    return sitk.Resample(ones, fixed, truth, sitk.sitkNearestNeighbor, 0)
