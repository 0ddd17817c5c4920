"""The pipeline on the shifted chest-CT case (docs/architecture.md, docs/models.md): the fixed
image, the shifted moving image, and the moving image warped by the network's start alone
(``--initial none --refine-steps 0``) and by the default pipeline (guarded start + refinement
pyramid), each with the fixed lungs outlined and its landmark error, so what is aligned shows
at a glance.

    .venv/bin/python docs/figures/make_lung_result_figure.py

Writes docs/figures/lung_result.png (registers the pair twice on the CPU, about 15 s).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import SimpleITK as sitk
from make_lung_case_figure import CASE, _views
from scipy import ndimage

from equireg.api import register
from equireg.cases import Case, score


def main() -> None:
    fixed = sitk.ReadImage(str(CASE / "fixed.nrrd"))
    moving = sitk.ReadImage(str(CASE / "moving_shifted.nrrd"))
    fixed_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(CASE / "fixed_labels.nrrd")))
    z, y, _ = np.nonzero(np.isin(fixed_labels, (1, 2)))
    row, axial = int(np.median(y)), int(np.percentile(z, 20))
    lungs = sitk.GetImageFromArray(
        ndimage.binary_fill_holes(np.isin(fixed_labels, (1, 2, 4))).astype(np.uint8)
    )
    lungs.CopyInformation(fixed)
    unregistered = sitk.Resample(moving, fixed, sitk.Transform())
    columns = [("fixed", fixed), ("shifted moving (TRE 67.4 mm)", unregistered)]
    case = Case(CASE, "shifted")
    runs = (
        ("network start only", {"refine_steps": 0, "initial": "none"}),
        ("default pipeline", {}),
    )
    for title, options in runs:
        result = register(fixed, moving, model="lung3d", device="cpu", **options)
        error = score(case, result.transform)["tre_mean_mm"]
        columns.append(
            (
                f"{title}: TRE {error:.2f} mm",
                sitk.Resample(moving, fixed, result.transform, sitk.sitkLinear, -1024),
            )
        )
    figure, axes = plt.subplots(2, len(columns), figsize=(3.2 * len(columns), 7.2))
    for column, (title, image) in enumerate(columns):
        for axis, (grey, extent), (outline, _) in zip(
            axes[:, column], _views(image, row, axial), _views(lungs, row, axial), strict=True
        ):
            axis.imshow(grey, cmap="gray", vmin=-1000, vmax=300, extent=extent)
            axis.contour(
                outline.astype(float),
                [0.5],
                colors="tab:red",
                linewidths=0.8,
                extent=extent,
                origin="upper",
            )
            axis.set_xticks([])
            axis.set_yticks([])
        axes[0, column].set_title(title, fontsize=9)
    axes[0, 0].set_ylabel("coronal", fontsize=8)
    axes[1, 0].set_ylabel("axial", fontsize=8)
    figure.suptitle("red: the fixed image's lungs", fontsize=9)
    figure.tight_layout()
    figure.savefig(CASE.parents[2] / "docs" / "figures" / "lung_result.png", dpi=80)


if __name__ == "__main__":
    main()
