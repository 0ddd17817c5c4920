"""Training pairs of the generic models (docs/models.md): random label maps rendered with
random contrasts, each image shifted and warped on its own.

    .venv/bin/python docs/figures/make_generic_data_figure.py

Writes docs/figures/generic_data.png: six 2-D pairs (``configs/generic2d.json``'s data) and
three 3-D pairs (``configs/generic3d.json``, middle slices), moving above fixed, from the
held-out validation seed (never a training step's seed).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from equireg.data.generic import generic_pairs
from equireg.train import VALIDATION_SEED, load_config

REPOSITORY = Path(__file__).resolve().parents[2]


def _pairs(name: str, count: int):
    config = load_config(REPOSITORY / "configs" / f"{name}.json")
    data = {**config["data"], "real_fraction": 0.0}  # the label-map pairs only
    shape = tuple(config["card"]["input_shape"])
    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    return generic_pairs(torch.zeros(0), count, data, shape, generator)


def main() -> None:
    flat, volumes = _pairs("generic2d", 6), _pairs("generic3d", 3)
    figure, axes = plt.subplots(2, 9, figsize=(15, 3.7))
    columns = [(flat.moving[i, 0], flat.fixed[i, 0]) for i in range(6)]
    middle = volumes.moving.shape[2] // 2
    columns += [(volumes.moving[i, 0, middle], volumes.fixed[i, 0, middle]) for i in range(3)]
    for column, (moving, fixed) in enumerate(columns):
        for row, image in enumerate((moving, fixed)):
            axes[row, column].imshow(image, cmap="gray", vmin=0, vmax=1)
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
        axes[0, column].set_title("2-D" if column < 6 else "3-D (middle slice)", fontsize=9)
    axes[0, 0].set_ylabel("moving")
    axes[1, 0].set_ylabel("fixed")
    figure.tight_layout()
    figure.savefig(REPOSITORY / "docs" / "figures" / "generic_data.png", dpi=80)


if __name__ == "__main__":
    main()
