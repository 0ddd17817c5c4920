"""Regenerate the regression cases in Testing/ (deterministic; outputs are committed).

    python Testing/make_cases.py --retina-jpg PATH/TO/skimage/data/retina.jpg \
                                 --lung-nrrd PATH/TO/slicerio/data/CTChest4.nrrd

``retina.jpg`` is the fundus photograph shipped in scikit-image 0.26.0 and ``CTChest4.nrrd``
the chest CT shipped in slicerio 1.4.0 (``make cases`` downloads the wheels and unpacks only
those files; their sha256 are checked below). The vessel-mask pair is drawn by
``equireg.data.synthetic.vessel_tree`` with a seed no training pool uses. Either input may be
left out to rebuild only the other anatomy.

Each case folder holds a fixed/moving pair, the true transform (fixed → moving physical points,
LPS mm, ITK text format), label maps for both images, matching landmarks, and the *shifted*
variant: the moving content moved inside its own field of view (retina: by (20 %, 10 %) of it;
lung: 20 rows posterior and 3 slices inferior), with its own truth, labels and landmarks.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from equireg.data.synthetic import vessel_tree
from equireg.evaluate import jacobian_determinant, transform_field
from equireg.space import Grid

RETINA_SHA256 = "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6"
HERE = Path(__file__).resolve().parent
SHAPE = 256
SPACING = 0.05  # mm: a 12.8 mm field of view, about a 45° fundus photograph
SHIFT_FRACTION = (0.20, 0.10)  # of the field of view, along x and y
VESSEL_SEED = 2026  # training pools use seeds 11 and 11 + 7919
LANDMARKS = 24

CT_SHA256 = "439ee098e50ee8e3254bd80ed8bcf7f8d006da4cab35be7a65b61ccb30dd6a3d"
AIR_HU = -1024.0  # below it is only the scanner's "outside the reconstruction" value
LUNG_SEED = 2027  # the truth's random warp and the landmarks; training uses its own seeds
BREATHING_MM = 18.0  # superior-inferior motion at the lung base, none at the apex
EXPANSION = 0.06  # antero-posterior: relative, 6 % of the distance in front of the spine
WARP_MM = 3.0  # std of the random B-spline coefficients (about 1 mm of displacement)
MESH = (8, 8, 7)  # B-spline mesh over the CT: about 49 mm between knots
# The shifted moving content: whole CT voxels along (L, P, S): 20 rows posterior (61 mm, 15.6 %
# of the field of view; the body keeps 7 mm to the border) and 3 slices inferior (30 mm, 8.8 %).
LUNG_SHIFT_VOXELS = (0, 20, -3)
LUNG_LANDMARKS = 36
LUNG_LABELS = (1, 2, 4)  # right lung, left lung, lung vessels (3 is the trachea)


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
    after = sitk.TranslationTransform(len(shift), shift.tolist())
    before = sitk.TranslationTransform(len(shift), (-shift).tolist())
    return sitk.CompositeTransform([after, *truth]), before


def _write_points(path: Path, points: np.ndarray) -> None:
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["x", "y", "z"][: points.shape[1]])
        writer.writerows([[f"{v:.4f}" for v in point] for point in points])


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


def _write_pair(
    folder: Path,
    reference: sitk.Image,
    sources: tuple[sitk.Image, sitk.Image],
    truth_parts: list[sitk.Transform],
    shift: np.ndarray,
    pixel: int,
    background: float = 0.0,
) -> tuple[sitk.Transform, sitk.Transform]:
    """Write the images and label maps of both variants (resampled from the image and label
    ``sources`` onto ``reference``) and both truths; return (truth, shifted truth)."""
    truth = sitk.CompositeTransform(truth_parts)
    truth_shifted, sampling_shifted = _shifted(truth_parts, shift)
    folder.mkdir(parents=True, exist_ok=True)
    identity = sitk.Transform(reference.GetDimension(), sitk.sitkIdentity)
    # Resampling gives ``output(x) = source(T(x))``. The fixed image is the source seen through
    # the truth and the moving image the source itself, so ``moving(truth(x)) = fixed(x)``:
    # the truth maps fixed points to moving points, the convention of every transform we write.
    image, labels = sources
    outputs = {
        "fixed": (truth, image, False),
        "moving": (identity, image, False),
        "moving_shifted": (sampling_shifted, image, False),
        "fixed_labels": (truth, labels, True),
        "moving_labels": (identity, labels, True),
        "moving_shifted_labels": (sampling_shifted, labels, True),
    }
    for name, (transform, source, is_labels) in outputs.items():
        interpolator = sitk.sitkNearestNeighbor if is_labels else sitk.sitkLinear
        fill = 0.0 if is_labels else background
        result = sitk.Resample(source, reference, transform, interpolator, fill)
        kind = sitk.sitkUInt8 if is_labels else pixel  # labels are small integers
        if kind == sitk.sitkFloat32:
            result = sitk.Cast(result, sitk.sitkFloat32)
        else:  # integer images (8-bit photographs, 16-bit CT) are rounded, not truncated
            result = sitk.Cast(sitk.Round(sitk.Cast(result, sitk.sitkFloat32)), kind)
        sitk.WriteImage(result, str(folder / f"{name}.nrrd"), useCompression=True)
    sitk.WriteTransform(truth, str(folder / "truth.tfm"))
    sitk.WriteTransform(truth_shifted, str(folder / "truth_shifted.tfm"))
    return truth, truth_shifted


def _write_landmarks(
    folder: Path, points: np.ndarray, transforms: tuple[sitk.Transform, sitk.Transform]
) -> None:
    """``fixed_landmarks.csv`` and, mapped through each truth, the moving variants' landmarks."""
    _write_points(folder / "fixed_landmarks.csv", points)
    for name, transform in zip(("moving", "moving_shifted"), transforms, strict=True):
        moved = np.array([transform.TransformPoint(p.tolist()) for p in points])
        _write_points(folder / f"{name}_landmarks.csv", moved)


def _write_retina_case(
    folder: Path, image: sitk.Image, labels: sitk.Image, seed: int, eight_bit: bool
) -> None:
    rng = np.random.default_rng(seed)
    shift = np.array(SHIFT_FRACTION) * SHAPE * SPACING
    pixel = sitk.sitkUInt8 if eight_bit else sitk.sitkFloat32  # photographs are 8-bit
    reference = _grid(SHAPE, SPACING)
    transforms = _write_pair(folder, reference, (image, labels), _truth(rng), shift, pixel)
    fixed_labels = sitk.ReadImage(str(folder / "fixed_labels.nrrd"))
    _write_landmarks(folder, _landmarks(fixed_labels, list(transforms), rng), transforms)


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


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest connected region of ``mask``."""
    regions, _ = ndimage.label(mask)
    return regions == np.argmax(np.bincount(regions.ravel())[1:]) + 1


def _body(hu: np.ndarray) -> np.ndarray:
    """The body: the largest connected region above -400 HU (not the table), with what it
    encloses in each axial slice (lungs, airways, bowel gas)."""
    return np.stack([ndimage.binary_fill_holes(axial) for axial in _largest_region(hu > -400)])


def chest_ct_case(ct_nrrd: Path) -> tuple[sitk.Image, sitk.Image]:
    """slicerio's chest CT in HU (float) and its labels: right lung 1, left lung 2, trachea 3,
    lung vessels 4.

    Lungs and airways are the largest air region (< -400 HU) inside the body (bowel gas is
    apart); the trachea is its small part near the mid-line of each slice above the carina,
    and the rest is split into right and left at the thinnest part of the mediastinum of each
    slice. Vessels are what is denser than -500 HU inside the lungs' outlines.
    """
    digest = hashlib.sha256(ct_nrrd.read_bytes()).hexdigest()
    if digest != CT_SHA256:
        raise SystemExit(f"{ct_nrrd}: sha256 {digest} is not slicerio 1.4.0's CTChest4.nrrd")
    ct = sitk.Maximum(sitk.Cast(sitk.ReadImage(str(ct_nrrd)), sitk.sitkFloat32), AIR_HU)
    direction = np.array(ct.GetDirection()).reshape(3, 3)
    assert np.allclose(np.abs(direction), np.eye(3)), "the split below needs axial slices"
    hu = sitk.GetArrayFromImage(ct)
    body = _body(hu)
    airways = _largest_region((hu < -400) & body)
    x = Grid.of(ct).physical_points()[0, 0, :, 0]  # LPS x of each column: patient right is low x
    spacing = ct.GetSpacing()
    body_x = np.mean(x[np.nonzero(body)[2]])
    labels = np.zeros(hu.shape, np.uint8)
    for z, axial in enumerate(airways):
        parts, count = ndimage.label(axial)
        for part in range(1, count + 1):
            region = parts == part
            area = region.sum() * spacing[0] * spacing[1]
            if area < 600 and abs(np.mean(x[np.nonzero(region)[1]]) - body_x) < 25:
                labels[z][region] = 3
        lungs = axial & (labels[z] == 0)
        if not lungs.any():
            continue
        profile = lungs.sum(axis=0).astype(float)
        profile[np.abs(x - body_x) > 45] = np.inf  # the mediastinum is near the mid-line
        thinnest = np.flatnonzero(profile == profile.min())
        split = x[int(np.median(thinnest))]
        for label, side in ((1, x < split), (2, x >= split)):
            lung = ndimage.binary_fill_holes(lungs & side[None, :])
            labels[z][lung & (labels[z] == 0)] = label
    labels[np.isin(labels, (1, 2)) & (hu > -500)] = 4
    result = sitk.GetImageFromArray(labels)
    result.CopyInformation(ct)
    return ct, result


def _breathing_truth(labels: sitk.Image, rng: np.random.Generator) -> list[sitk.Transform]:
    """Synthetic breathing, fixed (inhaled) → moving (exhaled, the CT) points, as one B-spline.

    Superior-inferior motion of ``BREATHING_MM`` at and below the lung base, fading
    quadratically to nothing at the apex (as ``equireg.data.lung.breathing_map``) and confined
    to a smooth footprint of the lungs, so spine, skin and table stay; an antero-posterior
    expansion in front of the spine that grows the same way towards the diaphragm; and a
    random smooth warp. The designed field is sampled at the B-spline's control points.
    """
    array = sitk.GetArrayFromImage(labels)
    lungs = np.isin(array, LUNG_LABELS)
    position = Grid.of(labels).physical_points()
    z, y = position[..., 2], position[..., 1]
    apex, base = z[lungs].max(), z[lungs].min()
    spine = np.percentile(y[lungs], 99)  # the lungs' posterior edge (LPS y grows posteriorly)
    ramp = np.clip((apex - z) / (apex - base), 0, 1) ** 2
    sigma = [20.0 / s for s in labels.GetSpacing()[1::-1]]  # 20 mm, in (row, column) voxels
    footprint = ndimage.gaussian_filter(lungs.any(axis=0).astype(float), sigma)
    displacement = np.zeros((*array.shape, 3))
    displacement[..., 2] = BREATHING_MM * ramp * np.clip(2 * footprint, 0, 1)
    displacement[..., 1] = EXPANSION * np.clip(spine - y, 0, None) * ramp
    field = sitk.GetImageFromArray(displacement, isVector=True)
    field.CopyInformation(labels)
    coefficients = []
    for axis, grid in enumerate(
        sitk.BSplineTransformInitializer(labels, MESH, order=3).GetCoefficientImages()
    ):
        designed = sitk.Resample(
            sitk.VectorIndexSelectionCast(field, axis),
            grid,
            sitk.Transform(),
            sitk.sitkLinear,
            useNearestNeighborExtrapolator=True,
        )
        noise = np.zeros(grid.GetSize()[::-1])  # none on the outermost control points
        noise[1:-1, 1:-1, 1:-1] = rng.normal(0, WARP_MM, [n - 2 for n in noise.shape])
        coefficient = sitk.GetImageFromArray(sitk.GetArrayFromImage(designed) + noise)
        coefficient.CopyInformation(grid)
        coefficients.append(coefficient)
    return [sitk.BSplineTransform(coefficients, 3)]


def _lung_landmarks(
    fixed: sitk.Image, fixed_labels: sitk.Image, transforms: list[sitk.Transform], rng
) -> np.ndarray:
    """Points on the vessels inside the fixed lungs (not at their border), taken in turn from
    the right and left, at least 25 mm apart, whose images under every truth stay a voxel
    inside the field."""
    labels = sitk.GetArrayFromImage(fixed_labels)
    vessels = (labels == 4) & ndimage.binary_erosion(np.isin(labels, LUNG_LABELS))
    x = Grid.of(fixed).physical_points()[..., 0]
    middle = x[vessels].mean()
    size = np.array(fixed.GetSize())
    pools = []
    for side in (x < middle, x >= middle):  # patient right, then left
        candidates = np.argwhere(vessels & side)
        rng.shuffle(candidates)
        pools.append(list(candidates))
    chosen: list[np.ndarray] = []
    while len(chosen) < LUNG_LANDMARKS and any(pools):
        for pool in pools:
            while pool:
                index = [int(i) for i in pool.pop()[::-1]]
                point = np.array(fixed.TransformIndexToPhysicalPoint(index))
                images = [point] + [np.array(t.TransformPoint(point.tolist())) for t in transforms]
                inside = all(
                    np.all((c >= 1) & (c <= size - 2))
                    for c in (
                        np.array(fixed.TransformPhysicalPointToContinuousIndex(p.tolist()))
                        for p in images
                    )
                )
                if inside and all(np.linalg.norm(point - other) >= 25 for other in chosen):
                    chosen.append(point)
                    break
    return np.array(chosen[:LUNG_LANDMARKS])


def truth_field(
    truth: sitk.Transform, fixed_labels: sitk.Image, region: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The truth's displacement on the fixed grid ``(*S, d)`` (mm), its length over ``region``
    and its Jacobian determinant; asserts that it does not fold."""
    displacement = transform_field(truth, fixed_labels)
    length = np.linalg.norm(displacement, axis=-1)[region]
    determinant = jacobian_determinant(
        displacement, fixed_labels.GetSpacing(), fixed_labels.GetDirection()
    )
    assert determinant.min() > 0, "the truth folds"
    return displacement, length, determinant


def _describe_truth(truth: sitk.Transform, fixed_labels: sitk.Image) -> None:
    """Print how far the truth moves the lungs and check that it does not fold."""
    lungs = np.isin(sitk.GetArrayFromImage(fixed_labels), LUNG_LABELS)
    displacement, length, determinant = truth_field(truth, fixed_labels, lungs)
    print(
        f"truth in the lungs: |u| mean {length.mean():.1f} mm, max {length.max():.1f} mm; "
        f"S-I max {np.abs(displacement[..., 2][lungs]).max():.1f} mm, "
        f"A-P max {np.abs(displacement[..., 1][lungs]).max():.1f} mm; "
        f"Jacobian determinant {determinant.min():.2f} to {determinant.max():.2f}"
    )


def _write_lung_case(folder: Path, ct: sitk.Image, labels: sitk.Image) -> None:
    rng = np.random.default_rng(LUNG_SEED)
    shift = np.array(LUNG_SHIFT_VOXELS) * np.array(ct.GetSpacing())
    sources = (ct, labels)
    truth_parts = _breathing_truth(labels, rng)
    transforms = _write_pair(folder, ct, sources, truth_parts, shift, sitk.sitkInt16, AIR_HU)
    shifted = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "moving_shifted.nrrd")))
    body = _body(shifted)
    assert not (body[:, 0].any() or body[:, -1].any()), "the shifted body leaves the field"
    fixed = sitk.ReadImage(str(folder / "fixed.nrrd"))
    fixed_labels = sitk.ReadImage(str(folder / "fixed_labels.nrrd"))
    _describe_truth(transforms[0], fixed_labels)
    points = _lung_landmarks(fixed, fixed_labels, list(transforms), rng)
    _write_landmarks(folder, points, transforms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retina-jpg", type=Path, help="skimage/data/retina.jpg (0.26.0)")
    parser.add_argument("--lung-nrrd", type=Path, help="slicerio/data/CTChest4.nrrd (1.4.0)")
    args = parser.parse_args()
    if not (args.retina_jpg or args.lung_nrrd):
        parser.error("give --retina-jpg, --lung-nrrd or both")
    if args.retina_jpg:
        _write_retina_case(HERE / "retina" / "photo", *photograph_case(args.retina_jpg), 1, True)
        _write_retina_case(HERE / "retina" / "vessels", *vessel_mask_case(), 2, False)
    if args.lung_nrrd:
        _write_lung_case(HERE / "lung" / "chest", *chest_ct_case(args.lung_nrrd))


if __name__ == "__main__":
    main()
