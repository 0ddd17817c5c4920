"""Draw the extension and module icon (128×128 PNG): a deformed grid carrying a shape.

Run from the repository root: ``.venv/bin/python Resources/make_icons.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
TARGETS = [
    ROOT / "Resources" / "EquivariantRegistration.png",
    ROOT / "EquivariantRegistration" / "Resources" / "Icons" / "EquivariantRegistration.png",
]


def warp(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A smooth deformation plus a shift: the kind of map the network predicts."""
    return x + 0.08 * np.sin(np.pi * y) + 0.06, y + 0.08 * np.sin(np.pi * x) - 0.04


def draw(path: Path) -> None:
    figure = Figure(figsize=(1.28, 1.28), dpi=100)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(-1.15, 1.15)
    axes.set_ylim(-1.15, 1.15)
    axes.axis("off")
    line = np.linspace(-1, 1, 50)
    for value in np.linspace(-1, 1, 7):
        axes.plot(*warp(line, np.full_like(line, value)), color="#3b6fb6", lw=1.2)
        axes.plot(*warp(np.full_like(line, value), line), color="#3b6fb6", lw=1.2)
    angle = np.linspace(0, 2 * np.pi, 80)
    axes.fill(0.45 * np.cos(angle) - 0.1, 0.45 * np.sin(angle), color="#e8a33d", alpha=0.85)
    axes.fill(*warp(0.45 * np.cos(angle) - 0.1, 0.45 * np.sin(angle)), color="#c0392b", alpha=0.6)
    figure.savefig(path, transparent=True)


if __name__ == "__main__":
    for target in TARGETS:
        target.parent.mkdir(parents=True, exist_ok=True)
        draw(target)
        print(target)
