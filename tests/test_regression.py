"""Regression cases of Testing/: the bundled models on CPU hold the thresholds of expected.json.

The thresholds were measured with ``python Testing/measure_expected.py`` (see each
expected.json for the commit and model sha256); a model or engine change that makes
registration clearly worse fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from equireg.api import register
from equireg.cases import find_cases, identity_score, score
from equireg.models import read_card

TESTING = Path(__file__).resolve().parents[1] / "Testing"
CASES = find_cases(TESTING)


def _expected(case) -> dict:
    anatomy = case.folder.parent
    return json.loads((anatomy / "expected.json").read_text())


def test_every_case_has_expectations():
    assert len(CASES) >= 4
    for case in CASES:
        expected = _expected(case)
        assert case.name in expected["cases"], f"{case.name}: run Testing/measure_expected.py"
        card = read_card(expected["model"])
        assert card.data.get("sha256") == expected["model_sha256"], (
            f"{expected['model']} changed since expected.json was measured: re-measure it"
        )


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_the_truth_of_each_case_registers_its_images(case):
    """``moving ∘ truth = fixed``: guards the cases against an inverted truth (fixed → moving)."""
    fixed = sitk.ReadImage(str(case.fixed), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(case.moving), sitk.sitkFloat32)
    registered = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, case.truth()))
    unregistered = sitk.GetArrayFromImage(sitk.Resample(moving, fixed))
    target = sitk.GetArrayFromImage(fixed)
    inside = registered > 0
    # Measured 0.674 vs 11.2 (photo) and 0.136 vs 0.516 (vessels): interpolation is what is left.
    error = np.abs(registered - target)[inside].mean()
    assert error < 0.3 * np.abs(unregistered - target)[inside].mean()
    assert identity_score(case)["tre_mean_mm"] > 0.3  # the pair needs registering at all
    assert score(case, case.truth())["tre_mean_mm"] < 1e-3


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bundled_model_holds_the_thresholds(case):
    expected = _expected(case)
    limits = expected["cases"][case.name]["thresholds"]
    result = register(str(case.fixed), str(case.moving), model=expected["model"], device="cpu")
    measured = score(case, result.transform)
    assert measured["tre_mean_mm"] <= limits["tre_mean_mm_max"], measured
    assert measured["field_error_mean_mm"] <= limits["field_error_mean_mm_max"], measured
    assert measured["dice"] >= limits["dice_min"], measured
    assert result.report["folding_fraction"] <= limits["folding_fraction_max"]
    if expected["model_trained"]:  # a trained model must beat doing nothing
        assert measured["tre_mean_mm"] < identity_score(case)["tre_mean_mm"], measured
