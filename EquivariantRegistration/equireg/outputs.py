"""The output files of one registration: their names (one registry) and ``Result.save``.

The engine, the command line and the Slicer bridge read the same ``OUTPUT_FILES``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from .errors import InputError
from .io import write_image, write_transform

OUTPUT_FILES = {
    "transform": "transform.h5",
    "displacement": "displacement.nrrd",
    "warped": "warped.nrrd",
    "report": "report.json",
    "inverse_transform": "inverse_transform.h5",
}


@dataclass
class Result:
    """What one registration produced; ``save`` writes its files as one set (README)."""

    transform: sitk.Transform
    displacement: sitk.Image
    warped: sitk.Image
    report: dict[str, Any]
    inverse_transform: sitk.Transform | None = None

    def save(self, output_dir: str | os.PathLike) -> dict[str, str]:
        """Write every output into a temporary folder, then move them into ``output_dir``."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".equireg-", dir=output_dir))
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
            (staging / OUTPUT_FILES["report"]).write_text(json.dumps(report, indent=2) + "\n")
            for name in names:
                os.replace(staging / OUTPUT_FILES[name], output_dir / OUTPUT_FILES[name])
            return outputs
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Fail early (``InputError``) when ``output_dir`` cannot be created or written."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"{output_dir}: output folder is an existing file")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=".equireg-probe-", dir=output_dir)
        os.rmdir(probe)
    except OSError as error:
        raise InputError(
            f"{output_dir}: output folder cannot be written ({error.strerror})"
        ) from None
    return output_dir
