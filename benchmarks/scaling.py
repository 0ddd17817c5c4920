"""How cost grows with the volume: ``python benchmarks/scaling.py [--max-edge 256]``.

Runs ``equireg register`` (CPU, a fresh process each, peak RSS from ``wait4``) on cubic volumes
of edge 64…256 (1 mm voxels) in two series: the bundled ``lung3d`` model, whose network always
sees its card's fixed grid (what grows is reading, resampling, the field and the warp), and
the same weights run at the image's own resolution (a model card with ``input_shape`` = the
volume), which shows how the network itself scales (so without the card's refinement steps,
which ``register`` runs by default and the first series includes). A series stops after a run
slower than ``--time-limit`` (the sizes left out are rows that say so). Memory should grow
linearly in the number of voxels: the table gives, per size, the peak memory added per voxel
added since the previous size (constant along a series when it is linear), and a fit of peak
memory = a + b·voxels per series follows it. Prints a markdown table and writes
``docs/figures/bench_scaling.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import (
    FIGURES,
    fmt,
    machine,
    markdown_table,
    run_measured,
    save_figure,
    volume_pair,
)

from equireg.models import read_card

EDGES = (64, 96, 128, 160, 192, 256)
SHAPE = read_card("lung3d").input_shape
GRID = f"{SHAPE[0]}³" if len(set(SHAPE)) == 1 else "×".join(map(str, SHAPE))
SERIES = {
    "bundled": f"lung3d at its {GRID} grid",
    "native": "lung3d at the image's resolution, no refinement",
}
# The native series measures the network itself: without the card's instance optimisation,
# whose steps at the image's resolution would dominate its time.
OPTIONS = {"bundled": [], "native": ["--refine-steps", "0"]}


def native_card(folder: Path, edge: int) -> Path:
    """A copy of the lung3d card that feeds the network the volume at ``edge``³ (same weights;
    the convolutional network takes any size divisible by 16)."""
    card = read_card("lung3d")
    data = {**card.data, "input_shape": [edge] * 3, "weights": str(card.weights_path)}
    path = folder / f"lung3d_{edge}.json"
    path.write_text(json.dumps(data))
    return path


def register_once(folder: Path, edge: int, model: str, device: str, options: list[str]) -> dict:
    fixed, moving = volume_pair(folder, (edge,) * 3, (1.0, 1.0, 1.0))
    command = [Path(sys.executable).parent / "equireg", "register", fixed, moving, "-o"]
    command += [folder / "out", "--model", model, "--device", device, "--progress", "none"]
    command += options
    result = run_measured(command)
    if result["returncode"] != 0:
        return {"error": (result["stderr"].strip().splitlines() or ["failed"])[-1][:120]}
    report = json.loads((folder / "out" / "report.json").read_text())
    return {
        "seconds": result["seconds"],
        "peak_mb": result["peak_rss_mb"],
        "network_s": report["timings_s"].get("network"),
        "refine_s": report["timings_s"].get("refine"),
        "cuda_mb": report["peak_memory"].get("cuda_max_allocated_mb"),
    }


def measure(edges: list[int], device: str, time_limit: float) -> list[dict]:
    rows = []
    for series in SERIES:
        for edge in edges:
            folder = Path(tempfile.mkdtemp(prefix="equireg-scaling-"))
            try:
                model = "lung3d" if series == "bundled" else str(native_card(folder, edge))
                result = register_once(folder, edge, model, device, OPTIONS[series])
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            rows.append({"series": series, "device": device, "edge": edge, **result})
            if result.get("seconds", np.inf) > time_limit:
                reason = f"not run: {edge}³ took over {time_limit:.0f} s"
                if "error" in result:
                    reason = f"not run: {edge}³ failed"
                rows += [
                    {"series": series, "device": device, "edge": e, "error": reason}
                    for e in edges
                    if e > edge
                ]
                break
    return rows


def added_per_voxel(rows: list[dict]) -> list[float | None]:
    """Per row, the peak memory added per voxel added (bytes) since the previous measured size
    of its series: the same all along a series whose memory is linear in the voxels."""
    previous: dict[str, dict] = {}
    slopes = []
    for row in rows:
        slope = None
        if "peak_mb" in row:
            before = previous.get(row["series"])
            if before is not None:
                added = (row["peak_mb"] - before["peak_mb"]) * 2**20
                slope = added / (row["edge"] ** 3 - before["edge"] ** 3)
            previous[row["series"]] = row
        slopes.append(slope)
    return slopes


def linear_fit(rows: list[dict]) -> tuple[float, float, float] | None:
    """Peak memory (MB) = a + b·voxels by least squares: (a MB, b bytes per voxel, R²)."""
    points = [(r["edge"] ** 3, r["peak_mb"]) for r in rows if "peak_mb" in r]
    if len(points) < 3:
        return None
    voxels, memory = np.array(points, dtype=np.float64).T
    slope, offset = np.polyfit(voxels, memory, 1)
    residual = memory - (offset + slope * voxels)
    r2 = 1 - np.sum(residual**2) / np.sum((memory - memory.mean()) ** 2)
    return float(offset), float(slope * 2**20), float(r2)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for series, label in SERIES.items():
        done = [r for r in rows if r["series"] == series and "seconds" in r]
        if not done:
            continue
        edges = np.array([r["edge"] for r in done])
        axes[0].plot(edges, [r["seconds"] for r in done], "o-", label=label)
        axes[1].plot(edges**3 / 1e6, [r["peak_mb"] for r in done], "o-", label=label)
    axes[0].set(xlabel="volume edge (voxels)", ylabel="wall time (s)", yscale="log")
    axes[1].set(xlabel="voxels (millions)", ylabel="peak RSS (MB)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"`equireg register` on {rows[0]['device']}", fontsize=9)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-edge", type=int, default=256)
    parser.add_argument("--time-limit", type=float, default=120.0, help="s; stops a series")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU here")
    rows = measure([e for e in EDGES if e <= args.max_edge], args.device, args.time_limit)
    print(f"Machine: {machine()}\n")
    headers = ["series", "edge", "voxels (M)", "wall time (s)", "network (s)", "refinement (s)"]
    headers += ["peak RSS (MB)", "added RSS per added voxel (bytes)"]
    table = [
        [
            SERIES[r["series"]],
            f"{r['edge']}³",
            f"{r['edge'] ** 3 / 1e6:.2f}",
            fmt(r.get("seconds"), 1),
            fmt(r.get("network_s"), 1),
            fmt(r.get("refine_s"), 1),
            fmt(r.get("peak_mb"), 0) if "peak_mb" in r else r.get("error", "–"),
            "" if slope is None else f"{slope:.0f}",
        ]
        for r, slope in zip(rows, added_per_voxel(rows), strict=True)
    ]
    print(markdown_table(headers, table, 1))
    print()
    for series, label in SERIES.items():
        fit = linear_fit([r for r in rows if r["series"] == series])
        if fit is None:
            print(f"- {label}: too few sizes for a fit")
            continue
        offset, per_voxel, r2 = fit
        print(
            f"- {label}: peak RSS ≈ {offset:.0f} MB + {per_voxel:.0f} bytes/voxel "
            f"(straight-line fit in the number of voxels, R² = {r2:.3f}; a flat series has "
            "a slope near 0 and a meaningless R²)"
        )
    plot(rows, FIGURES / "bench_scaling.png")


if __name__ == "__main__":
    main()
