"""Qt-free bridge between MRML nodes and the files of ``equireg register``.

Only MRML classes (``slicer.vtkMRML*``, present in Slicer and in PyPI ``slicer-core``), VTK,
numpy and the standard library: pytest covers all of it without the Slicer application.

Conventions. MRML works in RAS, the engine's files in LPS; storage nodes convert both ways.
``transform.h5`` maps fixed physical points to moving points (ITK's resampling direction),
which is what a Slicer transform node stores as its "from parent" transform, so reading the
file through a transform storage node needs no inversion: a moving node placed under the
result appears aligned with the fixed volume. ``displacement.nrrd`` holds LPS vectors and no
measurement frame, so Slicer would load them raw; the bridge turns them into RAS vectors marked
as spatial, as Slicer's own "Convert to displacement field" does, and Slicer's writer saves
them back as LPS (an ITK/ANTs field again).

Slicer 5.10 reads only 3-D ITK transforms; for a one-slice input (every 2-D image exported
from Slicer is one) the engine writes 3-D one-slice outputs, so every file here is 3-D.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy

from equireg.options import OUTPUT_FILES, bundled_model_names

from .engine import (
    EngineInputs,
    EngineProcess,
    Options,
    ProgressEvent,
    build_command,
    engine_environment,
)

# Slicer's roles for the inputs of a registration result ("spatialRegistrationFixed/Moving").
FIXED_VOLUME_ROLE = slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole()
MOVING_VOLUME_ROLE = slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole()
# A transform node attribute: its displacement grids are interpolated linearly. Slicer's
# transform reader sets cubic interpolation; ``restore_linear_interpolation`` re-applies
# linear after a scene is loaded.
INTERPOLATION_ATTRIBUTE = "EquivariantRegistration.Interpolation"
_AXIAL_TOLERANCE = 1e-6


class BridgeError(Exception):
    """A problem the user can act on; the message is one line."""


@dataclass
class Outputs:
    """The nodes one registration filled, and the engine's report (``report.json``)."""

    transform: Any  # vtkMRMLTransformNode (a grid transform node when created)
    displacement: Any  # vtkMRMLVectorVolumeNode: RAS vectors, spatial
    warped: Any  # vtkMRMLScalarVolumeNode
    report: dict[str, Any] = field(default_factory=dict)
    inverse_transform: Any | None = None  # moving → fixed, when the run asked for it


# --- geometry -----------------------------------------------------------------------------


def world_ijk_to_ras(node: Any) -> vtk.vtkMatrix4x4:
    """The volume's IJK → RAS matrix in world coordinates (a linear parent transform applied).

    The engine sees only the exported file, so the export must carry where the user sees the
    volume; a non-linear parent transform cannot be expressed in a file's geometry.
    """
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    parent = node.GetParentTransformNode()
    if parent is None:
        return matrix
    if not parent.IsTransformToWorldLinear():
        raise BridgeError(
            f"{node.GetName()}: is under a non-linear transform; harden the transform first"
        )
    to_world = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(to_world)
    world = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Multiply4x4(to_world, matrix, world)
    return world


def _columns(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])


def is_single_slice(node: Any) -> bool:
    """A 2-D image in Slicer: a volume one voxel thick (the engine then registers in 2-D)."""
    image = node.GetImageData()
    return image is not None and image.GetDimensions()[2] == 1


def _check_slice_is_axial(node: Any, matrix: vtk.vtkMatrix4x4) -> None:
    """The engine reads a single slice as 2-D by dropping z; that keeps the geometry only when
    the slice's rows and columns lie in an axial (x-y) plane."""
    in_plane = _columns(matrix)[:, :2]
    if np.any(np.abs(in_plane[2]) > _AXIAL_TOLERANCE * np.abs(in_plane).max()):
        raise BridgeError(
            f"{node.GetName()}: a single slice that is not axial; 2-D registration needs "
            "slices in the axial (x-y) plane"
        )


# --- export -------------------------------------------------------------------------------


def export_volume(node: Any, path: Path) -> Path:
    """Write ``node`` in world coordinates to ``path`` through a volume storage node.

    The user's node is not modified: a detached node shares its voxels and carries the world
    geometry (oblique directions and anisotropic spacing included; the file is LPS).
    """
    if node is None or node.GetImageData() is None:
        raise BridgeError(f"{node.GetName() if node else 'volume'}: has no image data")
    matrix = world_ijk_to_ras(node)
    if is_single_slice(node):
        _check_slice_is_axial(node, matrix)
    detached = node.NewInstance()
    detached.SetAndObserveImageData(node.GetImageData())
    detached.SetIJKToRASMatrix(matrix)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(False)  # a temporary file: speed over size
    if not storage.WriteData(detached):
        raise BridgeError(f"{node.GetName()}: cannot be written to {path}")
    return path


def export_inputs(
    folder: Path,
    fixed: Any,
    moving: Any,
    fixed_mask: Any | None = None,
    moving_mask: Any | None = None,
) -> EngineInputs:
    """Export the inputs of one run into ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    if fixed is None or moving is None:
        raise BridgeError("select both a fixed and a moving volume")

    def optional(node: Any | None, name: str) -> Path | None:
        return None if node is None else export_volume(node, folder / name)

    return EngineInputs(
        fixed=export_volume(fixed, folder / "fixed.nrrd"),
        moving=export_volume(moving, folder / "moving.nrrd"),
        fixed_mask=optional(fixed_mask, "fixed_mask.nrrd"),
        moving_mask=optional(moving_mask, "moving_mask.nrrd"),
    )


# --- import -------------------------------------------------------------------------------


def _read_transform(path: Path) -> Any:
    node = slicer.vtkMRMLTransformNode()
    storage = slicer.vtkMRMLTransformStorageNode()
    storage.SetFileName(str(path))
    if not path.is_file() or not storage.ReadData(node) or node.GetTransformFromParent() is None:
        raise BridgeError(f"{path}: cannot be read as a transform")
    return node


def _read_volume(path: Path, node_class: type) -> Any:
    node = node_class()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not path.is_file() or not storage.ReadData(node) or node.GetImageData() is None:
        raise BridgeError(f"{path}: cannot be read as a volume")
    return node


def _use_linear_interpolation(transform: vtk.vtkAbstractTransform) -> None:
    """Slicer interpolates displacement grids cubically; ITK, elastix, ANTs and the engine's
    own warped.nrrd interpolate linearly. Linear keeps Slicer's view identical to the files."""
    if hasattr(transform, "SetInterpolationModeToLinear"):
        transform.SetInterpolationModeToLinear()
    if transform.IsA("vtkGeneralTransform"):
        for index in range(transform.GetNumberOfConcatenatedTransforms()):
            _use_linear_interpolation(transform.GetConcatenatedTransform(index))


def restore_linear_interpolation(scene: Any) -> int:
    """Interpolate linearly in every transform node this module filled (they carry
    ``INTERPOLATION_ATTRIBUTE``), e.g. after a saved scene was loaded: Slicer's transform
    reader sets cubic interpolation. Returns the number of nodes changed."""
    nodes = scene.GetNodesByClass("vtkMRMLTransformNode")
    changed = 0
    for index in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(index)
        if node.GetAttribute(INTERPOLATION_ATTRIBUTE) == "linear":
            transform = node.GetTransformFromParent()
            if transform is not None:
                _use_linear_interpolation(transform)
                changed += 1
    return changed


def _new_node(scene: Any, class_name: str, name: str) -> Any:
    return scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))


def _fill_volume(target: Any, source: Any) -> None:
    matrix = vtk.vtkMatrix4x4()
    source.GetIJKToRASMatrix(matrix)
    target.SetAndObserveImageData(source.GetImageData())
    target.SetIJKToRASMatrix(matrix)
    target.CreateDefaultDisplayNodes()


def _ras_vectors(field: Any) -> vtk.vtkImageData:
    """The LPS displacement vectors of a volume read from ``displacement.nrrd`` (read raw,
    since the file has no measurement frame) as RAS vectors."""
    image = field.GetImageData()
    lps = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(-1, 3)
    ras = lps * np.array([-1, -1, 1], dtype=lps.dtype)
    converted = vtk.vtkImageData()
    converted.SetDimensions(image.GetDimensions())
    vectors = numpy_to_vtk(ras, deep=True)
    vectors.SetName("displacement")
    converted.GetPointData().SetScalars(vectors)
    return converted


def import_results(
    output_dir: Path,
    fixed: Any,
    moving: Any,
    transform: Any | None = None,
    displacement: Any | None = None,
    warped: Any | None = None,
    inverse_transform: Any | None = None,
) -> Outputs:
    """Load the engine's outputs into the given nodes (new nodes where ``None``).

    Every file is read into detached nodes first: when one is missing or unreadable a
    ``BridgeError`` is raised and the scene is left as it was. The transform node records the
    fixed and moving volumes under Slicer's registration roles (``spatialRegistrationFixed``,
    ``spatialRegistrationMoving``). ``inverse_transform.h5`` (moving → fixed), when the engine
    wrote one, fills ``inverse_transform`` with the roles swapped.
    """
    loaded_field = _read_volume(
        output_dir / OUTPUT_FILES["displacement"], slicer.vtkMRMLVectorVolumeNode
    )
    loaded_warped = _read_volume(
        output_dir / OUTPUT_FILES["warped"], slicer.vtkMRMLScalarVolumeNode
    )
    loaded_transform = _read_transform(output_dir / OUTPUT_FILES["transform"])
    inverse_file = output_dir / OUTPUT_FILES["inverse_transform"]
    loaded_inverse = _read_transform(inverse_file) if inverse_file.is_file() else None
    try:
        report = json.loads((output_dir / OUTPUT_FILES["report"]).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise BridgeError(f"{output_dir / OUTPUT_FILES['report']}: cannot be read") from None

    loaded_field.SetAndObserveImageData(_ras_vectors(loaded_field))

    # Nothing above changed the scene; from here on nothing can fail.
    scene = fixed.GetScene()
    base = f"{moving.GetName()} to {fixed.GetName()}"
    if transform is None:
        transform = _new_node(scene, "vtkMRMLGridTransformNode", f"{base} transform")
    if displacement is None:
        displacement = _new_node(scene, "vtkMRMLVectorVolumeNode", f"{base} displacement")
    if warped is None:
        warped = _new_node(scene, "vtkMRMLScalarVolumeNode", f"{moving.GetName()} warped")
    if loaded_inverse is not None and inverse_transform is None:
        name = f"{fixed.GetName()} to {moving.GetName()} inverse transform"
        inverse_transform = _new_node(scene, "vtkMRMLGridTransformNode", name)

    _fill_volume(warped, loaded_warped)
    _fill_volume(displacement, loaded_field)
    displacement.SetVoxelVectorType(slicer.vtkMRMLVolumeNode.VoxelVectorTypeSpatial)
    _set_result(transform, loaded_transform.GetTransformFromParent(), fixed, moving)
    if loaded_inverse is not None:
        _set_result(inverse_transform, loaded_inverse.GetTransformFromParent(), moving, fixed)
    return Outputs(transform, displacement, warped, report, inverse_transform)


def _set_result(node: Any, transform: vtk.vtkAbstractTransform, fixed: Any, moving: Any) -> None:
    """``node`` holds ``transform`` (fixed → moving, linear interpolation) and its inputs."""
    _use_linear_interpolation(transform)
    node.SetAndObserveTransformFromParent(transform)
    node.SetAttribute(INTERPOLATION_ATTRIBUTE, "linear")
    node.SetNodeReferenceID(FIXED_VOLUME_ROLE, fixed.GetID())
    node.SetNodeReferenceID(MOVING_VOLUME_ROLE, moving.GetID())


# --- landmarks ----------------------------------------------------------------------------


def read_landmarks(path: Path) -> np.ndarray:
    """Points of a landmark CSV (header ``x,y`` or ``x,y,z``; LPS mm), shape ``(n, dim)``.

    Row i of the fixed file and row i of the moving file are the same anatomical point.
    """
    with open(path, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    if not rows:
        raise BridgeError(f"{path}: no landmarks")
    axes = [axis for axis in ("x", "y", "z") if axis in rows[0]]
    return np.array([[float(row[axis]) for axis in axes] for row in rows])


def lps_to_ras(points: np.ndarray, z: float = 0.0) -> np.ndarray:
    """``(n, 2|3)`` LPS points as ``(n, 3)`` RAS points; 2-D points are placed at height ``z``."""
    points = np.asarray(points, dtype=float)
    if points.shape[1] == 2:
        points = np.column_stack([points, np.full(len(points), z)])
    return points * np.array([-1.0, -1.0, 1.0])


def landmark_errors(
    transform: Any, fixed_points: np.ndarray, moving_points: np.ndarray, z: float = 0.0
) -> np.ndarray:
    """Target registration errors (mm): ``|T(fixed_i) − moving_i|`` with T the transform
    node's fixed → moving ("from parent") transform; points in LPS, 2-D ones at height ``z``."""
    mapping = transform.GetTransformFromParent()
    fixed_ras, moving_ras = lps_to_ras(fixed_points, z), lps_to_ras(moving_points, z)
    mapped = np.array([mapping.TransformPoint(point.tolist()) for point in fixed_ras])
    return np.linalg.norm(mapped - moving_ras, axis=1)


# --- files of a run -----------------------------------------------------------------------


def bundled_models(module_dir: Path) -> list[str]:
    """``auto`` and the names of the models shipped in ``equireg/models`` (a card per model)."""
    return ["auto", *bundled_model_names(module_dir / "equireg" / "models")]


def find_regression_case(module_dir: Path, name: str) -> Path | None:
    """The folder of a regression case (``name`` like ``retina/photo``; it holds
    ``fixed.nrrd``, ``moving.nrrd``, landmarks): installed beside the module as sample data,
    or ``Testing/`` in a source checkout."""
    for folder in (
        module_dir / "Resources" / "SampleData" / name,
        module_dir.parent / "Testing" / name,
    ):
        if (folder / "fixed.nrrd").is_file() and (folder / "moving.nrrd").is_file():
            return folder
    return None


def selftest_threshold(case: Path) -> float | None:
    """The in-Slicer self-test's limit on the mean landmark error (mm) for ``case``: key
    ``"slicer_selftest": {"max_mean_tre_mm": ...}`` of ``expected.json`` in the case folder or
    its anatomy folder. ``None`` while absent (untrained models: only the outputs are checked).
    """
    for expected in (case / "expected.json", case.parent / "expected.json"):
        if expected.is_file():
            limits = json.loads(expected.read_text(encoding="utf-8")).get("slicer_selftest")
            return None if limits is None else float(limits["max_mean_tre_mm"])
    return None


def sample_data_sources(
    module_dir: Path, cases: dict[str, str], thumbnail: Path
) -> list[dict[str, Any]]:
    """Keyword arguments of ``SampleData.SampleDataLogic.registerCustomSampleDataSource``
    (Slicer 5.10-5.12 signature), one set per installed regression case: fixed, moving, and
    the moving image shifted far inside its field of view. ``cases`` maps a case (``retina/
    photo``) to the name shown in the Sample Data module."""
    sources = []
    for name, shown in cases.items():
        case = find_regression_case(module_dir, name)
        if case is None:
            continue
        files = [case / f"{stem}.nrrd" for stem in ("fixed", "moving", "moving_shifted")]
        label = name.replace("/", " ")
        sources.append(
            {
                "category": "Equivariant Registration",
                "sampleName": shown,  # also the button's text (no separate description)
                "thumbnailFileName": str(thumbnail),
                "uris": [path.as_uri() for path in files],
                "fileNames": [
                    f"EquivariantRegistration-{label.replace(' ', '-')}-{p.name}" for p in files
                ],
                "nodeNames": [f"{label} {path.stem.replace('_', ' ')}" for path in files],
                "checksums": [
                    f"SHA256:{hashlib.sha256(path.read_bytes()).hexdigest()}" for path in files
                ],
            }
        )
    return sources


def new_work_folder(root: Path) -> Path:
    """A fresh, timestamped folder for one run, inside ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.mkdtemp(prefix=f"EquivariantRegistration-{stamp}-", dir=root))


class Registration:
    """One run: export the inputs, run the engine in the background, import the results.

    ``start`` returns at once; call ``poll`` (from a timer) until ``finished`` and then
    ``finish``, or call ``wait`` to block. The work folder is removed at the end unless
    ``keep_files`` (and always on ``cancel``); a failed or cancelled run leaves the scene as
    it was.
    """

    def __init__(
        self,
        fixed: Any,
        moving: Any,
        *,
        python: str,
        module_dir: Path,
        work_root: Path,
        options: Options | None = None,
        fixed_mask: Any | None = None,
        moving_mask: Any | None = None,
        transform: Any | None = None,
        displacement: Any | None = None,
        warped: Any | None = None,
        inverse_transform: Any | None = None,
        keep_files: bool = False,
    ):
        self.fixed, self.moving = fixed, moving
        self.fixed_mask, self.moving_mask = fixed_mask, moving_mask
        self.targets = (transform, displacement, warped, inverse_transform)
        self.python, self.module_dir, self.work_root = python, module_dir, work_root
        self.options, self.keep_files = options or Options(), keep_files
        self.folder: Path | None = None
        self.command: list[str] = []
        self.process: EngineProcess | None = None

    def start(self) -> None:
        """Export the inputs into a new work folder and launch the engine."""
        self.folder = new_work_folder(self.work_root)
        try:
            inputs = export_inputs(
                self.folder / "inputs", self.fixed, self.moving, self.fixed_mask, self.moving_mask
            )
            self.command = build_command(self.python, inputs, self.folder / "output", self.options)
            # Running from the module folder finds ``equireg`` even if a launcher resets
            # PYTHONPATH (``python -m`` looks in the working directory first).
            self.process = EngineProcess(
                self.command, engine_environment(self.module_dir), cwd=self.module_dir
            )
        except Exception:
            self._remove_folder()
            raise

    def poll(self) -> list[ProgressEvent]:
        """Engine output that arrived since the last call; never blocks."""
        return self.process.poll() if self.process else []

    @property
    def finished(self) -> bool:
        return self.process is not None and self.process.finished

    def finish(self) -> Outputs:
        """Import the results of a finished run; ``BridgeError`` carries the engine's error."""
        try:
            if self.process is None or self.process.returncode != 0:
                raise BridgeError(
                    self.process.error_message() if self.process else "the run was not started"
                )
            return import_results(self.folder / "output", self.fixed, self.moving, *self.targets)
        finally:
            if not self.keep_files:
                self._remove_folder()

    def cancel(self) -> None:
        """Kill the engine and remove the work folder."""
        if self.process is not None:
            self.process.kill()
        self._remove_folder()

    def wait(
        self, on_event: Callable[[ProgressEvent], None] | None = None, interval: float = 0.1
    ) -> Outputs:
        """Block until the engine ends, passing each event to ``on_event``; then ``finish``."""
        while True:
            for event in self.poll():
                if on_event is not None:
                    on_event(event)
            if self.finished:
                return self.finish()
            time.sleep(interval)

    def _remove_folder(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
