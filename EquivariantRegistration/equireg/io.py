"""Reading and writing images and transforms (SimpleITK), with the input checks users rely on.

Every problem with an input becomes an ``InputError`` naming the file and the problem; writes
go through a temporary file in the destination folder so that nothing is left half-written.
"""

from __future__ import annotations

import contextlib
import gzip
import locale
import math
import os
import struct
import sys
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .validate import check_image, check_labels, check_landmarks, check_mask, same_grid

__all__ = [
    "atomic_write",
    "checked_mask",
    "quiet_output",
    "read_any",
    "read_image",
    "read_labels",
    "read_landmarks",
    "read_mask",
    "read_transform",
    "same_grid",
    "write_image",
    "write_text",
    "write_transform",
]

Notify = Callable[[str], None]
MAX_VOXELS = 2**30  # voxel values (× components) of one input: 4 GB as float32

checked_mask = check_mask  # the name ``api`` imports


@contextlib.contextmanager
def quiet_output() -> Iterator[list[str]]:
    """Capture what C++ libraries (ITK, GDCM, HDF5, MetaIO) print on file descriptors 1 and 2
    while the block runs; the captured lines are in the yielded list afterwards. The process
    locale is restored too (GDCM's writer sets it to "C", which makes Python's default text
    encoding ASCII)."""
    captured: list[str] = []
    saved_locale = locale.setlocale(locale.LC_ALL)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved, sink = [], tempfile.TemporaryFile()
    try:
        for fd in (1, 2):
            saved.append((fd, os.dup(fd)))
            os.dup2(sink.fileno(), fd)
    except OSError:  # no real descriptors (an embedding host): leave the streams alone
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        saved = []
    try:
        yield captured
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        sink.seek(0)
        captured.extend(sink.read().decode("utf-8", "replace").splitlines())
        sink.close()
        if locale.setlocale(locale.LC_ALL) != saved_locale:
            with contextlib.suppress(locale.Error):
                locale.setlocale(locale.LC_ALL, saved_locale)


def _reason(error: Exception) -> str:
    """One short line out of an ITK exception's text (the last line that says something)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    for line in reversed(lines):
        text = line.split("itk::ERROR:")[-1].strip()
        if text and not text.startswith(("Reason: No such file", "Description:")):
            return text[:200]
    return (lines[-1] if lines else "unknown error")[:200]


_NIFTI_BYTES = {
    2: 1,
    4: 2,
    8: 4,
    16: 4,
    32: 8,
    64: 8,
    128: 3,
    256: 1,
    512: 2,
    768: 4,
    1024: 8,
    1280: 8,
    1536: 16,
    1792: 16,
    2048: 32,
    2304: 4,
}


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Header + data bytes a single-file NIfTI-1/-2 declares (``None``: not such a header)."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            if header[344:347] not in (b"n+1",):
                return None  # a .hdr/.img pair: data elsewhere
            dims = struct.unpack(order + "8h", header[40:56])
            datatype = struct.unpack(order + "h", header[70:72])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            count = int(np.prod([max(int(d), 1) for d in dims[1 : 1 + max(0, min(dims[0], 7))]]))
            return max(offset, 352) + count * _NIFTI_BYTES.get(datatype, 0)
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            dims = struct.unpack(order + "8q", header[16:80])
            datatype = struct.unpack(order + "h", header[12:14])[0]
            offset = struct.unpack(order + "q", header[168:176])[0]
            count = int(np.prod([max(int(d), 1) for d in dims[1 : 1 + max(0, min(dims[0], 7))]]))
            return max(offset, 544) + count * _NIFTI_BYTES.get(datatype, 0)
    return None


def _check_nifti_complete(path: Path) -> None:
    """A NIfTI file whose data is cut short is an error (ITK would fill the rest with zeros)."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    try:
        if name.endswith(".gz"):
            with gzip.open(path, "rb") as stream:
                expected = _nifti_expected_bytes(stream.read(544))
                if expected is None:
                    return
                stream.seek(0)
                size = 0
                while block := stream.read(1 << 22):
                    size += len(block)
        else:
            with open(path, "rb") as stream:
                expected = _nifti_expected_bytes(stream.read(544))
            size = path.stat().st_size
    except (EOFError, OSError, zlib.error) as error:
        raise InputError(f"{path}: compressed data is truncated or corrupt ({error})") from None
    if expected is not None and size < expected:
        raise InputError(
            f"{path}: file is truncated ({size} of the {expected} bytes its header declares)"
        )


_GZIP_MAX_RATIO = 1100  # deflate expands at most ~1032:1


def _bytes_per_value(pixel_id: int) -> int:
    """Bytes of one component of ``pixel_id`` (1 when unknown: a lower bound)."""
    name = sitk.GetPixelIDValueAsString(pixel_id).lower()
    for words, size in (("64", 8), ("double", 8), ("32", 4), ("float", 4), ("16", 2)):
        if words in name:
            return size
    return 1


def _check_declared_data(path: Path, data_bytes: int, values: int) -> None:
    """An NRRD or MetaImage file too short for the data its header declares is an error before
    anything is allocated (raw data: its bytes; gzip: at most ~1032:1; text: a byte a value)."""
    if not path.name.lower().endswith((".nrrd", ".mha", ".nhdr", ".mhd")) or not path.is_file():
        return
    with open(path, "rb") as stream:
        header = stream.read(8192).decode("latin-1").lower()
    if "data file" in header or ("elementdatafile" in header and "= local" not in header):
        return  # detached data: the other file is read by ITK
    size = path.stat().st_size
    if "bzip2" in header or "bz2" in header:
        return
    if "encoding: gzip" in header or "encoding: gz" in header or "compresseddata = true" in header:
        needed = data_bytes // _GZIP_MAX_RATIO
    elif "encoding: ascii" in header or "encoding: text" in header or "encoding: txt" in header:
        needed = values
    elif "encoding: hex" in header:
        needed = 2 * data_bytes
    else:
        needed = data_bytes
    if size < needed:
        raise InputError(
            f"{path}: file is truncated ({size} bytes; its header declares {data_bytes} bytes "
            "of voxel data)"
        )


def _split_series(path: Path) -> tuple[Path, str | None]:
    """``folder#SeriesInstanceUID`` names one series of a DICOM folder."""
    text = str(path)
    if "#" in text and not path.exists():
        folder, uid = text.rsplit("#", 1)
        if Path(folder).is_dir():
            return Path(folder), uid
    return path, None


def _read_dicom_folder(path: Path, uid: str | None, notify: Notify) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = list(reader.GetGDCMSeriesIDs(str(path)))
    if not series:
        raise InputError(f"{path}: folder holds no DICOM series")
    files = {s: reader.GetGDCMSeriesFileNames(str(path), s) for s in series}
    if uid is not None:
        if uid not in files:
            raise InputError(f"{path}#{uid}: no such series (the folder holds {', '.join(series)})")
        chosen = uid
    else:
        chosen = max(series, key=lambda s: len(files[s]))
        if len(series) > 1:
            others = ", ".join(f"{s} ({len(files[s])} files)" for s in series if s != chosen)
            notify(
                f"{path}: {len(series)} DICOM series; reading the largest, {chosen} "
                f"({len(files[chosen])} files); others: {others}; choose one with {path}#UID"
            )
    reader.SetFileNames(files[chosen])
    return reader.Execute()


def read_any(path: str | os.PathLike, what: str, notify: Notify = lambda _m: None) -> sitk.Image:
    """Read a file or a DICOM folder (``folder#UID`` for one of its series) as it is stored,
    without the checks of ``read_image`` (``warp`` takes any image); ``what`` names the kind of
    file in messages.

    Raises:
        InputError: missing, unreadable or truncated file, or a DICOM folder without series.
    """
    path, uid = _split_series(Path(path))
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    _check_nifti_complete(path)
    notices: list[str] = []  # given to ``notify`` after the capture of library output ends
    try:
        with quiet_output():
            if path.is_dir():
                image = _read_dicom_folder(path, uid, notices.append)
            else:
                image = _read_file(path)
    except InputError:
        raise
    except RuntimeError as error:
        raise InputError(f"{path}: cannot be read as {what} ({_reason(error)})") from None
    except (OSError, MemoryError, OverflowError, ValueError) as error:
        raise InputError(f"{path}: cannot be read as {what} ({error})") from None
    for notice in notices:
        notify(notice)
    return image


def _read_file(path: Path) -> sitk.Image:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()  # the header only: refuse absurd sizes unallocated
    voxels = math.prod(reader.GetSize()) * reader.GetNumberOfComponents()
    if voxels > MAX_VOXELS:
        raise InputError(
            f"{path}: header declares {voxels} voxel values (size {reader.GetSize()}); "
            f"more than the {MAX_VOXELS} this program reads"
        )
    _check_declared_data(path, voxels * _bytes_per_value(reader.GetPixelID()), voxels)
    return reader.Execute()


def read_image(path: str | os.PathLike, notify: Notify = lambda _m: None) -> sitk.Image:
    """Read a 2-D or 3-D scalar image as float32 and check it as ``validate.check_image`` does
    (colour 2-D images become grey, a one-slice 3-D image becomes 2-D in its plane, with a
    notice through ``notify`` for the first). ``folder#UID`` reads one series of a DICOM folder;
    without it the folder's largest series is read (with a notice naming it).

    Raises:
        InputError: missing, unreadable or truncated file; a DICOM folder without series; and
            everything ``validate.check_image`` refuses.
    """
    path = Path(path)
    return check_image(read_any(path, "an image", notify), str(path), notify)


def read_mask(path: str | os.PathLike, reference: sitk.Image, role: str) -> sitk.Image:
    """Read a mask that must lie on ``reference``'s grid; non-zero voxels are inside.

    Raises:
        InputError: missing or unreadable file, and what ``validate.check_mask`` refuses.
    """
    path = Path(path)
    return check_mask(read_any(path, "a mask image"), reference, role, str(path))


def read_labels(path: str | os.PathLike, reference: sitk.Image, role: str) -> sitk.Image:
    """Read a label map (label 0 is background) that must lie on ``reference``'s grid.

    Raises:
        InputError: missing or unreadable file, and what ``validate.check_labels`` refuses.
    """
    path = Path(path)
    return check_labels(read_any(path, "a label image"), reference, role, str(path))


def file_mode() -> int:
    """The mode a new file gets from ``open`` under this process's umask (``0o644`` usually)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)`` then move the result onto ``path`` in one step, with the
    mode a plain ``open`` would give it (``mkstemp`` makes its files private, 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=".tmp-", suffix="".join(path.suffixes)
    )
    os.close(handle)
    try:
        try:
            write(temporary)
        except RuntimeError as error:  # ITK names the file it wrote: name the user's instead
            raise RuntimeError(str(error).replace(temporary, str(path))) from None
        os.chmod(temporary, file_mode())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``atomic_write`` with library chatter captured and every failure one ``InputError``."""
    try:
        with quiet_output():
            atomic_write(path, write)
    except RuntimeError as error:
        raise InputError(f"{path}: cannot be written ({_reason(error)})") from None
    except OSError as error:
        raise InputError(f"{path}: cannot be written ({error.strerror or error})") from None


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write ``image`` atomically (format from the extension).

    Raises:
        InputError: the place cannot be written (read-only, full disk, unknown extension).
    """
    _write(path, lambda p: sitk.WriteImage(image, p, compress))


def write_transform(transform: sitk.Transform, path: str | os.PathLike) -> None:
    """Write ``transform`` atomically (``.h5``, ``.tfm``, ``.txt``, ``.mat``).

    Raises:
        InputError: the place cannot be written.
    """
    _write(path, lambda p: sitk.WriteTransform(transform, p))


def write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` (UTF-8) atomically.

    Raises:
        InputError: the place cannot be written.
    """
    _write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def read_transform(path: str | os.PathLike) -> sitk.Transform:
    """Read an ITK transform file.

    Raises:
        InputError: missing or not an ITK transform.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such transform file")
    try:
        with quiet_output():
            return sitk.ReadTransform(str(path))
    except RuntimeError:
        raise InputError(f"{path}: cannot be read as an ITK transform") from None


def read_landmarks(path: str | os.PathLike, dim: int) -> np.ndarray:
    """Points ``(N, dim)`` in LPS mm from a CSV file with a header row (``x,y`` or ``x,y,z``).

    Raises:
        InputError: missing file, not a CSV of numbers, no rows, wrong column count, or NaN /
            infinite coordinates.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such landmark file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy warns on an empty file; we say it ourselves
            points = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2, dtype=np.float64)
    except (ValueError, UnicodeDecodeError) as error:
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else "bad value"
        raise InputError(f"{path}: not a CSV of numbers with one header row ({reason})") from None
    return check_landmarks(points, dim, str(path))
