"""Running ``equireg register`` as a background process; standard library only.

One function builds the command line, one class launches the engine and hands over its output
lines without ever blocking the caller: the Slicer widget polls it from a timer, the console
API waits on it, and pytest runs the very same code with the venv's Python.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from equireg.options import BY_NAME, RUN_OPTIONS

DEVICES = ("auto", "cpu", "cuda")
INITIAL_ALIGNMENTS = BY_NAME["initial"].choices

# What ``equireg register`` imports beyond the packages Slicer bundles (numpy, SimpleITK).
# torch comes through SlicerPyTorch and is installed only after the user confirms, never at
# import. tqdm is not needed: the engine imports it only for ``--progress bar`` (a terminal).
ENGINE_REQUIREMENTS = {"torch": "torch>=2.3"}

# Options: one field per entry of ``equireg.options.RUN_OPTIONS`` (the one registry of the
# engine's run options), with the registry's default; ``build_command`` turns each into its
# ``equireg register`` flag. A field left at ``None`` is decided by the engine.
Options = dataclasses.make_dataclass(
    "Options",
    [(option.name, Any, dataclasses.field(default=option.default)) for option in RUN_OPTIONS],
    frozen=True,
)
Options.__module__ = __name__
Options.__doc__ = (
    "The user's choices of ``equireg register``'s run options; the engine checks them."
)


@dataclass(frozen=True)
class EngineInputs:
    """The exported input files of one run."""

    fixed: Path
    moving: Path
    fixed_mask: Path | None = None
    moving_mask: Path | None = None


@dataclass(frozen=True)
class ProgressEvent:
    """One output line of the engine, interpreted.

    ``stage`` is the engine's stage (``load``, ``network``, ...), ``warning`` or ``done`` for its
    JSON lines, ``log`` for any other stdout line and ``stderr`` for error output.
    """

    stage: str
    progress: float | None
    message: str
    outputs: dict[str, str] | None = None


def build_command(
    python: str, inputs: EngineInputs, output_dir: Path, options: Options
) -> list[str]:
    """``python -m equireg register ...`` with JSON progress on stdout."""
    command = [python, "-m", "equireg", "register", str(inputs.fixed), str(inputs.moving)]
    command += ["--output-dir", str(output_dir)]
    for option in RUN_OPTIONS:
        value = getattr(options, option.name)
        if option.flag_only:
            command += [option.flag] if value else []
        elif value is not None:
            command += [option.flag, str(value)]
    if inputs.fixed_mask is not None:
        command += ["--fixed-mask", str(inputs.fixed_mask)]
    if inputs.moving_mask is not None:
        command += ["--moving-mask", str(inputs.moving_mask)]
    return command + ["--progress", "json"]


def engine_environment(module_dir: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with ``module_dir`` first on PYTHONPATH.

    ``module_dir`` holds the ``equireg`` package, which Slicer installs beside the module rather
    than into its Python's site-packages.
    """
    env = dict(os.environ if base is None else base)
    paths = [str(module_dir)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"  # progress lines arrive as they are printed
    env["PYTHONIOENCODING"] = "utf-8"  # what EngineProcess decodes, whatever the locale
    return env


def installed_version(name: str) -> str | None:
    """The installed version of distribution ``name`` (``None`` if absent); imports nothing."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    """The numeric release of a version: ``2.5.1+cu121`` and ``2.5.1rc1`` give ``(2, 5, 1)``."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in match[1].split("."))


_COMPARISONS = {
    ">=": lambda a, b: a >= b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


def satisfies(version: str, requirement: str) -> bool:
    """Whether ``version`` meets ``requirement`` (``name>=2.3``, ``name>=1,<3``; release numbers
    compared, padded with zeros: ``2.3`` equals ``2.3.0``)."""
    clauses = re.sub(r"^[A-Za-z0-9_.\-\[\]]+", "", requirement.strip())
    have = _release(version)
    for clause in filter(None, (part.strip() for part in clauses.split(","))):
        match = re.fullmatch(r"(>=|<=|==|!=|>|<)\s*(\S+)", clause)
        if match is None:
            raise ValueError(f"{requirement}: unsupported version clause {clause!r}")
        want = _release(match[2])
        width = max(len(have), len(want))
        padded = (have + (0,) * width)[:width], (want + (0,) * width)[:width]
        if not _COMPARISONS[match[1]](*padded):
            return False
    return True


def unmet_requirements(
    requirements: Mapping[str, str] = ENGINE_REQUIREMENTS,
    version_of: Any = installed_version,
) -> dict[str, str | None]:
    """The requirements that are not met, name → installed version (``None``: not installed)."""
    unmet = {}
    for name, requirement in requirements.items():
        version = version_of(name)
        if version is None or not satisfies(version, requirement):
            unmet[name] = version
    return unmet


def parse_line(line: str, stream: str) -> ProgressEvent:
    """Interpret one line of the engine's ``stream`` (``stdout`` or ``stderr``)."""
    if stream == "stdout":
        try:
            data: Any = json.loads(line)
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("stage"), str):
            progress = data.get("progress")
            return ProgressEvent(
                data["stage"],
                float(progress) if isinstance(progress, int | float) else None,
                str(data.get("message", "")),
                data.get("outputs"),
            )
        return ProgressEvent("log", None, line)
    return ProgressEvent("stderr", None, line)


class EngineProcess:
    """The engine running in the background; ``poll`` never blocks, ``kill`` ends it at once.

    Two reader threads move output lines into a queue, so a full pipe never stalls the engine
    and the caller (a Qt timer in Slicer) only ever drains what has arrived.
    """

    def __init__(self, command: list[str], env: Mapping[str, str], cwd: Path | None = None):
        # A process group of its own, so that killing also ends what a launcher (PythonSlicer
        # is one) started.
        if sys.platform == "win32":
            group: dict[str, Any] = {
                "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
            }
        else:
            group = {"start_new_session": True}
        self._process = subprocess.Popen(
            command,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            **group,
        )
        self._events: queue.Queue[ProgressEvent] = queue.Queue()
        self._readers = [
            threading.Thread(target=self._read, args=(self._process.stdout, "stdout"), daemon=True),
            threading.Thread(target=self._read, args=(self._process.stderr, "stderr"), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self.stderr_lines: list[str] = []

    def _read(self, stream: IO[str], name: str) -> None:
        with stream:
            for line in stream:
                if line.strip():
                    self._events.put(parse_line(line.rstrip("\r\n"), name))

    def poll(self) -> list[ProgressEvent]:
        """The events that arrived since the last call (possibly none)."""
        events = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if event.stage == "stderr":
                self.stderr_lines.append(event.message)
            events.append(event)
        return events

    @property
    def finished(self) -> bool:
        """The process has exited and every output line has been handed out by ``poll``."""
        return (
            self._process.poll() is not None
            and not any(reader.is_alive() for reader in self._readers)
            and self._events.empty()
        )

    @property
    def returncode(self) -> int | None:
        return self._process.poll()

    def error_message(self) -> str:
        """The engine's one-line error (its last ``equireg:`` line on stderr), for the user."""
        lines = [line.strip() for line in self.stderr_lines if line.strip()]
        flagged = [line for line in lines if line.startswith("equireg:")]
        if flagged:
            return flagged[-1]
        if lines:
            return lines[-1]
        return f"the registration engine stopped with exit code {self.returncode}"

    def kill(self) -> None:
        """End the engine and everything it started; returns once it has exited."""
        if self._process.poll() is None:
            if sys.platform == "win32":
                subprocess.run(
                    ["taskkill", "/F", "/T", "/PID", str(self._process.pid)],
                    capture_output=True,
                    check=False,
                )
            else:
                try:
                    os.killpg(self._process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._process.wait()
        for reader in self._readers:
            reader.join()


# Run by ``CudaProbe``: prints 1 when PyTorch sees a CUDA device, 0 otherwise.
CUDA_PROBE = "import torch; print(int(torch.cuda.is_available()))"


class CudaProbe:
    """Asks a background Python whether PyTorch sees a CUDA GPU.

    Importing torch takes seconds and loads CUDA libraries: Slicer's GUI process never does
    it; the panel starts a probe and reads ``result`` from a timer.
    """

    def __init__(self, python: str, env: Mapping[str, str] | None = None):
        self._process = EngineProcess([python, "-c", CUDA_PROBE], env or os.environ)
        self._answer: bool | None = None

    def result(self) -> bool | None:
        """``None`` while the probe runs; then whether a GPU is usable (``False`` when torch is
        missing or fails to load)."""
        for event in self._process.poll():
            if event.stage == "log" and event.message.strip() in ("0", "1"):
                self._answer = event.message.strip() == "1"
        if not self._process.finished:
            return None
        return bool(self._answer) and self._process.returncode == 0

    def cancel(self) -> None:
        self._process.kill()
