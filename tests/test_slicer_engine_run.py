"""The module's run, minus Qt: export nodes, run the real ``equireg register`` in a background
process, import its files into nodes (PyPI slicer-core). The pair is synthetic, so these tests
check consistency (the transform node reproduces warped.nrrd), not accuracy."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import slicer
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
    sample,
    transform_points,
    volume_node,
    voxel_centres_ras,
)

DIRECTION = np.array([[0.96, -0.28, 0.0], [0.28, 0.96, 0.0], [0.0, 0.0, 1.0]])


def pair(scene: slicer.vtkMRMLScene) -> tuple:
    """A 2-D pair of smooth images (single slices; in-plane rotation, anisotropic spacing)."""
    matrix = ijk_to_ras((0.5, 0.7, 1.0), (20.0, -15.0, 4.0), DIRECTION)
    fixed = volume_node(scene, np.zeros((1, 56, 64), np.float32), matrix, "fixed")
    moving = volume_node(scene, np.zeros((1, 56, 64), np.float32), matrix, "moving")
    lps = (voxel_centres_ras(fixed) @ LPS_TO_RAS)[:, :2]
    centre = lps.mean(axis=0)
    node_array(fixed)[...] = blobs_at(lps, centre).reshape(1, 56, 64)
    node_array(moving)[...] = blobs_at(lps - [1.5, -1.0], centre).reshape(1, 56, 64)
    return fixed, moving


def registration(scene, tmp_path: Path, **options) -> mrml_bridge.Registration:
    fixed, moving = pair(scene)
    keep_files = options.pop("keep_files", False)
    return mrml_bridge.Registration(
        fixed,
        moving,
        python=sys.executable,
        module_dir=MODULE_DIR,
        work_root=tmp_path / "work",
        options=engine.Options(device="cpu", **options),
        keep_files=keep_files,
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory):
    """One real registration through the bridge: the run, its events and its outputs."""
    scene = slicer.vtkMRMLScene()
    run = registration(scene, tmp_path_factory.mktemp("run"))
    events: list[engine.ProgressEvent] = []
    run.start()
    outputs = run.wait(on_event=events.append, interval=0.05)
    return scene, run, events, outputs


def test_progress_arrives_as_events_ending_with_done(finished_run) -> None:
    _, _, events, _ = finished_run
    stages = [event.stage for event in events if event.stage not in ("warning", "stderr")]
    assert stages[0] == "load" and stages[-1] == "done" and "network" in stages
    fractions = [e.progress for e in events if e.stage not in ("warning", "done", "stderr")]
    assert fractions == sorted(fractions) and 0.0 <= fractions[0] and fractions[-1] <= 1.0
    assert set(events[-1].outputs) >= {"transform", "displacement", "warped", "report"}


def test_outputs_are_on_the_fixed_grid_and_the_work_folder_is_gone(finished_run) -> None:
    scene, run, _, outputs = finished_run
    fixed = run.fixed
    np.testing.assert_allclose(node_matrix(outputs.warped), node_matrix(fixed), atol=1e-9)
    assert node_array(outputs.warped).shape == node_array(fixed).shape
    assert node_matrix(outputs.displacement)[2, 3] == pytest.approx(4.0)  # the fixed slice
    assert outputs.transform.GetNodeReference("spatialRegistrationMoving") is run.moving
    assert outputs.transform.GetClassName() == "vtkMRMLGridTransformNode"
    assert outputs.report["device"] == "cpu"
    assert not run.folder.exists()


def test_transform_node_reproduces_the_engines_warped_volume(finished_run) -> None:
    """Moving sampled at T(fixed voxel) in RAS equals warped.nrrd: one interpolation, same
    convention. An inverted or mirrored import could not match a non-trivial field."""
    _, run, _, outputs = finished_run
    centres = voxel_centres_ras(run.fixed)
    mapped = transform_points(outputs.transform, centres)
    assert np.abs(mapped - centres).max() > 0.5  # the (random) field does move points
    moved = sample(run.moving, mapped)
    warped = node_array(outputs.warped).ravel()
    inside = moved != 0
    assert inside.mean() > 0.5
    np.testing.assert_allclose(moved[inside], warped[inside], atol=1e-3 * warped.max())


def test_displacement_volume_holds_the_transform_nodes_ras_vectors(finished_run) -> None:
    _, _, _, outputs = finished_run
    points = voxel_centres_ras(outputs.displacement)
    vectors = node_array(outputs.displacement).reshape(-1, 3)
    moved = transform_points(outputs.transform, points)
    assert np.abs(vectors).max() > 0.5
    np.testing.assert_allclose(vectors, moved - points, atol=1e-4)
    spatial = slicer.vtkMRMLVolumeNode.VoxelVectorTypeSpatial
    assert outputs.displacement.GetVoxelVectorType() == spatial


def test_one_slice_export_gives_a_transform_slicer_5_10_reads(tmp_path: Path) -> None:
    """The module exports a 2-D image as a 3-D one-slice volume; the engine must answer with
    3-D transforms (Slicer 5.10 reads no 2-D ones), for the inverse too."""
    scene = slicer.vtkMRMLScene()
    run = registration(scene, tmp_path, keep_files=True, refine_steps=0, inverse=True)
    run.start()
    run.wait()
    for name in ("transform.h5", "inverse_transform.h5"):
        assert_readable_by_slicer_5_10(run.folder / "output" / name)


def test_hardened_moving_volume_matches_warped(finished_run) -> None:
    scene, run, _, outputs = finished_run
    hardened = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "hardened")
    hardened.SetAndObserveImageData(run.moving.GetImageData())
    hardened.CopyOrientation(run.moving)
    hardened.SetAndObserveTransformNodeID(outputs.transform.GetID())
    logic = slicer.vtkSlicerTransformLogic()
    logic.SetMRMLScene(scene)
    assert logic.hardenTransform(hardened)
    resampled = sample(hardened, voxel_centres_ras(run.fixed))
    warped = node_array(outputs.warped).ravel()
    both = (resampled != 0) & (warped != 0)
    difference = np.abs(resampled - warped)[both]
    # Hardening resamples onto a new grid, so two interpolations (and the untrained model's
    # rough field) separate the images; an inverted transform would differ everywhere.
    assert np.median(difference) < 0.01 * warped.max()
    unregistered = np.abs(node_array(run.moving).ravel() - warped)[both]
    assert np.mean(difference) < 0.1 * np.mean(unregistered)


def test_cancel_kills_the_engine_and_leaves_nothing(tmp_path: Path) -> None:
    scene = slicer.vtkMRMLScene()
    run = registration(scene, tmp_path)
    nodes = scene.GetNumberOfNodes()
    run.start()
    assert run.folder.exists()
    run.cancel()
    assert run.process.returncode not in (None, 0)
    assert not run.folder.exists()
    assert scene.GetNumberOfNodes() == nodes


def test_engine_error_is_reported_in_one_line_and_the_scene_is_unchanged(tmp_path: Path) -> None:
    scene = slicer.vtkMRMLScene()
    run = registration(scene, tmp_path, model="no-such-model", keep_files=True)
    nodes = scene.GetNumberOfNodes()
    run.start()
    with pytest.raises(mrml_bridge.BridgeError) as error:
        run.wait()
    message = str(error.value)
    assert message.startswith("equireg: error: model no-such-model") and "\n" not in message
    assert scene.GetNumberOfNodes() == nodes
    assert (run.folder / "inputs" / "fixed.nrrd").is_file()  # kept for inspection on request
