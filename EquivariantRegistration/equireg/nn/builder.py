"""Networks from JSON-able configs: the reference composition and the displacement-only baseline.

A config (what a model card stores under ``architecture``)::

    {
      "dim": 2,                                # 2 or 3
      "attention": {
        "pad": 8,                              # voxels of the 1/4-resolution grid per side
        "temperature": 20.0,                   # initial softmax temperature (learnt, as a log)
        "featurizer": {"width": 32, "dilations": [1, 2, 4, 8, 1], "out_channels": 64}
      },
      "unet": {"channels": [16, 32, 64, 128]}, # widths per level; len - 1 = poolings
      "extra_full_resolution_step": false,     # one more full-resolution U-Net step
      "kind": "equivariant"                    # optional: "equivariant" (default) | "unet"
    }

``"kind": "air"`` builds the AiR transformer baseline instead, from ``dim`` and its own
``"air"`` section (documented in ``nn/air.py``).

Input sizes must be divisible by ``2 ** len(channels)`` (the 1/2-resolution U-Net pools
``len(channels) - 1`` times more), and by ``2 ** (len(channels) + 1)`` for the baseline.
"""

from __future__ import annotations

import copy
from typing import Any

from ..compose import DisplacementStep, Downsample, RegistrationStep, TwoStep
from .air import build_air
from .attention import AttentionInversion
from .featurizer import Featurizer
from .unet import UNet

# 2-D, made for 128 × 128 inputs: 32 × 32 queries against 48 × 48 keys.
DEFAULT_2D: dict[str, Any] = {
    "dim": 2,
    "attention": {
        "pad": 8,
        "temperature": 20.0,
        "featurizer": {"width": 32, "dilations": [1, 2, 4, 8, 1], "out_channels": 64},
    },
    "unet": {"channels": [16, 32, 64, 128]},
    "extra_full_resolution_step": False,
}

# 3-D, made for 96³–128³ inputs (128³: 32³ queries against 40³ keys); narrower layers than in
# 2-D keep the full-resolution convolutions affordable on a CPU.
DEFAULT_3D: dict[str, Any] = {
    "dim": 3,
    "attention": {
        "pad": 4,
        "temperature": 20.0,
        "featurizer": {"width": 24, "dilations": [1, 2, 4, 1], "out_channels": 64},
    },
    "unet": {"channels": [8, 16, 32, 64]},
    "extra_full_resolution_step": False,
}


def default_config(dim: int) -> dict[str, Any]:
    """A fresh copy of the documented default config for ``dim``-D images (2 or 3)."""
    defaults = {2: DEFAULT_2D, 3: DEFAULT_3D}
    if dim not in defaults:
        raise ValueError(f"no default network for dim={dim}; use 2 or 3")
    return copy.deepcopy(defaults[dim])


def _unet_step(config: dict[str, Any]) -> DisplacementStep:
    dim = config["dim"]
    return DisplacementStep(UNet(dim, in_channels=2, out_channels=dim, **config["unet"]))


def _chain(steps: list[RegistrationStep]) -> RegistrationStep:
    """``TwoStep`` nested to the left, so each step warps the original moving image once."""
    network = steps[0]
    for step in steps[1:]:
        network = TwoStep(network, step)
    return network


def _refinement(config: dict[str, Any]) -> list[RegistrationStep]:
    """U-Net steps at 1/2 and full resolution, plus the optional extra full-resolution one."""
    steps: list[RegistrationStep] = [Downsample(_unet_step(config), 2), _unet_step(config)]
    if config["extra_full_resolution_step"]:
        steps.append(_unet_step(config))
    return steps


def build_network(config: dict[str, Any]) -> RegistrationStep:
    """The reference composition: attention inversion at 1/4 resolution (``[W, U]``-equivariant),
    then ``[U, U]``-equivariant U-Net refinements, so the whole is ``[W, U]``-equivariant."""
    attention = config["attention"]
    inversion = AttentionInversion(
        Featurizer(config["dim"], **attention["featurizer"]),
        pad=attention["pad"],
        temperature=attention["temperature"],
    )
    return _chain([Downsample(inversion, 4), *_refinement(config)])


def build_unet_only(config: dict[str, Any]) -> RegistrationStep:
    """The displacement-only baseline (only ``[U, U]``-equivariant): the same refinements after a
    1/4-resolution U-Net step instead of the attention inversion."""
    return _chain([Downsample(_unet_step(config), 4), *_refinement(config)])


BUILDERS = {"equivariant": build_network, "unet": build_unet_only, "air": build_air}


def build(config: dict[str, Any]) -> RegistrationStep:
    """The network named by ``config["kind"]`` (default: the equivariant reference composition);
    what training and model loading call, so baselines share one harness."""
    kind = config.get("kind", "equivariant")
    if kind not in BUILDERS:
        raise ValueError(f"unknown architecture kind {kind!r}; known: {', '.join(BUILDERS)}")
    return BUILDERS[kind](config)
