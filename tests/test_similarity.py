"""The similarity registry: values on known cases and gradients (autograd against finite
differences), in 2-D and 3-D."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import gaussian_blobs
from scipy import ndimage

from equireg import similarity
from equireg.refine import MIN_AGREEMENT, MULTIMODAL_RATIO
from equireg.similarity import (
    SIMILARITIES,
    _mind_distances,
    get,
    intensity_relation,
    local_agreement,
    mind_ssc,
)

PERFECT = {"mind": 1.0, "mse": 0.0}


def _image(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    values = torch.from_numpy(gaussian_blobs(shape, seed)).float()
    values = (values - values.min()) / (values.max() - values.min())
    return values[None, None]


@pytest.mark.parametrize("shape", [(48, 40), (20, 24, 16)], ids=["2d", "3d"])
@pytest.mark.parametrize("name", list(SIMILARITIES))
def test_identical_images_score_best_and_a_shift_scores_lower(name: str, shape) -> None:
    similarity = get(name)
    image = _image(shape)
    shifted = torch.roll(image, shifts=3, dims=2)
    if name in ("mind", "mse"):  # LNCC counts flat windows as 0, NMI's Parzen window blurs
        assert similarity.score(image, image) == pytest.approx(PERFECT[name], abs=1e-4)
    assert similarity.score(shifted, image) < similarity.score(image, image) - 0.01


@pytest.mark.parametrize("name", ["mind", "nmi"])
def test_multimodal_measures_see_through_a_contrast_inversion(name: str) -> None:
    """``1 − image`` is the same anatomy in another contrast: MIND and NMI still rate it as
    aligned (better than shifted by 3 voxels); LNCC rates it as anti-correlated."""
    image = _image((48, 40))
    inverted = 1 - image
    shifted = torch.roll(inverted, shifts=3, dims=2)
    similarity = get(name)
    assert similarity.score(inverted, image) > similarity.score(shifted, image) + 0.05
    assert get("lncc").score(inverted, image) < -0.9


def test_mind_descriptors_have_the_ssc_layout() -> None:
    assert mind_ssc(_image((16, 12))).shape == (1, 4, 16, 12)  # 4 pairs of the 4-neighbourhood
    assert mind_ssc(_image((8, 10, 6))).shape == (1, 12, 8, 10, 6)  # 12 of the 6-neighbourhood


def test_weights_select_the_voxels_that_count() -> None:
    """A weight of 0 over the half where the images differ makes them identical to the measure."""
    image = _image((48, 40))
    other = image.clone()
    other[..., 20:] = torch.rand_like(other[..., 20:])
    weight = torch.zeros_like(image)
    weight[..., :14] = 1  # away from the box filters' reach into the changed half
    for name in ("lncc", "mse"):  # MIND normalises by the whole image's mean variance
        expected = get(name).score(image, image, weight)
        assert get(name).score(other, image, weight) == pytest.approx(expected, abs=1e-4), name


@pytest.mark.parametrize("name", list(SIMILARITIES))
def test_gradients_match_finite_differences(name: str) -> None:
    torch.manual_seed(0)
    fixed = _image((12, 10), seed=1).double()
    # Inside (0, 1): NMI clips there, and a clipped voxel has no two-sided derivative.
    moving = 0.05 + 0.9 * (0.7 * fixed + 0.3 * _image((12, 10), seed=2).double())
    moving.requires_grad_()
    similarity = get(name)
    assert torch.autograd.gradcheck(
        lambda a: similarity.loss(a, fixed), (moving,), eps=1e-6, atol=1e-5, rtol=1e-3
    )


@pytest.mark.parametrize("name", list(SIMILARITIES))
def test_binding_the_fixed_image_gives_the_same_value(name: str) -> None:
    fixed, moving = _image((20, 24, 16), seed=1), _image((20, 24, 16), seed=2)
    weight = (torch.rand_like(fixed) > 0.3).float()
    similarity = get(name)
    bound = similarity.bind(fixed)
    for w in (None, weight):
        assert float(bound(moving, w)) == pytest.approx(float(similarity.value(moving, fixed, w)))


def test_local_agreement_tells_an_inverted_contrast_that_r_misses() -> None:
    """A T1/T2-like pair whose inside contrast is inverted but whose head against an empty
    background dominates Pearson's ``r`` (``r²/η²`` 0.90, above ``MULTIMODAL_RATIO``): the
    local correlations disagree in sign (measured 0.43), those of one modality do not."""
    n = 40
    z, y, x = np.mgrid[:n, :n, :n] - n / 2 + 0.5
    head = (x**2 + y**2 + z**2) < 17**2
    inner = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal((n, n, n)), 2) > 0.05
    t1 = np.where(head, np.where(inner, 1.0, 0.6), 0.0)
    t2 = np.where(head, np.where(inner, 0.6, 1.0), 0.0)

    def blurred(values: np.ndarray) -> torch.Tensor:
        return torch.tensor(ndimage.gaussian_filter(values, 0.7), dtype=torch.float32)[None, None]

    a, b = blurred(t1), blurred(t2)
    r, eta = intensity_relation(a, b)
    assert r * r > MULTIMODAL_RATIO * eta  # the ratio alone would call this one modality
    assert local_agreement(b, a) < MIN_AGREEMENT - 0.3
    assert local_agreement(2 * a + 1, a) > 0.99
    noisy = a + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0))
    assert local_agreement(noisy, a) > MIN_AGREEMENT + 0.05  # measured 0.978


@pytest.mark.parametrize("shape", [(30, 28), (14, 16, 12)], ids=["2d", "3d"])
@pytest.mark.parametrize("slab", [None, 1], ids=["one-slab", "slab-per-slice"])
def test_mind_s_written_out_gradient_equals_autograd(
    shape: tuple[int, ...], slab: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_MindSquaredError``'s backward against autograd through ``mind_ssc``, on an image
    with a flat half (where ``V`` is clamped to its lower bound) and a weight, in one slab and
    one slab per slice."""
    if slab is not None:
        monkeypatch.setattr(similarity, "SLAB_VALUES", slab)
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, *shape, dtype=torch.float64, generator=generator)
    a[:, :, : shape[0] // 2] = 0.5
    b = torch.rand(1, 1, *shape, dtype=torch.float64, generator=generator)
    weight = (torch.rand(1, 1, *shape, dtype=torch.float64, generator=generator) > 0.3).double()
    fused, plain = a.clone().requires_grad_(True), a.clone().requires_grad_(True)
    value = get("mind").bind(b)(fused, weight)
    squared = (mind_ssc(plain) - mind_ssc(b)).pow(2).mean(dim=1, keepdim=True)
    reference = 1 - (squared * weight).sum() / weight.sum()
    (value + reference).backward()
    torch.testing.assert_close(value, reference)
    torch.testing.assert_close(fused.grad, plain.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", [(9, 11), (6, 7, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("dilation", [1, 2])
def test_mind_distances_written_out_gradient_passes_gradcheck(
    shape: tuple[int, ...], dilation: int
) -> None:
    """``_MindDistances``' backward (shifted reads, the box filter's transpose, the squared
    differences) against finite differences, two images of two channels."""
    image = torch.rand(2, 2, *shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: _mind_distances(x, dilation), (image,), fast_mode=True
    )
