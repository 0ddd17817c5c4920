"""The generic models' training data (random label maps, random contrasts), their intensity
preprocessing, ``--model auto``'s choice, and training that resumes bit for bit."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import equireg.models
from equireg.data.generic import generic_pairs, label_map
from equireg.errors import InputError
from equireg.maps import identity_grid, sample
from equireg.models import auto_model, read_card
from equireg.preprocess import FOREGROUND_PERCENTILES, normalise_intensity
from equireg.train import CHECKPOINT, load_config, train

REPOSITORY = Path(__file__).resolve().parents[1]
SPEC = {"max_shift": 0.25, "warp_magnitude": 0.05, "warp_smoothness": 4.0}


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-9))


def _mean_correlations(multimodal: float) -> tuple[float, float]:
    """Mean correlation of fixed with moving, before and after the true map, over 12 pairs."""
    spec = {**SPEC, "multimodal": multimodal}
    batch = generic_pairs(torch.zeros(0), 12, spec, (64, 64), torch.Generator().manual_seed(1))
    before, after = [], []
    for index in range(12):
        inside = ((batch.true_map[index] > 0.02) & (batch.true_map[index] < 0.98)).all(0)
        warped = sample(batch.moving[index : index + 1], batch.true_map[index : index + 1])
        fixed = batch.fixed[index, 0][inside]
        after.append(_correlation(warped[0, 0][inside], fixed))
        before.append(_correlation(batch.moving[index, 0][inside], fixed))
    return float(np.mean(before)), float(np.mean(after))


def test_label_map_pairs_come_with_the_map_that_registers_them():
    # Measured (seed 1): one contrast 0.32 before, 0.95 after; independent contrasts 0.22, 0.59.
    before, after = _mean_correlations(multimodal=0.0)
    assert after > 0.9 and before < 0.5
    _, after_multimodal = _mean_correlations(multimodal=1.0)
    assert after_multimodal < after - 0.2  # independent contrasts: no longer one intensity map


def test_pairs_are_seeded_and_shift_each_image_independently():
    shape = (64, 64)
    first = generic_pairs(torch.zeros(0), 8, SPEC, shape, torch.Generator().manual_seed(4))
    again = generic_pairs(torch.zeros(0), 8, SPEC, shape, torch.Generator().manual_seed(4))
    assert torch.equal(first.fixed, again.fixed) and torch.equal(first.true_map, again.true_map)
    assert 0 <= float(first.moving.min()) and float(first.moving.max()) <= 1
    shifts = (first.true_map - identity_grid(shape)).mean(dim=(2, 3)).abs()
    assert float(shifts.max()) > 0.1  # up to 25 % of the field of view each way (plus warps)


def test_label_maps_have_background_rim_blobs_and_tubes():
    spec = {"body_probability": 1.0, "tube_probability": 1.0, "labels_min": 6, "labels_max": 6}
    for shape in ((96, 96), (48, 48, 48)):
        labels = label_map(shape, spec, torch.Generator().manual_seed(2))
        values = set(torch.unique(labels).int().tolist())
        assert 0 in values and 7 in values and 8 in values  # background, rim, tubes
        assert len(values & set(range(1, 7))) >= 3  # several blobs inside the body


def test_foreground_preprocessing_ignores_the_background():
    values = np.zeros((40, 40), np.float32)
    values[10:30, 10:30] = np.linspace(100, 300, 400).reshape(20, 20)
    normalised = normalise_intensity(values, FOREGROUND_PERCENTILES)
    assert normalised[0, 0] == 0 and normalised[10:30, 10:30].max() == 1
    assert 0.4 < float(np.median(normalised[10:30, 10:30])) < 0.6  # not squashed by the zeros


def test_auto_picks_the_generic_model_unless_a_card_rule_matches(tmp_path, monkeypatch):
    """No bundled card has a rule (generic3d matches lung3d on chest CT, docs/models.md); a
    specialised card with one is picked when every input meets it."""
    brain = np.random.default_rng(0).uniform(0, 400, (20, 20, 20))
    chest = np.full((20, 20, 20), -1000.0)
    chest[:, 5:15, 5:15] = -800  # aerated lung
    assert auto_model(2, [brain[0], brain[1]])[0] == "generic2d"
    assert auto_model(3, [brain, brain])[0] == "generic3d"
    assert auto_model(3, [chest, chest])[0] == "generic3d"
    card = json.loads(read_card("lung3d").path.read_text())
    card["auto_match"] = {"range": [-950, -500], "fraction": 0.05, "description": "chest CT"}
    for name in ("generic2d", "generic3d"):
        shutil.copy(read_card(name).path, tmp_path)
    (tmp_path / "lung3d.json").write_text(json.dumps(card))
    monkeypatch.setattr(equireg.models, "MODELS_DIR", tmp_path)
    assert auto_model(3, [chest, chest]) == ("lung3d", "auto: chest CT")
    assert auto_model(3, [chest, brain])[0] == "generic3d"  # every image must match
    assert auto_model(3, [brain, brain])[0] == "generic3d"
    assert read_card("generic3d", 3).chosen == "by name"
    with pytest.raises(InputError, match="no bundled model for 4-D"):
        auto_model(4)


def test_register_reports_which_model_ran_and_why(tmp_path):
    from equireg import register

    rng = np.random.default_rng(0)
    values = (rng.uniform(0, 1, (48, 48)) > 0.5).astype(np.float32) * 200
    image = sitk.GetImageFromArray(values)
    result = register(image, image, refine_steps=0, initial="none")
    assert result.report["model"]["name"] == "generic2d"
    assert result.report["model"]["chosen"] == "auto: the generic model for 2-D images"
    assert Path(result.report["model"]["card"]).name == "generic2d.json"


def _tiny_generic(name: str) -> dict:
    config = load_config(REPOSITORY / "configs" / f"{name}.json")
    config["training"].update(checkpoint_every=1, batch_size=1)
    config["data"]["pool_size"] = 2
    return config


@pytest.mark.parametrize("name", ["generic2d"])
def test_training_resumes_bit_for_bit_from_the_committed_checkpoint(tmp_path, name):
    """Two steps past the committed checkpoint, straight or in two segments: equal weights."""
    committed = REPOSITORY / "checkpoints" / name / CHECKPOINT
    step = int(torch.load(committed, weights_only=True)["step"])
    runs = []
    for run, segments in (("straight", [step + 2]), ("segments", [step + 1, step + 2])):
        (tmp_path / run).mkdir()
        shutil.copy(committed, tmp_path / run / CHECKPOINT)
        for stop in segments:
            train(copy.deepcopy(_tiny_generic(name)), tmp_path / run, torch.device("cpu"), stop)
        runs.append(torch.load(tmp_path / run / CHECKPOINT, weights_only=True))
    assert runs[0]["step"] == runs[1]["step"] == step + 2
    for key, value in runs[0]["model"].items():
        assert torch.equal(value, runs[1]["model"][key]), key


def test_loader_workers_draw_the_same_pairs(tmp_path):
    """Pairs generated ahead by two worker processes train the same weights as in-process."""
    committed = REPOSITORY / "checkpoints" / "generic2d" / CHECKPOINT
    step = int(torch.load(committed, weights_only=True)["step"])
    runs = []
    for workers in (0, 2):
        folder = tmp_path / str(workers)
        folder.mkdir()
        shutil.copy(committed, folder / CHECKPOINT)
        config = _tiny_generic("generic2d")
        train(config, folder, torch.device("cpu"), step + 2, workers=workers)
        runs.append(torch.load(folder / CHECKPOINT, weights_only=True)["model"])
    for key, value in runs[0].items():
        assert torch.equal(value, runs[1][key]), key


def test_training_says_so_when_the_checkpoint_is_already_at_the_schedule_end(tmp_path, capsys):
    committed = REPOSITORY / "checkpoints" / "generic2d" / CHECKPOINT
    step = int(torch.load(committed, weights_only=True)["step"])
    shutil.copy(committed, tmp_path / CHECKPOINT)
    card = train(_tiny_generic("generic2d"), tmp_path, torch.device("cpu"), step)
    assert f"already at step {step}" in capsys.readouterr().err
    assert json.loads(card.read_text())["training"]["steps"] == step


def test_the_bundled_generic_models_are_their_committed_checkpoints():
    for name in ("generic2d", "generic3d"):
        card = read_card(name)
        state = torch.load(card.weights_path, weights_only=True)
        checkpoint = torch.load(REPOSITORY / "checkpoints" / name / CHECKPOINT, weights_only=True)
        assert card.data["training"]["steps"] == checkpoint["step"]
        for key, value in state.items():
            assert torch.equal(value, checkpoint["model"][key]), (name, key)
        assert json.loads(card.path.read_text())["preprocessing"] == FOREGROUND_PERCENTILES


def test_the_gpu_segment_command_continues_the_committed_checkpoint(tmp_path):
    """``checkpoints/continue.sh`` (the command a lent GPU runs) on the CPU: a zero-minute
    segment takes one step past the committed checkpoint and leaves what $OUT brings back."""
    name = "generic3d"
    committed = torch.load(REPOSITORY / "checkpoints" / name / CHECKPOINT, weights_only=True)[
        "step"
    ]
    output = tmp_path / name
    environment = {**os.environ, "MINUTES": "0", "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [str(REPOSITORY / "checkpoints" / "continue.sh"), name, str(output), "1"],
        check=True,
        env=environment,
        capture_output=True,
    )
    assert torch.load(output / CHECKPOINT, weights_only=True)["step"] == committed + 1
    assert sorted(path.name for path in output.iterdir()) == sorted(
        [CHECKPOINT, "log.csv", "loss.png", f"{name}.pt", f"{name}.json"]
    )
    rows = (output / "log.csv").read_text().splitlines()
    assert rows[-1].startswith(f"{committed + 1},")
    card = json.loads((output / f"{name}.json").read_text())
    assert card["training"]["steps"] == committed + 1
    assert card["training"]["settings"]["batch_size"] == 1
