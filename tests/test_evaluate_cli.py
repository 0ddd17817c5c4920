"""``equireg evaluate``: the metrics of any transform file, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from equireg.cases import Case, identity_score
from equireg.cli import main

CASE = Path(__file__).resolve().parent.parent / "Testing" / "retina" / "vessels"
SHIFT_MM = (2.0, -1.5)  # whole pixels at 0.5 mm spacing


def _evaluate(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["evaluate", *map(str, args)]) == 0
    return json.loads(capsys.readouterr().out)


def _case_options(variant: str) -> list[str]:
    prefix = "moving" if variant == "plain" else "moving_shifted"
    return [
        CASE / "fixed.nrrd",
        CASE / f"{prefix}.nrrd",
        "--fixed-landmarks",
        CASE / "fixed_landmarks.csv",
        "--moving-landmarks",
        CASE / f"{prefix}_landmarks.csv",
        "--fixed-labels",
        CASE / "fixed_labels.nrrd",
        "--moving-labels",
        CASE / f"{prefix}_labels.nrrd",
        "--truth",
        CASE / ("truth.tfm" if variant == "plain" else "truth_shifted.tfm"),
    ]


@pytest.fixture(scope="module")
def translated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A pair whose moving image is the fixed one seen through a known translation, with
    labels, landmarks and the translation written as the (true) transform."""
    folder = tmp_path_factory.mktemp("translated")
    rng = np.random.default_rng(0)
    values = sitk.GetArrayFromImage(
        sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(rng.random((64, 48))), 2.0)
    )
    fixed = sitk.GetImageFromArray(values.astype(np.float32))
    fixed.SetSpacing((0.5, 0.5))
    fixed.SetOrigin((3.0, -2.0))
    inside = np.zeros(values.shape, dtype=np.uint8)
    inside[8:-8, 8:-8] = 1  # labels away from the border stay inside the translated image
    labels = sitk.GetImageFromArray(inside * (values > np.median(values)).astype(np.uint8))
    labels.CopyInformation(fixed)
    translation = sitk.TranslationTransform(2, SHIFT_MM)
    # moving(y) = fixed(y − t): the fixed point x is seen at x + t in the moving image.
    inverse = sitk.TranslationTransform(2, [-s for s in SHIFT_MM])
    moving = sitk.Resample(fixed, fixed, inverse, sitk.sitkLinear, 0.0)
    moving_labels = sitk.Resample(labels, labels, inverse, sitk.sitkNearestNeighbor, 0)
    points = np.array([[10.0, 5.0], [15.5, 10.0], [8.0, 20.0]])
    paths = {name: folder / f"{name}.nrrd" for name in ("fixed", "moving", "fl", "ml")}
    for name, image in zip(paths, (fixed, moving, labels, moving_labels), strict=True):
        sitk.WriteImage(image, str(paths[name]))
    paths["transform"] = folder / "translation.tfm"
    sitk.WriteTransform(translation, str(paths["transform"]))
    for name, array in (("fpts", points), ("mpts", points + SHIFT_MM)):
        paths[name] = folder / f"{name}.csv"
        np.savetxt(paths[name], array, delimiter=",", header="x,y", comments="")
    return paths


def test_known_translation_scores_perfectly(
    translated: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    p = translated
    metrics = _evaluate(
        capsys,
        p["fixed"],
        p["moving"],
        "--transform",
        p["transform"],
        "--fixed-landmarks",
        p["fpts"],
        "--moving-landmarks",
        p["mpts"],
        "--fixed-labels",
        p["fl"],
        "--moving-labels",
        p["ml"],
        "--truth",
        p["transform"],
    )
    assert metrics["landmarks"]["after_mm"]["max"] < 1e-9
    assert metrics["landmarks"]["before_mm"]["mean"] == pytest.approx(np.hypot(*SHIFT_MM))
    assert metrics["dice"]["after"]["mean"] == 1.0 > metrics["dice"]["before"]["mean"]
    assert metrics["field_error_mm"]["max"] < 1e-9
    assert metrics["folding_fraction"] == 0.0
    similarity = metrics["similarity"]
    assert similarity["lncc_after"] > similarity["lncc_before"]
    assert similarity["mse_after"] < similarity["mse_before"]


def test_landmarks_outside_the_moving_image_are_counted_apart(
    translated: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A moving crop that lacks one landmark: the TRE over all of them measures an
    extrapolation there, so the count outside and the TRE inside are reported too."""
    p = translated
    moving = sitk.ReadImage(str(p["moving"]))[:, :20]  # y up to −2 + 19·0.5 = 7.5 mm
    sitk.WriteImage(moving, str(tmp_path / "crop.nrrd"))
    options = ["--fixed-landmarks", p["fpts"], "--moving-landmarks", p["mpts"]]
    metrics = _evaluate(
        capsys, p["fixed"], tmp_path / "crop.nrrd", "--transform", p["transform"], *options
    )
    landmarks = metrics["landmarks"]
    assert landmarks["count"] == 3 and landmarks["outside_moving"] == 2  # y = 8.5 and 18.5 mm
    assert landmarks["after_inside_moving_mm"]["max"] < 1e-9
    full = _evaluate(capsys, p["fixed"], p["moving"], "--transform", p["transform"], *options)
    assert "outside_moving" not in full["landmarks"]


@pytest.mark.parametrize("variant", ["plain", "shifted"])
def test_identity_matches_the_case_baseline(
    variant: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    identity = tmp_path / "identity.tfm"
    sitk.WriteTransform(sitk.Transform(2, sitk.sitkIdentity), str(identity))
    metrics = _evaluate(capsys, *_case_options(variant), "--transform", identity)
    expected = identity_score(Case(CASE, variant))
    assert metrics["landmarks"]["after_mm"]["mean"] == pytest.approx(expected["tre_mean_mm"])
    assert metrics["landmarks"]["after_mm"]["p90"] == pytest.approx(expected["tre_p90_mm"])
    assert metrics["dice"]["after"]["mean"] == pytest.approx(expected["dice"])
    assert metrics["field_error_mm"]["mean"] == pytest.approx(expected["field_error_mean_mm"])
    assert metrics["landmarks"]["before_mm"] == metrics["landmarks"]["after_mm"]


def test_case_truth_has_no_landmark_or_field_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "metrics.json"
    options = _case_options("shifted")
    metrics = _evaluate(
        capsys, *options, "--transform", CASE / "truth_shifted.tfm", "--output", output
    )
    assert metrics["landmarks"]["after_mm"]["p90"] < 1e-3
    assert metrics["field_error_mm"]["max"] < 1e-9
    assert json.loads(output.read_text()) == metrics


def test_equivariance_error_of_the_bundled_model(
    translated: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    p = translated
    metrics = _evaluate(
        capsys, p["fixed"], p["moving"], "--transform", p["transform"], "--equivariance", "auto"
    )
    equivariance = metrics["equivariance"]
    assert equivariance["model"] == "generic2d"
    assert equivariance["shift_voxels"] == [8, 8]
    assert np.isfinite(equivariance["error_voxels"]) and equivariance["error_voxels"] >= 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: {"transform": p["fixed"]}, "cannot be read as an ITK transform"),
        (lambda p: {"fixed": p["fixed"].parent / "missing.nrrd"}, "no such file"),
        (lambda p: {"mpts": None}, "landmarks: give both"),
        (lambda p: {"mpts": p["fl"]}, "not a CSV of numbers"),
        (lambda p: {"ml": p["fpts"]}, "cannot be read as a label image"),
        (lambda p: {"truth": p["mpts"]}, "cannot be read as an ITK transform"),
    ],
    ids=["transform", "fixed", "one-landmark-file", "landmark-csv", "labels", "truth"],
)
def test_bad_input_is_one_line_and_exit_2(
    translated: dict[str, Path], change, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    p = {**translated, "truth": translated["transform"], **change(translated)}
    args = [p["fixed"], p["moving"], "--transform", p["transform"], "--truth", p["truth"]]
    args += ["--fixed-landmarks", p["fpts"], "--fixed-labels", p["fl"], "--moving-labels", p["ml"]]
    if p["mpts"] is not None:
        args += ["--moving-landmarks", p["mpts"]]
    assert main(["evaluate", *map(str, args)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error, error
