"""The AiR baseline: a map of the right shape, identity at init, gradients, training harness,
model round-trip, baseline configs, and no translation equivariance of either kind."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from test_nn import EQUIVARIANCE_TOLERANCE, NETWORK_CASES, smooth_periodic_image, translate

from equireg.compose import DisplacementStep
from equireg.evaluate import equivariance_error
from equireg.maps import evaluate, identity_grid, warp
from equireg.models import load_network, read_card, save_model
from equireg.nn.air import AiR, patchify, unpatchify
from equireg.nn.builder import build
from equireg.train import train

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# Small networks, per dimension: the image size, and a patch size and field stride that cover
# both output modes (a displacement per voxel, and a coarser field interpolated by the warp).
CASES = {
    2: {"size": 32, "air": {"patch_size": 8, "field_stride": 1}},
    3: {"size": 16, "air": {"patch_size": 4, "field_stride": 2}},
}


def air_config(dim: int, **air: int) -> dict:
    """A small AiR architecture config (``nn/air.py``)."""
    sizes = {"width": 32, "heads": 2, "encoder_layers": 1, "decoder_layers": 1, "mlp_ratio": 2}
    return {"kind": "air", "dim": dim, "air": {**sizes, **air}}


def randomise_output(step: DisplacementStep, scale: float, seed: int) -> None:
    """Small random weights for the zero-initialised output layer, so the step moves voxels."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in step.net.output.parameters():
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("dim", [2, 3])
def test_patches_round_trip_in_row_major_order(dim):
    image = torch.randn(2, 3, *[8, 12, 8][:dim])
    tokens = patchify(image, 4)
    grid = [n // 4 for n in image.shape[2:]]
    assert tokens.shape == (2, math.prod(grid), 3 * 4**dim)
    assert torch.equal(unpatchify(tokens, grid, 3, 4), image)
    second = (slice(None), *[slice(0, 4)] * (dim - 1), slice(4, 8))  # patch 1: next along last
    assert torch.equal(tokens[0, 1].reshape(3, *[4] * dim), image[0][second])


@pytest.mark.parametrize("dim", [2, 3])
def test_fresh_air_step_is_the_identity_map_of_the_right_shape(dim):
    case = CASES[dim]
    shape = [case["size"]] * dim
    step = build(air_config(dim, **case["air"]))
    assert isinstance(step, DisplacementStep) and isinstance(step.net, AiR)
    moving, fixed = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    field = step.net(torch.cat([moving, fixed], dim=1))
    assert field.shape == (2, dim, *[n // case["air"]["field_stride"] for n in shape])
    phi = evaluate(step(moving, fixed), shape, 2, fixed)
    assert phi.shape == (2, dim, *shape)
    assert torch.equal(phi, identity_grid(shape, 2))


@pytest.mark.parametrize("dim", [2, 3])
def test_gradients_reach_every_parameter(dim):
    case = CASES[dim]
    shape = [case["size"]] * dim
    step = build(air_config(dim, **case["air"]))
    randomise_output(step, scale=1e-2, seed=0)
    moving = smooth_periodic_image(shape, sigma=1.5, seed=1)
    fixed = translate(moving, [1] * dim)
    (warp(moving, step(moving, fixed), shape) - fixed).square().mean().backward()
    for name, parameter in step.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="divisible"):
        build(air_config(2, patch_size=8))(torch.rand(1, 1, 32, 36), torch.rand(1, 1, 32, 36))
    with pytest.raises(ValueError, match="field_stride"):
        AiR(2, patch_size=8, field_stride=3)


@pytest.mark.parametrize("dim", [2, 3])
def test_air_is_not_equivariant_to_shifts(dim):
    """Under the shifts of ``test_nn``'s network test it misses ``[W, U]`` equivariance by the
    shift between the images, as the U-Net baseline does; and where the U-Net is exactly
    ``[U, U]``-equivariant (a common shift by a multiple of its pooling grid, here also of the
    patch size), AiR is not: its absolute position embeddings change the output by a sizeable
    fraction of the displacement itself."""
    case = NETWORK_CASES[dim]
    shape = [case["size"]] * dim
    moving = smooth_periodic_image(shape, sigma=3.0, seed=2)
    fixed = translate(moving, case["correspondence"])
    torch.manual_seed(0)
    step = build(air_config(dim, patch_size=8, field_stride=1)).eval()
    randomise_output(step, scale=1e-3, seed=3)
    with torch.no_grad():
        values = evaluate(step(moving, fixed), shape, 1, fixed)
    displacement = ((values - identity_grid(shape)) * case["size"]).norm(dim=1).mean()
    assert displacement > 0.25  # voxels: the step really moves voxels
    independent = equivariance_error(step, moving, fixed, case["w"], case["u"], case["margin"])
    common = equivariance_error(step, moving, fixed, case["u"], case["u"], case["margin"])
    assert independent > 100 * EQUIVARIANCE_TOLERANCE, independent
    assert common > 0.1 * displacement, (common, float(displacement))


def test_air_trains_in_the_harness_and_loads_from_its_card(tmp_path):
    config = {
        "card": {
            "name": "air_tiny",
            "description": "test",
            "dim": 2,
            "input_shape": [64, 64],
            "preprocessing": {"kind": "percentile", "low": 0.5, "high": 99.5},
            "architecture": air_config(2, patch_size=8, field_stride=1),
        },
        "data": {
            "kind": "retina",
            "seed": 11,
            "pool_size": 2,
            "warp_magnitude": 0.05,
            "warp_smoothness": 4.0,
            "max_shift": 0.2,
            "gamma_sigma": 0.2,
            "noise": 0.01,
        },
        "training": {
            "seed": 0,
            "steps": 2,
            "batch_size": 1,
            "lr": 0.001,
            "similarity": "lncc_pyramid",
            "lncc_window": 9,
            "warmup_steps": 1,  # one diffusion step, then one GradICON step (both directions)
            "diffusion_weight": 1.0,
            "gradicon_weight": 0.75,
            "checkpoint_every": 2,
        },
    }
    card_path = train(config, tmp_path, torch.device("cpu"))
    with open(tmp_path / "log.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["phase"] for row in rows] == ["warmup", "gradicon"]
    assert all(torch.isfinite(torch.tensor(float(row["total"]))) for row in rows)
    network = load_network(read_card(str(card_path)))
    assert isinstance(network.net, AiR)
    assert network.net.output.weight.abs().sum() > 0, "training must move the output layer"


def test_saved_air_round_trips_through_its_card(tmp_path):
    config = air_config(2, patch_size=8, field_stride=2)
    step = build(config)
    randomise_output(step, scale=1e-2, seed=0)
    card = {
        "name": "air_saved",
        "description": "test",
        "dim": 2,
        "input_shape": [32, 32],
        "preprocessing": {"kind": "percentile", "low": 0.5, "high": 99.5},
        "architecture": config,
    }
    saved = save_model(step.eval(), card, tmp_path)
    loaded = load_network(read_card(str(saved.weights_path)))
    moving, fixed = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        expected = evaluate(step(moving, fixed), [32, 32], 1, fixed)
        assert torch.equal(evaluate(loaded(moving, fixed), [32, 32], 1, fixed), expected)


def test_baseline_configs_differ_from_retina2d_only_in_the_network():
    reference = json.loads((CONFIGS / "retina2d.json").read_text())
    for name, kind in (("air_retina2d", "air"), ("unet_retina2d", "unet")):
        config = json.loads((CONFIGS / f"{name}.json").read_text())
        # Only the optional gradient clipping may differ (the U-Net baseline diverged without).
        training = {k: v for k, v in config["training"].items() if k != "grad_clip"}
        assert config["data"] == reference["data"] and training == reference["training"]
        card = config["card"]
        assert card["name"] == name and card["architecture"]["kind"] == kind
        others = {k: v for k, v in card.items() if k not in ("name", "description", "architecture")}
        assert others == {
            k: v
            for k, v in reference["card"].items()
            if k not in ("name", "description", "architecture")
        }
        build(card["architecture"])
