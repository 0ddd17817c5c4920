"""Check each peer's transform convention on a known translation: ``python
benchmarks/peer_conventions.py [--systems elastix,ConvexAdam,...]``.

For a 2-D and a 3-D image of smooth random structure (anisotropic spacing, flipped axes and an
origin away from zero, as stored scans have), the moving image is the fixed content moved by
``t`` mm: ``moving(y) = fixed(y − t)``, so every fixed point ``x`` is found at ``x + t`` in the
moving image. Each peer of ``registration.py`` registers the pair and the mean of ``T(x) − x``
over the inner half of the fixed grid must come out as ``+t`` (fixed → moving physical points,
the convention ``equireg.cases.score`` expects); a peer whose glue flipped an axis, swapped
x and z or returned the inverse shows ``-t`` or a permutation. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from common import fmt, markdown_table
from registration import systems
from scipy import ndimage

from equireg.evaluate import transform_field

CASES = {
    2: {"size": (96, 80), "spacing": (1.0, 1.25), "shift": (4.0, -3.0)},
    3: {"size": (64, 56, 40), "spacing": (2.0, 2.0, 3.0), "shift": (4.0, -3.0, 6.0)},
}


def pair(folder: Path, dim: int) -> tuple[Path, Path, np.ndarray]:
    """Write a fixed image and the same content moved by the case's shift; return both paths
    and the shift (mm)."""
    case = CASES[dim]
    rng = np.random.default_rng(dim)
    noise = rng.normal(size=case["size"][::-1])
    blobs = sitk.GetImageFromArray(np.abs(ndimage.gaussian_filter(noise, 3.0)).astype(np.float32))
    blobs.SetSpacing(case["spacing"])
    blobs.SetOrigin([17.0, -40.0, 25.0][:dim])
    direction = np.diag([-1.0, -1.0, 1.0][:dim])  # a scan stored RAS-first, seen in LPS
    blobs.SetDirection(direction.ravel().tolist())
    shift = np.array(case["shift"])
    moved = sitk.Resample(blobs, blobs, sitk.TranslationTransform(dim, (-shift).tolist()))
    paths = folder / f"fixed{dim}.nrrd", folder / f"moving{dim}.nrrd"
    for path, image in zip(paths, (blobs, moved), strict=True):
        sitk.WriteImage(sitk.RescaleIntensity(image, 0, 100), str(path))
    return paths[0], paths[1], shift


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default="elastix,ANTs,SimpleITK,ConvexAdam,FireANTs")
    args = parser.parse_args()
    chosen = systems({}, set(args.systems.split(",")))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for dim in (2, 3):
            fixed, moving, shift = pair(Path(folder), dim)
            reference = sitk.ReadImage(str(fixed))
            inner = tuple(slice(n // 4, n - n // 4) for n in reference.GetSize()[::-1])
            for name, system in chosen.items():
                with tempfile.TemporaryDirectory() as scratch:
                    transform = system(fixed, moving, Path(scratch))
                field = transform_field(transform, reference)[inner].reshape(-1, dim)
                found = field.mean(axis=0)
                error = np.linalg.norm(field - shift, axis=-1).mean()
                rows.append(
                    [
                        name,
                        f"{dim}-D",
                        ", ".join(fmt(v, 1) for v in shift),
                        ", ".join(fmt(v, 2) for v in found),
                        fmt(error, 2),
                    ]
                )
    headers = ["system", "pair", "true t (mm)", "mean T(x) − x (mm)", "mean error (mm)"]
    print(markdown_table(headers, rows, 2))


if __name__ == "__main__":
    main()
