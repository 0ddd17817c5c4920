"""The output files of one registration: their names (one registry), ``Result.save`` and the
output folder's lock (docs/errors.md, "Outputs").

The engine, the command line and the Slicer bridge read the same ``OUTPUT_FILES``. A run's
outputs are written into a staging folder and committed as one set: the folder is locked for
the run, files of our own output names that the run did not produce are removed in the same
commit, an output never replaces an input, and staging folders of dead runs are removed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from .errors import InputError
from .io import write_image, write_transform
from .options import OUTPUT_FILES
from .space import lift_displacement, lift_transform
from .validate import slice_plane

try:  # Unix; on Windows the folder is not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

STAGING_PREFIX = ".equireg-"
_HELD: dict[Path, int] = {}  # output folders this process has locked: folder -> descriptor


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_dead_staging(output_dir: Path, legacy_age_s: float = 3600.0) -> None:
    """Remove ``.equireg-PID-*`` staging folders whose process is gone (a killed run), and
    pre-PID ``.equireg-*`` folders older than ``legacy_age_s``."""
    with contextlib.suppress(OSError):
        for entry in output_dir.iterdir():
            if not entry.name.startswith(STAGING_PREFIX) or not entry.is_dir():
                continue
            pid_text = entry.name[len(STAGING_PREFIX) :].split("-", 1)[0]
            if pid_text.isdigit():
                dead = int(pid_text) != os.getpid() and not _pid_alive(int(pid_text))
            else:
                dead = time.time() - entry.stat().st_mtime > legacy_age_s
            if dead:
                shutil.rmtree(entry, ignore_errors=True)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_not_outputs(output_dir: Path, inputs: dict[str, Any]) -> None:
    """No input file is one of the outputs a run into ``output_dir`` writes.

    Raises:
        InputError: naming the input (``--moving D/warped.nrrd`` with ``-o D``).
    """
    for role, value in inputs.items():
        if not isinstance(value, (str, os.PathLike)):
            continue
        for name in OUTPUT_FILES.values():
            if _same_file(Path(value), output_dir / name):
                raise InputError(
                    f"{value}: the {role} input is an output file name in the output folder "
                    f"{output_dir}; it would be replaced (choose another output folder)"
                )


class OutputFolder:
    """The output folder of one run, created if needed and locked while the block runs.

    On a failure, a folder this run created and left empty is removed. Usage::

        with OutputFolder(path, inputs={"fixed": f, "moving": m}) as folder:
            result = register(...)
            result.save(folder.path)

    Raises (on entering):
        InputError: the path is a file, cannot be created or written, another run holds the
            lock, or an input is one of its output files.
    """

    def __init__(self, path: str | os.PathLike, inputs: dict[str, Any] | None = None):
        if not str(path).strip():
            raise InputError("output folder: empty path (give -o FOLDER)")
        self.path = Path(path)
        self.inputs = inputs or {}
        self.created = False
        self._fd: int | None = None

    def __enter__(self) -> OutputFolder:
        path = self.path
        if path.exists() and not path.is_dir():
            raise InputError(f"{path}: output folder is an existing file")
        check_not_outputs(path, self.inputs)
        try:
            self.created = not path.exists()
            path.mkdir(parents=True, exist_ok=True)
            probe = tempfile.mkdtemp(prefix=".equireg-probe-", dir=path)
            os.rmdir(probe)
        except OSError as error:
            self._remove_if_created()
            raise InputError(
                f"{path}: output folder cannot be written ({error.strerror or error})"
            ) from None
        try:
            self._fd = _lock(path)
        except InputError:
            self._remove_if_created()
            raise
        remove_dead_staging(path)
        return self

    def _remove_if_created(self) -> None:
        if self.created:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only when empty

    def __exit__(self, kind: type | None, *_: object) -> None:
        _unlock(self.path, self._fd)
        if kind is not None:
            self._remove_if_created()


def _lock(path: Path) -> int | None:
    key = path.resolve()
    if fcntl is None or key in _HELD:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise InputError(
            f"{path}: output folder is in use by another equireg run (wait for it, or choose "
            "another folder)"
        ) from None
    _HELD[key] = fd
    return fd


def _unlock(path: Path, fd: int | None) -> None:
    if fd is None:
        return
    _HELD.pop(path.resolve(), None)
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@dataclass
class Result:
    """What one registration produced; ``save`` writes its files as one set (README)."""

    transform: sitk.Transform
    displacement: sitk.Image
    warped: sitk.Image
    report: dict[str, Any]
    inverse_transform: sitk.Transform | None = None

    def save(self, output_dir: str | os.PathLike) -> dict[str, str]:
        """Write every output into a staging folder, then commit them into ``output_dir`` as
        one set (same file mode for all; other files of our output names removed).

        Raises:
            InputError: the folder cannot be written, is locked by another run, or an input
                named in the report is one of the output files.
        """
        output_dir = Path(output_dir)
        inputs = self.report.get("inputs", {})
        with OutputFolder(output_dir, {k: inputs.get(k) for k in ("fixed", "moving")}):
            return self._commit(output_dir)

    def _commit(self, output_dir: Path) -> dict[str, str]:
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=output_dir))
        try:
            write_transform(self.transform, staging / OUTPUT_FILES["transform"])
            write_image(self.displacement, staging / OUTPUT_FILES["displacement"])
            write_image(self.warped, staging / OUTPUT_FILES["warped"])
            names = ["transform", "displacement", "warped", "report"]
            if self.inverse_transform is not None:
                write_transform(self.inverse_transform, staging / OUTPUT_FILES["inverse_transform"])
                names.append("inverse_transform")
            outputs = {name: str(output_dir / OUTPUT_FILES[name]) for name in names}
            report = {**self.report, "outputs": outputs}
            text = json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n"
            (staging / OUTPUT_FILES["report"]).write_text(text, encoding="utf-8")
            for name in names:
                os.replace(staging / OUTPUT_FILES[name], output_dir / OUTPUT_FILES[name])
            for name, file_name in OUTPUT_FILES.items():
                if name not in names:
                    with contextlib.suppress(FileNotFoundError):
                        (output_dir / file_name).unlink()
            return outputs
        except OSError as error:
            raise InputError(
                f"{output_dir}: outputs cannot be written ({error.strerror or error})"
            ) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def json_safe(value: Any) -> Any:
    """``value`` (dicts, lists, numbers) with NaN and ±inf as ``None``: JSON has no such
    numbers, and ``json.dumps`` would write bare ``NaN``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def lift_to_slice(result: Result, fixed: sitk.Image, moving: sitk.Image) -> Result:
    """``result`` of 2-D images that came from one-slice 3-D inputs, as 3-D one-slice outputs.

    ``fixed`` and ``moving`` are the checked images ``register`` ran on (``validate.
    check_image`` records a one-slice input's 3-D plane on them). When the fixed image came
    from a one-slice 3-D image, the transform(s) become 3-D (a one-slice
    DisplacementFieldTransform, linear parts as 3-D affine transforms), the displacement a
    one-slice 3-D field in LPS mm and the warped image a one-slice 3-D image on the fixed
    slice's own grid, so ``equireg warp`` and Slicer (3-D transforms only) accept them. A 2-D
    moving image is taken to lie in the fixed slice's plane. Otherwise ``result`` is returned
    unchanged.
    """
    fixed_plane = slice_plane(fixed)
    if fixed_plane is None:
        return result
    moving_plane = slice_plane(moving) or fixed_plane
    inverse = None
    if result.inverse_transform is not None:
        inverse = lift_transform(result.inverse_transform, moving_plane, fixed_plane, fixed_plane)
    report = {**result.report, "one_slice_3d": True}
    return replace(
        result,
        transform=lift_transform(result.transform, fixed_plane, moving_plane, fixed_plane),
        displacement=lift_displacement(result.displacement, fixed_plane, moving_plane),
        warped=fixed_plane.lift_image(result.warped),
        report=report,
        inverse_transform=inverse,
    )


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Create ``output_dir`` if needed and check that it can be written (``demo``).

    Raises:
        InputError: the path is a file or cannot be created or written.
    """
    with OutputFolder(output_dir) as folder:
        return folder.path
