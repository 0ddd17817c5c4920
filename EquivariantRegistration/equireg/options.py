"""The options and output files of one registration, registered once: the command line,
``register`` and the Slicer bridge all read these lists (standard library only, so Slicer's GUI
process can import them without torch).

Adding an option: one ``RunOption`` here (the command line gains ``--flag`` and the bridge
passes it), one keyword of ``api.register`` that uses it, and, for the Slicer panel, one
parameter-node field and widget (docs/slicer.md, "Adding an option").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunOption:
    """One option of ``equireg register``: ``--flag`` on the command line, ``name`` in Python.

    ``choices`` lists the valid values of a choice option (``None``: free value of ``kind``);
    ``default`` is what ``register`` uses when the option is not given (``None``: decided at
    run time, e.g. by the model card).
    """

    name: str
    kind: type
    default: object
    help: str
    choices: tuple[str, ...] | None = None
    flag_only: bool = False  # a switch (``--inverse``) rather than ``--flag VALUE``

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


MODELS_DIR = Path(__file__).resolve().parent / "models"  # a card NAME.json per bundled model


def bundled_model_names(folder: Path = MODELS_DIR) -> list[str]:
    """The names of the models whose cards are in ``folder`` (standard library only)."""
    return sorted(card.stem for card in folder.glob("*.json"))


MAX_REFINE_STEPS = 10_000  # per pyramid level; more is a typo, not a wish
SIMILARITIES = ("auto", "lncc", "mind", "nmi", "mse")


@dataclass(frozen=True)
class QualityPreset:
    """The numbers of one ``--quality`` (``refine.QUALITY`` builds its pyramid from them, the
    help below states them): the finest level is no finer than an ``edge_2d``² (2-D) or
    ``edge_3d``³ (3-D) grid, with ``levels`` levels of ``steps`` steps each."""

    edge_2d: int
    edge_3d: int
    levels: int
    steps: int


QUALITY_PRESETS = {
    "fast": QualityPreset(256, 64, levels=3, steps=50),
    "balanced": QualityPreset(512, 96, levels=3, steps=50),
    "best": QualityPreset(1024, 160, levels=3, steps=100),
}
QUALITIES = tuple(QUALITY_PRESETS)


def _quality_help() -> str:
    presets = ", ".join(
        f"{name} ({p.edge_2d}² / {p.edge_3d}³, {p.steps} steps per level)"
        for name, p in QUALITY_PRESETS.items()
    )
    return f"refinement pyramid, voxels no finer than a grid of: {presets}"


RUN_OPTIONS: tuple[RunOption, ...] = (
    RunOption(
        "model",
        str,
        "auto",
        f"auto, a bundled model ({', '.join(bundled_model_names())}), or a .pt path with its "
        ".json card beside it",
    ),
    RunOption("device", str, "auto", "auto, cpu, cuda or cuda:N"),
    RunOption(
        "initial",
        str,
        "affine",
        "linear alignment in physical space, one of the refinement's starts (mutual information "
        "unless --similarity lncc or mse); none skips it",
        ("none", "translation", "rigid", "affine"),
    ),
    RunOption(
        "similarity",
        str,
        "auto",
        "similarity of the refinement and the guarded start: auto (lncc, or mind when the "
        "images' intensities are not related linearly and positively, locally as well as "
        "overall), lncc (one modality), mind or "
        "nmi (two modalities, e.g. T1/T2, CT/MR), mse (same intensities)",
        SIMILARITIES,
    ),
    RunOption(
        "quality",
        str,
        "balanced",
        _quality_help(),
        QUALITIES,
    ),
    RunOption(
        "refine_steps",
        int,
        None,
        f"refinement steps per pyramid level, 0 to {MAX_REFINE_STEPS} (default: the --quality "
        "preset's); 0: the best start (identity, alignment or network) without refinement",
    ),
    RunOption(
        "field_grid",
        str,
        "auto",
        "grid of displacement.nrrd: auto (the finest refinement level), network (the model's "
        "grid) or fixed (the fixed image's own grid)",
        ("auto", "network", "fixed"),
    ),
    RunOption(
        "inverse",
        bool,
        False,
        "also write inverse_transform.h5 (moving -> fixed)",
        flag_only=True,
    ),
)

BY_NAME = {option.name: option for option in RUN_OPTIONS}

# The files of one registration (``outputs.Result.save`` writes them, the Slicer bridge reads them).
OUTPUT_FILES = {
    "transform": "transform.h5",
    "displacement": "displacement.nrrd",
    "warped": "warped.nrrd",
    "report": "report.json",
    "inverse_transform": "inverse_transform.h5",
}
