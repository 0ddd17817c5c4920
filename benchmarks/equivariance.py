"""The equivariance experiment on the retina cases: ``python benchmarks/equivariance.py``.

As in the design's source work: how registration quality holds up when the moving content is
shifted, for the displacement-only U-Net and AiR (neither ``[W, U]``-equivariant), the
equivariant network (attention then U-Nets) and attention alone (its
``Downsample(AttentionInversion)`` first step), plus the equivariant network with its attention
pad raised to the featurizer's receptive radius (same weights, trained at the smaller pad: the
proposed fix of docs/equivariance.md, without retraining). Each network registers every case of
``Testing/retina`` in both variants (``plain``: small motion; ``shifted``: the moving content
moved by 20 % / 10 % of the field of view) on the model's input grid; quality is the Dice of the
vessel labels warped by the network's map.

The equivariance error (``equireg.evaluate.equivariance_error``, model-grid voxels) shifts the
moving image of each plain pair by ``--shift`` voxels along both axes, in the four diagonal
directions, and compares the maps after undoing the shift, over the fixed image's foreground
(normalised intensity above ``FOREGROUND``: the fundus disk, the vessels) and everywhere. Three
kinds of shift: *zero fill* (the headline: content leaving the grid is lost, zeros enter, as
when content moves inside a fixed field of view), *rolled* (content wraps around) and *pure
translation* (both images first embedded in a zero canvas wider than the shift, so nothing is
lost or wrapped). Weights: the bundled ``retina2d`` model (or ``--equivariant``), ``--unet`` and
``--air`` (cards trained from ``configs/unet_retina2d.json`` / ``configs/air_retina2d.json``);
without ``--unet`` an untrained U-Net is flagged, without ``--air`` AiR is left out. Prints two
markdown tables and writes ``docs/figures/bench_equivariance.png``.

``--directions`` prints instead, per plain case and for each of the eight directions of a
zero-filled moving shift by ``--shift`` voxels, the equivariant network's foreground
equivariance error and what the shift does to registration: landmark error (over the landmarks
whose moving point stays in the shifted grid) and Dice of the networks' maps, against the
unshifted pair (the diagnosis in docs/equivariance.md).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from common import FIGURES, ROOT, fmt, machine, markdown_table, save_figure
from torch import nn

from equireg.assess import network_input
from equireg.cases import VARIANTS, Case, find_cases
from equireg.compose import RegistrationStep
from equireg.evaluate import FOREGROUND, equivariance_error, shifted
from equireg.io import read_image, read_landmarks
from equireg.maps import warp
from equireg.models import ModelCard, load_network, read_card
from equireg.nn.builder import build
from equireg.space import Grid, resample_to_grid

KINDS = ("zero fill", "rolled", "pure translation")


def receptive_radius(module: nn.Module) -> int:
    """Voxels a stack of stride-1 convolutions (the featurizer) sees on each side."""
    return sum(
        (conv.kernel_size[0] - 1) // 2 * conv.dilation[0]
        for conv in module.modules()
        if isinstance(conv, nn.Conv2d | nn.Conv3d)
    )


def networks(
    equivariant: str, unet: str | None, air: str | None
) -> dict[str, tuple[RegistrationStep, bool]]:
    """The networks by name, each with whether its weights are trained. Attention alone is the
    first step of the equivariant network, with its weights."""
    card = read_card(equivariant, 2)
    full = load_network(card)
    if unet is not None:
        unet_card = read_card(unet, 2)
        baseline, baseline_trained = load_network(unet_card), unet_card.trained
    else:
        torch.manual_seed(0)
        baseline, baseline_trained = build(card.architecture | {"kind": "unet"}).eval(), False
    chosen = {"displacement-only U-Net": (baseline, baseline_trained)}
    if air is not None:
        air_card = read_card(air, 2)
        chosen["AiR (patch transformer)"] = (load_network(air_card), air_card.trained)
    chosen["equivariant (attention + U-Nets)"] = (full, card.trained)
    chosen["attention alone"] = (full.first.first, card.trained)  # TwoStep(TwoStep(Downsample…
    wide = load_network(card)
    inversion = wide.first.first.step
    inversion.pad = receptive_radius(inversion.featurizer)
    chosen[f"equivariant, pad {inversion.pad} (trained at pad {full.first.first.step.pad})"] = (
        wide,
        card.trained,
    )
    return chosen


def labels_on_grid(path: Path, image: sitk.Image, shape: tuple[int, ...]) -> torch.Tensor:
    """A label map as a vessel fraction on the model grid over ``image``'s extent."""
    grid = Grid.of(image).resized(shape)
    labels = sitk.Cast(sitk.ReadImage(str(path)) > 0, sitk.sitkFloat32)
    return torch.from_numpy(sitk.GetArrayFromImage(resample_to_grid(labels, grid)))[None, None]


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0.5, b > 0.5
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def pair(case: Case, card: ModelCard) -> tuple[torch.Tensor, torch.Tensor]:
    """``(moving, fixed)`` on the model grid, as ``register`` feeds the network."""
    fixed, _ = network_input(read_image(case.fixed), card.input_shape, card.preprocessing)
    moving, _ = network_input(read_image(case.moving), card.input_shape, card.preprocessing)
    return moving, fixed


def score_case(network: RegistrationStep, case: Case, card: ModelCard) -> dict[str, float]:
    """Dice of the labels warped by the network's map, and before (identity), on the grid."""
    shape = card.input_shape
    moving_net, fixed_net = pair(case, card)
    prefix = VARIANTS[case.variant][0]
    fixed_labels = labels_on_grid(case.folder / "fixed_labels.nrrd", read_image(case.fixed), shape)
    moving_image = read_image(case.moving)
    moving_labels = labels_on_grid(case.folder / f"{prefix}_labels.nrrd", moving_image, shape)
    with torch.no_grad():
        phi = network(moving_net, fixed_net)
        warped = warp(moving_labels, phi, shape)
    return {"dice": dice(warped, fixed_labels), "dice_identity": dice(moving_labels, fixed_labels)}


def errors_case(
    network: RegistrationStep, moving: torch.Tensor, fixed: torch.Tensor, shift: int
) -> dict[str, list[float]]:
    """Equivariance errors (foreground, everywhere) of each kind of shift, one per direction."""
    # Pure translation: a zero canvas wider than the shift on every side, in steps of 16 voxels
    # so that the networks' pooling grids still divide the size.
    canvas = 16 * -(-abs(shift) // 16)
    embedded = [F.pad(image, (canvas,) * 4) for image in (moving, fixed)]
    errors: dict[str, list[float]] = {}
    margin = abs(shift) + 8
    for kind, signs in itertools.product(KINDS, itertools.product((1, -1), repeat=2)):
        m, f = embedded if kind == "pure translation" else (moving, fixed)
        fill = "roll" if kind == "rolled" else "zero"
        w = tuple(sign * shift for sign in signs)
        for where, mask in (("foreground", f > FOREGROUND), ("everywhere", None)):
            error = equivariance_error(network, m, f, w, (0, 0), margin, fill=fill, mask=mask)
            errors.setdefault(f"{kind}, {where}", []).append(error)
    return errors


def shifted_pair_scores(
    network: RegistrationStep, case: Case, card: ModelCard, shift: tuple[int, int]
) -> dict[str, float]:
    """Landmark error (mm) and Dice when the moving image (and its labels) of ``case`` are
    shifted by ``shift`` model-grid voxels with zero fill; the map's answer is shifted back
    (``+ w``) before it is compared with the truth, so a ``[W, U]``-equivariant network would
    score as on the unshifted pair, up to the content the shift cuts off."""
    shape = card.input_shape
    moving_net, fixed_net = pair(case, card)
    fixed_grid = Grid.of(read_image(case.fixed)).resized(shape)
    moving_image = read_image(case.moving)
    moving_grid = Grid.of(moving_image).resized(shape)
    prefix = VARIANTS[case.variant][0]
    fixed_points = read_landmarks(case.folder / "fixed_landmarks.csv", 2)
    moving_points = read_landmarks(case.folder / f"{prefix}_landmarks.csv", 2)
    w = np.asarray(shift) / np.asarray(shape)
    queries = torch.from_numpy(fixed_grid.physical_to_network(fixed_points).T.copy())
    fixed_labels = labels_on_grid(case.folder / "fixed_labels.nrrd", read_image(case.fixed), shape)
    moving_labels = labels_on_grid(case.folder / f"{prefix}_labels.nrrd", moving_image, shape)
    with torch.no_grad():
        phi = network(shifted(moving_net, shift, "zero"), fixed_net)
        found = phi(queries.float().view(1, 2, -1, 1))[0, :, :, 0].T.double().numpy() + w
        warped = warp(shifted(moving_labels, shift, "zero"), phi, shape)
    after_shift = moving_grid.physical_to_network(moving_points) - w
    kept = ((after_shift >= 0) & (after_shift <= 1)).all(axis=1)
    distances = np.linalg.norm(moving_grid.network_to_physical(found) - moving_points, axis=1)
    return {"tre": float(distances[kept].mean()), "dice": dice(warped, fixed_labels)}


def directions_table(
    chosen: dict[str, tuple[RegistrationStep, bool]], card: ModelCard, shift: int
) -> str:
    """Rows per plain case and zero-filled shift direction (unshifted first): the equivariant
    network's foreground equivariance error, then landmark error and Dice of every network."""
    equivariant = chosen["equivariant (attention + U-Nets)"][0]
    directions = [(0, 0)] + [
        (a * shift, b * shift) for a, b in itertools.product((1, 0, -1), repeat=2) if a or b
    ]
    rows = []
    for case in find_cases(ROOT / "Testing" / "retina"):
        if case.variant != "plain":
            continue
        moving, fixed = pair(case, card)
        for w in directions:
            error = equivariance_error(
                equivariant, moving, fixed, w, (0, 0), abs(shift) + 8, "zero", fixed > FOREGROUND
            )
            row = [case.folder.name, str(w), fmt(error, 2) if any(w) else ""]
            for network, _ in chosen.values():
                scores = shifted_pair_scores(network, case, card, w)
                row += [fmt(scores["tre"], 2), fmt(scores["dice"], 2)]
            rows.append(row)
    headers = ["case", "moving shift (voxels)", "equivariance error, foreground"]
    for name in chosen:
        headers += [f"{name}: TRE (mm)", "Dice"]
    return markdown_table(headers, rows, 2)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["network"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    bars = (("plain", "dice_plain"), ("shifted", "dice_shifted"))
    width = 0.38
    for offset, (label, key) in enumerate(bars):
        positions = np.arange(len(rows)) + (offset - 0.5) * width
        axes[0].bar(positions, [r[key] for r in rows], width, label=label)
    axes[0].set_title("Dice of warped vessel labels (mean over cases)", fontsize=9)
    bars = (
        ("zero fill, foreground", "zero fill, foreground"),
        ("zero fill, everywhere", "zero fill, everywhere"),
        ("pure translation, foreground", "pure translation, foreground"),
    )
    width = 0.27
    for offset, (label, key) in enumerate(bars):
        positions = np.arange(len(rows)) + (offset - 1) * width
        axes[1].bar(positions, [r[key] for r in rows], width, label=label)
    axes[1].set_title("equivariance error (model-grid voxels)", fontsize=9)
    for axis in axes:
        axis.set_xticks(np.arange(len(rows)), names, rotation=20, ha="right", fontsize=7)
        axis.legend(fontsize=7)
    trained = all(r["trained"] for r in rows)
    fig.suptitle("trained weights" if trained else "includes RANDOM weights", fontsize=9)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--equivariant", default="retina2d", help="model (name or .pt path)")
    parser.add_argument("--unet", help="trained displacement-only U-Net (card or .pt path)")
    parser.add_argument("--air", help="trained AiR baseline (card or .pt path)")
    parser.add_argument("--shift", type=int, default=8, help="voxels of the model grid")
    parser.add_argument(
        "--directions", action="store_true", help="the per-direction diagnosis table instead"
    )
    args = parser.parse_args()
    card = read_card(args.equivariant, 2)
    if args.directions:
        chosen = networks(args.equivariant, args.unet, args.air)
        keep = (
            "displacement-only U-Net",
            "AiR (patch transformer)",
            "equivariant (attention + U-Nets)",
        )
        chosen = {name: value for name, value in chosen.items() if name in keep}
        print(f"Machine: {machine()}\n")
        print(directions_table(chosen, card, args.shift))
        return
    cases = find_cases(ROOT / "Testing" / "retina")
    plain = [pair(case, card) for case in cases if case.variant == "plain"]
    print(f"Machine: {machine()}\n")
    rows = []
    for name, (network, trained) in networks(args.equivariant, args.unet, args.air).items():
        scores = {case: score_case(network, case, card) for case in cases}
        row: dict = {"network": name, "trained": trained}
        for variant in VARIANTS:
            chosen = [s for c, s in scores.items() if c.variant == variant]
            row[f"dice_{variant}"] = float(np.mean([s["dice"] for s in chosen]))
            row[f"identity_{variant}"] = float(np.mean([s["dice_identity"] for s in chosen]))
        errors: dict[str, list[float]] = {}
        for moving, fixed in plain:
            for key, values in errors_case(network, moving, fixed, args.shift).items():
                errors.setdefault(key, []).extend(values)
        row |= {key: float(np.mean(values)) for key, values in errors.items()}
        row["zero fill, worst"] = float(np.max(errors["zero fill, foreground"]))
        rows.append(row)
    quality = [
        [
            r["network"],
            "trained" if r["trained"] else "random",
            fmt(r["dice_plain"]),
            fmt(r["dice_shifted"]),
            f"{r['dice_shifted'] - r['dice_plain']:+.3f}",
            fmt(r["zero fill, foreground"], 2),
            fmt(r["zero fill, everywhere"], 2),
        ]
        for r in rows
    ]
    identity = [rows[0]["identity_plain"], rows[0]["identity_shifted"]]
    quality.append(["identity (no registration)", "", *map(fmt, identity), "", "", ""])
    headers = ["network", "weights", "Dice plain", "Dice shifted", "shifted − plain"]
    headers += [f"equivariance error, foreground (shift ±{args.shift})", "everywhere"]
    print(markdown_table(headers, quality, 2))
    print(
        f"\nEquivariance error by kind of shift (model-grid voxels; moving image shifted by "
        f"±{args.shift} along both axes, mean over the four directions and both plain cases; "
        "foreground / everywhere):\n"
    )
    by_kind = [
        [
            r["network"],
            *(f"{fmt(r[f'{k}, foreground'], 2)} / {fmt(r[f'{k}, everywhere'], 2)}" for k in KINDS),
            fmt(r["zero fill, worst"], 2),
        ]
        for r in rows
    ]
    headers = ["network", *KINDS, "zero fill, worst case and direction (foreground)"]
    print(markdown_table(headers, by_kind, 1))
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
