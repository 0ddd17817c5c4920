"""The MRML bridge in a real MRML scene (PyPI slicer-core): export, command line, import, and
the RAS/LPS and transform-direction conventions with a translation whose truth we control."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk
from slicer_support import (
    LPS_TO_RAS,
    MODULE_DIR,
    assert_readable_by_slicer_5_10,
    blobs_at,
    engine,
    ijk_to_ras,
    mrml_bridge,
    node_array,
    node_matrix,
    numpy_to_matrix,
    sample,
    transform_points,
    volume_node,
    voxel_centres_ras,
)

from equireg.cli import build_parser
from equireg.io import read_image
from equireg.options import BY_NAME, RUN_OPTIONS

SHIFT_LPS = np.array([3.2, -2.1, 1.7])  # the known translation: fixed point x ↦ moving x + t


def rotation(angle: float, tilt: float = 0.0) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    about_z = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    ct, st = math.cos(tilt), math.sin(tilt)
    return about_z @ np.array([[1, 0, 0], [0, ct, -st], [0, st, ct]])


@pytest.fixture
def scene() -> slicer.vtkMRMLScene:
    return slicer.vtkMRMLScene()


def oblique_node(scene, name, shape=(16, 20, 24), spacing=(0.7, 1.3, 2.1), angle=0.4, tilt=0.3):
    """A volume with oblique direction and anisotropic spacing, values = blobs in LPS space."""
    matrix = ijk_to_ras(spacing, (-12.5, 40.0, 7.25), rotation(angle, tilt))
    node = volume_node(scene, np.zeros(shape, np.float32), matrix, name)
    lps = voxel_centres_ras(node) @ LPS_TO_RAS
    node_array(node)[...] = blobs_at(lps, lps.mean(axis=0)).reshape(shape)
    node.GetImageData().Modified()
    return node


# --- export -------------------------------------------------------------------------------


def test_export_keeps_oblique_anisotropic_geometry_in_lps(scene, tmp_path: Path) -> None:
    node = oblique_node(scene, "oblique")
    path = mrml_bridge.export_volume(node, tmp_path / "oblique.nrrd")
    image = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), node_array(node))
    matrix = node_matrix(node)
    for ijk in [(0, 0, 0), (23, 0, 5), (7, 19, 15)]:
        ras = (matrix @ [*ijk, 1])[:3]
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(ijk), LPS_TO_RAS @ ras)


def test_export_writes_world_coordinates_under_a_linear_transform(scene, tmp_path: Path) -> None:
    node = oblique_node(scene, "moved")
    parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    to_parent = np.eye(4)
    to_parent[:3, :3] = rotation(0.2)
    to_parent[:3, 3] = [5.0, -3.0, 2.0]
    parent.SetMatrixTransformToParent(numpy_to_matrix(to_parent))
    node.SetAndObserveTransformNodeID(parent.GetID())
    image = sitk.ReadImage(str(mrml_bridge.export_volume(node, tmp_path / "world.nrrd")))
    world = to_parent @ node_matrix(node)
    np.testing.assert_allclose(
        image.TransformIndexToPhysicalPoint((3, 4, 5)), LPS_TO_RAS @ (world @ [3, 4, 5, 1])[:3]
    )
    np.testing.assert_array_equal(node_matrix(node)[:3, 3], [-12.5, 40.0, 7.25])  # untouched


def test_export_refuses_a_volume_under_a_non_linear_transform(scene, tmp_path: Path) -> None:
    node = oblique_node(scene, "warped by a grid")
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(mrml_bridge.BridgeError, match="non-linear transform"):
        mrml_bridge.export_volume(node, tmp_path / "x.nrrd")


def test_single_axial_slice_reaches_the_engine_as_2d_with_its_geometry(
    scene, tmp_path: Path
) -> None:
    matrix = ijk_to_ras((0.4, 0.9, 3.0), (5.0, -7.0, 12.0), rotation(0.5))
    node = volume_node(scene, np.arange(30 * 20, dtype=np.float32).reshape(20, 30), matrix, "2d")
    image = read_image(mrml_bridge.export_volume(node, tmp_path / "slice.nrrd"))
    assert image.GetDimension() == 2 and image.GetSize() == (30, 20)
    ras = (matrix @ [4, 6, 0, 1])[:3]
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((4, 6)), (-ras[0], -ras[1]))


def test_tilted_single_slice_is_refused(scene, tmp_path: Path) -> None:
    matrix = ijk_to_ras((1.0, 1.0, 1.0), (0, 0, 0), rotation(0.2, tilt=0.4))
    node = volume_node(scene, np.ones((10, 12), np.float32), matrix, "tilted")
    with pytest.raises(mrml_bridge.BridgeError, match="not axial"):
        mrml_bridge.export_volume(node, tmp_path / "x.nrrd")


def test_export_inputs_writes_masks_only_when_given(scene, tmp_path: Path) -> None:
    fixed, moving = oblique_node(scene, "f"), oblique_node(scene, "m")
    mask = volume_node(
        scene,
        (node_array(fixed) > 50).astype(np.uint8),
        node_matrix(fixed),
        "mask",
        "vtkMRMLLabelMapVolumeNode",
    )
    inputs = mrml_bridge.export_inputs(tmp_path, fixed, moving, fixed_mask=mask)
    assert inputs.moving_mask is None
    written = sitk.ReadImage(str(inputs.fixed_mask))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), node_array(mask))
    assert {p.name for p in tmp_path.iterdir()} == {"fixed.nrrd", "moving.nrrd", "fixed_mask.nrrd"}


# --- command line -------------------------------------------------------------------------


def test_command_is_accepted_by_the_engine_parser(tmp_path: Path) -> None:
    inputs = engine.EngineInputs(
        tmp_path / "f.nrrd", tmp_path / "m.nrrd", tmp_path / "fm.nrrd", tmp_path / "mm.nrrd"
    )
    options = engine.Options(model="retina2d", device="cpu", refine_steps=25)
    command = engine.build_command("PythonSlicer", inputs, tmp_path / "out", options)
    assert command[:4] == ["PythonSlicer", "-m", "equireg", "register"]
    args = build_parser().parse_args(command[3:])
    assert (args.fixed, args.moving) == (str(inputs.fixed), str(inputs.moving))
    assert (args.fixed_mask, args.moving_mask) == (str(inputs.fixed_mask), str(inputs.moving_mask))
    assert (args.model, args.device, args.refine_steps) == ("retina2d", "cpu", 25)
    assert (args.initial, args.progress, args.output_dir) == (
        BY_NAME["initial"].default,
        "json",
        str(tmp_path / "out"),
    )


def test_every_run_option_reaches_the_engine_parser(tmp_path: Path) -> None:
    """``Options`` and ``build_command`` come from ``equireg.options.RUN_OPTIONS``: each option,
    set to a value other than its default, arrives in the engine's parsed arguments."""
    inputs = engine.EngineInputs(tmp_path / "f.nrrd", tmp_path / "m.nrrd")
    assert [f.name for f in dataclasses.fields(engine.Options)] == [o.name for o in RUN_OPTIONS]
    assert engine.Options() == engine.Options(**{o.name: o.default for o in RUN_OPTIONS})
    chosen = {}
    for option in RUN_OPTIONS:
        if option.flag_only:
            chosen[option.name] = True
        elif option.choices:
            chosen[option.name] = next(c for c in option.choices if c != option.default)
        else:
            chosen[option.name] = {"model": "retina2d", "device": "cpu"}.get(option.name, 7)
    command = engine.build_command("py", inputs, tmp_path, engine.Options(**chosen))
    args = build_parser().parse_args(command[3:])
    assert {name: getattr(args, name) for name in chosen} == chosen
    defaults = build_parser().parse_args(
        engine.build_command("py", inputs, tmp_path, engine.Options())[3:]
    )
    assert {o.name: getattr(defaults, o.name) for o in RUN_OPTIONS} == {
        o.name: o.default for o in RUN_OPTIONS
    }


def test_model_default_refinement_leaves_the_option_to_the_engine(tmp_path: Path) -> None:
    inputs = engine.EngineInputs(tmp_path / "f.nrrd", tmp_path / "m.nrrd")
    command = engine.build_command("PythonSlicer", inputs, tmp_path / "out", engine.Options())
    assert "--refine-steps" not in command
    assert build_parser().parse_args(command[3:]).refine_steps is None


def test_every_initial_alignment_the_panel_offers_is_accepted(tmp_path: Path) -> None:
    inputs = engine.EngineInputs(tmp_path / "f.nrrd", tmp_path / "m.nrrd")
    for initial in engine.INITIAL_ALIGNMENTS:
        command = engine.build_command("py", inputs, tmp_path, engine.Options(initial=initial))
        assert "--fixed-mask" not in command and "--moving-mask" not in command
        assert build_parser().parse_args(command[3:]).initial == initial


def test_engine_environment_puts_the_module_folder_first() -> None:
    env = engine.engine_environment(MODULE_DIR, {"PYTHONPATH": "/elsewhere", "HOME": "/h"})
    assert env["PYTHONPATH"] == os.pathsep.join([str(MODULE_DIR), "/elsewhere"])
    assert env["HOME"] == "/h" and env["PYTHONIOENCODING"] == "utf-8"


def test_progress_lines_are_parsed() -> None:
    line = json.dumps({"stage": "network", "progress": 0.25, "message": "running"})
    assert engine.parse_line(line, "stdout") == engine.ProgressEvent("network", 0.25, "running")
    done = engine.parse_line('{"stage": "done", "progress": 1.0, "outputs": {"a": "b"}}', "stdout")
    assert done.stage == "done" and done.outputs == {"a": "b"}
    assert engine.parse_line("plain text", "stdout").stage == "log"
    assert engine.parse_line("equireg: error: x", "stderr").stage == "stderr"


def test_bundled_models_lists_auto_and_every_card() -> None:
    names = mrml_bridge.bundled_models(MODULE_DIR)
    assert names[0] == "auto" and {"retina2d", "lung3d"} <= set(names)


# --- import and the conventions (a translation whose truth we control) ---------------------


def write_outputs(folder: Path, fixed: sitk.Image, moving: sitk.Image, transform) -> Path:
    """An output folder as the engine writes it, for ``transform`` (fixed → moving, LPS)."""
    folder.mkdir(parents=True, exist_ok=True)
    field = sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(),
        fixed.GetSpacing(), fixed.GetDirection(),
    )  # fmt: skip
    sitk.WriteTransform(transform, str(folder / "transform.h5"))
    sitk.WriteImage(field, str(folder / "displacement.nrrd"))
    sitk.WriteImage(sitk.Resample(moving, fixed, transform), str(folder / "warped.nrrd"))
    (folder / "report.json").write_text(json.dumps({"model": {"name": "known shift"}}))
    return folder


def shift_transform(kind: str, shift: np.ndarray, reference: sitk.Image) -> sitk.Transform:
    """The translation x ↦ x + shift as an ITK transform of the given kind: ``translation``,
    ``field`` (the engine's form) or ``composite`` (a linear stage then a field)."""
    if kind == "translation":
        return sitk.TranslationTransform(len(shift), shift.tolist())
    if kind == "composite":
        linear = sitk.TranslationTransform(len(shift), (shift / 2).tolist())
        return sitk.CompositeTransform([linear, shift_transform("field", shift / 2, reference)])
    field = sitk.Compose([sitk.Image(reference.GetSize(), sitk.sitkFloat64) + s for s in shift])
    field.CopyInformation(reference)
    return sitk.DisplacementFieldTransform(field)


@pytest.fixture
def shifted_pair(scene, tmp_path: Path):
    """Fixed (oblique, anisotropic) and moving (another oblique grid) volumes with
    ``moving(x + t) = fixed(x)`` in LPS, exported as the module would export them."""
    fixed = oblique_node(scene, "fixed")
    centre = (voxel_centres_ras(fixed) @ LPS_TO_RAS).mean(axis=0)
    shape, spacing, direction = (34, 38, 42), np.array([1.3, 1.25, 1.4]), rotation(-0.3, 0.2)
    half = direction @ (spacing * (np.array(shape[::-1]) - 1) / 2)
    origin = LPS_TO_RAS @ (centre + SHIFT_LPS) - half  # covers the fixed volume, shifted
    moving = volume_node(
        scene, np.zeros(shape, np.float32), ijk_to_ras(spacing, origin, direction), "moving"
    )
    lps = voxel_centres_ras(moving) @ LPS_TO_RAS
    node_array(moving)[...] = blobs_at(lps - SHIFT_LPS, centre).reshape(shape)
    inputs = mrml_bridge.export_inputs(tmp_path / "inputs", fixed, moving)
    return fixed, moving, sitk.ReadImage(str(inputs.fixed)), sitk.ReadImage(str(inputs.moving))


@pytest.mark.parametrize("kind", ["field", "translation", "composite"])
def test_known_translation_maps_landmarks_and_volume_correctly_in_ras(
    kind: str, scene, shifted_pair, tmp_path: Path
) -> None:
    fixed, moving, fixed_image, moving_image = shifted_pair
    transform = shift_transform(kind, SHIFT_LPS, fixed_image)
    folder = write_outputs(tmp_path / "output", fixed_image, moving_image, transform)
    outputs = mrml_bridge.import_results(folder, fixed, moving)

    # Landmarks as in Testing/*/: CSV in LPS, row i of each file the same point.
    fixed_points = np.array([[0.0, 38.0, 12.0], [-8.0, 44.0, 20.0], [-15.0, 50.0, 9.0]])
    for name, points in (("fixed", fixed_points), ("moving", fixed_points + SHIFT_LPS)):
        rows = ["x,y,z"] + [",".join(map(str, p)) for p in points]
        (tmp_path / f"{name}_landmarks.csv").write_text("\n".join(rows) + "\n")
    fixed_lm = mrml_bridge.read_landmarks(tmp_path / "fixed_landmarks.csv")
    moving_lm = mrml_bridge.read_landmarks(tmp_path / "moving_landmarks.csv")
    errors = mrml_bridge.landmark_errors(outputs.transform, fixed_lm, moving_lm)
    np.testing.assert_allclose(errors, 0.0, atol=1e-4)
    inverted = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    inverted.SetAndObserveTransformFromParent(outputs.transform.GetTransformToParent())
    wrong = mrml_bridge.landmark_errors(inverted, fixed_lm, moving_lm)
    np.testing.assert_allclose(wrong, 2 * np.linalg.norm(SHIFT_LPS), rtol=1e-3)  # test has teeth

    # Moving landmarks placed under the transform and hardened land on the fixed landmarks.
    markups = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "moving landmarks")
    for point in mrml_bridge.lps_to_ras(moving_lm):
        markups.AddControlPoint(*point)
    markups.SetAndObserveTransformNodeID(outputs.transform.GetID())
    logic = slicer.vtkSlicerTransformLogic()
    logic.SetMRMLScene(scene)
    assert logic.hardenTransform(markups)
    landed = [markups.GetNthControlPointPosition(i) for i in range(len(fixed_lm))]
    np.testing.assert_allclose(landed, mrml_bridge.lps_to_ras(fixed_lm), atol=1e-3)

    # The moving volume, hardened under the transform, looks like the fixed volume.
    centres = voxel_centres_ras(fixed)
    moving.SetAndObserveTransformNodeID(outputs.transform.GetID())
    assert logic.hardenTransform(moving)
    resampled, expected = sample(moving, centres), node_array(fixed).ravel()
    inside = resampled != 0  # sample() gives exactly 0 outside the hardened volume
    assert inside.mean() > 0.9
    difference = np.abs(resampled - expected)[inside]
    assert difference.max() < 0.03 * expected.max()  # two linear interpolations apart


def test_import_fills_nodes_with_fixed_geometry_and_references(scene, shifted_pair, tmp_path):
    fixed, moving, fixed_image, moving_image = shifted_pair
    transform = shift_transform("field", SHIFT_LPS, fixed_image)
    folder = write_outputs(tmp_path / "output", fixed_image, moving_image, transform)
    target = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "chosen by the user")
    outputs = mrml_bridge.import_results(folder, fixed, moving, transform=target)
    assert outputs.transform is target and outputs.report["model"]["name"] == "known shift"
    grid = target.GetTransformFromParent()  # interpolated like ITK does, not cubically
    assert grid.GetInterpolationMode() == vtk.VTK_LINEAR_INTERPOLATION
    assert target.GetNodeReference("spatialRegistrationFixed") is fixed  # Slicer's roles
    assert target.GetNodeReference("spatialRegistrationMoving") is moving
    np.testing.assert_allclose(node_matrix(outputs.warped), node_matrix(fixed), atol=1e-9)
    field = node_array(outputs.displacement)
    assert field.shape == node_array(fixed).shape + (3,)
    shift_ras = LPS_TO_RAS @ SHIFT_LPS  # RAS vectors, as Slicer's "Convert" makes them
    np.testing.assert_allclose(field.reshape(-1, 3), np.tile(shift_ras, (field.size // 3, 1)))
    spatial = slicer.vtkMRMLVolumeNode.VoxelVectorTypeSpatial
    assert outputs.displacement.GetVoxelVectorType() == spatial
    assert outputs.warped.GetDisplayNode() is not None
    assert outputs.inverse_transform is None


def test_new_transform_node_is_a_grid_transform(scene, shifted_pair, tmp_path: Path) -> None:
    """As Slicer's transform reader makes for a displacement-field file."""
    fixed, moving, fixed_image, moving_image = shifted_pair
    transform = shift_transform("field", SHIFT_LPS, fixed_image)
    folder = write_outputs(tmp_path / "output", fixed_image, moving_image, transform)
    outputs = mrml_bridge.import_results(folder, fixed, moving)
    assert outputs.transform.GetClassName() == "vtkMRMLGridTransformNode"
    logic = slicer.vtkSlicerTransformLogic()
    logic.SetMRMLScene(scene)
    loaded = logic.AddTransform(str(folder / "transform.h5"), scene)
    assert loaded.GetClassName() == "vtkMRMLGridTransformNode"


def affine_transform(reference: sitk.Image) -> sitk.Transform:
    """A non-trivial fixed → moving transform: a rotation and shear about the fixed centre,
    then a smooth field."""
    centre = reference.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2 for n in reference.GetSize()]
    )
    affine = sitk.AffineTransform(3)
    affine.SetCenter(centre)
    affine.SetMatrix((0.97, -0.12, 0.05, 0.15, 0.98, -0.04, 0.02, 0.06, 1.03))
    affine.SetTranslation((1.5, -2.0, 0.8))
    return sitk.CompositeTransform([affine, shift_transform("field", SHIFT_LPS / 3, reference)])


@pytest.mark.parametrize("kind", ["field", "affine"])
def test_displacement_volume_agrees_with_the_transform_node_in_ras(
    kind: str, scene, shifted_pair, tmp_path: Path
) -> None:
    """At every voxel centre x of the displacement volume (RAS), its vector is T(x) − x for the
    transform node T beside it: the two outputs say the same thing in Slicer's frame."""
    fixed, moving, fixed_image, moving_image = shifted_pair
    if kind == "field":
        transform = shift_transform("field", SHIFT_LPS, fixed_image)
    else:
        transform = affine_transform(fixed_image)
    folder = write_outputs(tmp_path / "output", fixed_image, moving_image, transform)
    outputs = mrml_bridge.import_results(folder, fixed, moving)
    points = voxel_centres_ras(outputs.displacement)
    vectors = node_array(outputs.displacement).reshape(-1, 3)
    moved = transform_points(outputs.transform, points)
    assert np.abs(vectors).max() > 1.0
    np.testing.assert_allclose(vectors, moved - points, atol=1e-4)


def test_displacement_volume_saves_back_as_the_lps_field(scene, shifted_pair, tmp_path) -> None:
    """Slicer's writer turns the spatial RAS vectors into LPS with a measurement frame: saved
    from Slicer, the node is the engine's ITK/ANTs field again."""
    fixed, moving, fixed_image, moving_image = shifted_pair
    folder = write_outputs(
        tmp_path / "output", fixed_image, moving_image, affine_transform(fixed_image)
    )
    outputs = mrml_bridge.import_results(folder, fixed, moving)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(tmp_path / "saved.nrrd"))
    assert storage.WriteData(outputs.displacement)
    saved, original = (
        sitk.ReadImage(str(path))
        for path in (tmp_path / "saved.nrrd", folder / "displacement.nrrd")
    )
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(saved), sitk.GetArrayFromImage(original), atol=1e-5
    )
    np.testing.assert_allclose(saved.GetOrigin(), original.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(saved.GetDirection(), original.GetDirection(), atol=1e-9)
    assert "NRRD_measurement frame" in saved.GetMetaDataKeys()
    reread = mrml_bridge._read_volume(tmp_path / "saved.nrrd", slicer.vtkMRMLVectorVolumeNode)
    assert reread.GetVoxelVectorType() == slicer.vtkMRMLVolumeNode.VoxelVectorTypeSpatial
    np.testing.assert_allclose(
        node_array(reread), node_array(outputs.displacement), atol=1e-5
    )  # Slicer reads its own file back as RAS


def test_inverse_transform_is_imported_with_the_roles_swapped(scene, shifted_pair, tmp_path):
    fixed, moving, fixed_image, moving_image = shifted_pair
    transform = shift_transform("field", SHIFT_LPS, fixed_image)
    folder = write_outputs(tmp_path / "output", fixed_image, moving_image, transform)
    inverse = shift_transform("field", -SHIFT_LPS, moving_image)
    sitk.WriteTransform(inverse, str(folder / "inverse_transform.h5"))
    outputs = mrml_bridge.import_results(folder, fixed, moving)
    node = outputs.inverse_transform
    assert node is not None and node.GetClassName() == "vtkMRMLGridTransformNode"
    assert node.GetNodeReference("spatialRegistrationFixed") is moving
    assert node.GetNodeReference("spatialRegistrationMoving") is fixed
    points = np.array([[0.0, 38.0, 12.0], [-8.0, 44.0, 20.0]])
    errors = mrml_bridge.landmark_errors(node, points + SHIFT_LPS, points)
    np.testing.assert_allclose(errors, 0.0, atol=1e-4)


def test_linear_interpolation_survives_saving_and_reloading_the_scene(
    scene, shifted_pair, tmp_path: Path
) -> None:
    """Slicer's transform reader sets cubic interpolation; the node's attribute tells the
    module (which calls ``restore_linear_interpolation`` when a scene is loaded) to undo it."""
    fixed, moving, fixed_image, moving_image = shifted_pair
    folder = write_outputs(
        tmp_path / "output", fixed_image, moving_image, affine_transform(fixed_image)
    )
    outputs = mrml_bridge.import_results(folder, fixed, moving)
    saved = tmp_path / "scene"
    saved.mkdir()
    for node in (outputs.transform, outputs.displacement, outputs.warped, fixed, moving):
        node.AddDefaultStorageNode()
        storage = node.GetStorageNode()
        extension = ".h5" if node.IsA("vtkMRMLTransformNode") else ".nrrd"
        storage.SetFileName(str(saved / f"{node.GetID()}{extension}"))
        assert storage.WriteData(node)
    scene.SetURL(str(saved / "scene.mrml"))
    assert scene.Commit()

    reloaded = slicer.vtkMRMLScene()
    reloaded.SetURL(str(saved / "scene.mrml"))
    assert reloaded.Connect()
    transform = reloaded.GetNodeByID(outputs.transform.GetID())

    def modes(node) -> set[int]:
        transform = node.GetTransformFromParent()
        parts = [transform]
        if transform.IsA("vtkGeneralTransform"):
            parts = [
                transform.GetConcatenatedTransform(i)
                for i in range(transform.GetNumberOfConcatenatedTransforms())
            ]
        return {part.GetInterpolationMode() for part in parts if part.IsA("vtkGridTransform")}

    assert modes(transform) == {vtk.VTK_CUBIC_INTERPOLATION}  # what the reader does
    assert mrml_bridge.restore_linear_interpolation(reloaded) == 1
    assert modes(transform) == {vtk.VTK_LINEAR_INTERPOLATION}
    assert transform.GetNodeReference("spatialRegistrationFixed").GetID() == fixed.GetID()
    points = voxel_centres_ras(fixed)[::97]
    np.testing.assert_allclose(
        transform_points(transform, points), transform_points(outputs.transform, points), atol=1e-4
    )


def test_failed_import_leaves_the_scene_unchanged(scene, shifted_pair, tmp_path: Path) -> None:
    fixed, moving, fixed_image, moving_image = shifted_pair
    transform = shift_transform("translation", SHIFT_LPS, fixed_image)
    folder = write_outputs(tmp_path / "output", fixed_image, moving_image, transform)
    (folder / "warped.nrrd").unlink()
    target = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "existing")
    nodes, modified = scene.GetNumberOfNodes(), target.GetMTime()
    with pytest.raises(mrml_bridge.BridgeError, match="warped.nrrd"):
        mrml_bridge.import_results(folder, fixed, moving, transform=target)
    assert scene.GetNumberOfNodes() == nodes and target.GetMTime() == modified


def one_slice_pair(scene, tmp_path: Path):
    """Single-slice fixed and moving volumes (at z = 6 mm, in-plane rotation, anisotropic
    spacing) with ``moving(x + t) = fixed(x)``, exported as the module exports them."""
    matrix = ijk_to_ras((0.5, 0.8, 2.0), (3.0, -4.0, 6.0), rotation(0.35))
    fixed = volume_node(scene, np.zeros((40, 48), np.float32), matrix, "fixed 2d")
    moving = volume_node(scene, np.zeros((40, 48), np.float32), matrix, "moving 2d")
    lps = (voxel_centres_ras(fixed) @ LPS_TO_RAS)[:, :2]
    centre = lps.mean(axis=0)
    node_array(fixed)[...] = blobs_at(lps, centre).reshape(1, 40, 48)
    node_array(moving)[...] = blobs_at(lps - SHIFT_LPS[:2], centre).reshape(1, 40, 48)
    inputs = mrml_bridge.export_inputs(tmp_path / "inputs", fixed, moving)
    return fixed, moving, inputs


def assert_one_slice_result(outputs, fixed, moving) -> None:
    """The outputs of a one-slice pair lie on the fixed slice and carry the in-plane shift."""
    np.testing.assert_allclose(node_matrix(outputs.warped), node_matrix(fixed), atol=1e-9)
    assert node_matrix(outputs.displacement)[2, 3] == pytest.approx(6.0)
    vectors = node_array(outputs.displacement).reshape(-1, 3)
    np.testing.assert_allclose(
        vectors, np.tile(LPS_TO_RAS @ [*SHIFT_LPS[:2], 0], (len(vectors), 1))
    )
    points = np.array([[0.0, 1.0], [-3.0, 4.0]])
    errors = mrml_bridge.landmark_errors(outputs.transform, points, points + SHIFT_LPS[:2], z=6.0)
    np.testing.assert_allclose(errors, 0.0, atol=1e-4)
    centres = voxel_centres_ras(fixed)
    moved = sample(moving, transform_points(outputs.transform, centres))
    interior = (np.abs(moved) > 0) & (sample(fixed, centres) > 0)
    assert interior.mean() > 0.5
    np.testing.assert_allclose(
        moved[interior], node_array(outputs.warped).ravel()[interior], atol=1e-3
    )


def test_3d_one_slice_engine_outputs_are_imported_as_they_are(scene, tmp_path: Path) -> None:
    """The engine's outputs for a 3-D one-slice input: a 3-D one-slice field on the fixed
    slice's geometry, zero out-of-plane displacement, and a 3-D transform.h5 that Slicer 5.10
    reads."""
    fixed, moving, inputs = one_slice_pair(scene, tmp_path)
    fixed_image, moving_image = (
        sitk.ReadImage(str(inputs.fixed)),
        sitk.ReadImage(str(inputs.moving)),
    )
    assert fixed_image.GetDimension() == 3 and fixed_image.GetSize()[2] == 1
    transform = shift_transform("field", np.array([*SHIFT_LPS[:2], 0.0]), fixed_image)
    folder = write_outputs(tmp_path / "output", fixed_image, moving_image, transform)
    assert_readable_by_slicer_5_10(folder / "transform.h5")

    outputs = mrml_bridge.import_results(folder, fixed, moving)
    assert_one_slice_result(outputs, fixed, moving)
    np.testing.assert_allclose(node_matrix(outputs.displacement), node_matrix(fixed), atol=1e-9)


def test_regression_case_lookup_prefers_installed_sample_data(tmp_path: Path) -> None:
    module_dir = tmp_path / "module"
    installed = module_dir / "Resources" / "SampleData" / "retina" / "photo"
    for folder in (installed, tmp_path / "Testing" / "retina" / "photo"):
        folder.mkdir(parents=True)
        (folder / "fixed.nrrd").touch()
        (folder / "moving.nrrd").touch()
    assert mrml_bridge.find_regression_case(module_dir, "retina/photo") == installed
    assert mrml_bridge.find_regression_case(module_dir, "lung/ct") is None


@pytest.mark.parametrize("variant", ["moving", "moving_shifted"])
def test_regression_case_truth_maps_its_landmarks_in_ras(variant: str) -> None:
    """The regression cases' true transforms (2-D rotation + B-spline, written by SimpleITK,
    fixed → moving), read through a transform storage node as the engine's files are, carry
    each fixed landmark onto its moving landmark: the conventions agree with the case data."""
    case = mrml_bridge.find_regression_case(MODULE_DIR, "retina/photo")
    truth = "truth.tfm" if variant == "moving" else "truth_shifted.tfm"
    node = mrml_bridge._read_transform(case / truth)
    fixed_points = mrml_bridge.read_landmarks(case / "fixed_landmarks.csv")
    moving_points = mrml_bridge.read_landmarks(case / f"{variant}_landmarks.csv")
    errors = mrml_bridge.landmark_errors(node, fixed_points, moving_points)
    assert len(errors) >= 10 and errors.max() < 1e-3
    swapped = mrml_bridge.landmark_errors(node, moving_points, fixed_points)
    assert swapped.mean() > 0.5  # the wrong direction is clearly wrong


def test_selftest_threshold_comes_from_expected_json(tmp_path: Path) -> None:
    assert mrml_bridge.selftest_threshold(tmp_path) is None
    (tmp_path / "expected.json").write_text(json.dumps({"mean_tre_mm": 3.0}))
    assert mrml_bridge.selftest_threshold(tmp_path) is None
    limits = {"slicer_selftest": {"max_mean_tre_mm": 2.5}}
    (tmp_path / "expected.json").write_text(json.dumps(limits))
    assert mrml_bridge.selftest_threshold(tmp_path) == 2.5
    (tmp_path / "photo").mkdir()  # a case folder: expected.json is its anatomy's
    assert mrml_bridge.selftest_threshold(tmp_path / "photo") == 2.5
    for case in (MODULE_DIR.parent / "Testing").rglob("fixed.nrrd"):
        threshold = mrml_bridge.selftest_threshold(case.parent)  # the real cases parse
        assert threshold is None or threshold > 0


def test_2d_landmarks_are_read_from_csv(tmp_path: Path) -> None:
    (tmp_path / "fixed_landmarks.csv").write_text("x,y\n1.5,-2.0\n3.25,4.0\n")
    points = mrml_bridge.read_landmarks(tmp_path / "fixed_landmarks.csv")
    np.testing.assert_array_equal(points, [[1.5, -2.0], [3.25, 4.0]])
    np.testing.assert_array_equal(mrml_bridge.lps_to_ras(points, z=7.0)[0], [-1.5, 2.0, 7.0])


# --- sample data, dependencies ---------------------------------------------------------------


def test_sample_data_sources_fit_slicers_registration_function(tmp_path: Path) -> None:
    """Each source is passed to ``SampleDataLogic.registerCustomSampleDataSource``, whose
    signature in Slicer 5.8-5.12 (Modules/Scripted/SampleData/SampleData.py) the stub copies:
    there is no ``sampleDescription``; ``sampleName`` is the button's text."""
    registered = []

    def registerCustomSampleDataSource(
        category="Custom", sampleName=None, uris=None, fileNames=None, nodeNames=None,
        customDownloader=None, thumbnailFileName=None,
        loadFileTypes=None, loadFiles=None, loadFileProperties={},  # noqa: B006 - Slicer's
        checksums=None,
        loadFileType=None,
    ):  # fmt: skip
        registered.append((category, sampleName, uris, fileNames, nodeNames, checksums))

    icon = MODULE_DIR / "Resources" / "Icons" / "EquivariantRegistration.png"
    cases = {"retina/photo": "Retina photograph (2-D)", "lung/chest": "Chest CT (3-D)"}
    for source in mrml_bridge.sample_data_sources(MODULE_DIR, cases, icon):
        registerCustomSampleDataSource(**source)
        assert Path(source["thumbnailFileName"]).is_file()
    assert [entry[1] for entry in registered] == list(cases.values())
    for _, _, uris, file_names, node_names, checksums in registered:
        assert len(uris) == len(file_names) == len(node_names) == len(checksums) == 3
        assert len(set(file_names)) == 3 and len(set(node_names)) == 3
        for uri, checksum in zip(uris, checksums, strict=True):
            data = Path(uri.removeprefix("file://")).read_bytes()
            assert checksum == f"SHA256:{hashlib.sha256(data).hexdigest()}"
    assert mrml_bridge.sample_data_sources(tmp_path, cases, icon) == []  # no cases installed


@pytest.mark.parametrize(
    ("version", "requirement", "met"),
    [
        ("2.5.1+cu121", "torch>=2.3", True),
        ("2.3", "torch>=2.3.0", True),
        ("2.2.2", "torch>=2.3", False),
        ("1.13.1", "torch>=2.3", False),
        ("2.10.0", "torch>=2.3", True),  # compared as numbers, not as text
        ("3.0.0", "torch>=2.3,<3", False),
        ("2.6.0rc1", "torch>=2.3,!=2.4.0", True),
    ],
)
def test_version_requirements(version: str, requirement: str, met: bool) -> None:
    assert engine.satisfies(version, requirement) is met


def test_unmet_requirements_name_missing_and_outdated_packages() -> None:
    installed = {"torch": "2.1.0", "tqdm": "4.66.1"}
    requirements = {"torch": "torch>=2.3", "tqdm": "tqdm>=4.60", "other": "other>=1"}
    unmet = engine.unmet_requirements(requirements, installed.get)
    assert unmet == {"torch": "2.1.0", "other": None}
    assert engine.unmet_requirements({"torch": engine.ENGINE_REQUIREMENTS["torch"]}) == {}


def test_cuda_probe_answers_from_a_background_process() -> None:
    """torch is imported by the probe's own process, never by the caller (Slicer's GUI); a
    Python that cannot load torch counts as no GPU."""
    import torch

    def answer(probe: engine.CudaProbe) -> bool:
        deadline = time.monotonic() + 120
        while (result := probe.result()) is None:
            assert time.monotonic() < deadline, "the probe did not finish"
            time.sleep(0.05)
        return result

    assert answer(engine.CudaProbe(sys.executable)) is torch.cuda.is_available()
    broken = {**os.environ, "PYTHONHOME": "/nowhere"}  # this Python cannot even start
    assert answer(engine.CudaProbe(sys.executable, broken)) is False
