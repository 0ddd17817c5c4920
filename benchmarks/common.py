"""What every benchmark script shares: the machine's description, timing, child-process peak
memory and markdown tables, so that each table states the same facts in the same way."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures"
NOT_MEASURED = "not measured (no GPU in this session)"


def cpu_model() -> str:
    """The CPU's model name as lscpu shows it (from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def commit() -> str:
    """The checked-out commit (short hash), and whether tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no").strip()
    return head + (" with uncommitted changes" if dirty else "")


def machine() -> str:
    """One line: CPU model, cores this process may use, GPU (if any), torch version and threads,
    and the load average (other processes slow multi-threaded runs far beyond their share)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    load = os.getloadavg()[0]
    return (
        f"{cpu_model()}, {cores} cores, {gpu}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {load:.1f} at the start"
    )


def best_time(run: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Best wall time (s) of ``repeats`` runs after one warm-up run (CUDA synchronised)."""
    run()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def current_rss_mb() -> float:
    """This process's resident memory now (MB), for the baseline before a measured step."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_measured(command: Sequence[str], timeout: float | None = None) -> dict:
    """Run ``command``; its wall time, peak resident memory (MB; the child's own ``ru_maxrss``
    through ``wait4``, so earlier children do not count), exit code and output."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen([str(part) for part in command], stdout=out, stderr=err)
        timer = threading.Timer(timeout, process.kill) if timeout else None
        if timer is not None:
            timer.start()
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        if timer is not None:
            timer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        return {
            "seconds": seconds,
            "peak_rss_mb": usage.ru_maxrss / 1024,
            "returncode": process.returncode,
            "stdout": out.read(),
            "stderr": err.read(),
        }


def run_child(args: Sequence[str], timeout: float | None = None) -> dict:
    """Run this Python on ``args`` and parse the last stdout line as JSON (one measurement in a
    fresh process, so peak memory and caches belong to that measurement alone)."""
    result = subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["no output"]
        return {"error": lines[-1][:200]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: int) -> str:
    """A markdown table; columns from index ``right`` on are right-aligned (numbers)."""
    align = ["---" if i < right else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for a table cell; missing or NaN values show as a dash."""
    if value is None or value != value:
        return "–"
    return f"{value:.{digits}f}"


def volume_pair(folder: Path, size: Sequence[int], spacing: Sequence[float]) -> tuple[Path, Path]:
    """Two CT-like volumes (int16 HU) of ``size`` with smooth random structure, written as
    uncompressed NRRD: what ``register`` costs does not depend on the content."""
    coarse_size = [max(2, n // 8) for n in size]
    reference = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    reference.SetSpacing([float(s) for s in spacing])
    paths = []
    for seed in (0, 1):
        values = np.random.default_rng(seed).uniform(-1000, 200, coarse_size[::-1])
        coarse = sitk.GetImageFromArray(values.astype(np.float32))
        coarse.SetSpacing([n * s / c for n, s, c in zip(size, spacing, coarse_size, strict=True)])
        image = sitk.Resample(coarse, reference, sitk.Transform(), sitk.sitkLinear, -1000.0)
        paths.append(folder / f"volume{seed}.nrrd")
        sitk.WriteImage(sitk.Cast(image, sitk.sitkInt16), str(paths[-1]), False)
    return paths[0], paths[1]


def save_figure(fig, path: Path) -> None:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
