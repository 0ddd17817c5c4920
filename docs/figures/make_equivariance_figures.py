"""Draws docs/figures/inversion_1d.png and equivariance_1d.png (see docs/equivariance.md).

The curves are computed by tests/test_inversion_1d.py's own functions, so the figures show
exactly what the tests check. Run from the repository root (or anywhere):
``python docs/figures/make_equivariance_figures.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
TEST_FILE = HERE.parents[1] / "tests" / "test_inversion_1d.py"
MOVING_SHIFT, FIXED_SHIFT = 8, -6  # samples; the figure's W and U
FLOOR = 1e-9  # exact zeros on the logarithmic error axes


def load_demo() -> ModuleType:
    """The test module, imported by path (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location("test_inversion_1d", TEST_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inversion_figure(demo: ModuleType, path: Path) -> None:
    """x² and cos/B pairs: sharp and blunt attention against the analytic inverse, and errors."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), layout="constrained")
    titles = {
        "square": "A(x) = x², B(x) = x",
        "cosine": "A(x) = cos(πx/2), B(x) = x + 0.07 sin(3πx)",
    }
    truths = {"square": "√x", "cosine": "(2/π) arccos B(x)"}
    colours = {"square": "tab:blue", "cosine": "tab:red"}
    for ax, (name, make) in zip(axes[:2], demo.PAIRS.items(), strict=True):
        x, moving, fixed, truth = make()
        sharp = demo.invert(moving, fixed, x)
        blunt = demo.invert(moving, fixed, x, temperature=demo.BLUNT)
        ax.plot(x, moving, color="0.55", label="A (keys)")
        if name == "cosine":
            ax.plot(x, fixed, color="0.55", linestyle="--", label="B (queries)")
        ax.plot(x, truth, color="black", linewidth=3, alpha=0.3, label=f"Ξ = {truths[name]}")
        ax.plot(x, sharp, color=colours[name], label=f"attention, τ = {demo.SHARP:g}")
        ax.plot(
            x, blunt, color=colours[name], linestyle=":", label=f"attention, τ = {demo.BLUNT:g}"
        )
        ax.set(title=titles[name], xlabel="x (fixed coordinate)", xlim=(0, 1), ylim=(-0.02, 1.02))
        ax.legend(fontsize=8, loc="upper left" if name == "square" else "lower left")

        error = (sharp - truth).abs().clamp_min(FLOOR)
        excluded = truth < demo.FLAT
        axes[2].semilogy(x, error, color=colours[name], label=f"{name}, τ = {demo.SHARP:g}")
        axes[2].semilogy(
            x, (blunt - truth).abs(), color=colours[name], linestyle=":", label=f"{name}, τ = 1"
        )
        axes[2].plot(x[excluded], error[excluded], "x", color=colours[name], markersize=5)
    axes[2].axhline(0.5 / demo.SAMPLES, color="black", linestyle="--", linewidth=1)
    axes[2].text(0.5, 0.6 / demo.SAMPLES, "half a sample (test tolerance)", ha="center", fontsize=8)
    axes[2].set(
        title="|attention − Ξ|  (×: excluded, Ξ < 0.1)",
        xlabel="x (fixed coordinate)",
        xlim=(0, 1),
        ylim=(1e-6, 1),
    )
    axes[2].legend(fontsize=8, loc="lower center", ncol=2)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def equivariance_figure(demo: ModuleType, path: Path) -> None:
    """Crops, Ξ for the pair and for the shifted pair against W⁻¹∘Ξ∘U, and the mismatch."""
    n, pad = demo.EQUI_SAMPLES, demo.PAD
    w, u = MOVING_SHIFT / n, FIXED_SHIFT / n
    x, padded = demo.voxel_centres(n), demo.voxel_centres(n, pad)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), layout="constrained")

    ax = axes[0]
    ax.plot(padded, demo.scene_moving(padded), color="tab:blue", label="A (moving, with pad)")
    ax.plot(padded, demo.scene_moving(padded + w), color="tab:blue", linestyle="--", label="A∘W")
    fixed = demo.scene_moving(demo.scene_warp(x))
    ax.plot(x, fixed, color="tab:red", label="B (fixed)")
    ax.plot(x, demo.scene_moving(demo.scene_warp(x + u)), "--", color="tab:red", label="B∘U")
    ax.axvspan(0, 1, color="0.92", zorder=0)
    ax.set(title=f"crops; W: +{MOVING_SHIFT} samples, U: {FIXED_SHIFT} samples", xlabel="x")
    ax.legend(fontsize=8)

    xi = demo.shifted_inverse(0, 0)
    shifted = demo.shifted_inverse(MOVING_SHIFT, FIXED_SHIFT)
    inside, predicted = demo.predicted_inverse(xi, MOVING_SHIFT, FIXED_SHIFT)
    ax = axes[1]
    ax.plot(x, xi, color="black", label="Ξ[A, B]")
    ax.plot(x, shifted, color="tab:green", label="Ξ[A∘W, B∘U]")
    ax.plot(x[inside][::4], predicted[::4], "o", color="tab:orange", markersize=4, mfc="none")
    ax.plot([], [], "o", color="tab:orange", mfc="none", label="W⁻¹∘Ξ[A, B]∘U (predicted)")
    ax.axhspan(0, 1, color="0.92", zorder=0)
    ax.set(title="attention output: a map, shifted as predicted", xlabel="x (fixed coordinate)")
    ax.legend(fontsize=8)

    ax = axes[2]
    xi_bare = demo.shifted_inverse(0, 0, pad=0)
    inside_bare, predicted_bare = demo.predicted_inverse(xi_bare, MOVING_SHIFT, FIXED_SHIFT)
    bare = demo.shifted_inverse(MOVING_SHIFT, FIXED_SHIFT, pad=0)[inside_bare]
    bare_error = (bare - predicted_bare).abs().clamp_min(FLOOR)
    ax.semilogy(x[inside_bare], bare_error, color="tab:purple", linewidth=3, label="no pad")
    error = (shifted[inside] - predicted).abs().clamp_min(FLOOR)
    ax.semilogy(
        x[inside], error, color="tab:green", label=f"pad of {pad} samples, coordinates extrapolated"
    )
    ax.axhline(1 / n, color="black", linestyle="--", linewidth=1)
    ax.text(0.5, 1.3 / n, "one sample", ha="center", fontsize=8)
    ax.set(
        title="|Ξ[A∘W, B∘U] − W⁻¹∘Ξ∘U|",
        xlabel="x (fixed coordinate)",
        xlim=(0, 1),
        ylim=(FLOOR / 2, 1),
    )
    ax.legend(fontsize=8, loc="center right")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    demo = load_demo()
    with torch.no_grad():
        inversion_figure(demo, HERE / "inversion_1d.png")
        equivariance_figure(demo, HERE / "equivariance_1d.png")


if __name__ == "__main__":
    main()
