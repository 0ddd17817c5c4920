"""1-D demonstration that attention inverts functions and is [W,U]-equivariant.

Attention with queries from the fixed signal B, keys from the moving signal A and values = A's
coordinate grid returns, for each fixed sample, the coordinate where A has B's intensity:
``Ξ[A, B] = A⁻¹ ∘ B`` (so ``A ∘ Ξ = B``, the contract of ``compose.py``). See
docs/equivariance.md; docs/figures/make_equivariance_figures.py plots these same computations.

The features stand in for the learned ones: a scalar intensity ``v`` becomes a bank of Gaussian
radial basis functions ``exp(-(v - c_k)² / 2σ²)`` (centres ``c_k`` spaced ``σ``), normalised to
unit length, and the queries are multiplied by a temperature ``τ``, as the real layer does with
its unit-length learned features. For a dense bank the cosine of two such vectors is
``exp(-(u - v)² / 4σ²)``, so the logits near the best match are ``τ - τ (u - v)² / 4σ²``: the
softmax weights form a Gaussian kernel in intensity of width ``σ √(2/τ)``, a sharp
nearest-intensity lookup that averages the coordinates of the matching samples.
"""

from __future__ import annotations

import math

import pytest
import torch

from equireg.nn.attention import attention

SAMPLES = 256
SHARP = 1000.0  # kernel width σ√(2/τ) ≈ 0.002 in intensity: about half a sample of slope-1 data
BLUNT = 1.0  # logits differ by at most 1: nearly uniform weights
BASIS = 32  # radial basis functions, spaced σ = 0.045 over the intensity range below
INTENSITY_RANGE = (-0.2, 1.2)
FLAT = 0.1  # excluded: where the true inverse is below this, A is flat and A⁻¹ steep


def voxel_centres(n: int, pad: int = 0) -> torch.Tensor:
    """Coordinates ``(i + 0.5) / n`` for ``i`` in ``[-pad, n + pad)``, extrapolated into the pad."""
    return (torch.arange(-pad, n + pad, dtype=torch.float32) + 0.5) / n


def intensity_features(
    values: torch.Tensor,
    scale: float,
    intensity_range: tuple[float, float] = INTENSITY_RANGE,
    count: int = BASIS,
) -> torch.Tensor:
    """Unit-length Gaussian radial-basis encoding of intensities, times ``scale``: ``(N, K)``."""
    centres = torch.linspace(*intensity_range, count, dtype=values.dtype)
    width = centres[1] - centres[0]
    bumps = torch.exp(-0.5 * ((values[:, None] - centres) / width) ** 2)
    return scale * bumps / bumps.norm(dim=1, keepdim=True)


def invert(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    moving_coords: torch.Tensor,
    temperature: float = SHARP,
    intensity_range: tuple[float, float] = INTENSITY_RANGE,
) -> torch.Tensor:
    """``Ξ[A, B] = A⁻¹ ∘ B`` on the fixed samples: attention with values = ``moving_coords``."""
    query = intensity_features(fixed, temperature, intensity_range)
    key = intensity_features(moving, 1.0, intensity_range)
    return attention(query[None], key[None], moving_coords[None, :, None])[0, :, 0]


def square_pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``A(x) = x²``, ``B(x) = x``: coordinates, A, B and the true ``Ξ = √x``."""
    x = voxel_centres(SAMPLES)
    return x, x**2, x, x.sqrt()


def cosine_pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``A(x) = cos(πx/2)``, ``B(x) = x + 0.07 sin(3πx)``: coordinates, A, B, true Ξ.

    B is increasing (slope ≥ 1 - 0.21π > 0) from 0 to 1, so ``Ξ = (2/π) arccos B`` everywhere.
    """
    x = voxel_centres(SAMPLES)
    fixed = x + 0.07 * torch.sin(3 * math.pi * x)
    return x, torch.cos(math.pi * x / 2), fixed, (2 / math.pi) * torch.arccos(fixed)


PAIRS = {"square": square_pair, "cosine": cosine_pair}


@pytest.mark.parametrize("pair", PAIRS)
def test_sharp_attention_inverts_within_half_a_sample(pair: str) -> None:
    """Where A is not flat (true Ξ ≥ 0.1) the error is below half a sample (1/512 ≈ 0.002)."""
    x, moving, fixed, truth = PAIRS[pair]()
    assert 0 <= fixed.min() and fixed.max() <= 1
    error = (invert(moving, fixed, x) - truth).abs()
    assert (truth < FLAT).float().mean() < 0.05  # "most of the domain": over 95 % is checked
    assert error[truth >= FLAT].max() < 0.5 / SAMPLES
    # Near Ξ = 0 the kernel's intensity width covers several flat samples: a few samples' error.
    assert error.max() < 4 / SAMPLES


@pytest.mark.parametrize("pair", PAIRS)
def test_blunt_attention_does_not_invert(pair: str) -> None:
    """At temperature 1 the weights are nearly uniform: Ξ collapses toward A's mean coordinate."""
    x, moving, fixed, truth = PAIRS[pair]()
    checked = truth >= FLAT
    sharp = (invert(moving, fixed, x) - truth).abs()[checked].max()
    blunt = (invert(moving, fixed, x, temperature=BLUNT) - truth).abs()[checked].max()
    assert blunt > 0.2
    assert blunt > 100 * sharp


# Equivariance: A and B are crops of two signals defined on the whole line, and shifting a crop
# by k samples is W(x) = x + k/n. The moving crop carries PAD extra samples per side whose values
# are the extrapolated coordinates, so Ξ may leave [0, 1] as W⁻¹ ∘ Ξ ∘ U demands.
EQUI_SAMPLES = 128
PAD = 24
MAX_SHIFT = 10
EQUI_RANGE = (-0.4, 1.4)  # the scenes' intensities on the long grid, with a margin


def scene_moving(x: torch.Tensor) -> torch.Tensor:
    """The moving scene: increasing (slope ≥ 1 - 0.12π) on the whole line."""
    return x + 0.06 * torch.sin(2 * math.pi * x)


def scene_warp(x: torch.Tensor) -> torch.Tensor:
    """The true ``Ξ`` of the unshifted crops: the fixed scene is ``scene_moving ∘ scene_warp``."""
    return x + 0.05 * torch.sin(2 * math.pi * x)


def shifted_inverse(moving_shift: int, fixed_shift: int, pad: int = PAD) -> torch.Tensor:
    """``Ξ[A∘W, B∘U]`` on the fixed crop, with ``W``, ``U`` shifts by whole samples.

    Both scenes are sampled once on a long grid and cropped, so a shift moves samples exactly.
    """
    n, margin = EQUI_SAMPLES, PAD + MAX_SHIFT
    line = voxel_centres(n, margin)
    moving_line, fixed_line = scene_moving(line), scene_moving(scene_warp(line))
    start = margin + moving_shift - pad
    moving = moving_line[start : start + n + 2 * pad]
    fixed = fixed_line[margin + fixed_shift : margin + fixed_shift + n]
    return invert(moving, fixed, voxel_centres(n, pad), intensity_range=EQUI_RANGE)


def predicted_inverse(
    xi: torch.Tensor, moving_shift: int, fixed_shift: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``W⁻¹ ∘ Ξ ∘ U`` on the fixed samples where ``U`` keeps them in the crop: (mask, values)."""
    n = EQUI_SAMPLES
    source = torch.arange(n) + fixed_shift
    inside = (source >= 0) & (source < n)
    return inside, xi[source[inside]] - moving_shift / n


SHIFTS = [(5, -9), (-7, 3), (0, 10), (-10, 0)]


def test_unshifted_crops_recover_the_scene_warp() -> None:
    """Sanity check of the equivariance set-up: the pad holds every match, so Ξ is accurate."""
    xi = shifted_inverse(0, 0)
    assert (xi - scene_warp(voxel_centres(EQUI_SAMPLES))).abs().max() < 0.5 / EQUI_SAMPLES


@pytest.mark.parametrize(("moving_shift", "fixed_shift"), SHIFTS)
def test_independent_shifts_give_w_inverse_xi_u(moving_shift: int, fixed_shift: int) -> None:
    """``Ξ[A∘W, B∘U] = W⁻¹ ∘ Ξ[A, B] ∘ U`` to float32 rounding, border samples included."""
    inside, predicted = predicted_inverse(shifted_inverse(0, 0), moving_shift, fixed_shift)
    shifted = shifted_inverse(moving_shift, fixed_shift)[inside]
    torch.testing.assert_close(shifted, predicted, rtol=0, atol=1e-5)


def test_without_the_pad_equivariance_breaks_at_the_border() -> None:
    """Without the extrapolated margin a match shifted out of the crop cannot be found."""
    moving_shift, fixed_shift = 10, 0
    inside, predicted = predicted_inverse(shifted_inverse(0, 0, pad=0), moving_shift, fixed_shift)
    error = (shifted_inverse(moving_shift, fixed_shift, pad=0)[inside] - predicted).abs()
    assert error.max() > 5 / EQUI_SAMPLES
