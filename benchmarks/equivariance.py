"""The equivariance experiment on the retina cases: ``python benchmarks/equivariance.py``.

As in the design's source work: how registration quality holds up when the moving content is
shifted, for the displacement-only U-Net (``[U, U]``-equivariant only), the equivariant network
(attention then U-Nets, ``[W, U]``-equivariant) and attention alone (its
``Downsample(AttentionInversion)`` first step). Each network registers every case of
``Testing/retina`` in both variants (``plain``: small motion; ``shifted``: the same moving
content moved by 20 % / 10 % of the field of view) on the model's input grid; quality is the
Dice of the vessel labels warped by the network's map. The equivariance error rolls the moving
image by ``--shift`` voxels and compares the maps after undoing the shift
(``equireg.evaluate.equivariance_error``). Weights: the bundled ``retina2d`` model (or
``--equivariant PATH``) and ``--unet PATH`` (a model trained from ``configs/unet_retina2d.json``);
untrained ones are flagged, since random weights measure neither quality nor equivariance.
Prints a markdown table and writes ``docs/figures/bench_equivariance.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from common import FIGURES, ROOT, fmt, machine, markdown_table, save_figure

from equireg.cases import VARIANTS, Case, find_cases
from equireg.compose import RegistrationStep
from equireg.evaluate import equivariance_error
from equireg.io import read_image
from equireg.maps import warp
from equireg.models import ModelCard, load_network, read_card
from equireg.nn.builder import build
from equireg.preprocess import network_input
from equireg.space import Grid, resample_to_grid


def networks(equivariant: str, unet: str | None) -> dict[str, tuple[RegistrationStep, bool]]:
    """The three networks by name, each with whether its weights are trained. Attention alone
    is the first step of the equivariant network, with its weights."""
    card = read_card(equivariant, 2)
    full = load_network(card)
    if unet is not None:
        unet_card = read_card(unet, 2)
        baseline, baseline_trained = load_network(unet_card), unet_card.trained
    else:
        torch.manual_seed(0)
        baseline, baseline_trained = build(card.architecture | {"kind": "unet"}).eval(), False
    attention = full.first.first  # TwoStep(TwoStep(Downsample(attention), ·), ·)
    return {
        "displacement-only U-Net": (baseline, baseline_trained),
        "equivariant (attention + U-Nets)": (full, card.trained),
        "attention alone": (attention, card.trained),
    }


def labels_on_grid(path: Path, image: sitk.Image, shape: tuple[int, ...]) -> torch.Tensor:
    """A label map as a vessel fraction on the model grid over ``image``'s extent."""
    grid = Grid.of(image).resized(shape)
    labels = sitk.Cast(sitk.ReadImage(str(path)) > 0, sitk.sitkFloat32)
    return torch.from_numpy(sitk.GetArrayFromImage(resample_to_grid(labels, grid)))[None, None]


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0.5, b > 0.5
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def score_case(network: RegistrationStep, case: Case, card: ModelCard) -> dict[str, float]:
    """Dice of the labels warped by the network's map, and before (identity), on the grid."""
    shape = card.input_shape
    fixed, moving = read_image(case.fixed), read_image(case.moving)
    fixed_net, _ = network_input(fixed, shape, card.preprocessing)
    moving_net, _ = network_input(moving, shape, card.preprocessing)
    prefix = VARIANTS[case.variant][0]
    fixed_labels = labels_on_grid(case.folder / "fixed_labels.nrrd", fixed, shape)
    moving_labels = labels_on_grid(case.folder / f"{prefix}_labels.nrrd", moving, shape)
    with torch.no_grad():
        phi = network(moving_net, fixed_net)
        warped = warp(moving_labels, phi, shape)
    return {"dice": dice(warped, fixed_labels), "dice_identity": dice(moving_labels, fixed_labels)}


def error_case(network: RegistrationStep, case: Case, card: ModelCard, shift: int) -> float:
    shape = card.input_shape
    fixed_net, _ = network_input(read_image(case.fixed), shape, card.preprocessing)
    moving_net, _ = network_input(read_image(case.moving), shape, card.preprocessing)
    return equivariance_error(
        network, moving_net, fixed_net, (shift, shift), (0, 0), margin=abs(shift) + 8
    )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["network"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    width = 0.38
    for offset, variant in enumerate(("plain", "shifted")):
        positions = np.arange(len(rows)) + (offset - 0.5) * width
        axes[0].bar(positions, [r[f"dice_{variant}"] for r in rows], width, label=variant)
    axes[0].set_title("Dice of warped vessel labels (mean over cases)", fontsize=9)
    axes[0].legend(fontsize=7)
    axes[1].bar(np.arange(len(rows)), [r["equivariance_error"] for r in rows], 0.5)
    axes[1].set_title("equivariance error (model-grid voxels)", fontsize=9)
    for axis in axes:
        axis.set_xticks(np.arange(len(rows)), names, rotation=15, ha="right", fontsize=7)
    trained = all(r["trained"] for r in rows)
    fig.suptitle("trained weights" if trained else "includes RANDOM weights", fontsize=9)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--equivariant", default="retina2d", help="model (name or .pt path)")
    parser.add_argument("--unet", help="trained displacement-only U-Net (.pt path)")
    parser.add_argument("--shift", type=int, default=8, help="voxels of the model grid")
    args = parser.parse_args()
    card = read_card(args.equivariant, 2)
    cases = find_cases(ROOT / "Testing" / "retina")
    print(f"Machine: {machine()}\n")
    rows = []
    for name, (network, trained) in networks(args.equivariant, args.unet).items():
        scores = {case: score_case(network, case, card) for case in cases}
        row = {"network": name, "trained": trained}
        for variant in VARIANTS:
            chosen = [s for c, s in scores.items() if c.variant == variant]
            row[f"dice_{variant}"] = float(np.mean([s["dice"] for s in chosen]))
            row[f"identity_{variant}"] = float(np.mean([s["dice_identity"] for s in chosen]))
        plain = [c for c in cases if c.variant == "plain"]
        errors = [error_case(network, case, card, args.shift) for case in plain]
        row["equivariance_error"] = float(np.mean(errors))
        rows.append(row)
    headers = ["network", "weights", "Dice plain", "Dice shifted", "shifted − plain"]
    headers.append(f"equivariance error (voxels, shift {args.shift})")
    table = [
        [
            r["network"],
            "trained" if r["trained"] else "random",
            fmt(r["dice_plain"]),
            fmt(r["dice_shifted"]),
            f"{r['dice_shifted'] - r['dice_plain']:+.3f}",
            fmt(r["equivariance_error"], 3),
        ]
        for r in rows
    ]
    table.append(
        [
            "identity (no registration)",
            "",
            fmt(rows[0]["identity_plain"]),
            fmt(rows[0]["identity_shifted"]),
            "",
            "",
        ]
    )
    print(markdown_table(headers, table, 2))
    if not all(r["trained"] for r in rows):
        print(
            "\nRows with random weights: their Dice says nothing about quality, and their "
            "equivariance error is not informative either: random features make the attention "
            "nearly uniform (every fixed voxel maps near the moving image's centre, wherever its "
            "content is) and a random U-Net predicts almost no displacement, so both miss the "
            "shift by about its length. The comparison needs trained weights for every network."
        )
    plot(rows, FIGURES / "bench_equivariance.png")


if __name__ == "__main__":
    main()
