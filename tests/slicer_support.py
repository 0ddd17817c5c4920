"""Helpers for the Slicer-layer tests: the module's Qt-free package, and MRML volume nodes
made from arrays with any geometry (PyPI ``slicer-core``: a real MRML scene, no GUI)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from scipy.ndimage import map_coordinates
from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "EquivariantRegistration"

# Slicer puts the module folder on sys.path; here the tests do (the engine is installed).
sys.path.insert(0, str(MODULE_DIR))
engine = importlib.import_module("EquivariantRegistrationLib.engine")
mrml_bridge = importlib.import_module("EquivariantRegistrationLib.mrml_bridge")

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def numpy_to_matrix(values: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(values[r, c]))
    return matrix


def ijk_to_ras(spacing, origin_ras, direction_ras) -> np.ndarray:
    """A 4×4 IJK → RAS matrix from spacing, RAS origin and RAS direction cosines (columns)."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(direction_ras, dtype=float) * np.asarray(spacing, dtype=float)
    matrix[:3, 3] = origin_ras
    return matrix


def volume_node(
    scene: slicer.vtkMRMLScene,
    values: np.ndarray,
    matrix: np.ndarray,
    name: str,
    class_name: str = "vtkMRMLScalarVolumeNode",
):
    """A volume node holding ``values`` (array axes k, j, i) with IJK → RAS ``matrix``."""
    values = values if values.ndim == 3 else values[None]
    image = vtk.vtkImageData()
    image.SetDimensions(values.shape[2], values.shape[1], values.shape[0])
    image.GetPointData().SetScalars(numpy_to_vtk(np.ascontiguousarray(values).ravel(), deep=True))
    node = scene.AddNewNodeByClass(class_name, name)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(numpy_to_matrix(matrix))
    return node


def node_array(node) -> np.ndarray:
    """The node's voxels, array axes (k, j, i[, component])."""
    image = node.GetImageData()
    values = vtk_to_numpy(image.GetPointData().GetScalars())
    shape = image.GetDimensions()[::-1]
    components = image.GetNumberOfScalarComponents()
    return values.reshape(shape + ((components,) if components > 1 else ()))


def node_matrix(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix_to_numpy(matrix)


def voxel_centres_ras(node) -> np.ndarray:
    """RAS coordinates of every voxel centre, shape ``(k·j·i, 3)`` in array order."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in node_array(node).shape[:3]], indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    return (node_matrix(node) @ ijk)[:3].T


def sample(node, ras_points: np.ndarray) -> np.ndarray:
    """Values of a scalar volume node at RAS points (trilinear; 0 outside)."""
    ras_to_ijk = np.linalg.inv(node_matrix(node))
    ijk = (ras_to_ijk @ np.column_stack([ras_points, np.ones(len(ras_points))]).T)[:3]
    return map_coordinates(node_array(node).astype(float), ijk[::-1], order=1, cval=0.0)


def transform_points(transform_node, ras_points: np.ndarray) -> np.ndarray:
    """The transform node's "from parent" transform applied to RAS points."""
    mapping = transform_node.GetTransformFromParent()
    return np.array([mapping.TransformPoint(p.tolist()) for p in ras_points])


def blobs_at(points: np.ndarray, centre: np.ndarray, width: float = 5.0) -> np.ndarray:
    """A smooth function of physical position (mm): Gaussian blobs within ±10 mm of
    ``centre``; ``points`` has shape ``(n, dim)``. The same call gives the same function."""
    rng = np.random.default_rng(0)
    centres = np.asarray(centre) + rng.uniform(-10, 10, (8, points.shape[1]))
    return sum(
        100 * np.exp(-np.sum((points - c) ** 2, axis=1) / (2 * width**2)) for c in centres
    ).astype(np.float32)


def transform_dimensions(path) -> list[int]:
    """The dimension of each transform in an ITK transform file (a composite's in order)."""
    transform = sitk.ReadTransform(str(path))
    if transform.GetName() != "CompositeTransform":
        return [transform.GetDimension()]
    composite = sitk.CompositeTransform(transform)
    return [
        composite.GetNthTransform(i).GetDimension()
        for i in range(composite.GetNumberOfTransforms())
    ]


def assert_readable_by_slicer_5_10(path) -> None:
    """Slicer 5.10 (the minimum version) reads only 3-D ITK transforms; PyPI slicer-core 5.13
    also converts 2-D ones, so reading the file with it proves nothing for 5.10."""
    dimensions = transform_dimensions(path)
    assert dimensions and set(dimensions) == {3}, f"{path}: transforms of dimension {dimensions}"
