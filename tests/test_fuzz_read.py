"""Fuzz ``read_image`` for a bounded time: random bytes and random headers (NIfTI, NRRD,
MetaImage) give an image or an ``InputError``, never another exception or a crash.

The loop runs in a child process so that a crash inside a C++ reader fails this test with the
case that caused it instead of taking the test session down.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FUZZ_SECONDS = 6.0

_CHILD = r"""
import gzip, json, struct, sys, time, traceback
from pathlib import Path
import numpy as np
from equireg.errors import InputError
from equireg.io import read_image

folder, seconds = Path(sys.argv[1]), float(sys.argv[2])
rng = np.random.default_rng(int(sys.argv[3]))
DTYPES = [2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 0, 7, 9999]


def dims():
    count = int(rng.integers(0, 9))
    sizes = rng.integers(-2, 40, size=7)
    if rng.random() < 0.1:
        sizes[int(rng.integers(0, 7))] = int(rng.integers(1, 2**15))  # absurd sizes now and then
    return count, [int(s) for s in sizes]


def nifti():
    count, sizes = dims()
    header = bytearray(rng.integers(0, 256, size=348, dtype=np.uint8).tobytes())
    header[0:4] = struct.pack("<i", 348)
    header[40:56] = struct.pack("<8h", count, *sizes)
    header[70:72] = struct.pack("<h", int(rng.choice(DTYPES)))
    header[108:112] = struct.pack("<f", float(rng.choice([352.0, 0.0, 1e9, -5.0, 400.0])))
    header[344:348] = b"n+1\0"
    if rng.random() < 0.7:  # plausible spacing
        header[76:108] = struct.pack("<8f", *rng.uniform(-1, 3, size=8))
    data = rng.integers(0, 256, size=int(rng.integers(0, 60000)), dtype=np.uint8).tobytes()
    body = bytes(header) + b"\0" * 4 + data
    return (".nii.gz", gzip.compress(body)) if rng.random() < 0.4 else (".nii", body)


def nrrd():
    count, sizes = dims()
    count = max(1, min(count, 5))
    kind = rng.choice(["float", "uint8", "short", "double", "bogus", "int64"])
    encoding = rng.choice(["raw", "gzip", "ascii", "hex"])
    lines = ["NRRD0004", f"type: {kind}", f"dimension: {count}",
             "sizes: " + " ".join(str(s) for s in sizes[:count]), f"encoding: {encoding}"]
    if rng.random() < 0.5:
        lines.append("spacings: " + " ".join(str(float(v)) for v in rng.uniform(-1, 2, count)))
    if rng.random() < 0.3:
        lines.append("space directions: " + " ".join("(0,0,0)" for _ in range(count)))
    data = rng.integers(0, 256, size=int(rng.integers(0, 60000)), dtype=np.uint8).tobytes()
    if encoding == "gzip" and rng.random() < 0.5:
        data = gzip.compress(data)
    return ".nrrd", ("\n".join(lines) + "\n\n").encode() + data


ELEMENTS = ["MET_FLOAT", "MET_UCHAR", "MET_BOGUS", "MET_DOUBLE"]
SUFFIXES = [".nii", ".nii.gz", ".nrrd", ".mha", ".png", ".jpg", ".tif", ".dcm", ".vtk"]


def metaimage():
    count, sizes = dims()
    count = max(1, min(count, 5))
    lines = ["ObjectType = Image", f"NDims = {count}",
             "DimSize = " + " ".join(str(s) for s in sizes[:count]),
             "ElementType = " + str(rng.choice(ELEMENTS)),
             "ElementSpacing = " + " ".join(str(float(v)) for v in rng.uniform(-1, 2, count)),
             "CompressedData = " + str(rng.choice(["False", "True"])),
             "ElementDataFile = LOCAL"]
    data = rng.integers(0, 256, size=int(rng.integers(0, 60000)), dtype=np.uint8).tobytes()
    return ".mha", ("\n".join(lines) + "\n").encode() + data


def noise():
    suffix = str(rng.choice(SUFFIXES))
    return suffix, rng.integers(0, 256, size=int(rng.integers(0, 5000)), dtype=np.uint8).tobytes()


makers = [nifti, nrrd, metaimage, noise]
end, counts = time.monotonic() + seconds, {"image": 0, "input_error": 0}
case = 0
while time.monotonic() < end:
    suffix, data = makers[case % len(makers)]()
    path = folder / f"case{case}{suffix}"
    path.write_bytes(data)
    print(f"CASE {path}", flush=True)
    try:
        read_image(path)
        counts["image"] += 1
    except InputError as error:
        assert "\n" not in str(error), str(error)
        counts["input_error"] += 1
    except BaseException:
        print("UNEXPECTED " + traceback.format_exc().replace("\n", " | "), flush=True)
        sys.exit(1)
    path.unlink()
    case += 1
print("RESULT " + json.dumps(counts), flush=True)
"""


def test_read_image_on_random_files_gives_an_image_or_an_input_error(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path), str(FUZZ_SECONDS), "13"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = run.stdout.strip().splitlines()
    last_case = next((line for line in reversed(lines) if line.startswith("CASE")), "")
    unexpected = [line for line in lines if line.startswith("UNEXPECTED")]
    assert run.returncode == 0 and not unexpected, (run.returncode, last_case, unexpected)
    counts = json.loads(lines[-1].removeprefix("RESULT "))
    assert counts["input_error"] > 20, counts
