"""Accuracy and time per regression case: ``python benchmarks/registration.py``.

Registers every case of ``Testing/`` (both variants, plain and shifted) with this project and
with the tools users would pick instead, all in this one process on the same files, and scores
every resulting transform (fixed → moving physical points) with ``equireg.cases.score`` plus the
folding fraction of the transform sampled on the fixed grid. Systems: identity; equireg with the
bundled model on CPU (and CUDA when present); models given with ``--model NAME=PATH`` (e.g. the
U-Net-only and AiR baselines); elastix (PyPI ``itk-elastix``, default affine + B-spline maps);
ANTs SyN (PyPI ``antspyx``); a SimpleITK pipeline (correlation, affine then B-spline);
ConvexAdam (PyPI ``convexadam``) and FireANTs (PyPI ``fireants``) on the CPU (``torch_peers``).
On 3-D cases equireg uses the bundled 3-D model (``auto``: ``generic3d``), the peers get CT in
HU clipped to air…soft tissue (``PEER_CT_WINDOW_HU``) and settings for a CT volume (see
``PEERS_3D``), and
a ``--model`` whose dimension differs from the case's is not run (said below the table).
``--cases`` picks other case folders (``make bench-cases`` builds ``.data/bench-cases``: brain
MR, multimodal MR, a second chest CT, a larger warp of the fundus photograph); ``--peers-only``
leaves out this project's rows. Prints one markdown table and writes
``docs/figures/bench_registration.png`` (or ``--figure``).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch_peers
from common import FIGURES, ROOT, fmt, machine, markdown_table, save_figure

from equireg.api import register
from equireg.cases import Case, find_cases, score
from equireg.cli import keep_freed_memory
from equireg.evaluate import folding_fraction, transform_field
from equireg.io import read_image
from equireg.models import read_card

# A system takes (fixed path, moving path, scratch folder) and returns fixed -> moving.
System = Callable[[Path, Path, Path], sitk.Transform]

# The peers' settings on 3-D cases (a chest CT of 128×128×34 voxels of 3×3×10 mm); 2-D cases
# keep each tool's defaults. elastix's default B-spline spacing (10 mm) is 200 pixels of the
# retina cases but 3 voxels of the CT: 15 mm is 5 voxels in plane (1.5 slices). ANTs SyN keeps
# its default iterations (40, 20, 0: at 1/4 and 1/2 resolution). SimpleITK samples 5 % of the
# voxels for its metric (all of them in 2-D): with all of them its B-spline stage takes minutes
# on the CT (10 %: about 1 min on one thread, 5 %: about 30 s, for much the same accuracy).
PEERS_3D = {"elastix_grid_mm": 15.0, "simpleitk_sampling": 0.05}
CT_AIR_HU = -900.0  # a fixed image this dark somewhere is taken for CT in HU (air is -1000)
PEER_CT_WINDOW_HU = (-1000.0, 0.0)  # air to soft tissue: lung3d's window, the peers' since 59ef6fc


def identity(fixed: Path, moving: Path, scratch: Path) -> sitk.Transform:
    return sitk.Transform(read_image(fixed).GetDimension(), sitk.sitkIdentity)


def equireg(fixed: Path, moving: Path, scratch: Path, model: str, device: str) -> sitk.Transform:
    return register(fixed, moving, model=model, device=device).transform


def peer_inputs(fixed: Path, moving: Path, scratch: Path) -> tuple[Path, Path]:
    """The files the peers register: the case's own, except for a CT volume (3-D, a fixed
    image reaching ``CT_AIR_HU`` or below), which the peers get clipped to
    ``PEER_CT_WINDOW_HU`` so that the -3024 HU outside the scanned field and bone do not drive
    them. Other images (MR, photographs, 2-D) are given as stored."""
    image = read_image(fixed)
    is_ct = float(sitk.GetArrayViewFromImage(image).min()) <= CT_AIR_HU
    if image.GetDimension() != 3 or not is_ct:
        return fixed, moving
    low, high = PEER_CT_WINDOW_HU
    clipped = []
    for role, path in (("fixed", fixed), ("moving", moving)):
        clipped.append(scratch / f"{role}_window.nrrd")
        image = sitk.Clamp(read_image(path), sitk.sitkFloat32, low, high)
        sitk.WriteImage(image, str(clipped[-1]), False)
    return clipped[0], clipped[1]


def elastix(fixed: Path, moving: Path, scratch: Path) -> sitk.Transform:
    """elastix's default affine then B-spline maps (in 3-D a 15 mm B-spline grid). Its transform
    maps fixed points to moving points (the resampling convention); transformix samples it as a
    displacement field on the fixed grid, which becomes a SimpleITK transform with the fixed
    image's geometry."""
    import itk

    reference = read_image(fixed)
    fixed, moving = peer_inputs(fixed, moving, scratch)
    fixed_image, moving_image = itk.imread(str(fixed), itk.F), itk.imread(str(moving), itk.F)
    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("affine"))
    if reference.GetDimension() == 3:
        bspline = parameters.GetDefaultParameterMap("bspline", 4, PEERS_3D["elastix_grid_mm"])
    else:
        bspline = parameters.GetDefaultParameterMap("bspline")
    parameters.AddParameterMap(bspline)
    _, result = itk.elastix_registration_method(
        fixed_image, moving_image, parameter_object=parameters, log_to_console=False
    )
    field = itk.transformix_deformation_field(moving_image, result, output_directory=str(scratch))
    image = sitk.GetImageFromArray(itk.array_from_image(field).astype(np.float64), isVector=True)
    image.CopyInformation(reference)
    return sitk.DisplacementFieldTransform(image)


def ants_syn(fixed: Path, moving: Path, scratch: Path) -> sitk.Transform:
    """ANTs SyN (with its default rigid + affine initialisation). Its forward transforms
    resample the moving image onto the fixed grid, so they map fixed points to moving points;
    antsApplyTransforms composes them into one displacement field on the fixed grid."""
    import ants

    fixed, moving = peer_inputs(fixed, moving, scratch)
    fixed_image, moving_image = ants.image_read(str(fixed)), ants.image_read(str(moving))
    result = ants.registration(
        fixed_image, moving_image, type_of_transform="SyN", outprefix=str(scratch / "ants_")
    )
    composed = ants.apply_transforms(
        fixed_image, moving_image, result["fwdtransforms"], compose=str(scratch / "ants_field_")
    )
    field = sitk.Cast(sitk.ReadImage(composed), sitk.sitkVectorFloat64)
    return sitk.DisplacementFieldTransform(field)


def _method(shrink: list[int], sampling: float | None) -> sitk.ImageRegistrationMethod:
    """Normalised correlation (the pairs are mono-modal), a multi-resolution pyramid, on a random
    ``sampling`` fraction of the voxels (``None``: all)."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsCorrelation()
    if sampling is not None:
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(sampling, seed=0)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel([s / 2 for s in shrink])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return method


def simpleitk(fixed: Path, moving: Path, scratch: Path) -> sitk.Transform:
    """A classical SimpleITK pipeline: affine (gradient descent, started from the images' centres
    of mass, which finds large shifts that the geometric centres miss), then a B-spline on an
    8-cell mesh (L-BFGS-B) after it. ``Execute`` optimises the transform that maps fixed points
    to moving ones, and the B-spline acts before the affine: ``T = A ∘ B``."""
    fixed, moving = peer_inputs(fixed, moving, scratch)
    fixed_image, moving_image = read_image(fixed), read_image(moving)
    dim = fixed_image.GetDimension()
    sampling = PEERS_3D["simpleitk_sampling"] if dim == 3 else None
    moments = sitk.CenteredTransformInitializerFilter.MOMENTS
    start = sitk.CenteredTransformInitializer(
        fixed_image, moving_image, sitk.AffineTransform(dim), moments
    )
    affine_method = _method([4, 2, 1], sampling)
    affine_method.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 200)
    affine_method.SetOptimizerScalesFromPhysicalShift()
    affine_method.SetInitialTransform(start, inPlace=False)
    affine = affine_method.Execute(fixed_image, moving_image)
    bspline = sitk.BSplineTransformInitializer(fixed_image, [8] * dim)
    bspline_method = _method([2, 1], sampling)
    bspline_method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=100)
    bspline_method.SetMovingInitialTransform(affine)
    bspline_method.SetInitialTransform(bspline, inPlace=True)
    bspline_method.Execute(fixed_image, moving_image)
    return sitk.CompositeTransform([affine, bspline])


def convexadam(fixed: Path, moving: Path, scratch: Path) -> sitk.Transform:
    """ConvexAdam with its defaults on the peers' inputs (see ``torch_peers.convexadam``)."""
    fixed, moving = peer_inputs(fixed, moving, scratch)
    return torch_peers.convexadam(read_image(fixed), read_image(moving))


def fireants(fixed: Path, moving: Path, scratch: Path) -> sitk.Transform:
    """FireANTs moments + affine + SyN on the peers' inputs (see ``torch_peers.fireants``)."""
    fixed, moving = peer_inputs(fixed, moving, scratch)
    return torch_peers.fireants(read_image(fixed), read_image(moving))


def systems(
    models: dict[str, str], only: set[str] | None, peers_only: bool = False
) -> dict[str, System]:
    """Every system this run compares, by the name its table rows carry (``peers_only``: the
    identity and the other tools, none of this project's)."""
    found: dict[str, System] = {"identity": identity}
    if not peers_only:
        found["equireg (cpu)"] = partial(equireg, model="auto", device="cpu")
        if torch.cuda.is_available():
            found["equireg (cuda)"] = partial(equireg, model="auto", device="cuda")
        for name, path in models.items():
            found[f"{name} (cpu)"] = partial(equireg, model=path, device="cpu")
    found |= {"elastix affine+B-spline": elastix, "ANTs SyN": ants_syn, "SimpleITK": simpleitk}
    found |= {"ConvexAdam": convexadam, "FireANTs SyN": fireants}
    return {k: v for k, v in found.items() if only is None or k.split(" ")[0] in only}


def run(system: System, case: Case) -> dict[str, float]:
    """Time one registration (wall clock, in this process) and score its transform."""
    scratch = Path(tempfile.mkdtemp(prefix="equireg-bench-"))
    try:
        start = time.perf_counter()
        transform = system(case.fixed, case.moving, scratch)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    fixed = read_image(case.fixed)
    field = transform_field(transform, fixed)
    folding = folding_fraction(field, fixed.GetSpacing(), fixed.GetDirection())
    return {**score(case, transform), "folding": folding, "seconds": seconds}


def model_dims(models: dict[str, str]) -> dict[str, int]:
    """The dimension of each ``--model`` system, by row name; the other systems run on every
    case (``auto`` picks the bundled model for the case's dimension)."""
    return {f"{name} (cpu)": read_card(path).dim for name, path in models.items()}


def warm_up(found: dict[str, System], cases: list[Case], dims: dict[str, int]) -> None:
    """One untimed run of the learnt systems on the first case of each dimension (first-call
    kernel set-up) and the imports of the peers in ``found`` (itk loads its modules lazily, for
    seconds), so that times are per registration; a run restricted by ``--systems`` needs only
    its own systems installed."""
    if "ANTs SyN" in found:
        import ants  # noqa: F401
    if "ConvexAdam" in found:
        import convexAdam.convex_adam_MIND  # noqa: F401
    if "elastix affine+B-spline" in found:
        import itk

        itk.ElastixRegistrationMethod  # noqa: B018 - forces itk's lazy load
    if "FireANTs SyN" in found:
        torch_peers._fireants_modules()
    firsts = {read_image(case.fixed).GetDimension(): case for case in reversed(cases)}
    for dim, case in sorted(firsts.items()):
        for name, system in found.items():
            if name.endswith(("(cpu)", "(cuda)")) and dims.get(name, dim) == dim:
                system(case.fixed, case.moving, Path(tempfile.gettempdir()))


def plot(rows: list[dict], path: Path) -> None:
    """Dice and mean TRE per system, plain vs shifted variant (means over the cases), one row of
    panels per anatomy (the first folder of the case name: ``retina``, ``lung``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    anatomies = list(dict.fromkeys(r["case"].split("/")[0] for r in rows))
    fig, grid = plt.subplots(len(anatomies), 3, figsize=(12, 3.6 * len(anatomies)), squeeze=False)
    width = 0.38
    titles = ("Dice (higher is better)", "mean TRE, mm (lower is better)", "time, s (log)")
    for anatomy, axes in zip(anatomies, grid, strict=True):
        chosen = [r for r in rows if r["case"].split("/")[0] == anatomy]
        names = list(dict.fromkeys(r["system"] for r in chosen))
        for offset, variant in enumerate(("plain", "shifted")):
            positions = np.arange(len(names)) + (offset - 0.5) * width
            for axis, key in zip(axes, ("dice", "tre_mean_mm", "seconds"), strict=True):
                values = [
                    np.mean(
                        [r[key] for r in chosen if r["system"] == n and r["variant"] == variant]
                    )
                    for n in names
                ]
                axis.bar(positions, values, width, label=variant)
        for axis, title in zip(axes, titles, strict=True):
            axis.set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=7)
            axis.set_title(f"{anatomy}: {title}" if len(anatomies) > 1 else title, fontsize=9)
        axes[2].set_yscale("log")
        axes[0].legend(fontsize=7)
    save_figure(fig, path)


def skipped_note(skipped: dict[str, list[str]], dims: dict[str, int]) -> str:
    """One line per ``--model`` system left out of some cases, and why (not silently)."""
    lines = [
        f"- {name}: not run on {', '.join(cases)}: a {dims[name]}-D model, and no model of "
        "those cases' dimension was given for it"
        for name, cases in skipped.items()
    ]
    return "\n".join(["Not in the table:", *lines]) if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--systems", help="comma-separated first words of system names to run")
    parser.add_argument("--cases", type=Path, default=ROOT / "Testing", help="a folder of cases")
    parser.add_argument("--peers-only", action="store_true", help="no equireg or --model rows")
    parser.add_argument("--figure", type=Path, default=FIGURES / "bench_registration.png")
    args = parser.parse_args()
    models = {} if args.peers_only else dict(item.split("=", 1) for item in args.model)
    only = set(args.systems.split(",")) if args.systems else None
    found = systems(models, only, args.peers_only)
    dims = model_dims(models)
    cases = find_cases(args.cases)
    if not cases:
        parser.error(f"no cases (folders holding fixed.nrrd) under {args.cases}")
    # The allocator setting the equireg command makes for itself; every system of this process
    # (peers included) runs under it.
    keep_freed_memory()
    print(f"Machine: {machine()}\n")
    warm_up(found, cases, dims)
    rows = []
    skipped: dict[str, list[str]] = {}
    for case in cases:
        dim = read_image(case.fixed).GetDimension()
        for name, system in found.items():
            if dims.get(name, dim) != dim:
                skipped.setdefault(name, []).append(case.name)
                continue
            try:
                result = run(system, case)
            except Exception as error:  # noqa: BLE001 - a failing peer is a table entry
                result = {"error": f"{type(error).__name__}: {str(error)[:80]}"}
            rows.append({"system": name, "case": case.name, "variant": case.variant, **result})
    headers = ["system", "case", "TRE mean (mm)", "TRE p90 (mm)", "Dice", "field error (mm)"]
    headers += ["folding (%)", "time (s)"]
    table = [
        [
            row["system"],
            row["case"],
            fmt(row.get("tre_mean_mm")),
            fmt(row.get("tre_p90_mm")),
            fmt(row.get("dice")),
            fmt(row.get("field_error_mean_mm")),
            fmt(100 * row["folding"], 2) if "folding" in row else row.get("error", "–"),
            fmt(row.get("seconds"), 1),
        ]
        for row in sorted(rows, key=lambda r: (r["case"], list(found).index(r["system"])))
    ]
    print(markdown_table(headers, table, 2))
    note = skipped_note(skipped, dims)
    if note:
        print(f"\n{note}")
    plot([r for r in rows if "dice" in r], args.figure)


if __name__ == "__main__":
    main()
