"""benchmarks/equivariance.py's own logic: the receptive radius and the networks it compares."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from equireg.nn.builder import DEFAULT_2D, DEFAULT_3D
from equireg.nn.featurizer import Featurizer

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def equivariance(monkeypatch: pytest.MonkeyPatch):
    """The script as a module (it imports ``common`` as a sibling)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    yield importlib.import_module("equivariance")
    for name in ("common", "equivariance"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize(("config", "radius"), [(DEFAULT_2D, 33), (DEFAULT_3D, 17)])
def test_receptive_radius_of_the_default_featurizers(equivariance, config, radius) -> None:
    """3-wide stem, two 3-wide convolutions per block at its dilation, 1-wide head:
    ``1 + 2 Σ dilations`` (2-D: 67 voxels across, as ``Featurizer`` says)."""
    featurizer = Featurizer(config["dim"], **config["attention"]["featurizer"])
    assert equivariance.receptive_radius(featurizer) == radius


def test_networks_without_baselines(equivariance) -> None:
    """No ``--unet``: an untrained U-Net, flagged; no ``--air``: no AiR row; the pad row is the
    bundled network with the pad raised to the receptive radius, its own copy."""
    chosen = equivariance.networks("retina2d", None, None)
    names = list(chosen)
    assert names[0] == "displacement-only U-Net" and chosen[names[0]][1] is False
    assert not any(name.startswith("AiR") for name in names)
    full = chosen["equivariant (attention + U-Nets)"][0]
    wide = chosen[names[-1]][0]
    assert names[-1] == "equivariant, pad 33 (trained at pad 8)"
    assert wide.first.first.step.pad == 33 and full.first.first.step.pad == 8
