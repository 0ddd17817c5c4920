"""Glue for the two PyTorch peers of ``registration.py``: ConvexAdam and FireANTs, on the CPU.

Each function takes the fixed and moving images (SimpleITK, as the peers should read them) and
returns a SimpleITK transform that maps fixed physical points to moving physical points (LPS
mm), the convention of every transform ``equireg.cases.score`` scores. Neither tool writes ITK
transforms in that convention by itself: ConvexAdam returns a displacement in voxels of its input
arrays, FireANTs sampling coordinates in its normalised [-1, 1] space; both are converted here.

- ConvexAdam: H. Siebert, C. Großbröhmer, L. Hansen, M. P. Heinrich, "ConvexAdam:
  Self-Configuring Dual-Optimisation-Based 3D Multitask Medical Image Registration", IEEE
  Transactions on Medical Imaging, 2024 (PyPI ``convexadam``; MIND-SSC features, a coupled
  convex discrete search, then Adam instance optimisation).
- FireANTs: R. Jena, P. Chaudhari, J. C. Gee, "FireANTs: Adaptive Riemannian Optimization for
  Multi-Scale Diffeomorphic Registration", Nature Communications, 2024 (PyPI ``fireants``,
  FireANTs License 1.0; Riemannian Adam on a multi-scale SyN).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import SimpleITK as sitk
import torch

from equireg.space import Grid

# ConvexAdam works in voxels of one isotropic grid over the fixed image (its regulariser and
# search window count voxels); the grid's spacing is the fixed image's finest, made coarser only
# to keep a 3-D grid within this many voxels (the lung CT's 3 × 3 × 10 mm becomes 3 mm).
CONVEXADAM_VOXELS = 2_000_000
# ConvexAdam is 3-D only: a 2-D pair is registered as a slab of this many copies of the slice
# (three of its 6-voxel coarse cells: the fewest that its 3-cell smoothing takes), and the middle
# slice's in-plane displacement kept.
CONVEXADAM_SLAB = 18
# FireANTs: moments (centres of mass) -> affine -> SyN, with the settings of its own example
# pipelines (scales 4, 2, 1; 200, 100, 50 iterations; local correlation, 5-voxel window).
FIREANTS_SCALES = [4, 2, 1]
FIREANTS_ITERATIONS = [200, 100, 50]
# FireANTs is built for the GPU: on the CPU its separable local-correlation filter and gradient
# smoothing run as PyTorch conv3d, about 1 s per full-resolution iteration of a 64³ volume on
# this 2-core machine, so a 1M-voxel brain would take ~10 min. A 3-D pair is therefore
# registered on isotropic grids of at most this many voxels (a 2-D pair on its own grid).
FIREANTS_VOXELS = 2**18


def _isotropic_grid(fixed: sitk.Image, budget: int) -> Grid:
    """The fixed image's extent and direction with (nearly) isotropic voxels: its finest spacing,
    or coarser so that a 3-D grid stays within ``budget`` voxels."""
    grid = Grid.of(fixed)
    extent = np.array(grid.size) * np.array(grid.spacing)
    spacing = min(grid.spacing)
    if grid.dim == 3:
        spacing = max(spacing, float(np.prod(extent) / budget) ** (1 / 3))
    return grid.resized([max(1, round(e / spacing)) for e in extent[::-1]])


def _on_grid(image: sitk.Image, grid: Grid) -> sitk.Image:
    """``image`` resampled (linear, float32) onto ``grid``, its minimum outside its extent."""
    low = float(sitk.GetArrayViewFromImage(image).min())
    reference = grid.reference_image()
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, low, sitk.sitkFloat32)


def _field_transform(displacement: np.ndarray, grid: Grid) -> sitk.Transform:
    """A displacement field transform from physical vectors ``(*grid.shape, d)`` (LPS mm, x, y[,
    z]) on ``grid``."""
    image = sitk.GetImageFromArray(displacement.astype(np.float64), isVector=True)
    return sitk.DisplacementFieldTransform(grid.stamp(image))


def convexadam(fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    """ConvexAdam (``convex_adam_pt`` with its defaults: MIND radius 1, dilation 2, coarse grid
    6 voxels, search ±4 coarse steps, 80 Adam iterations at half resolution, inverse-consistent)
    on an isotropic grid over the fixed image, float32 on the CPU.

    Its displacement ``d`` (voxels, in the order of its input array's axes) samples the moving
    image at ``index + d`` for each fixed voxel ``index`` (as its own ``apply_convex`` does):
    fixed -> moving, which becomes physical millimetres through the grid's spacing and
    direction."""
    from convexAdam.convex_adam_MIND import convex_adam_pt

    dim = fixed.GetDimension()
    grid = _isotropic_grid(fixed, CONVEXADAM_VOXELS)
    arrays = []
    for image in (fixed, moving):
        array = sitk.GetArrayFromImage(_on_grid(image, grid))
        arrays.append(np.repeat(array[None], CONVEXADAM_SLAB, 0) if dim == 2 else array)
    voxels = convex_adam_pt(arrays[0], arrays[1], dtype=torch.float32, device=torch.device("cpu"))
    # (z, y, x, 3): components along the array's axes z, y, x
    if dim == 2:
        voxels = voxels[CONVEXADAM_SLAB // 2, ..., 1:]  # in-plane (y, x) of the middle slice
    index = voxels[..., ::-1]  # along the grid's index axes x, y[, z]
    physical = grid.index_to_physical(index) - grid.index_to_physical(np.zeros(dim))
    return _field_transform(physical, grid)


def _fireants_modules():
    """FireANTs' classes, imported with its import-time prints (fused-kernel availability)
    kept off our stdout, which carries the benchmark's tables."""
    with contextlib.redirect_stdout(io.StringIO()):
        from fireants.io.image import BatchedImages, Image
        from fireants.registration.affine import AffineRegistration
        from fireants.registration.moments import MomentsRegistration
        from fireants.registration.syn import SyNRegistration
    return BatchedImages, Image, MomentsRegistration, AffineRegistration, SyNRegistration


def fireants(fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    """FireANTs on the CPU: centres of mass (moments), affine, then SyN, each with local
    normalised correlation, on grids of at most ``FIREANTS_VOXELS`` in 3-D, intensities
    rescaled to [0, 1].

    Without its optional CUDA kernels (``fireants_fused_ops``, not on PyPI) FireANTs falls back
    to PyTorch's ``grid_sample`` and FFT/convolution paths, which run on the CPU when the images'
    tensors live there (``device="cpu"``). ``get_warped_coordinates`` gives, for each fixed
    voxel, where to sample the moving image in the moving image's normalised coordinates;
    the moving image's ``torch2phy`` matrix turns them into moving physical points."""
    batched, image_class, moments_class, affine_class, syn_class = _fireants_modules()
    grid = _isotropic_grid(fixed, FIREANTS_VOXELS)
    # Intensities min-max rescaled to [0, 1] per image, as FireANTs' own template pipeline
    # normalises them: its centre-of-mass start weights each voxel by its intensity, which CT in
    # (negative) HU would turn into nonsense.
    moving = _on_grid(moving, _isotropic_grid(moving, FIREANTS_VOXELS))
    fixed, moving = (
        sitk.RescaleIntensity(image, 0.0, 1.0) for image in (_on_grid(fixed, grid), moving)
    )
    with contextlib.redirect_stdout(io.StringIO()):
        fixed_images = batched([image_class(fixed, device="cpu")])
        moving_images = batched([image_class(moving, device="cpu")])
        quiet = {"progress_bar": False}
        moments = moments_class(1, fixed_images, moving_images, moments=1, **quiet)
        moments.optimize()
        affine = affine_class(
            FIREANTS_SCALES,
            FIREANTS_ITERATIONS,
            fixed_images,
            moving_images,
            init_rigid=moments.get_affine_init(),
            **quiet,
        )
        affine.optimize()
        syn = syn_class(
            FIREANTS_SCALES,
            FIREANTS_ITERATIONS,
            fixed_images,
            moving_images,
            cc_kernel_size=5,
            optimizer_lr=0.25,
            init_affine=affine.get_affine_matrix().detach(),
            **quiet,
        )
        syn.optimize()
        with torch.no_grad():
            coordinates = syn.get_warped_coordinates(fixed_images, moving_images)[0]
    dim = fixed.GetDimension()
    torch2phy = moving_images.get_torch2phy()[0].double()  # (dim + 1, dim + 1)
    points = coordinates.double() @ torch2phy[:dim, :dim].T + torch2phy[:dim, dim]
    return _field_transform(points.numpy() - grid.physical_points(), grid)
