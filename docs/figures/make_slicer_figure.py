"""Draw docs/figures/slicer_results.png: what the Slicer module puts into the scene.

The demo's sample pair goes through the module's own Qt-free path (volume nodes exported by
storage nodes, ``equireg register`` in a background process, results imported into nodes),
and the figure shows the nodes' voxels. Needs the ``slicer-tests`` extra (PyPI slicer-core).
Run from the repository root: ``.venv/bin/python docs/figures/make_slicer_figure.py``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
from matplotlib.figure import Figure
from vtk.util.numpy_support import vtk_to_numpy

from equireg.demo import sample_pair

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "EquivariantRegistration"
sys.path.insert(0, str(MODULE_DIR))
from EquivariantRegistrationLib.engine import Options  # noqa: E402
from EquivariantRegistrationLib.mrml_bridge import Registration  # noqa: E402


def load(scene: slicer.vtkMRMLScene, image: sitk.Image, name: str, folder: Path):
    """A volume node read through a storage node, as Slicer loads a file."""
    path = folder / f"{name}.nrrd"
    sitk.WriteImage(image, str(path))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.ReadData(node)
    return node


def voxels(node) -> np.ndarray:
    image = node.GetImageData()
    values = vtk_to_numpy(image.GetPointData().GetScalars())
    components = image.GetNumberOfScalarComponents()
    return values.reshape(image.GetDimensions()[1::-1] + ((components,) if components > 1 else ()))


def main() -> None:
    fixed_image, moving_image, _ = sample_pair()
    scene = slicer.vtkMRMLScene()
    with tempfile.TemporaryDirectory() as folder:
        fixed = load(scene, fixed_image, "fixed", Path(folder))
        moving = load(scene, moving_image, "moving", Path(folder))
        run = Registration(
            fixed,
            moving,
            python=sys.executable,
            module_dir=MODULE_DIR,
            work_root=Path(folder),
            options=Options(device="cpu"),
        )
        run.start()
        outputs = run.wait()
    trained = outputs.report["model"]["trained"]

    fixed_values, warped = voxels(fixed), voxels(outputs.warped)
    rows, columns = (np.arange(n) // 32 for n in fixed_values.shape)
    tiles = np.add.outer(rows, columns) % 2 == 1
    panels = [
        ("fixed", fixed_values, "gray"),
        ("moving", voxels(moving), "gray"),
        ("warped (output volume)", warped, "gray"),
        ("checkerboard fixed / warped", np.where(tiles, fixed_values, warped), "gray"),
        (
            "|displacement| mm (output field)",
            np.linalg.norm(voxels(outputs.displacement), axis=-1),
            "magma",
        ),
    ]
    figure = Figure(figsize=(12.5, 2.9), dpi=80)
    for index, (title, values, colours) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        shown = axes.imshow(values, cmap=colours, origin="upper")
        axes.set_title(title, fontsize=10)
        axes.axis("off")
        if colours == "magma":
            figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.02)
    model = outputs.report["model"]["name"] + (
        "" if trained else " — UNTRAINED placeholder weights"
    )
    figure.suptitle(f"Equivariant Registration in Slicer's scene (model {model})", fontsize=11)
    figure.tight_layout()
    target = ROOT / "docs" / "figures" / "slicer_results.png"
    figure.savefig(target)
    print(f"{target} ({target.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
