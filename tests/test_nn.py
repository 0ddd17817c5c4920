"""The network layers: the attention kernel, translation equivariance, shapes, identity at init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from equireg.compose import DisplacementStep, Downsample
from equireg.evaluate import equivariance_error, shifted
from equireg.maps import evaluate, identity_grid
from equireg.nn.attention import AttentionInversion, _fused_attention, attention
from equireg.nn.builder import (
    DEFAULT_2D,
    DEFAULT_3D,
    build_network,
    build_unet_only,
    default_config,
)
from equireg.nn.featurizer import Featurizer
from equireg.nn.unet import UNet

# Random features are only weakly discriminative: at a moderate temperature the attention of a
# voxel spreads over far-away keys, among them keys next to the borders (whose features see the
# zero padding) and keys that a periodic shift wraps around. Equivariance is only exact where
# the attention is sharp, so the equivariance tests raise the temperature until it is.
SHARP_TEMPERATURE = 1e5
# Largest allowed mean |Φ[A∘W, B∘U] - W⁻¹∘Φ[A, B]∘U| in voxels (``equireg.evaluate``), over
# the voxels at least a margin from every border: rolled images differ near the borders by the
# zero padding the features see and by the content the roll wraps around.
EQUIVARIANCE_TOLERANCE = 0.01


def reference_attention(query, key, value):
    """The plain formula in float64."""
    return torch.softmax(query.double() @ key.double().transpose(1, 2), dim=-1) @ value.double()


def smooth_periodic_image(shape: list[int], sigma: float, seed: int) -> torch.Tensor:
    """Blurred noise, periodic (circular blur) so that ``torch.roll`` is an exact translation."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 1, *shape, generator=generator)
    radius = int(3 * sigma)
    taps = torch.exp(-(torch.arange(-radius, radius + 1.0) ** 2) / (2 * sigma**2))
    conv = F.conv2d if len(shape) == 2 else F.conv3d
    for axis in range(len(shape)):
        kernel = (taps / taps.sum()).view(
            1, 1, *[-1 if a == axis else 1 for a in range(len(shape))]
        )
        padding = [0] * (2 * len(shape))
        padding[2 * (len(shape) - 1 - axis) : 2 * (len(shape) - axis)] = [radius, radius]
        image = conv(F.pad(image, padding, mode="circular"), kernel)
    return 0.5 + 0.2 * (image - image.mean()) / image.std()


def translate(tensor: torch.Tensor, shift: list[int]) -> torch.Tensor:
    """``f ∘ T`` for ``T(x) = x + shift`` (voxels), periodically: ``out[i] = f[i + shift]``."""
    return torch.roll(tensor, shifts=[-s for s in shift], dims=list(range(2, tensor.dim())))


def randomise_unet_outputs(network: torch.nn.Module, seed: int) -> None:
    """Give every U-Net's zero-initialised output layer small random weights, so that the
    refinement steps move voxels by a few voxels instead of nothing."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, UNet):
                weight, bias = module.output.weight, module.output.bias
                weight.copy_(0.02 * torch.randn(weight.shape, generator=generator))
                bias.copy_(0.002 * torch.randn(bias.shape, generator=generator))


# --- the attention kernel ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "n", "m", "c", "dv", "scale"),
    [
        (1, 7, 3, 5, 1, 1.0),  # tiny: fewer queries than threads
        (2, 300, 5000, 16, 2, 3.0),  # several key chunks, a partial last chunk
        (1, 1100, 2500, 64, 3, 8.0),  # several query blocks, a partial last block
        (2, 101, 257, 8, 4, 40.0),  # sharp: scores span more than the float exponent range
    ],
)
def test_attention_matches_reference_with_gradients(batch, n, m, c, dv, scale):
    torch.manual_seed(0)
    query = torch.randn(batch, n, c, requires_grad=True)
    key = torch.randn(batch, m, c, requires_grad=True)
    value = torch.randn(batch, m, dv, requires_grad=True)
    scaled = scale / math.sqrt(c)
    out = attention(query * scaled, key, value)
    leaves64 = [t.detach().double().requires_grad_() for t in (query, key, value)]
    expected = reference_attention(leaves64[0] * scaled, *leaves64[1:])
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)

    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (query, key, value), grad_out)
    expected_grads = torch.autograd.grad(expected, leaves64, grad_out.double())
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        size = expected_grad.abs().max()
        torch.testing.assert_close(grad.double() / size, expected_grad / size, atol=1e-4, rtol=0)


def test_attention_rows_far_below_their_bound_are_exact():
    """Rows whose scores all lie far below the Cauchy–Schwarz bound would underflow with the bound
    as softmax shift; the kernel must redo them with their exact maximum."""
    torch.manual_seed(0)
    direction = F.normalize(torch.randn(16), dim=0)
    key = direction + 0.01 * torch.randn(1, 500, 16)
    value = torch.randn(1, 500, 2)
    query = torch.stack([-200 * direction, 200 * direction, torch.zeros(16)]).unsqueeze(0)
    out = attention(query, key, value)
    torch.testing.assert_close(
        out.double(), reference_attention(query, key, value), atol=1e-5, rtol=1e-5
    )


def test_attention_float64_and_the_fused_path():
    torch.manual_seed(0)
    query, key = (
        torch.randn(2, 90, 12, dtype=torch.float64),
        torch.randn(2, 150, 12, dtype=torch.float64),
    )
    value = torch.randn(2, 150, 3, dtype=torch.float64)
    out = attention(query, key, value)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference_attention(query, key, value), atol=1e-12, rtol=1e-12)
    # The CUDA path (PyTorch's kernels with padded widths) runs on CPU too.
    fused = _fused_attention(query.float(), key.float(), value.float())
    torch.testing.assert_close(
        fused.double(), reference_attention(query, key, value), atol=1e-5, rtol=1e-5
    )


def test_attention_rejects_inconsistent_shapes():
    with pytest.raises(ValueError):
        attention(torch.zeros(1, 4, 3), torch.zeros(1, 5, 2), torch.zeros(1, 5, 2))
    with pytest.raises(ValueError):
        attention(torch.zeros(1, 4, 3), torch.zeros(1, 5, 3), torch.zeros(1, 6, 2))


# --- equivariance ----------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [2, 3])
def test_attention_inversion_is_equivariant_to_independent_shifts(dim):
    """``Ξ[A∘W, B∘U] = W⁻¹ ∘ Ξ[A, B] ∘ U`` for any whole-voxel shifts, on the layer's own grid."""
    torch.manual_seed(0)
    n, dilations, margin = (48, [1, 2], 12) if dim == 2 else (20, [1], 6)
    featurizer = Featurizer(dim, width=16, dilations=dilations, out_channels=32)
    layer = AttentionInversion(featurizer, pad=4, temperature=SHARP_TEMPERATURE)
    moving = smooth_periodic_image([n] * dim, sigma=0.75, seed=1)
    w, u = (2, -3, 1)[:dim], (-1, 2, 0)[:dim]
    fixed = translate(moving, [-s for s in u])  # keeps the matches of compared voxels inside
    assert equivariance_error(layer, moving, fixed, w, u, margin) < EQUIVARIANCE_TOLERANCE


def without_biases(featurizer: Featurizer) -> Featurizer:
    """The featurizer with every convolution and ChannelNorm bias set to zero: then every layer
    maps a zero input to zero, so the zero background has zero features."""
    with torch.no_grad():
        for module in featurizer.modules():
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    return featurizer


@pytest.mark.parametrize(
    ("biases", "pad", "exact"),
    [(True, 7, True), (False, 2, True), (True, 2, False)],
)
def test_attention_on_a_zero_background_and_the_pad(biases, pad, exact):
    """Content on a zero background moved without losing any of it (zero-filled shifts): the
    layer is exactly ``[W, U]``-equivariant on the content when its pad covers the featurizer's
    receptive radius (here 1 + 2·1 + 2·2 = 7), or, with a small pad, when the featurizer has no
    biases. With biases and a small pad it is not: the background's features are non-zero and
    change near the canvas edge, which the content then sees (docs/equivariance.md, "Known
    limitation")."""
    torch.manual_seed(0)
    featurizer = Featurizer(2, width=16, dilations=[1, 2], out_channels=32)
    if not biases:
        without_biases(featurizer)
    layer = AttentionInversion(featurizer, pad=pad, temperature=SHARP_TEMPERATURE)
    window = torch.zeros(1, 1, 32, 32)
    window[..., 4:24, 4:24] = 1
    moving = smooth_periodic_image([32, 32], sigma=1.0, seed=4).clamp(min=0.05) * window
    fixed = shifted(moving, (2, -3), "zero")
    # Content of the fixed image in rows 2..21 and columns 7..26; after these shifts the moving
    # content lies in rows 8..27, columns 1..20, the fixed content in rows 0..19, columns 8..27.
    error = equivariance_error(
        layer, moving, fixed, (-4, 3), (2, -1), margin=2, fill="zero", mask=fixed > 0
    )
    assert (error < 1e-5) if exact else (error > 0.5), error


# Per dimension: image size, the test network (small, so the test is fast), the shift from the
# moving to the fixed image (about -u, so that the matches of the compared voxels stay inside
# both images), shifts that are multiples of both networks' coarsest stride, and the margin that
# leaves out the reach of the borders through the featurizer and the U-Nets.
NETWORK_CASES = {
    2: {
        "size": 192,
        "config": {
            "dim": 2,
            "attention": {
                "pad": 4,
                "temperature": SHARP_TEMPERATURE,
                "featurizer": {"width": 16, "dilations": [1, 2, 4], "out_channels": 32},
            },
            "unet": {"channels": [4, 8, 16]},  # strides: attention 4, U-Nets 8, baseline 16
            "extra_full_resolution_step": True,
        },
        "correspondence": [-16, 16],
        "w": (0, 16),
        "u": (16, -16),
        "margin": 64,
    },
    3: {
        "size": 64,
        "config": {
            "dim": 3,
            "attention": {
                "pad": 4,
                "temperature": SHARP_TEMPERATURE,
                "featurizer": {"width": 16, "dilations": [1], "out_channels": 32},
            },
            "unet": {"channels": [4, 8]},  # strides: attention 4, U-Nets 4, baseline 8
            "extra_full_resolution_step": False,
        },
        "correspondence": [-8, 8, 4],
        "w": (0, 8, 8),
        "u": (8, -8, 0),
        "margin": 24,
    },
}


@pytest.mark.parametrize("dim", [2, 3])
def test_network_is_equivariant_and_the_unet_baseline_is_not(dim):
    """The composed network with random weights satisfies ``Φ[A∘W, B∘U] = W⁻¹∘Φ[A, B]∘U`` for
    ``W ≠ U``; the displacement-only network, built from the same steps, misses by about the
    shift between the images."""
    case = NETWORK_CASES[dim]
    moving = smooth_periodic_image([case["size"]] * dim, sigma=3.0, seed=2)
    fixed = translate(moving, case["correspondence"])
    errors = {}
    for builder in (build_network, build_unet_only):
        torch.manual_seed(0)
        network = builder(case["config"]).eval()
        randomise_unet_outputs(network, seed=3)
        errors[builder.__name__] = equivariance_error(
            network, moving, fixed, case["w"], case["u"], case["margin"]
        )
    assert errors["build_network"] < EQUIVARIANCE_TOLERANCE, errors
    assert errors["build_unet_only"] > 100 * EQUIVARIANCE_TOLERANCE, errors


# --- shapes, identity at initialisation, composition ------------------------------------------


@pytest.mark.parametrize("dim", [2, 3])
def test_layer_shapes(dim):
    image = torch.rand(2, 1, *[16] * dim)
    features = Featurizer(dim, width=8, dilations=[1, 2], out_channels=12)(image)
    assert features.shape == (2, 12, *[16] * dim)
    unet = UNet(dim, channels=[4, 8, 16])
    assert unet(torch.rand(2, 2, *[16] * dim)).shape == (2, dim, *[16] * dim)
    with pytest.raises(ValueError):
        unet(torch.rand(1, 2, *[10] * dim))


@pytest.mark.parametrize("dim", [2, 3])
def test_fresh_unet_step_is_the_identity(dim):
    step = DisplacementStep(UNet(dim, channels=[4, 8]))
    moving, fixed = torch.rand(1, 1, *[8] * dim), torch.rand(1, 1, *[8] * dim)
    shape = [8] * dim
    phi = evaluate(step(moving, fixed), shape, 1, fixed)
    assert torch.equal(phi, identity_grid(shape))


@pytest.mark.parametrize("dim", [2, 3])
def test_fresh_network_is_its_attention_step_and_trains_end_to_end(dim):
    """Fresh U-Net steps are identities, so through ``TwoStep`` and ``Downsample`` the whole
    network's map is the 1/4-resolution attention map; gradients reach every stage."""
    config = default_config(dim)
    config["extra_full_resolution_step"] = True
    network = build_network(config)
    shape = [32] * dim
    moving = smooth_periodic_image(shape, sigma=2.0, seed=4)
    fixed = translate(moving, [2] * dim)
    phi = evaluate(network(moving, fixed), shape, 1, fixed)
    attention_steps = [m for m in network.modules() if isinstance(m, Downsample) and m.factor == 4]
    assert len(attention_steps) == 1 and isinstance(attention_steps[0].step, AttentionInversion)
    alone = evaluate(attention_steps[0](moving, fixed), shape, 1, fixed)
    torch.testing.assert_close(phi, alone, atol=1e-6, rtol=0)

    phi.square().mean().backward()
    inversion = attention_steps[0].step
    assert inversion.log_temperature.grad is not None
    assert all(p.grad is not None for p in inversion.featurizer.parameters())
    unets = [m for m in network.modules() if isinstance(m, UNet)]
    assert len(unets) == 3
    assert all(unet.output.weight.grad.abs().sum() > 0 for unet in unets)


@pytest.mark.parametrize("config", [DEFAULT_2D, DEFAULT_3D], ids=["2d", "3d"])
def test_default_networks_are_small_and_built_from_json(config):
    network = build_network(config)
    megabytes = sum(p.numel() for p in network.parameters()) * 4 / 2**20
    assert megabytes < 20
    copy = default_config(config["dim"])
    copy["unet"]["channels"].append(1)
    assert copy != config, "default_config must return a copy"
    baseline = build_unet_only(config)
    assert not any(isinstance(m, AttentionInversion) for m in baseline.modules())
