"""Bundled models: a JSON model card beside each weights file (docs/models.md).

A model is named by a preset (``generic2d``, ``generic3d``, ``retina2d``, ``lung3d``), ``auto``
(the generic model of the images' dimension, or a specialised model whose card has an
``auto_match`` rule the images meet; no bundled card has one now), or a path to a ``.pt``
state dict with its card at the same path with ``.json``.
Weights are loaded with ``torch.load(..., weights_only=True)`` after their sha256 is checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..compose import RegistrationStep
from ..errors import InputError
from ..options import MODELS_DIR, bundled_model_names
from ..preprocess import fraction_within

GENERIC = {2: "generic2d", 3: "generic3d"}  # what ``auto`` picks unless a card's rule matches


@dataclass
class ModelCard:
    """What a model is and how to feed it; stored as ``NAME.json`` beside ``NAME.pt``."""

    path: Path  # the card's own path
    data: dict[str, Any]
    chosen: str = "by name"  # why this model runs: by name, or the ``auto`` rule that picked it

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def dim(self) -> int:
        return int(self.data["dim"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.data["input_shape"])

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.data["preprocessing"]

    @property
    def architecture(self) -> dict[str, Any]:
        return self.data["architecture"]

    @property
    def trained(self) -> bool:
        return bool(self.data.get("trained", False))

    @property
    def weights_path(self) -> Path:
        """The weights file, which must lie in the card's own folder (a plain relative name)."""
        relative = Path(str(self.data["weights"]))
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise InputError(
                f"{self.path}: weights path {str(relative)!r} leaves the card's folder; "
                "it must be a file name beside the card"
            )
        return self.path.parent / relative


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _matches(rule: dict[str, Any], images: Sequence[np.ndarray]) -> bool:
    """Whether every image has at least ``rule["fraction"]`` of its voxels inside
    ``rule["range"]`` (e.g. aerated lung, −950…−500 HU, for a chest CT model)."""
    low, high = rule["range"]
    return bool(images) and all(
        fraction_within(values, low, high) >= rule["fraction"] for values in images
    )


def auto_model(dim: int | None, images: Sequence[np.ndarray] = ()) -> tuple[str, str]:
    """The bundled model ``auto`` picks for ``images`` of dimension ``dim``, and why.

    A specialised card with an ``auto_match`` rule (``{"range": [low, high], "fraction": f,
    "description": ...}``) is picked when every image meets it; otherwise the generic model.

    Raises:
        InputError: no bundled model for ``dim``.
    """
    if dim not in GENERIC:
        raise InputError(f"model auto: no bundled model for {dim}-D images")
    for card_path in sorted(MODELS_DIR.glob("*.json")):
        data = json.loads(card_path.read_text())
        rule = data.get("auto_match")
        if rule and data.get("dim") == dim and _matches(rule, images):
            return data["name"], f"auto: {rule['description']}"
    return GENERIC[dim], f"auto: the generic model for {dim}-D images"


def read_card(spec: str, dim: int | None = None, images: Sequence[np.ndarray] = ()) -> ModelCard:
    """Resolve ``spec`` (``auto``, a preset name, or a path to weights or a card) to its card;
    ``auto`` looks at ``images`` (voxel arrays of the fixed and moving image, any shape).

    Raises:
        InputError: no bundled model for ``dim``, unknown name, missing or invalid card, a
            weights path outside the card's folder, or a model of another dimension.
    """
    chosen, given_weights = "by name", None
    if spec == "auto":
        spec, chosen = auto_model(dim, images)
    if os.sep in spec or spec.endswith((".pt", ".json")):
        given = Path(spec)
        if given.is_dir():
            raise InputError(f"{given}: is a folder; give the model's NAME.pt (card NAME.json)")
        if given.suffix == ".pt" and not given.is_file():
            raise InputError(f"{given}: model weights not found")
        card_path = given.with_suffix(".json")
        given_weights = given if given.suffix == ".pt" else None
        if not card_path.is_file():
            raise InputError(f"{card_path}: model card not found (expected beside the weights)")
    else:
        card_path = MODELS_DIR / f"{spec}.json"
        if not card_path.is_file():
            known = ", ".join(bundled_model_names(MODELS_DIR))
            raise InputError(f"model {spec}: unknown model name (bundled: {known})")
    try:
        card = ModelCard(card_path, json.loads(card_path.read_text()), chosen)
        _ = (card.name, card.dim, card.input_shape, card.preprocessing, card.architecture)
        _ = card.weights_path
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise InputError(f"{card_path}: invalid model card ({error})") from None
    if given_weights is not None and card.weights_path.resolve() != given_weights.resolve():
        raise InputError(
            f"{card_path}: names weights {card.data['weights']!r}, not {given_weights.name}; "
            'the card and its weights must share a name (or edit the card\'s "weights")'
        )
    if dim is not None and card.dim != dim:
        raise InputError(f"model {card.name}: is a {card.dim}-D model but the images are {dim}-D")
    return card


def _unpickling_reason(error: Exception) -> str:
    """What torch refused, in one line, without its advice to load with weights_only=False."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line.removeprefix("WeightsUnpickler error:").strip()
    useful = [line for line in lines if "weights_only" not in line]
    return (useful[0] if useful else type(error).__name__)[:200]


def load_network(card: ModelCard) -> RegistrationStep:
    """Build the card's architecture and load its weights: the card must name their sha256,
    the file must match it, and it is read with ``torch.load(weights_only=True)``.

    Raises:
        InputError: weights missing, no sha256 in the card, a sha256 mismatch, a file that
            holds more than tensors (refused, never executed), or weights of another
            architecture.
    """
    from ..nn.builder import build

    weights = card.weights_path
    if not weights.is_file():
        raise InputError(f"{weights}: weights file of model {card.name} not found")
    expected = card.data.get("sha256")
    if not isinstance(expected, str) or not expected.strip():
        raise InputError(
            f"{card.path}: model card has no sha256 of its weights; unchecked weights are not "
            "loaded (add the file's sha256 to the card)"
        )
    if sha256_of(weights) != expected.strip().lower():
        raise InputError(
            f"{weights}: sha256 does not match the model card; the file is corrupt or was replaced"
        )
    network = build(card.architecture)
    try:
        with warnings.catch_warnings():  # torch's remarks on pickle protocols: not for users
            warnings.simplefilter("ignore")
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling error means refused weights
        raise InputError(
            f"{weights}: refused: not a plain tensor file ({_unpickling_reason(error)})"
        ) from None
    try:
        network.load_state_dict(state)
    except Exception as error:  # noqa: BLE001 - missing/unexpected keys, shape mismatches
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(error).__name__)
        raise InputError(
            f"{weights}: weights do not fit the {card.name} architecture of the card "
            f"({detail[:160]})"
        ) from None
    return network.eval()


def save_model(network: RegistrationStep, card_data: dict[str, Any], directory: Path) -> ModelCard:
    """Write ``NAME.pt`` and ``NAME.json`` (with the weights' sha256) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{card_data['name']}.pt"
    torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, weights)
    data = {**card_data, "weights": weights.name, "sha256": sha256_of(weights)}
    card_path = directory / f"{card_data['name']}.json"
    card_path.write_text(json.dumps(data, indent=2) + "\n")
    return ModelCard(card_path, data)
