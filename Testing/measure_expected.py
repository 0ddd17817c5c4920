"""Measure the bundled models on the regression cases and write ``expected.json`` thresholds.

    .venv/bin/python Testing/measure_expected.py [--anatomy brain|retina|lung|all]

Each anatomy is measured with the bundled model ``--model auto`` picks for it
(``ANATOMY_MODELS``; ``tests/test_regression.py`` checks that auto still picks it) into
``Testing/<anatomy>/expected.json``; ``all`` (the default) measures every one.

Thresholds are the measured values with a margin (TRE and field error may grow by 15 % + 0.02
mm, Dice may fall by 10 %), so a regression test fails when a change makes the model clearly
worse, not when a CPU rounds differently. Identity (no registration) is recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from equireg.api import register
from equireg.cases import find_cases, identity_score, score
from equireg.models import read_card

HERE = Path(__file__).resolve().parent
ANATOMY_MODELS = {"brain": "generic2d", "retina": "generic2d", "lung": "generic3d"}  # auto's picks


def thresholds(measured: dict[str, float]) -> dict[str, float]:
    return {
        "tre_mean_mm_max": round(measured["tre_mean_mm"] * 1.15 + 0.02, 4),
        "field_error_mean_mm_max": round(measured["field_error_mean_mm"] * 1.15 + 0.02, 4),
        "dice_min": round(measured["dice"] * 0.9, 4),
        "folding_fraction_max": round(max(measured["folding_fraction"] * 2, 0.001), 4),
    }


def measure(anatomy: str, model: str) -> dict:
    card = read_card(model)
    cases = {}
    for case in find_cases(HERE / anatomy):
        result = register(str(case.fixed), str(case.moving), model=model, device="cpu")
        measured = score(case, result.transform)
        measured["folding_fraction"] = result.report["folding_fraction"]
        cases[case.name] = {
            "measured": {k: round(v, 4) for k, v in measured.items()},
            "identity": {k: round(v, 4) for k, v in identity_score(case).items()},
            "thresholds": thresholds(measured),
        }
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
    ).stdout.strip()
    selftest = cases.get(f"{anatomy}/photo/plain")
    return {
        "measured_with": "python Testing/measure_expected.py",
        "commit": commit,
        "model": model,
        "model_sha256": card.data.get("sha256"),
        "model_trained": card.trained,
        "cases": cases,
        # What the in-Slicer self-test (EquivariantRegistration.py) holds the module to.
        **(
            {"slicer_selftest": {"max_mean_tre_mm": selftest["thresholds"]["tre_mean_mm_max"]}}
            if selftest
            else {}
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anatomy", choices=[*ANATOMY_MODELS, "all"], default="all")
    args = parser.parse_args()
    chosen = ANATOMY_MODELS if args.anatomy == "all" else [args.anatomy]
    for anatomy in chosen:
        began = time.perf_counter()
        expected = measure(anatomy, ANATOMY_MODELS[anatomy])
        (HERE / anatomy / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
        for name, values in expected["cases"].items():
            print(name, values["measured"], "identity:", values["identity"])
        print(f"{anatomy}: {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
