"""``equireg demo``: register the bundled sample pair and draw an overview PNG.

The sample pair is generated deterministically (a procedural fundus photograph and a copy
deformed by a known smooth map plus a shift), so the demo can also report the error of the
recovered transform against the truth.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from .api import Progress, register
from .data.synthetic import deform, fundus_photograph, random_diffeomorphism, translation
from .io import write_image
from .maps import compose, evaluate, sampled_map
from .outputs import check_output_dir
from .space import Grid

SAMPLE_SHAPE = (256, 256)
SAMPLE_SPACING = (0.05, 0.05)  # mm: a 12.8 mm field of view, about a fundus photograph's


def sample_pair(seed: int = 7) -> tuple[sitk.Image, sitk.Image, torch.Tensor]:
    """Fixed and moving images (2-D, LPS geometry) and the true map (network coordinates).

    The fixed image is the moving image seen through the true map ``ψ`` (smooth warp after a
    shift of 12 % of the field of view), so ``moving ∘ ψ = fixed``: ``ψ`` is what a perfect
    registration returns.
    """
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    moving_values = torch.from_numpy(fundus_photograph(SAMPLE_SHAPE, rng))[None, None]
    warp_values = random_diffeomorphism(SAMPLE_SHAPE, 0.04, 4.0, generator)
    truth_map = compose(
        sampled_map(translation(SAMPLE_SHAPE, (0.12, -0.08))), sampled_map(warp_values)
    )
    truth = evaluate(truth_map, SAMPLE_SHAPE, 1, moving_values)
    fixed_values = deform(moving_values, truth)
    images = []
    for values in (fixed_values, moving_values):
        image = sitk.GetImageFromArray((values[0, 0].numpy() * 255).astype(np.float32))
        image.SetSpacing(SAMPLE_SPACING)
        image.SetOrigin((-6.4, -6.4))
        images.append(image)
    return images[0], images[1], truth


def truth_error_mm(
    transform: sitk.Transform, fixed: sitk.Image, truth: torch.Tensor
) -> tuple[float, float]:
    """Mean distance (mm) between ``transform`` and the true map, and of the identity."""
    grid = Grid.of(fixed)
    points = grid.physical_points().reshape(-1, 2)
    true_points = grid.network_to_physical(
        truth[0].permute(1, 2, 0).reshape(-1, 2).double().numpy()
    )
    mapped = np.array([transform.TransformPoint(p.tolist()) for p in points[::7]])
    error = np.linalg.norm(mapped - true_points[::7], axis=1).mean()
    identity_error = np.linalg.norm(points - true_points, axis=1).mean()
    return float(error), float(identity_error)


def draw_overview(fixed: sitk.Image, moving: sitk.Image, result_dir: Path, path: Path) -> None:
    """Fixed, moving, warped, a checkerboard of fixed/warped and the deformed grid, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    warped = sitk.ReadImage(str(result_dir / "warped.nrrd"))
    field = sitk.ReadImage(str(result_dir / "displacement.nrrd"))
    fixed_a, moving_a, warped_a = (sitk.GetArrayFromImage(i) for i in (fixed, moving, warped))
    tiles = (np.indices(fixed_a.shape) // 32).sum(0) % 2 == 0
    checker = np.where(tiles, fixed_a, warped_a)
    grid = Grid.of(field)
    points = grid.physical_points()
    moved = points + sitk.GetArrayFromImage(field)
    extent = _extent(Grid.of(fixed))

    figure, axes = plt.subplots(1, 5, figsize=(20, 4.4))
    for axis, image, title in zip(
        axes,
        (fixed_a, moving_a, warped_a, checker),
        ("fixed", "moving", "warped moving", "checkerboard fixed | warped"),
        strict=False,
    ):
        axis.imshow(image, cmap="gray", extent=extent, origin="upper")
        axis.set_title(title)
    axis = axes[4]
    axis.imshow(fixed_a, cmap="gray", extent=extent, origin="upper", alpha=0.4)
    step = max(1, grid.shape[0] // 32)
    for row in moved[::step]:
        axis.plot(row[:, 0], row[:, 1], color="tab:red", linewidth=0.6)
    for column in moved[:, ::step].transpose(1, 0, 2):
        axis.plot(column[:, 0], column[:, 1], color="tab:red", linewidth=0.6)
    axis.set_title("deformed grid (fixed → moving)")
    for axis in axes:
        axis.set_xlabel("x (mm, LPS)")
        axis.set_aspect("equal")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _extent(grid: Grid) -> tuple[float, float, float, float]:
    first = grid.index_to_physical(np.array([-0.5, -0.5]))
    last = grid.index_to_physical(np.array(grid.size) - 0.5)
    return (first[0], last[0], last[1], first[1])


def run_demo(
    output_dir: str,
    device: str = "auto",
    refine_steps: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Generate the sample pair, register it, write outputs, ``overview.png`` and
    ``summary.json``; returns the summary (with the warnings and the paths written)."""
    output = check_output_dir(output_dir)
    fixed, moving, truth = sample_pair()
    write_image(fixed, output / "fixed.nrrd")
    write_image(moving, output / "moving.nrrd")
    result = register(
        output / "fixed.nrrd",
        output / "moving.nrrd",
        device=device,
        refine_steps=refine_steps,
        progress=progress,
    )
    result_dir = output / result.report["model"]["name"]  # the model auto picked
    result.save(result_dir)
    error, identity_error = truth_error_mm(result.transform, fixed, truth)
    draw_overview(fixed, moving, result_dir, output / "overview.png")
    summary = {
        "model": result.report["model"],
        "mean_error_vs_truth_mm": round(error, 4),
        "mean_error_identity_mm": round(identity_error, 4),
        "similarity_before": result.report["similarity_before"],
        "similarity_after": result.report["similarity_after"],
        "folding_fraction": result.report["folding_fraction"],
        "timings_s": result.report["timings_s"],
        "warnings": result.report["warnings"],
        "paths": {
            "fixed": str(output / "fixed.nrrd"),
            "moving": str(output / "moving.nrrd"),
            "outputs": str(result_dir),
            "overview": str(output / "overview.png"),
        },
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
