"""The lung regression case at a glance (Testing/README.md): fixed, moving and shifted moving
CT, a coronal and an axial slice each, with the labels outlined (lungs, trachea, lung vessels).

    .venv/bin/python docs/figures/make_lung_case_figure.py

Writes docs/figures/lung_case.png. All three images share one grid, so the same slices show
the synthetic breathing (fixed vs moving) and the shift (moving vs shifted moving).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

REPOSITORY = Path(__file__).resolve().parents[2]
CASE = REPOSITORY / "Testing" / "lung" / "chest"
COLOURS = {1: "tab:red", 2: "tab:cyan", 3: "yellow", 4: "tab:orange"}  # see make_cases.py


def _views(image: sitk.Image, row: int, axial: int) -> list[tuple[np.ndarray, list[float]]]:
    """A coronal and an axial slice in radiological orientation (patient right on the left,
    superior and anterior at the top), top row first, with their extents in mm. For the CT's
    axis-aligned grid, whose LPS x and y run against the columns and rows and z with slices."""
    array = sitk.GetArrayFromImage(image)
    nz, ny, nx = array.shape
    sx, sy, sz = image.GetSpacing()
    coronal = array[::-1, row, ::-1]
    transverse = array[axial, ::-1, ::-1]
    return [(coronal, [0, nx * sx, nz * sz, 0]), (transverse, [0, nx * sx, ny * sy, 0])]


def main() -> None:
    fixed_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(CASE / "fixed_labels.nrrd")))
    z, y, _ = np.nonzero(np.isin(fixed_labels, (1, 2, 4)))
    row = int(np.median(y))  # through the middle of the lungs
    axial = int(np.percentile(z, 20))  # low in the lungs, where breathing moves them most
    columns = [("fixed", "fixed"), ("moving", "moving"), ("moving_shifted", "shifted moving")]
    figure, axes = plt.subplots(2, 3, figsize=(9.6, 7.2), height_ratios=[1, 1.15])
    for column, (name, title) in enumerate(columns):
        image = sitk.ReadImage(str(CASE / f"{name}.nrrd"))
        labels = sitk.ReadImage(str(CASE / f"{name}_labels.nrrd"))
        for axis, (grey, extent), (outline, _) in zip(
            axes[:, column], _views(image, row, axial), _views(labels, row, axial), strict=True
        ):
            axis.imshow(grey, cmap="gray", vmin=-1000, vmax=300, extent=extent)
            for label, colour in COLOURS.items():
                if (outline == label).any():
                    mask = outline == label
                    if label in (1, 2):  # the lungs' outlines, around their vessels (label 4)
                        mask = ndimage.binary_fill_holes(mask)
                    mask = mask.astype(float)
                    axis.contour(
                        mask, [0.5], colors=colour, linewidths=0.8, extent=extent, origin="upper"
                    )
            axis.set_xticks([])
            axis.set_yticks([])
        axes[0, column].set_title(title)
    axes[0, 0].set_ylabel("coronal")
    axes[1, 0].set_ylabel("axial")
    figure.tight_layout()
    figure.savefig(REPOSITORY / "docs" / "figures" / "lung_case.png", dpi=70)
    plt.close(figure)


if __name__ == "__main__":
    main()
