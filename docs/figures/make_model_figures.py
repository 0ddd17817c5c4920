"""The equivariance table and figure of docs/models.md: the bundled retina2d model and the
baselines trained on the same data for the same steps (displacement-only U-Net, AiR) on the
regression cases, unshifted and shifted.

    .venv/bin/python docs/figures/make_model_figures.py \
        --baseline "U-Net only=runs/unet_retina2d/unet_retina2d.json" \
        --baseline "AiR=runs/air_retina2d/air_retina2d.json"

Prints a markdown table and writes docs/figures/retina_shift.png.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import SimpleITK as sitk

from equireg.api import register
from equireg.cases import find_cases, identity_score, score

REPOSITORY = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--baseline", action="append", default=[], help="LABEL=CARD of a trained baseline"
    )
    args = parser.parse_args()
    models = {"retina2d (ours)": "retina2d"}
    models.update(spec.split("=", 1) for spec in args.baseline)
    print("| model | case | moving | TRE mean (mm) | Dice | field error (mm) | time (s) |")
    print("|---|---|---|---|---|---|---|")
    warped = {}
    for case in find_cases(REPOSITORY / "Testing" / "retina"):  # the 2-D models
        anatomy_case = case.name.rsplit("/", 1)[0]
        baseline = identity_score(case)
        print(
            f"| identity | {anatomy_case} | {case.variant} | {baseline['tre_mean_mm']:.3f} | "
            f"{baseline['dice']:.3f} | {baseline['field_error_mean_mm']:.3f} | – |"
        )
        for label, model in models.items():
            began = time.perf_counter()
            result = register(str(case.fixed), str(case.moving), model=model, device="cpu")
            seconds = time.perf_counter() - began
            measured = score(case, result.transform)
            print(
                f"| {label} | {anatomy_case} | {case.variant} | {measured['tre_mean_mm']:.3f} | "
                f"{measured['dice']:.3f} | {measured['field_error_mean_mm']:.3f} | {seconds:.1f} |"
            )
            warped[case.name, label] = (result.warped, measured["tre_mean_mm"])
    _figure(warped, list(models))


def _figure(warped: dict, labels: list[str]) -> None:
    """Fixed, moving and each model's warped image for the photograph, unshifted and shifted."""
    cases = [c for c in find_cases(REPOSITORY / "Testing" / "retina") if "photo" in c.name]
    figure, axes = plt.subplots(len(cases), 2 + len(labels), figsize=(3.2 * (2 + len(labels)), 6.6))
    for row, case in zip(axes, cases, strict=True):
        images = [
            (sitk.ReadImage(str(case.fixed)), "fixed"),
            (sitk.ReadImage(str(case.moving)), f"moving ({case.variant})"),
        ]
        for label in labels:
            image, tre = warped[case.name, label]
            images.append((image, f"{label}\nTRE {tre:.2f} mm"))
        for axis, (image, title) in zip(row, images, strict=True):
            axis.imshow(sitk.GetArrayViewFromImage(image), cmap="gray")
            axis.set_title(title, fontsize=9)
            axis.axis("off")
    figure.tight_layout()
    figure.savefig(REPOSITORY / "docs" / "figures" / "retina_shift.png", dpi=60)
    plt.close(figure)


if __name__ == "__main__":
    main()
