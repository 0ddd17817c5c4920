"""Every kind of bad input (docs/errors.md): exit 2 and one line on the command line, the same
``InputError`` from the Python API, checked before any work; outputs committed as one set.

The network is replaced by a known shift where a real model run is not the point (as in
test_cli.py), so that each case takes well under a second.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import gaussian_blobs

import equireg.api
import equireg.outputs
from equireg.cli import main
from equireg.compose import RegistrationStep
from equireg.errors import InputError
from equireg.io import quiet_output, read_image
from equireg.maps import Map
from equireg.models import MODELS_DIR, load_network, read_card
from equireg.outputs import OUTPUT_FILES


class _Identity(RegistrationStep):
    """The identity map: stands in for the network where its answer does not matter."""

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Map:
        return lambda coords: coords


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(equireg.api, "load_network", lambda card: _Identity())


def _image(array: np.ndarray, spacing=None, origin=None, direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(array, isVector=False)
    if spacing is not None:
        image.SetSpacing(spacing)
    if origin is not None:
        image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def _write(array_or_image, path: Path, compress: bool = False) -> Path:
    image = array_or_image if isinstance(array_or_image, sitk.Image) else _image(array_or_image)
    sitk.WriteImage(image, str(path), compress)
    return path


def _blobs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return gaussian_blobs(shape, seed)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pair")
    return (
        _write(_blobs((40, 36)), folder / "fixed.nrrd"),
        _write(_blobs((40, 36), seed=1), folder / "moving.nrrd"),
    )


def _run(args: list[str], capfd: pytest.CaptureFixture) -> tuple[int, list[str]]:
    code = main(args)
    err = capfd.readouterr().err.strip().splitlines()
    return code, err


def _one_line(code: int, err: list[str], expected: str, exit_code: int = 2) -> None:
    assert code == exit_code, err
    assert len(err) == 1, err
    assert expected in err[0], err


# --- images: the same checks for files (command line) and in-memory images (API) ------------


def _truncated(path: Path, compress: bool) -> Path:
    _write(_blobs((16, 20, 24)), path, compress=compress)
    data = path.read_bytes()
    if compress:  # keep the header intact, cut the compressed data
        raw = gzip.decompress(data)
        path.write_bytes(gzip.compress(raw[: 352 + 100]))
    else:
        path.write_bytes(data[: len(data) // 2])
    return path


def _rgb() -> np.ndarray:
    return (np.random.default_rng(0).random((30, 32, 3)) * 255).astype(np.uint8)


def _complex_image() -> sitk.Image:
    values = _blobs((20, 22)).astype(np.complex64) * (1 + 1j)
    return sitk.GetImageFromArray(values)


# kind -> (make the image in memory, expected words); the file cases write the same image.
IMAGES = {
    "nan": (lambda: _image(np.where(_blobs((20, 22)) > 20, np.nan, 1).astype(np.float32)), "NaN"),
    "inf": (
        lambda: _image(np.where(_blobs((20, 22)) > 20, np.inf, 1).astype(np.float32)),
        "infinite",
    ),
    "constant": (lambda: _image(np.full((20, 22), 5.0, np.float32)), "constant (5 everywhere)"),
    "all zero": (lambda: _image(np.zeros((20, 22), np.float32)), "all zero"),
    "1x1": (lambda: _image(np.ones((1, 1), np.float32)), "too small"),
    "4-D": (lambda: _image(_blobs((3, 4, 5, 6))), "4-D"),
    "complex": (_complex_image, "complex"),
    "3-D vector": (lambda: sitk.GetImageFromArray(np.ones((6, 7, 8, 2), np.float32)), "vector"),
    "1-D line": (lambda: _image(_blobs((9, 1, 1))), "too small"),
}


@pytest.mark.parametrize("kind", list(IMAGES))
def test_bad_image_in_memory_raises_input_error_naming_the_argument(kind: str) -> None:
    make, expected = IMAGES[kind]
    with pytest.raises(InputError) as caught:
        equireg.api.register(make(), make() if kind != "1x1" else _image(_blobs((20, 22))))
    text = str(caught.value)
    assert expected in text and "\n" not in text and text.startswith(("fixed", "moving"))


@pytest.mark.parametrize("kind", [k for k in IMAGES if k != "complex"])
def test_bad_image_file_exits_2_with_one_line(
    kind: str, pair: tuple[Path, Path], tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    make, expected = IMAGES[kind]
    bad = _write(make(), tmp_path / "bad.nrrd")
    out = tmp_path / "out"
    code, err = _run(["register", str(pair[0]), str(bad), "-o", str(out)], capfd)
    _one_line(code, err, expected)
    assert str(bad) in err[0] and err[0].startswith("equireg: error: ")
    assert not out.exists(), "a failed run leaves no folder it created"


def test_complex_file_exits_2(
    pair: tuple[Path, Path], tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    bad = _write(_complex_image(), tmp_path / "complex.mha")
    code, err = _run(["register", str(bad), str(pair[1]), "-o", str(tmp_path / "o")], capfd)
    _one_line(code, err, "complex")


@pytest.mark.parametrize("compress", [False, True], ids=["nii", "nii.gz"])
def test_truncated_nifti_is_an_error_not_zeros(
    compress: bool, pair: tuple[Path, Path], tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    bad = _truncated(tmp_path / ("cut.nii.gz" if compress else "cut.nii"), compress)
    with pytest.raises(InputError, match="truncated") as caught:
        read_image(bad)
    assert "constant" not in str(caught.value)
    code, err = _run(["register", str(pair[0]), str(bad), "-o", str(tmp_path / "o")], capfd)
    _one_line(code, err, "truncated")


def test_colour_image_in_memory_becomes_grey_as_a_file_does(pair: tuple[Path, Path]) -> None:
    colour = sitk.GetImageFromArray(_rgb(), isVector=True)
    grey = sitk.GetImageFromArray(_rgb().astype(np.float32) @ np.array([0.299, 0.587, 0.114]))
    result = equireg.api.register(grey, colour, refine_steps=0)
    assert any("grey" in w for w in result.report["warnings"])
    assert result.warped.GetNumberOfComponentsPerPixel() == 1


def test_non_image_arguments_are_input_errors() -> None:
    with pytest.raises(InputError, match="fixed: expected a file path or a SimpleITK image"):
        equireg.api.register(np.zeros((4, 4)), "x.nrrd")
    with pytest.raises(InputError, match="fixed_mask: expected"):
        equireg.api.register(_image(_blobs((20, 22))), _image(_blobs((20, 22))), fixed_mask=3)


# --- masks, labels, landmarks ----------------------------------------------------------------


def test_nan_mask_is_refused_in_memory_and_as_a_file(
    pair: tuple[Path, Path], tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    mask = _image(np.where(_blobs((40, 36)) > 20, np.nan, 1).astype(np.float32))
    with pytest.raises(InputError, match="fixed_mask .*NaN"):
        equireg.api.register(pair[0], pair[1], fixed_mask=mask)
    path = _write(mask, tmp_path / "mask.nrrd")
    code, err = _run(
        ["register", *map(str, pair), "-o", str(tmp_path / "o"), "--fixed-mask", str(path)], capfd
    )
    _one_line(code, err, "mask.nrrd: mask contains NaN")


def test_a_mask_of_another_dimension_is_an_input_error(
    pair: tuple[Path, Path], tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """A 3-D mask for a 2-D image: one line naming the mask and both dimensions, exit 2 (it
    was a numpy broadcasting error and exit 3)."""
    mask = _write(_image(np.ones((5, 36, 40), dtype=np.float32)), tmp_path / "mask3d.nrrd")
    code, err = _run(
        ["register", *map(str, pair), "-o", str(tmp_path / "o"), "--fixed-mask", str(mask)], capfd
    )
    _one_line(code, err, "mask3d.nrrd")
    assert "3-D" in err[0] and "2-D" in err[0]


@pytest.fixture(scope="module")
def transform_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("t") / "shift.tfm"
    sitk.WriteTransform(sitk.TranslationTransform(2, (1.0, 0.5)), str(path))
    return path


def _labels(array: np.ndarray, path: Path, spacing=None) -> Path:
    return _write(_image(array, spacing=spacing), path)


EVALUATE = {
    "labels off the fixed grid": (
        lambda d: (
            ["--fixed-labels", str(_labels(np.ones((40, 36), np.uint8), d / "fl.nrrd", (2, 2)))]
            + ["--moving-labels", str(_labels(np.ones((40, 36), np.uint8), d / "ml.nrrd"))]
        ),
        "fl.nrrd: label map is not on the fixed image's grid",
    ),
    "float labels with NaN": (
        lambda d: (
            ["--fixed-labels", str(_labels(np.full((40, 36), np.nan, np.float32), d / "fl.nrrd"))]
            + ["--moving-labels", str(_labels(np.ones((40, 36), np.uint8), d / "ml.nrrd"))]
        ),
        "fl.nrrd: label map contains NaN",
    ),
    "NaN landmark": (
        lambda d: (
            ["--fixed-landmarks", str(_csv(d / "f.csv", "x,y\n1,2\nnan,3\n"))]
            + ["--moving-landmarks", str(_csv(d / "m.csv", "x,y\n1,2\n2,3\n"))]
        ),
        "f.csv: landmark row 2 has a NaN or infinite coordinate",
    ),
    "Inf landmark": (
        lambda d: (
            ["--fixed-landmarks", str(_csv(d / "f.csv", "x,y\n1,2\n2,3\n"))]
            + ["--moving-landmarks", str(_csv(d / "m.csv", "x,y\n1,inf\n2,3\n"))]
        ),
        "m.csv: landmark row 1 has a NaN or infinite coordinate",
    ),
    "empty landmark file": (
        lambda d: (
            ["--fixed-landmarks", str(_csv(d / "f.csv", ""))]
            + ["--moving-landmarks", str(_csv(d / "m.csv", "x,y\n1,2\n"))]
        ),
        "f.csv: expected rows of 2 coordinates",
    ),
}


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(EVALUATE))
def test_evaluate_bad_input_exits_2_with_one_line(
    case: str,
    pair: tuple[Path, Path],
    transform_file: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture,
) -> None:
    make, expected = EVALUATE[case]
    args = ["evaluate", *map(str, pair), "--transform", str(transform_file), *make(tmp_path)]
    code, err = _run(args, capfd)
    _one_line(code, err, expected)


# --- options: types and ranges before any work --------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"refine_steps": 2.5}, "--refine-steps 2.5: must be a whole number"),
        ({"refine_steps": "10"}, "--refine-steps '10': must be a whole number"),
        ({"refine_steps": True}, "must be a whole number"),
        ({"refine_steps": -1}, "must be between 0 and"),
        ({"refine_steps": 10**9}, "must be between 0 and"),
        ({"initial": "sideways"}, "--initial sideways: must be one of"),
        ({"similarity": 3}, "--similarity 3: must be a str"),
        ({"inverse": "yes"}, "--inverse 'yes': must be True or False"),
    ],
)
def test_bad_options_are_refused_before_any_work(
    options: dict, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_work(*_args, **_kwargs):
        raise AssertionError("an input was read before the options were checked")

    monkeypatch.setattr(equireg.api, "read_image", no_work)
    with pytest.raises(InputError) as caught:
        equireg.api.register("fixed.nrrd", "moving.nrrd", **options)
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--refine-steps", "2.5"], "argument --refine-steps: '2.5' is not a whole number"),
        (["--refine-steps", "99999999"], "argument --refine-steps: 99999999: must be between"),
        (["--initial", "sideways"], "argument --initial: invalid choice"),
        (["--no-such-option"], "register: unrecognized arguments: --no-such-option"),
    ],
)
def test_usage_errors_are_one_line_naming_the_option(
    args: list[str], expected: str, pair: tuple[Path, Path], tmp_path: Path, capfd
) -> None:
    code, err = _run(["register", *map(str, pair), "-o", str(tmp_path / "o"), *args], capfd)
    _one_line(code, err, expected)


@pytest.mark.parametrize("where", ["before the command", "after it"])
def test_debug_adds_the_traceback_and_keeps_the_exit_code(
    where: str, pair: tuple[Path, Path], tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "missing.nrrd"
    args = ["register", str(pair[0]), str(missing), "-o", str(tmp_path)]
    args = ["--debug", *args] if where == "before the command" else [*args, "--debug"]
    code, err = _run(args, capfd)
    assert code == 2 and err[0].startswith("Traceback") and "no such file" in err[-1]


def test_register_help_shows_defaults_and_ranges(capfd: pytest.CaptureFixture) -> None:
    code = main(["register", "--help"])
    text = " ".join(capfd.readouterr().out.split())
    assert code == 0
    assert "(default: balanced)" in text and "0 to 10000" in text and "json (one JSON line" in text


# --- library chatter ------------------------------------------------------------------------


def test_folder_that_is_not_dicom_gives_one_line(
    pair: tuple[Path, Path], tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "not_dicom"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(b"DICM" * 100)
    (folder / "b.txt").write_text("hello")
    code, err = _run(["register", str(folder), str(pair[1]), "-o", str(tmp_path / "o")], capfd)
    _one_line(code, err, "folder holds no DICOM series")


def _dicom_series(folder: Path, uid: str, slices: int, z0: float) -> None:
    with quiet_output():  # GDCM's writer sets the process locale to "C"; this restores it
        _write_dicom_series(folder, uid, slices, z0)


def _write_dicom_series(folder: Path, uid: str, slices: int, z0: float) -> None:
    values = _blobs((slices, 24, 20)).astype(np.int16)
    for k in range(slices):
        image = sitk.GetImageFromArray(values[k : k + 1])
        image.SetOrigin((0.0, 0.0, z0 + 2.0 * k))
        image.SetSpacing((1.0, 1.0, 2.0))
        for tag, value in {
            "0020|000e": uid,
            "0020|000d": "1.2.3",
            "0008|0060": "CT",
            "0020|0013": str(k + 1),
            "0020|0032": f"0\\0\\{z0 + 2.0 * k}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": "2.0",
            "0008|0018": f"{uid}.{k + 1}",
        }.items():
            image.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()  # else GDCM gives every file a new series
        writer.SetFileName(str(folder / f"{uid}-{k:03d}.dcm"))
        writer.Execute(image)


def test_dicom_folder_with_several_series_reads_the_largest_or_the_named_one(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "dicom"
    folder.mkdir()
    _dicom_series(folder, "1.2.3.4.100", 8, 0.0)
    _dicom_series(folder, "1.2.3.4.200", 5, 50.0)
    notices: list[str] = []
    largest = read_image(folder, notices.append)
    assert largest.GetSize()[2] == 8
    assert len(notices) == 1 and "1.2.3.4.100" in notices[0] and "1.2.3.4.200" in notices[0]
    named = read_image(f"{folder}#1.2.3.4.200")
    assert named.GetSize()[2] == 5 and named.GetOrigin()[2] == pytest.approx(50.0)
    with pytest.raises(InputError, match="no such series"):
        read_image(f"{folder}#9.9.9")


# --- models ---------------------------------------------------------------------------------


def _model_copy(folder: Path, edit=None) -> Path:
    for suffix in (".json", ".pt"):
        shutil.copy(MODELS_DIR / f"retina2d{suffix}", folder / f"retina2d{suffix}")
    if edit is not None:
        card = json.loads((folder / "retina2d.json").read_text())
        edit(card)
        (folder / "retina2d.json").write_text(json.dumps(card))
    return folder / "retina2d.pt"


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _rehash(folder: Path) -> None:
    from equireg.models import sha256_of

    card = json.loads((folder / "retina2d.json").read_text())
    card["sha256"] = sha256_of(folder / "retina2d.pt")
    (folder / "retina2d.json").write_text(json.dumps(card))


def test_weights_without_checksum_are_refused(tmp_path: Path) -> None:
    for value in (None, ""):
        weights = _model_copy(tmp_path, lambda card, v=value: card.update(sha256=v))
        with pytest.raises(InputError, match="no sha256"):
            load_network(read_card(str(weights)))


def test_card_weights_path_must_stay_in_its_folder(tmp_path: Path) -> None:
    (tmp_path / "inner").mkdir()
    for outside in ("../retina2d.pt", "/etc/passwd"):
        weights = _model_copy(tmp_path / "inner", lambda card, o=outside: card.update(weights=o))
        with pytest.raises(InputError, match="leaves the card's folder"):
            read_card(str(weights))


def test_malicious_weights_are_refused_without_torchs_advice(tmp_path: Path) -> None:
    weights = _model_copy(tmp_path)
    torch.save({"x": _Evil()}, weights)
    _rehash(tmp_path)
    with pytest.raises(InputError) as caught:
        load_network(read_card(str(weights)))
    text = str(caught.value)
    assert "refused" in text and "weights_only" not in text and "\n" not in text
    assert "os.system" in text or "posix.system" in text, text


def test_weights_of_another_architecture_are_one_line(
    pair: tuple[Path, Path], tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    weights = _model_copy(tmp_path)
    torch.save({"layer.weight": torch.zeros(3)}, weights)
    _rehash(tmp_path)
    with pytest.raises(InputError, match="do not fit the retina2d architecture") as caught:
        load_network(read_card(str(weights)))
    assert "\n" not in str(caught.value)


# --- warp -----------------------------------------------------------------------------------


def _warp_args(pair, transform_file, out, *extra) -> list[str]:
    return [
        "warp",
        str(pair[1]),
        "--transform",
        str(transform_file),
        "--reference",
        *extra,
        "-o",
        str(out),
    ]


def test_warp_bad_places_and_dimensions_exit_2(
    pair: tuple[Path, Path], transform_file: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    volume = _write(_blobs((6, 8, 10)), tmp_path / "volume.nrrd")
    cases = [
        (_warp_args(pair, transform_file, tmp_path / "w.nrrd", str(volume)), "3-D reference image"),
        (_warp_args(pair, transform_file, tmp_path, str(pair[0])), "-o is a folder"),
        (_warp_args(pair, transform_file, tmp_path / "w.xyz", str(pair[0])), "cannot be written"),
    ]
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if not os.access(readonly, os.W_OK):  # root writes anywhere
        cases.append(
            (
                _warp_args(pair, transform_file, readonly / "w.nrrd", str(pair[0])),
                "cannot be written",
            )
        )
    for args, expected in cases:
        code, err = _run(args, capfd)
        _one_line(code, err, expected)
    assert not list(tmp_path.glob("*.xyz")) and not list(tmp_path.glob(".tmp-*"))


# --- outputs: one set per run ---------------------------------------------------------------


def test_outputs_are_one_set_with_one_mode_and_stale_outputs_go(
    pair: tuple[Path, Path], tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "inverse_transform.h5").write_text("from an earlier run")
    (out / "notes.txt").write_text("the user's own file")
    dead = out / ".equireg-999999999-abc"  # a killed run's staging folder (no such pid)
    dead.mkdir()
    (dead / ".tmp-x.h5").write_text("partial")
    code, _ = _run(["register", *map(str, pair), "-o", str(out), "--progress", "none"], capfd)
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert names == set(OUTPUT_FILES.values()) - {"inverse_transform.h5"} | {"notes.txt"}
    modes = {stat.S_IMODE((out / name).stat().st_mode) for name in names}
    assert len(modes) == 1  # the outputs get the mode of a file the user wrote (notes.txt)
    report = json.loads((out / "report.json").read_text())
    assert set(report["outputs"]) == {"transform", "displacement", "warped", "report"}


def test_an_output_never_replaces_an_input(
    pair: tuple[Path, Path], tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    out = tmp_path / "D"
    out.mkdir()
    moving = shutil.copy(pair[1], out / "warped.nrrd")
    before = Path(moving).read_bytes()
    code, err = _run(["register", str(pair[0]), str(moving), "-o", str(out)], capfd)
    _one_line(code, err, "the moving input is an output file name")
    assert Path(moving).read_bytes() == before
    result = equireg.api.register(pair[0], moving, refine_steps=0)
    with pytest.raises(InputError, match="would be replaced"):
        result.save(out)


def test_a_locked_output_folder_is_refused(
    pair: tuple[Path, Path], tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    out = tmp_path / "busy"
    code = r"""
import sys, time
from equireg.outputs import OutputFolder
with OutputFolder(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code_, err = _run(["register", *map(str, pair), "-o", str(out)], capfd)
        _one_line(code_, err, "in use by another equireg run")
    finally:
        holder.terminate()
        holder.wait(timeout=30)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_the_save_leaves_no_staging(
    signum: int,
    pair: tuple[Path, Path],
    tmp_path: Path,
    capfd: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    real = equireg.outputs.write_image

    def write_then_signal(image, path, *args):
        real(image, path, *args)
        os.kill(os.getpid(), signum)

    monkeypatch.setattr(equireg.outputs, "write_image", write_then_signal)
    # Python's own Ctrl-C handler, also where the shell started the tests with SIGINT ignored
    # (a background job: ``make test &``), which would make the signal a no-op.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    out = tmp_path / "out"
    code, err = _run(["register", *map(str, pair), "-o", str(out), "--progress", "none"], capfd)
    assert code == (143 if signum == signal.SIGTERM else 130) and len(err) == 1
    assert not out.exists() or not any(out.iterdir())


def test_command_line_chatter_and_temp_folder(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """A real process: stderr is one line for a bad input, and a run with refinement leaves no
    empty torchinductor folder in TMPDIR."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    folder = tmp_path / "not_dicom"
    folder.mkdir()
    (folder / "x.dcm").write_bytes(b"\0" * 200)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "equireg",
            "register",
            str(folder),
            str(pair[1]),
            "-o",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "equireg",
            "register",
            *map(str, pair),
            "-o",
            str(tmp_path / "r"),
            "--refine-steps",
            "2",
            "--progress",
            "none",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert not any(p.name.startswith("torchinductor") for p in temp.iterdir())


def test_library_diagnostics_of_a_failed_write_are_one_line(
    pair: tuple[Path, Path], tmp_path: Path, capfd: pytest.CaptureFixture, monkeypatch
) -> None:
    """A full disk makes HDF5 print its error stack on stderr (52 lines): it is captured and
    the run ends with one line naming the file."""

    def full_disk(transform, path):
        os.write(2, b"HDF5-DIAG: Error detected in HDF5 (1.14.3):\n" * 52)
        raise RuntimeError("Exception thrown in SimpleITK WriteTransform: HDF5 write failed")

    monkeypatch.setattr(sitk, "WriteTransform", full_disk)
    code, err = _run(["register", *map(str, pair), "-o", str(tmp_path / "o")], capfd)
    _one_line(code, err, "transform.h5: cannot be written (")
    assert not (tmp_path / "o").exists()


def test_runtime_failure_exits_3_with_one_line_and_keeps_it_with_debug(
    pair: tuple[Path, Path], tmp_path: Path, capfd: pytest.CaptureFixture, monkeypatch
) -> None:
    from equireg.errors import RegistrationFailure

    def out_of_memory(*_args, **_kwargs):
        raise RegistrationFailure("out of memory on CUDA, and the CPU failed too:\nline two")

    monkeypatch.setattr(equireg.api, "load_network", out_of_memory)
    code, err = _run(["register", *map(str, pair), "-o", str(tmp_path / "o")], capfd)
    _one_line(code, err, "equireg: failed: out of memory on CUDA", exit_code=3)
    code, err = _run(["--debug", "register", *map(str, pair), "-o", str(tmp_path / "o")], capfd)
    assert code == 3 and err[0].startswith("Traceback") and "out of memory" in err[-1]
