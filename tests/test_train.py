"""Training: synthetic pairs with their true maps, resumable determinism, logs and plots, and
DistributedDataParallel with two gloo processes under torchrun."""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from equireg.data.pairs import random_pairs, retina_pool
from equireg.losses import map_error
from equireg.maps import identity_grid, sample
from equireg.models import load_network, read_card
from equireg.train import train

REPOSITORY = Path(__file__).resolve().parents[1]

TINY_CONFIG = {
    "card": {
        "name": "tiny2d",
        "description": "test model",
        "dim": 2,
        "input_shape": [64, 64],
        "preprocessing": {"kind": "percentile", "low": 0.5, "high": 99.5},
        "architecture": {
            "dim": 2,
            "attention": {
                "pad": 4,
                "temperature": 20.0,
                "featurizer": {"width": 8, "dilations": [1, 2], "out_channels": 16},
            },
            "unet": {"channels": [4, 8]},
            "extra_full_resolution_step": False,
        },
    },
    "data": {
        "kind": "retina",
        "seed": 3,
        "pool_size": 4,
        "warp_magnitude": 0.05,
        "warp_smoothness": 4.0,
        "max_shift": 0.2,
        "gamma_sigma": 0.2,
        "contrast_range": 0.5,
        "noise": 0.01,
    },
    "training": {
        "seed": 0,
        "steps": 4,
        "batch_size": 2,
        "lr": 0.001,
        "similarity": "lncc_pyramid",
        "lncc_window": 5,
        "warmup_steps": 2,
        "map_steps": 3,
        "map_weight": 0.05,
        "diffusion_weight": 1.0,
        "gradicon_weight": 0.5,
        "checkpoint_every": 2,
    },
}


def test_pairs_come_with_the_map_that_registers_them():
    data = {**TINY_CONFIG["data"], "noise": 0.0, "gamma_sigma": 0.0, "contrast_range": 0.0}
    pool = retina_pool(2, (64, 64), seed=1)
    batch = random_pairs(pool, 3, data, torch.Generator().manual_seed(5))
    inside = ((batch.true_map > 0.03) & (batch.true_map < 0.97)).all(1, keepdim=True)
    warped_error = (sample(batch.moving, batch.true_map) - batch.fixed).abs()[inside].mean()
    unregistered_error = (batch.moving - batch.fixed).abs()[inside].mean()
    # Measured 0.009 vs 0.15 at 128² (and similar at 64²): the residual is interpolation only.
    assert warped_error < 0.2 * unregistered_error
    again = random_pairs(pool, 3, data, torch.Generator().manual_seed(5))
    assert torch.equal(again.fixed, batch.fixed) and torch.equal(again.true_map, batch.true_map)


def test_map_error_counts_voxels_inside_the_moving_image_only():
    truth = identity_grid((32, 16))
    shifted = truth + torch.tensor([2 / 32, 0.0]).view(1, 2, 1, 1)
    assert map_error(truth, truth) == 0
    assert torch.isclose(map_error(shifted, truth), torch.tensor(2.0), atol=1e-5)
    outside = truth + 2.0  # every true position outside the moving image: nothing to count
    assert map_error(shifted, outside) == 0


def _state(card_path: Path) -> dict[str, torch.Tensor]:
    return load_network(read_card(str(card_path))).state_dict()


def test_resumed_training_matches_an_uninterrupted_run_and_logs(tmp_path):
    straight = train(copy.deepcopy(TINY_CONFIG), tmp_path / "straight", torch.device("cpu"))
    train(copy.deepcopy(TINY_CONFIG), tmp_path / "resumed", torch.device("cpu"), steps=2)
    with open(tmp_path / "resumed" / "log.csv", "a") as log:  # a segment killed at step 3
        log.write("3,gradicon,0,0,0,nan,nan,1\n")
    resumed = train(copy.deepcopy(TINY_CONFIG), tmp_path / "resumed", torch.device("cpu"))
    for name, value in _state(straight).items():
        assert torch.equal(value, _state(resumed)[name]), name  # bit for bit
    card = json.loads(straight.read_text())
    assert card["trained"] and card["training"]["steps"] == 4
    assert card["training"]["validation_map_error_voxels"] > 0
    with open(tmp_path / "resumed" / "log.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [int(row["step"]) for row in rows] == [1, 2, 3, 4]
    assert [row["phase"] for row in rows] == ["warmup", "warmup", "gradicon", "gradicon"]
    assert rows[0]["map_error"] != "nan" and rows[3]["map_error"] == "nan"  # map_steps = 3
    assert (tmp_path / "resumed" / "loss.png").stat().st_size > 1000


def test_two_gloo_processes_train_one_model_with_torchrun(tmp_path):
    config_path = tmp_path / "tiny.json"
    config_path.write_text(json.dumps({**TINY_CONFIG, "training": {**TINY_CONFIG["training"]}}))
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--standalone",
            "-m",
            "equireg",
            "train",
            str(config_path),
            "-o",
            str(tmp_path / "run"),
            "--progress",
            "none",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    card = json.loads((tmp_path / "run" / "tiny2d.json").read_text())
    assert card["training"]["processes"] == 2
    single = train(copy.deepcopy(TINY_CONFIG), tmp_path / "single", torch.device("cpu"))
    # Two replicas average the gradients of two different batches: not the one-process model.
    differs = [
        not torch.allclose(value, _state(single)[name])
        for name, value in _state(tmp_path / "run" / "tiny2d.json").items()
    ]
    assert any(differs)


@pytest.mark.parametrize("kind", ["heart"])
def test_unknown_data_kind_is_refused(tmp_path, kind):
    config = copy.deepcopy(TINY_CONFIG)
    config["data"]["kind"] = kind
    with pytest.raises(ValueError, match="unknown training data kind"):
        train(config, tmp_path, torch.device("cpu"))


def _bad_train(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    card = read_card("generic2d").path
    (tmp_path / "afile").write_text("x")
    out = str(tmp_path / "out")
    return {
        "missing config": ([str(tmp_path / "nosuch.json"), "-o", out], "cannot read"),
        "not JSON": ([str(tmp_path / "afile"), "-o", out], "not a JSON file"),
        "a model card": ([str(card), "-o", out], "not a training configuration (no card.name"),
        "output is a file": ([str(config), "-o", str(tmp_path / "afile")], "-o is a file"),
        "no steps": ([str(config), "-o", out, "--steps", "0"], "--steps 0: must be at least 1"),
        "empty batch": ([str(config), "-o", out, "--batch-size", "0"], "--batch-size 0"),
        "negative workers": ([str(config), "-o", out, "--workers", "-1"], "--workers -1"),
    }


@pytest.mark.parametrize(
    "name",
    ["missing config", "not JSON", "a model card", "output is a file", "no steps"]
    + ["empty batch", "negative workers"],
)
def test_train_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys, name):
    from equireg.cli import main

    arguments, message = _bad_train(tmp_path)[name]
    assert main(["train", *arguments, "--progress", "none"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0], error
    assert not (tmp_path / "out").exists()
