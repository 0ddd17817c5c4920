"""The command's contract: outputs, transform convention, progress, bad input."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import gaussian_blobs

import equireg.api
import equireg.cli as cli
from equireg.capture import Pair, capture, capture_pairs
from equireg.cli import main
from equireg.compose import RegistrationStep
from equireg.maps import Map
from equireg.models import MODELS_DIR, load_network, read_card
from equireg.preprocess import background_value
from equireg.refine import QUALITY

OUTPUTS = {"transform.h5", "displacement.nrrd", "warped.nrrd", "report.json"}


def _blobs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A smooth random image with structure everywhere (for registration)."""
    return gaussian_blobs(shape, seed)


def _write(array: np.ndarray, path: Path, spacing=None, origin=None) -> Path:
    image = sitk.GetImageFromArray(array, isVector=False)  # a 4-D array stays a 4-D image
    if spacing is not None:
        image.SetSpacing(spacing)
    if origin is not None:
        image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def pair_2d(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pair2d")
    fixed = _write(_blobs((96, 80)), folder / "fixed.nrrd", (0.5, 0.75), (10.0, -4.0))
    moving = _write(_blobs((96, 80), seed=0), folder / "moving.nrrd", (0.5, 0.75), (12.0, -4.0))
    return fixed, moving


def _register(pair: tuple[Path, Path], out: Path, *options: str) -> int:
    return main(["register", str(pair[0]), str(pair[1]), "-o", str(out), *options])


@pytest.fixture(scope="module")
def registered_2d(pair_2d: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("out") / "result"
    assert _register(pair_2d, out, "--inverse", "--progress", "none") == 0
    return out


def test_register_writes_every_output_and_nothing_else(registered_2d: Path) -> None:
    assert {p.name for p in registered_2d.iterdir()} == OUTPUTS | {"inverse_transform.h5"}
    report = json.loads((registered_2d / "report.json").read_text())
    for key in (
        "versions",
        "model",
        "timings_s",
        "peak_memory",
        "similarity_before",
        "similarity_after",
        "folding_fraction",
        "warnings",
        "device",
    ):
        assert key in report
    assert report["device"] == "cpu"
    # the swapped registration behind inverse_transform.h5 reports its own start and levels
    inverse = report["inverse"]
    assert inverse["refinement"]["start"]["chosen"] in inverse["refinement"]["start"]["scores"]
    assert len(inverse["refinement"]["levels"]) == len(report["refinement"]["levels"])
    assert set(inverse["similarity_after"]) == set(report["similarity_after"])


def test_transform_file_reproduces_warped_image_through_simpleitk(
    pair_2d: tuple[Path, Path], registered_2d: Path
) -> None:
    _check_warped_is_transform(pair_2d, registered_2d)


def _check_warped_is_transform(pair: tuple[Path, ...], out: Path) -> None:
    fixed, moving = (sitk.ReadImage(str(p), sitk.sitkFloat32) for p in pair[:2])
    transform = sitk.ReadTransform(str(out / "transform.h5"))
    fill = background_value(sitk.GetArrayViewFromImage(moving))  # warped.nrrd's padding
    resampled = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, fill)
    warped = sitk.ReadImage(str(out / "warped.nrrd"))
    assert Grid_equal(warped, fixed)
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(resampled), sitk.GetArrayFromImage(warped), atol=1e-3
    )


def Grid_equal(a: sitk.Image, b: sitk.Image) -> bool:  # noqa: N802 - reads as a predicate
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetOrigin(), b.GetOrigin())
        and np.allclose(a.GetSpacing(), b.GetSpacing())
    )


def test_displacement_file_is_the_transform(registered_2d: Path) -> None:
    _check_displacement_is_transform(registered_2d)


def _check_displacement_is_transform(out: Path) -> None:
    field = sitk.ReadImage(str(out / "displacement.nrrd"))
    transform = sitk.ReadTransform(str(out / "transform.h5"))
    values = sitk.GetArrayFromImage(field)
    for index in [(3, 4), (40, 30), (60, 70)]:
        point = field.TransformIndexToPhysicalPoint(index)
        expected = np.array(transform.TransformPoint(point)) - np.array(point)
        np.testing.assert_allclose(values[index[1], index[0]], expected, atol=1e-6)


class _KnownShift(RegistrationStep):
    """Returns the map x ↦ x + t (network units): stands in for the network in convention tests."""

    def __init__(self, shift: tuple[float, ...]):
        super().__init__()
        self.shift = shift

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Map:
        offset = torch.tensor(self.shift, dtype=fixed.dtype).view(1, -1, *[1] * (fixed.dim() - 2))
        return lambda coords: coords + offset


def test_network_translation_becomes_the_right_physical_translation(tmp_path: Path) -> None:
    """The network sees both images in one physical frame (isotropic voxels, LPS axes): on a
    96×80 grid with spacing (0.5, 0.75) mm (72 × 40 mm), retina2d's 128² frame has 0.5625 mm
    voxels, so a network map shifting by (+0.125 along y, −0.05 along x) of the frame is the
    physical translation (−3.6, +9.0) mm (x, y)."""
    fixed = sitk.ReadImage(
        str(_write(_blobs((96, 80)), tmp_path / "fixed.nrrd", (0.5, 0.75), (10.0, -4.0))),
        sitk.sitkFloat32,
    )
    card = read_card("retina2d")
    net = capture(
        _KnownShift((0.125, -0.05)), card, fixed, fixed, None, None, torch.device("cpu"), []
    )
    points = np.array([[20.0, 10.0], [30.0, 40.0], [-100.0, 300.0]])
    np.testing.assert_allclose(net.map(points) - points, [[-3.6, 9.0]] * 3, atol=1e-4)


def test_pairs_run_in_one_batch_give_each_pair_s_own_map(tmp_path: Path) -> None:
    """``capture_pairs`` runs the forward pair and the swapped one as one batch (as
    ``register`` does with the aligned pair): each map equals the pair's run on its own."""
    fixed = sitk.ReadImage(str(_write(_blobs((96, 80)), tmp_path / "f.nrrd")), sitk.sitkFloat32)
    moving = sitk.ReadImage(
        str(_write(_blobs((90, 84), seed=1), tmp_path / "m.nrrd", (0.9, 1.1), (3.0, -2.0))),
        sitk.sitkFloat32,
    )
    card = read_card("generic2d")
    network = load_network(card)
    cpu = torch.device("cpu")
    both = capture_pairs(network, card, [Pair(fixed, moving), Pair(moving, fixed)], cpu, [])
    points = np.array([[20.0, 10.0], [30.0, 40.0], [60.0, 70.0]])
    for run, (a, b) in zip(both, [(fixed, moving), (moving, fixed)], strict=True):
        alone = capture(network, card, a, b, None, None, cpu, [])
        np.testing.assert_allclose(run.map(points), alone.map(points), atol=1e-4)


def test_network_start_follows_a_moved_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same content stored 7 mm further right and 5 mm lower (origin moved): the network's
    frames move with each image's extent, so even a network that returns the identity in its
    frame gives T(p) = p + (7, 5) mm, and the guarded start takes it over the identity; warping
    the moving image with it gives the fixed image back."""
    array = _blobs((96, 80))
    fixed = _write(array, tmp_path / "fixed.nrrd", (0.5, 0.75), (10.0, -4.0))
    moving = _write(array, tmp_path / "moving.nrrd", (0.5, 0.75), (17.0, 1.0))
    monkeypatch.setattr(equireg.api, "load_network", lambda card: _KnownShift((0.0, 0.0)))
    result = equireg.api.register(fixed, moving, field_grid="fixed", refine_steps=0, initial="none")
    assert result.report["refinement"]["start"]["chosen"] == "network"
    for point in ([20.0, 10.0], [30.0, 40.0]):
        np.testing.assert_allclose(
            np.array(result.transform.TransformPoint(point)) - point, [7.0, 5.0], atol=1e-4
        )
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.warped), array, atol=1e-3)


def test_json_progress_lines(
    pair_2d: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "json"
    assert _register(pair_2d, out, "--progress", "json", "--refine-steps", "3") == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    stages = [line["stage"] for line in lines]
    assert {"load", "network", "refine", "field", "warp"} <= set(stages)
    progress = [line["progress"] for line in lines if line["stage"] != "warning"]
    assert progress == sorted(progress) and 0 <= progress[0] and progress[-1] == 1.0
    assert lines[-1]["stage"] == "done"
    assert set(Path(p).name for p in lines[-1]["outputs"].values()) == OUTPUTS


def test_refinement_defaults_to_the_quality_preset(pair_2d: tuple[Path, Path]) -> None:
    """No refine_steps: the quality preset's steps on each of its levels (half on the finest);
    an explicit 0 keeps the best start and runs no refinement stage."""
    for quality in ("fast", "balanced"):
        report = equireg.api.register(*pair_2d, quality=quality).report
        steps = [level["steps"] for level in report["refinement"]["levels"]]
        preset = QUALITY[quality]
        assert steps == [preset.steps] * (preset.levels - 1) + [preset.steps // 2]
    report = equireg.api.register(*pair_2d, refine_steps=0).report
    assert report["refinement"]["levels"] == [] and "refine" not in report["timings_s"]
    stages = {k: v for k, v in report["timings_s"].items() if k != "total"}
    assert report["timings_s"]["total"] == pytest.approx(sum(stages.values()), abs=0.01)


def _known_affine(fixed: sitk.Image) -> sitk.AffineTransform:
    """Rotation by 8°, scales 1.06 and 0.95, a 2 mm shift: fixed → moving, about the centre."""
    angle = np.radians(8.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    truth = sitk.AffineTransform(2)
    truth.SetMatrix((rotation @ np.diag([1.06, 0.95])).flatten().tolist())
    truth.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint([47.5, 39.5]))
    truth.SetTranslation((1.5, -2.0))
    return truth


@pytest.fixture(scope="module")
def affine_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, sitk.Transform]:
    """A 2-D pair whose moving image is the fixed one under a known affine transform, on a grid
    of its own (other spacing and origin, oblique direction), and that transform."""
    folder = tmp_path_factory.mktemp("affine_pair")
    fixed_path = _write(_blobs((96, 80), seed=3), folder / "fixed.nrrd", (0.5, 0.75), (10.0, -4.0))
    fixed = sitk.ReadImage(str(fixed_path), sitk.sitkFloat32)
    truth = _known_affine(fixed)
    reference = sitk.Image([90, 100], sitk.sitkFloat32)
    reference.SetSpacing((0.6, 0.55))
    reference.SetOrigin((8.0, -8.0))
    tilt = np.radians(5.0)
    reference.SetDirection([np.cos(tilt), -np.sin(tilt), np.sin(tilt), np.cos(tilt)])
    moving = sitk.Resample(fixed, reference, truth.GetInverse(), sitk.sitkLinear, 0.0)
    moving_path = folder / "moving.nrrd"
    sitk.WriteImage(moving, str(moving_path))
    return fixed_path, moving_path, truth


def test_initial_affine_outputs_are_consistent(
    affine_pair: tuple[Path, Path, sitk.Transform], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """With ``--initial affine`` the network registers the affinely resampled moving image, and
    transform.h5 (affine ∘ field), displacement.nrrd (the total) and warped.nrrd agree."""
    out = tmp_path / "affine"
    options = ("--initial", "affine", "--inverse", "--progress", "json")
    assert _register(affine_pair, out, *options) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    stages = [line["stage"] for line in lines]
    assert stages.index("load") < stages.index("affine") < stages.index("network")
    progress = [line["progress"] for line in lines if line["stage"] != "warning"]
    assert progress == sorted(progress)
    assert {p.name for p in out.iterdir()} == OUTPUTS | {"inverse_transform.h5"}
    _check_warped_is_transform(affine_pair, out)
    _check_displacement_is_transform(out)
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["initial"] == "affine" and report["timings_s"]["affine"] > 0
    assert set(report["affine"]["parameters"]) == {
        "translation_mm",
        "rotation_deg",
        "scale",
        "shear",
    }
    assert "similarity_after_initial" in report


def test_initial_affine_recovers_the_transform_and_its_inverse(
    affine_pair: tuple[Path, Path, sitk.Transform], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a network that returns the identity and no refinement, the guarded start is the
    affine stage: transform.h5 must be the known transform (fixed → moving) and
    inverse_transform.h5 its inverse, also outside the fields' grids."""
    monkeypatch.setattr(equireg.api, "load_network", lambda card: _KnownShift((0.0, 0.0)))
    fixed, moving, truth = affine_pair
    result = equireg.api.register(
        fixed, moving, initial="affine", inverse=True, refine_steps=0, similarity="lncc"
    )
    assert result.report["refinement"]["start"]["chosen"] == "affine"
    image = sitk.ReadImage(str(fixed))
    points = [
        image.TransformIndexToPhysicalPoint((i, j)) for i in (10, 40, 70) for j in (10, 50, 85)
    ]
    for point in points:
        mapped = np.array(result.transform.TransformPoint(point))
        # Measured distances ≤ 0.22 mm (a third of a fixed voxel): the blobs reach the border of
        # the fixed image, so the moving image holds zeros where the fixed content was cut off.
        np.testing.assert_allclose(mapped, truth.TransformPoint(point), atol=0.4)
        back = result.inverse_transform.TransformPoint(mapped.tolist())
        np.testing.assert_allclose(back, point, atol=1e-3)


def test_warp_command_with_nearest_keeps_labels(
    pair_2d: tuple[Path, Path], registered_2d: Path, tmp_path: Path
) -> None:
    labels = (_blobs((96, 80)) > 40).astype(np.uint8) * 3
    label_path = _write(labels, tmp_path / "labels.nrrd", (0.5, 0.75), (12.0, -4.0))
    out = tmp_path / "warped_labels.nrrd"
    assert (
        main(
            [
                "warp",
                str(label_path),
                "--transform",
                str(registered_2d / "transform.h5"),
                "--reference",
                str(pair_2d[0]),
                "-o",
                str(out),
                "--interpolation",
                "nearest",
            ]
        )
        == 0
    )
    values = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out))))
    assert set(values.tolist()) <= {0, 3}


def _corrupt_model(tmp_path: Path) -> str:
    for suffix in (".json", ".pt"):
        shutil.copy(MODELS_DIR / f"retina2d{suffix}", tmp_path / f"retina2d{suffix}")
    with open(tmp_path / "retina2d.pt", "r+b") as stream:
        stream.seek(200)
        stream.write(b"\x00garbage")
    return str(tmp_path / "retina2d.pt")


def _renamed_model(tmp_path: Path) -> str:
    """generic2d's weights and card copied as renamed.pt/.json: the card still names its own."""
    for suffix in (".json", ".pt"):
        shutil.copy(MODELS_DIR / f"generic2d{suffix}", tmp_path / f"renamed{suffix}")
    return str(tmp_path / "renamed.pt")


BAD_INPUTS = {
    "missing file": (lambda d, f, m: [str(d / "nope.nrrd"), m], "nope.nrrd: no such file"),
    "unreadable": (lambda d, f, m: [f, str(_junk(d))], "junk.nrrd: cannot be read"),
    "constant": (
        lambda d, f, m: [f, str(_write(np.ones((20, 20), np.float32), d / "flat.nrrd"))],
        "constant",
    ),
    "nan": (
        lambda d, f, m: [str(_write(np.full((20, 20), np.nan, np.float32), d / "nan.nrrd")), m],
        "NaN",
    ),
    "4-D": (
        lambda d, f, m: [f, str(_write(np.zeros((3, 4, 5, 6), np.float32), d / "four.nii.gz"))],
        "4-D",
    ),
    "2-D vs 3-D": (
        lambda d, f, m: [f, str(_write(_blobs((12, 14, 16)), d / "vol.nrrd"))],
        "3-D but the fixed image is 2-D",
    ),
    "one-slice volume vs volume": (
        lambda d, f, m: [
            str(_write(_blobs((12, 14, 16)), d / "vol.nrrd")),
            str(_write(_blobs((1, 14, 16)), d / "slice.nrrd")),
        ],
        "the moving image is a single slice and the other a volume",
    ),
    "3-D model for 2-D": (
        lambda d, f, m: [f, m, "--model", "lung3d"],
        "lung3d: is a 3-D model but the images are 2-D",
    ),
    "unknown model": (lambda d, f, m: [f, m, "--model", "nosuch"], "nosuch: unknown model name"),
    "model folder": (lambda d, f, m: [f, m, "--model", str(d)], "is a folder; give the model"),
    "card naming other weights": (
        lambda d, f, m: [f, m, "--model", _renamed_model(d)],
        "names weights 'generic2d.pt', not renamed.pt",
    ),
    "missing weights": (
        lambda d, f, m: [f, m, "--model", str(d / "absent.pt")],
        "absent.pt: model weights not found",
    ),
    "bad sha256": (lambda d, f, m: [f, m, "--model", _corrupt_model(d)], "sha256 does not match"),
    "mask on other grid": (
        lambda d, f, m: [
            f,
            m,
            "--fixed-mask",
            str(_write(np.ones((10, 10), np.uint8), d / "mask.nrrd")),
        ],
        "mask.nrrd: mask is not on the fixed image's grid",
    ),
}


def _junk(folder: Path) -> Path:
    (folder / "junk.nrrd").write_text("this is not an image")
    return folder / "junk.nrrd"


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_no_outputs(
    case: str, pair_2d: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    make_args, expected = BAD_INPUTS[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    out = tmp_path / "out"
    code = main(
        [
            "register",
            *make_args(inputs, str(pair_2d[0]), str(pair_2d[1])),
            "-o",
            str(out),
            "--progress",
            "none",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and expected in err[0] and err[0].startswith("equireg: error: ")
    assert not out.exists() or not any(out.iterdir())


def test_unwritable_output_folder_exits_2(
    pair_2d: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = main(["register", str(pair_2d[0]), str(pair_2d[1]), "-o", str(blocker / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "output folder cannot be written" in err[0]


def test_module_entry_point_and_exit_code(tmp_path: Path) -> None:
    """``python -m equireg`` is what the Slicer module launches; usage errors exit 2."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "equireg",
            "register",
            str(tmp_path / "x.nrrd"),
            str(tmp_path / "y.nrrd"),
            "-o",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        run.returncode == 2
        and run.stderr.strip() == f"equireg: error: {tmp_path / 'x.nrrd'}: no such file or folder"
    )
    usage = subprocess.run(
        [sys.executable, "-m", "equireg", "register"], capture_output=True, text=True, timeout=120
    )
    assert usage.returncode == 2


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's (Linux)",
)
def test_the_command_keeps_freed_memory_for_reuse(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``main`` tells glibc to keep freed blocks (a 3-D MIND step spent a quarter of its time
    faulting the pages of fresh tensors in), before any work, even work that fails."""
    assert cli.keep_freed_memory()
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True) or True)
    missing = tmp_path / "missing.nrrd"
    assert main(["register", str(missing), str(missing), "-o", str(tmp_path / "out")]) == 2
    assert calls == [True]
