"""Regression cases (``Testing/<anatomy>/<case>/``): a pair with its truth, and its scoring.

A case folder holds ``fixed.nrrd`` and, per variant (``moving``, ``moving_shifted``), the
moving image, its vessel/organ labels (``<variant>_labels.nrrd``), landmarks
(``<variant>_landmarks.csv`` matching ``fixed_landmarks.csv`` row by row) and the true
transform (``truth.tfm`` / ``truth_shifted.tfm``, fixed → moving physical points). The same
scoring serves the regression tests, ``expected.json`` and the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from .evaluate import dense_field_error, dice, overlap_mask, target_registration_error
from .io import read_image, read_landmarks

VARIANTS = {"plain": ("moving", "truth.tfm"), "shifted": ("moving_shifted", "truth_shifted.tfm")}


@dataclass(frozen=True)
class Case:
    folder: Path
    variant: str  # a key of VARIANTS

    @property
    def name(self) -> str:
        return f"{self.folder.parent.name}/{self.folder.name}/{self.variant}"

    @property
    def fixed(self) -> Path:
        return self.folder / "fixed.nrrd"

    @property
    def moving(self) -> Path:
        return self.folder / f"{VARIANTS[self.variant][0]}.nrrd"

    def truth(self) -> sitk.Transform:
        return sitk.ReadTransform(str(self.folder / VARIANTS[self.variant][1]))


def find_cases(root: Path) -> list[Case]:
    """Every case folder under ``root`` (those holding ``fixed.nrrd``), both variants each."""
    folders = sorted(path.parent for path in Path(root).rglob("fixed.nrrd"))
    return [Case(folder, variant) for folder in folders for variant in VARIANTS]


def score(case: Case, transform: sitk.Transform) -> dict[str, float]:
    """Landmark error, label overlap and dense-field error (mm) of ``transform`` on ``case``."""
    fixed = read_image(case.fixed)
    moving = read_image(case.moving)
    truth = case.truth()
    dim = fixed.GetDimension()
    prefix = VARIANTS[case.variant][0]
    _, tre = target_registration_error(
        read_landmarks(case.folder / "fixed_landmarks.csv", dim),
        read_landmarks(case.folder / f"{prefix}_landmarks.csv", dim),
        transform,
    )
    fixed_labels = sitk.ReadImage(str(case.folder / "fixed_labels.nrrd"))
    moving_labels = sitk.ReadImage(str(case.folder / f"{prefix}_labels.nrrd"))
    warped_labels = sitk.Resample(moving_labels, fixed_labels, transform, sitk.sitkNearestNeighbor)
    field = dense_field_error(transform, truth, fixed, overlap_mask(truth, fixed, moving))
    return {
        "tre_mean_mm": tre["mean"],
        "tre_p90_mm": tre["p90"],
        "dice": dice(fixed_labels, warped_labels)["mean"],
        "field_error_mean_mm": field["mean"],
    }


def identity_score(case: Case) -> dict[str, float]:
    """The score of doing nothing, the baseline every method must beat."""
    return score(case, sitk.Transform(read_image(case.fixed).GetDimension(), sitk.sitkIdentity))
