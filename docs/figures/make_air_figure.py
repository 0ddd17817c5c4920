"""Draws docs/figures/air_sample.png and prints the numbers of docs/baselines.md for a trained AiR.

Held-out retina pairs (from a fundus photograph and a vessel segmentation of a pool seed the
training never uses) are registered by the model whose card is given; the figure shows fixed,
moving, warped, the displacement magnitude and a zoom on it with the patch grid. Printed:
similarity before/after, the error against the true map, folding, the change of the
displacement between neighbouring voxels across patch borders and inside patches (against the
same for the smooth true maps), and the equivariance errors.
Run from the repository root after training (docs/baselines.md):
``.venv/bin/python docs/figures/make_air_figure.py /tmp/air/air_retina2d.json``.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from equireg.data.pairs import random_pairs, retina_pool  # noqa: E402
from equireg.evaluate import (  # noqa: E402
    equivariance_error,
    map_folding_fraction,
    similarity_report,
)
from equireg.losses import map_error  # noqa: E402
from equireg.maps import evaluate, identity_grid, sample  # noqa: E402
from equireg.models import load_network, read_card  # noqa: E402

HERE = Path(__file__).resolve().parent
PAIRS = 8
POOL_SEED_OFFSET = 5003  # base images outside the training pool (and the validation pool)
PAIR_SEED = 20_241
ZOOM = 40  # voxels: side of the zoomed displacement crop


def patch_seams(displacement: torch.Tensor, patch: int) -> tuple[float, float]:
    """Mean |Δu| (voxels) between neighbouring voxels across patch borders, and inside patches."""
    across, inside = [], []
    for axis in range(2, displacement.dim()):
        step = displacement.diff(dim=axis).norm(dim=1)  # difference between i and i + 1
        border = (torch.arange(step.shape[axis - 1]) + 1) % patch == 0
        across.append(step.movedim(axis - 1, 0)[border].mean())
        inside.append(step.movedim(axis - 1, 0)[~border].mean())
    return float(torch.stack(across).mean()), float(torch.stack(inside).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("card", help="model card of a trained AiR (beside its weights)")
    parser.add_argument("--output", type=Path, default=HERE / "air_sample.png")
    args = parser.parse_args()

    card = read_card(args.card)
    network = load_network(card)
    data = card.data["training"]["data"]
    shape = card.input_shape
    # Half the pairs from a fundus photograph, half from a vessel segmentation (the pool
    # alternates the two kinds), so that the figure shows one of each.
    pool = retina_pool(2, shape, data["seed"] + POOL_SEED_OFFSET)
    generator = torch.Generator().manual_seed(PAIR_SEED)
    halves = [random_pairs(pool[k : k + 1], PAIRS // 2, data, generator) for k in (0, 1)]
    moving, fixed, truth = (torch.cat([half[part] for half in halves]) for part in (0, 1, 2))
    with torch.no_grad():
        values = evaluate(network(moving, fixed), shape, PAIRS, fixed)
    warped = sample(moving, values)
    voxels = torch.tensor(shape, dtype=values.dtype).view(1, -1, 1, 1)
    displacement = (values - identity_grid(shape)) * voxels
    magnitude = displacement.norm(dim=1)

    report = similarity_report(fixed, moving, warped, window=9)
    patch = card.architecture["air"]["patch_size"]
    across, inside = patch_seams(displacement, patch)
    true_across, true_inside = patch_seams((truth - identity_grid(shape)) * voxels, patch)
    identity_error = float(map_error(identity_grid(shape, PAIRS), truth))
    print(f"map error {float(map_error(values, truth)):.2f} voxels (identity {identity_error:.2f})")
    print(f"LNCC (window 9) before {report['lncc_before']:.3f} after {report['lncc_after']:.3f}")
    print(f"MSE before {report['mse_before']:.4f} after {report['mse_after']:.4f}")
    print(
        f"mean |u| {float(magnitude.mean()):.2f} voxels; folding {map_folding_fraction(values):.4f}"
    )
    print(f"mean |Δu| across patch borders {across:.3f}, inside patches {inside:.3f} voxels")
    print(f"  the true maps: {true_across:.3f} and {true_inside:.3f} voxels")
    quarter = shape[0] // 4
    shift_fixed = (16, -16)  # voxels, a multiple of the patch size
    for name, shift_moving in (("[W,U]", (0, 16)), ("[U,U]", shift_fixed)):
        error = equivariance_error(
            network, moving[:1], fixed[:1], shift_moving, shift_fixed, quarter
        )
        print(
            f"equivariance error {name}, w = {shift_moving}, u = {shift_fixed}: {error:.2f} voxels"
        )

    rows = [0, PAIRS // 2]  # a fundus photograph and a vessel segmentation
    figure, axes = plt.subplots(len(rows), 5, figsize=(12.5, 5.2), layout="constrained")
    top = float(magnitude[rows].max())
    for row, index in zip(axes, rows, strict=True):
        for ax, image, title in zip(
            row, (fixed, moving, warped), ("fixed", "moving", "warped (AiR)"), strict=False
        ):
            ax.imshow(image[index, 0], cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=9)
        shown = row[3].imshow(magnitude[index], cmap="magma", vmin=0, vmax=top)
        row[3].set_title("|u| (voxels)", fontsize=9)
        figure.colorbar(shown, ax=row[3], shrink=0.8)
        corner = (shape[0] - ZOOM) // 2
        crop = magnitude[index, corner : corner + ZOOM, corner : corner + ZOOM]
        row[4].imshow(crop, cmap="magma", extent=(corner, corner + ZOOM, corner + ZOOM, corner))
        for line in range(-(-corner // patch) * patch, corner + ZOOM, patch):
            row[4].axhline(line, color="cyan", linewidth=0.8)
            row[4].axvline(line, color="cyan", linewidth=0.8)
        row[4].set_title(f"|u|, centre {ZOOM}² (patch grid)", fontsize=9)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    # A palette of 192 colours keeps the noisy displacement panels small in the repository.
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=72)
    Image.open(buffer).convert("RGB").quantize(192).save(args.output, optimize=True)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
