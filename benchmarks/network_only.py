"""The networks alone on every case: the generic models against doing nothing, the
specialised models and baselines trained the same way.

    .venv/bin/python benchmarks/network_only.py [--cases DIR ...] \
        [--model "U-Net only=.train/unet_generic2d/unet_generic2d.json"]

By default the cases are ``Testing/`` and, when built (``make bench-cases``),
``.data/bench-cases``. Every case is registered by each model of its dimension (the bundled
``generic2d``/``generic3d``, ``retina2d``/``lung3d``, and each ``--model LABEL=CARD`` of that
dimension) with the network's raw map as the whole result (``capture.capture``: both images in
one physical frame, as ``register`` runs it), then scored by ``equireg.cases.score`` (landmark
TRE mean, mm). The column "generic, guarded" is ``register(..., initial="none",
refine_steps=0)`` (``--initial none --refine-steps 0``): the better of the identity and the
network's map by the similarity, as the pipeline starts. Prints one markdown table (rows:
cases; columns: models) with the machine line; the generic model's raw cell is bold where it
beats identity and every other model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import SimpleITK as sitk
import torch
from common import ROOT, commit, fmt, machine, markdown_table

from equireg.api import register
from equireg.capture import capture
from equireg.cases import find_cases, identity_score, score
from equireg.io import read_image
from equireg.models import load_network, read_card
from equireg.space import Grid

BUNDLED = {2: ["generic2d", "retina2d"], 3: ["generic3d", "lung3d"]}


def network_transform(model: str, fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    """The model's raw map (fixed → moving LPS mm) as a displacement-field transform on the
    fixed grid."""
    card = read_card(model, fixed.GetDimension())
    result = capture(load_network(card), card, fixed, moving, None, None, torch.device("cpu"), [])
    points = Grid.of(fixed).physical_points()
    field = sitk.GetImageFromArray(result.map(points) - points, isVector=True)
    field = sitk.Cast(field, sitk.sitkVectorFloat64)
    field.CopyInformation(fixed)
    return sitk.DisplacementFieldTransform(field)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=Path, action="append")
    parser.add_argument("--model", action="append", default=[], help="LABEL=CARD of a baseline")
    args = parser.parse_args()
    folders = args.cases or [ROOT / "Testing", ROOT / ".data" / "bench-cases"]
    cases = [case for folder in folders if folder.is_dir() for case in find_cases(folder)]
    extra = dict(spec.split("=", 1) for spec in args.model)
    labels = ["identity", "generic", "generic, guarded", "specialised", *extra]
    rows = []
    for case in cases:
        fixed, moving = read_image(case.fixed), read_image(case.moving)
        dim = fixed.GetDimension()
        generic, specialised = BUNDLED[dim]
        models = {"generic": generic, "specialised": specialised}
        models.update({label: card for label, card in extra.items() if read_card(card).dim == dim})
        tre = {"identity": identity_score(case)["tre_mean_mm"]}
        for label, model in models.items():
            tre[label] = score(case, network_transform(model, fixed, moving))["tre_mean_mm"]
        guarded = register(fixed, moving, model=generic, initial="none", refine_steps=0)
        others = [value for label, value in tre.items() if label != "generic"]
        tre["generic, guarded"] = score(case, guarded.transform)["tre_mean_mm"]
        best = tre["generic"] < min(others)
        cells = [
            f"**{fmt(tre[label])}**" if label == "generic" and best else fmt(tre.get(label))
            for label in labels
        ]
        rows.append([case.name, f"{generic} / {specialised}", *cells])
        print(rows[-1], flush=True)
    print(f"\n- Machine: {machine()}\n- Commit: {commit()}\n")
    headers = ["case", "models (generic / specialised)", *[f"{label} TRE (mm)" for label in labels]]
    print(markdown_table(headers, rows, right=2))


if __name__ == "__main__":
    main()
