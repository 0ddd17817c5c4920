"""Regenerate the regression cases in Testing/ (deterministic; outputs are committed).

    python Testing/make_cases.py --retina-jpg PATH/TO/skimage/data/retina.jpg

``retina.jpg`` is the fundus photograph shipped in scikit-image 0.26.0 (``make cases``
downloads the wheel and unpacks only that file; its sha256 is checked below). The vessel-mask
pair is drawn by ``equireg.data.synthetic.vessel_tree`` with a seed no training pool uses.

Each case folder holds a fixed/moving pair, the true transform (fixed → moving physical points,
LPS mm, ITK text format), vessel label maps for both images, matching landmarks, and the
*shifted* variant: the moving content moved by (20 %, 10 %) of the field of view inside its own
field of view, with its own truth, labels and landmarks.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from equireg.data.synthetic import vessel_tree

RETINA_SHA256 = "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6"
HERE = Path(__file__).resolve().parent
SHAPE = 256
SPACING = 0.05  # mm: a 12.8 mm field of view, about a 45° fundus photograph
SHIFT_FRACTION = (0.20, 0.10)  # of the field of view, along x and y
VESSEL_SEED = 2026  # training pools use seeds 11 and 11 + 7919
LANDMARKS = 24


def _grid(shape: int, spacing: float) -> sitk.Image:
    """An empty image of the case geometry: centred on the origin, axis-aligned."""
    image = sitk.Image(shape, shape, sitk.sitkFloat32)
    image.SetSpacing((spacing, spacing))
    image.SetOrigin((-(shape - 1) * spacing / 2,) * 2)
    return image


def _source_image(array: np.ndarray) -> sitk.Image:
    """A high-resolution source covering the same 12.8 mm, smoothed for the case's sampling."""
    side = SHAPE * SPACING
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.CopyInformation(_grid(array.shape[0], side / array.shape[0]))
    return sitk.SmoothingRecursiveGaussian(image, SPACING * 0.5)


def _truth(rng: np.random.Generator) -> list[sitk.Transform]:
    """A small rotation and translation after a smooth B-spline warp: fixed → moving points,
    as the list of a composite transform (applied right to left)."""
    reference = _grid(SHAPE, SPACING)
    warp = sitk.BSplineTransformInitializer(reference, [4, 4], order=3)
    warp.SetParameters(rng.normal(0, 0.3, len(warp.GetParameters())).tolist())  # mm
    rigid = sitk.Euler2DTransform()
    rigid.SetAngle(np.deg2rad(rng.uniform(-6, 6)))
    rigid.SetTranslation(rng.uniform(-1.0, 1.0, 2).tolist())
    return [rigid, warp]


def _shifted(truth: list[sitk.Transform], shift: np.ndarray) -> tuple[sitk.Transform, ...]:
    """(fixed → shifted-moving truth, sampling transform of the shifted moving image).

    The shifted moving image is ``source(y − s)``: its content moved by ``s``; so the fixed
    point ``x`` (``source(truth(x))``) is found at ``truth(x) + s``.
    """
    after = sitk.TranslationTransform(2, shift.tolist())
    before = sitk.TranslationTransform(2, (-shift).tolist())
    return sitk.CompositeTransform([after, *truth]), before


def _resample(source: sitk.Image, transform: sitk.Transform, labels: bool) -> sitk.Image:
    interpolator = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    return sitk.Resample(source, _grid(SHAPE, SPACING), transform, interpolator, 0.0)


def _write_points(path: Path, points: np.ndarray) -> None:
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["x", "y"])
        writer.writerows([[f"{x:.4f}", f"{y:.4f}"] for x, y in points])


def _landmarks(labels: sitk.Image, transforms: list[sitk.Transform], rng) -> np.ndarray:
    """Fixed points on vessels whose images under every transform stay well inside the field."""
    array = sitk.GetArrayFromImage(labels)
    candidates = np.argwhere(array > 0)
    rng.shuffle(candidates)
    limit = SHAPE * SPACING / 2 - 0.6
    chosen: list[np.ndarray] = []
    for row, column in candidates:
        point = np.array(labels.TransformIndexToPhysicalPoint((int(column), int(row))))
        images = [np.array(t.TransformPoint(point.tolist())) for t in transforms]
        if all(np.abs(p).max() < limit for p in [point, *images]) and all(
            np.linalg.norm(point - other) > 1.0 for other in chosen
        ):
            chosen.append(point)
        if len(chosen) == LANDMARKS:
            break
    return np.array(chosen)


def _write_case(
    folder: Path, image: sitk.Image, labels: sitk.Image, seed: int, eight_bit: bool
) -> None:
    rng = np.random.default_rng(seed)
    truth_parts = _truth(rng)
    truth = sitk.CompositeTransform(truth_parts)
    shift = np.array(SHIFT_FRACTION) * SHAPE * SPACING
    truth_shifted, sampling_shifted = _shifted(truth_parts, shift)
    folder.mkdir(parents=True, exist_ok=True)
    identity = sitk.Transform(2, sitk.sitkIdentity)
    # Resampling gives ``output(x) = source(T(x))``. The fixed image is the source seen through
    # the truth and the moving image the source itself, so ``moving(truth(x)) = fixed(x)``:
    # the truth maps fixed points to moving points, the convention of every transform we write.
    outputs = {
        "fixed": (truth, image, False),
        "moving": (identity, image, False),
        "moving_shifted": (sampling_shifted, image, False),
        "fixed_labels": (truth, labels, True),
        "moving_labels": (identity, labels, True),
        "moving_shifted_labels": (sampling_shifted, labels, True),
    }
    for name, (transform, source, is_labels) in outputs.items():
        result = _resample(source, transform, is_labels)
        if is_labels or eight_bit:  # photographs are 8-bit; labels are small integers
            result = sitk.Cast(sitk.Round(sitk.Cast(result, sitk.sitkFloat32)), sitk.sitkUInt8)
        else:
            result = sitk.Cast(result, sitk.sitkFloat32)
        sitk.WriteImage(result, str(folder / f"{name}.nrrd"), useCompression=True)
    sitk.WriteTransform(truth, str(folder / "truth.tfm"))
    sitk.WriteTransform(truth_shifted, str(folder / "truth_shifted.tfm"))
    fixed_labels = sitk.ReadImage(str(folder / "fixed_labels.nrrd"))
    points = _landmarks(fixed_labels, [truth, truth_shifted], rng)
    _write_points(folder / "fixed_landmarks.csv", points)
    for name, transform in (("moving", truth), ("moving_shifted", truth_shifted)):
        moved = np.array([transform.TransformPoint(p.tolist()) for p in points])
        _write_points(folder / f"{name}_landmarks.csv", moved)


def photograph_case(retina_jpg: Path) -> tuple[sitk.Image, sitk.Image]:
    """The green channel of scikit-image's fundus photograph and a vessel label map of it."""
    digest = hashlib.sha256(retina_jpg.read_bytes()).hexdigest()
    if digest != RETINA_SHA256:
        raise SystemExit(f"{retina_jpg}: sha256 {digest} is not scikit-image 0.26.0's retina.jpg")
    green = sitk.GetArrayFromImage(sitk.ReadImage(str(retina_jpg)))[..., 1].astype(np.float32)
    source = sitk.GetImageFromArray(green)
    # Vessels: clearly darker than their surroundings, inside the camera's circular field.
    background = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(source, 12.0))
    field = background > 0.15 * green.max()
    vessels = ((background - green) > 6.0) & field
    return _source_image(green), sitk.Cast(_source_image(vessels * 1.0) > 0.5, sitk.sitkUInt8)


def vessel_mask_case() -> tuple[sitk.Image, sitk.Image]:
    """A binary vessel tree like DRIVE's manual segmentations (input and labels alike)."""
    vessels, _ = vessel_tree((1024, 1024), np.random.default_rng(VESSEL_SEED))
    mask = sitk.Cast(_source_image(vessels) > 0.5, sitk.sitkUInt8)
    return sitk.Cast(mask, sitk.sitkFloat32), mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retina-jpg", type=Path, required=True)
    args = parser.parse_args()
    _write_case(HERE / "retina" / "photo", *photograph_case(args.retina_jpg), 1, True)
    _write_case(HERE / "retina" / "vessels", *vessel_mask_case(), 2, False)


if __name__ == "__main__":
    main()
