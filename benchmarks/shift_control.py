"""Shifted variants against a control with the same content: is the gap the shift, or the cut?

    .venv/bin/python benchmarks/shift_control.py [--cases DIR ...]

A shifted variant's moving image is the plain one with its content moved by whole voxels
inside the same grid: what is moved out of the grid is lost, and the space it leaves is
filled with the background. So the shifted variant differs from its plain twin by the shift
*and* by the lost content (cut edges inside the grid that no mask marks). This script builds,
for every case whose shifted moving image is its plain one rolled by whole voxels, a
*control*: the plain moving image with exactly the content the shifted one lost replaced by
the same background, unshifted. The promise of the equivariant design is about the shift
alone, so the shifted variant is compared with the control (same content), and both with the
plain twin. Each is registered by ``register`` with its defaults (one thread) and scored by
``equireg.cases.score`` (landmark TRE mean, mm). Cases whose shift is not whole voxels are
listed as skipped. Prints one markdown table with the machine line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from common import ROOT, commit, fmt, machine, markdown_table

from equireg.api import register
from equireg.cases import Case, find_cases, score


def whole_voxel_shift(
    plain: np.ndarray, shifted: np.ndarray, offset_mm: np.ndarray, image: sitk.Image
) -> np.ndarray | None:
    """The index offset ``d`` (array axis order) with ``shifted[i] = plain[i − d]`` wherever
    both are inside the grid, from the truth's translation ``offset_mm`` (LPS mm) of either
    sign; ``None`` when neither is a whole-voxel roll of the image."""
    matrix = np.asarray(image.GetDirection()).reshape(image.GetDimension(), -1)
    index = np.linalg.solve(matrix * np.asarray(image.GetSpacing()), offset_mm)[::-1]
    for sign in (1, -1):
        d = np.round(sign * index).astype(int)
        if np.any(np.abs(sign * index - d) > 1e-3) or np.any(np.abs(d) >= plain.shape):
            continue
        inner = tuple(slice(max(k, 0), n + min(k, 0)) for k, n in zip(d, plain.shape, strict=True))
        source = tuple(
            slice(max(-k, 0), n - max(k, 0)) for k, n in zip(d, plain.shape, strict=True)
        )
        if np.array_equal(shifted[inner], plain[source]):
            return d
    return None


def truth_translation(case: Case) -> np.ndarray | None:
    """The translation (mm) that the shifted truth adds to the plain one, if it holds one."""
    truth = case.truth()
    parts = [truth.GetNthTransform(k) for k in range(truth.GetNumberOfTransforms())]
    for part in parts:
        if part.GetTransformEnum() == sitk.sitkTranslation:
            return np.asarray(sitk.TranslationTransform(part).GetOffset())
    return None


def control_image(plain_image: sitk.Image, d: np.ndarray) -> sitk.Image:
    """The plain moving image with the content a roll by ``d`` moves out of the grid replaced
    by its minimum (the background the shifted variant is padded with)."""
    plain = sitk.GetArrayFromImage(plain_image)
    keep = np.zeros(plain.shape, bool)
    keep[tuple(slice(max(-k, 0), n - max(k, 0)) for k, n in zip(d, plain.shape, strict=True))] = 1
    control = sitk.GetImageFromArray(np.where(keep, plain, plain.min()).astype(plain.dtype))
    control.CopyInformation(plain_image)
    return control


def tre(case: Case, moving: sitk.Image | Path) -> float:
    result = register(str(case.fixed), moving if isinstance(moving, sitk.Image) else str(moving))
    return score(case, result.transform)["tre_mean_mm"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=Path, action="append")
    args = parser.parse_args()
    torch.set_num_threads(1)
    folders = args.cases or [ROOT / "Testing", ROOT / ".data" / "bench-cases"]
    cases = [case for folder in folders if folder.is_dir() for case in find_cases(folder)]
    rows, skipped = [], []
    for shifted_case in (case for case in cases if case.variant == "shifted"):
        plain_case = Case(shifted_case.folder, "plain")
        plain_image = sitk.ReadImage(str(plain_case.moving))
        shifted = sitk.GetArrayFromImage(sitk.ReadImage(str(shifted_case.moving)))
        offset = truth_translation(shifted_case)
        d = None
        if offset is not None:
            d = whole_voxel_shift(sitk.GetArrayFromImage(plain_image), shifted, offset, plain_image)
        name = shifted_case.name.rsplit("/", 1)[0]
        if d is None:
            skipped.append(name)
            continue
        plain = tre(plain_case, plain_case.moving)
        control = tre(plain_case, control_image(plain_image, d))
        moved = tre(shifted_case, shifted_case.moving)
        kept = np.prod([n - abs(k) for k, n in zip(d, shifted.shape, strict=True)])
        lost = 1 - kept / shifted.size
        rows.append(
            [
                name,
                " × ".join(str(int(k)) for k in d[::-1]),
                f"{100 * lost:.0f} %",
                fmt(plain),
                fmt(control),
                fmt(moved),
                f"{100 * (moved / control - 1):+.0f} %",
                f"{100 * (moved / plain - 1):+.0f} %",
            ]
        )
        print(rows[-1], flush=True)
    print(f"\n- Machine: {machine()}\n- Commit: {commit()}\n")
    headers = [
        "case",
        "shift (voxels, x × y [× z])",
        "grid lost",
        "plain TRE (mm)",
        "control: plain cut like shifted",
        "shifted",
        "shifted vs control",
        "shifted vs plain",
    ]
    print(markdown_table(headers, rows, right=3))
    if skipped:
        print(f"\nSkipped (shift not whole voxels): {', '.join(skipped)}")


if __name__ == "__main__":
    main()
