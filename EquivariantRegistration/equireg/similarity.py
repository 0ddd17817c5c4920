"""Image similarity measures, registered once: refinement, the guarded start, training and the
reports of ``register`` and ``equireg evaluate`` use the same names and the same code.

Every measure is a *similarity* (higher is better) of a warped moving image ``a`` and a fixed
image ``b``, both ``(B, C, *S)`` tensors on one grid, optionally weighted by ``weight``
``(B, 1, *S)`` in [0, 1] (the voxels that count: a fixed mask times the part of the fixed grid
that the moving image covers). ``mind`` is 1 for identical images and ``mse`` (the negated
mean squared difference) 0; ``lncc`` is 1 for identical images where each window has
structure (flat windows count 0), and ``nmi`` is highest for identical images but below 1
(its Parzen window blurs the joint histogram). Losses are the negated values, differentiable
wherever the images are.

Intensities are expected roughly in [0, 1] (``preprocess.robust_normalise``): NMI bins them
there, MIND is scale-free, LNCC is invariant to affine intensity changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations

import torch
import torch.nn.functional as F

from .losses import box_mean, box_mean_transpose, local_correlation, local_moments

Tensor = torch.Tensor


def _weighted_mean(values: Tensor, weight: Tensor | None) -> Tensor:
    if weight is None:
        return values.mean()
    weight = weight.expand_as(values)
    return (values * weight).sum() / weight.sum().clamp(min=1e-6)


def lncc_similarity(a: Tensor, b: Tensor, weight: Tensor | None = None, window: int = 5) -> Tensor:
    """Mean local normalised cross-correlation over boxes of ``window`` voxels (1 = identical
    up to local affine intensity changes). Avants et al., "Symmetric diffeomorphic image
    registration with cross-correlation", Medical Image Analysis 12(1), 2008."""
    return _weighted_mean(local_correlation(a, b, window), weight)


def _bind_lncc(b: Tensor) -> Callable[[Tensor, Tensor | None], Tensor]:
    moments = local_moments(b)
    return lambda a, weight=None: _weighted_mean(local_correlation(a, moments), weight)


def mse_similarity(a: Tensor, b: Tensor, weight: Tensor | None = None) -> Tensor:
    """Negated mean squared intensity difference (same modality, same intensity scale)."""
    return -_weighted_mean((a - b).pow(2), weight)


def _block(values: Tensor, starts: tuple[int, ...], size: tuple[int, ...]) -> Tensor:
    """``values[:, :, starts[0] : starts[0] + size[0], …]`` (a view)."""
    index = [slice(None), slice(None)]
    index += [slice(start, start + n) for start, n in zip(starts, size, strict=True)]
    return values[tuple(index)]


@dataclass(frozen=True)
class _MindPlan:
    """Which squared-difference images ``E_v`` MIND-SSC needs and where each distance reads
    one (``_mind_distances``)."""

    dims: int
    dilation: int
    radius: int
    bases: tuple[tuple[int, ...], ...]  # the K/2 vectors v, first non-zero component > 0
    reads: tuple[tuple[int, tuple[int, ...]], ...]  # per distance: which E, read at which offset


def _mind_plan(dims: int, dilation: int, radius: int) -> _MindPlan:
    neighbours = []
    for axis in range(dims):
        for sign in (-1, 1):
            offset = [0] * dims
            offset[axis] = sign * dilation
            neighbours.append(tuple(offset))
    pairs = [
        (p, q)
        for p, q in combinations(neighbours, 2)
        if sum((u - v) ** 2 for u, v in zip(p, q, strict=True)) == 2 * dilation**2
    ]
    bases: dict[tuple[int, ...], int] = {}
    reads = []
    for p, q in pairs:
        v = tuple(a - b for a, b in zip(p, q, strict=True))
        forward = next(c for c in v if c != 0) > 0
        bases.setdefault(v if forward else tuple(-c for c in v), len(bases))
        reads.append((bases[v if forward else tuple(-c for c in v)], q if forward else p))
    return _MindPlan(dims, dilation, radius, tuple(bases), tuple(reads))


def _mind_distances(image: Tensor, dilation: int = 1, radius: int = 1) -> Tensor:
    """The patch distances ``(B, C·K, *S)`` of ``image`` ``(B, C, *S)`` that MIND-SSC
    descriptors (``mind_ssc``) are made of.

    The self-similarity context of Heinrich et al., "Towards realtime multimodal fusion for
    image-guided interventions using self-similarities", MICCAI 2013: for every pair of
    neighbours ``(n_i, n_j)`` of the six-neighbourhood (four in 2-D) at distance √2·dilation,
    the patch distance ``D = box((I(x+n_i) − I(x+n_j))²)`` over a ``2·radius+1`` box, turned into
    ``exp(−D / V)`` with ``V`` the mean of the ``K`` distances (12 in 3-D, 4 in 2-D) and
    normalised by its maximum (so ``exp(−(D − min D) / V)``). Contrast-invariant: a monotone
    remapping of intensities changes the descriptors little, which is what makes it work
    across modalities.

    The image is extended by replicating its border. Since ``(I(x+p) − I(x+q))² = E_v(x+q)``
    with ``E_v(y) = (I(y+v) − I(y))²``, ``v = p − q``, and ``E_v(y) = E_{−v}(y+v)``, the
    ``K`` squared differences are shifted copies of ``K/2`` images ``E``: those are
    box-filtered once, over the grid grown by ``dilation`` voxels (half the box sums of
    filtering all ``K``). The gradient is written out (``_MindDistances``).
    """
    dims = image.dim() - 2
    padded = F.pad(image, [2 * dilation] * (2 * dims), mode="replicate")
    return _MindDistances.apply(padded, _mind_plan(dims, dilation, radius))


class _MindDistances(torch.autograd.Function):
    """``_mind_distances`` of the replicate-padded image, and its gradient written out: the
    distances' gradient added into the ``K/2`` filtered images at their read offsets, the box
    filter's transpose, then ``2 (I(y+v) − I(y))`` times that into both ends of each difference.
    Autograd through the same slices filled and copied a full-size zero tensor per slice, most
    of a MIND step's backward pass."""

    @staticmethod
    def forward(ctx, padded: Tensor, plan: _MindPlan) -> Tensor:
        ctx.save_for_backward(padded)
        ctx.plan = plan
        size, grown = _mind_grids(padded, plan)
        channels = padded.shape[1]
        centre = _block(padded, (plan.dilation,) * plan.dims, grown)
        squared = [
            (_block(padded, tuple(plan.dilation + c for c in v), grown) - centre).pow_(2)
            for v in plan.bases
        ]
        window = (2 * plan.radius + 1,) * plan.dims
        filtered = box_mean(torch.cat(squared, dim=1), window).split(channels, dim=1)
        return torch.cat(
            [
                _block(filtered[base], tuple(plan.dilation + c for c in offset), size)
                for base, offset in plan.reads
            ],
            dim=1,
        )

    @staticmethod
    def backward(ctx, grad: Tensor):
        (padded,) = ctx.saved_tensors
        plan = ctx.plan
        size, grown = _mind_grids(padded, plan)
        channels = padded.shape[1]
        d = plan.dilation
        filtered = grad.new_zeros(grad.shape[0], channels * len(plan.bases), *grown)
        parts = filtered.split(channels, dim=1)
        for k, (base, offset) in enumerate(plan.reads):
            target = _block(parts[base], tuple(d + c for c in offset), size)
            target.add_(grad[:, k * channels : (k + 1) * channels])
        squared = box_mean_transpose(filtered, (2 * plan.radius + 1,) * plan.dims)
        result = torch.zeros_like(padded)
        centre = _block(padded, (d,) * plan.dims, grown)
        at_centre = _block(result, (d,) * plan.dims, grown)
        for b, v in enumerate(plan.bases):
            shifted = tuple(d + c for c in v)
            slope = _block(padded, shifted, grown) - centre
            slope.mul_(squared[:, b * channels : (b + 1) * channels]).mul_(2)
            _block(result, shifted, grown).add_(slope)
            at_centre.sub_(slope)
        return result, None


def _mind_grids(padded: Tensor, plan: _MindPlan) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The image's own shape and the grid grown by ``dilation`` voxels, from the padded one."""
    size = tuple(n - 4 * plan.dilation for n in padded.shape[2:])
    return size, tuple(n + 2 * plan.dilation for n in size)


def mind_ssc(image: Tensor, dilation: int = 1, radius: int = 1) -> Tensor:
    """MIND-SSC descriptors ``(B, C·K, *S)`` of ``image`` ``(B, C, *S)`` (``_mind_distances``
    gives the method and its source)."""
    distances = _mind_distances(image, dilation, radius)
    return _descriptors(distances, _variance(distances)[0])[0]


VARIANCE_RANGE = (1e-3, 1e3)  # V is kept within these multiples of its mean over the image


def _variance(distances: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``1 / V`` with ``V`` the mean of the ``K`` distances clamped to ``VARIANCE_RANGE``
    times its mean over the image, ``V`` before clamping, and the clamp's bounds."""
    raw = distances.mean(dim=1, keepdim=True)
    low, high = (factor * raw.mean() + 1e-8 for factor in VARIANCE_RANGE)
    return raw.clamp(min=low, max=high).reciprocal(), raw, low, high


def _descriptors(distances: Tensor, inverse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``exp(−D / V)`` over its maximum over the channels, i.e. ``exp((min D − D) / V)`` (one
    exponential, no division), with the exponent and the channel of ``min D``."""
    nearest, argmin = distances.min(dim=1, keepdim=True)
    exponent = (nearest - distances) * inverse
    return exponent.exp(), exponent, argmin


SLAB_VALUES = 1 << 20  # values per slab of _MindSquaredError (all K channels): 4 MB


class _MindSquaredError(torch.autograd.Function):
    """The weighted mean over voxels of the mean over channels of ``(MIND(D) − F)²``, from the
    patch distances ``D`` ``(B, K, *S)`` of the moving image and the fixed descriptors ``F``,
    with its gradient with respect to ``D`` written out (through the exponential, ``min D``,
    ``V`` and the clamp of ``V``, whose bounds follow the mean of ``V``).

    Everything per voxel runs slab by slab along the first spatial axis, each slab's dozen
    passes over ``K`` channels staying in cache (a volume's K channels are tens of MB, and
    each pass over them is bound by memory, not by arithmetic), and the gradient is formed in
    the same pass when it will be needed (the loss is a scalar: its backward pass only scales
    it)."""

    @staticmethod
    def forward(ctx, distances: Tensor, target: Tensor, weight: Tensor | None):
        inverse, raw, low, high = _variance(distances)
        channels = distances.shape[1]
        if weight is None:
            share = torch.full_like(raw, 1 / raw.numel())
        else:
            share = weight.expand_as(raw) / weight.sum().clamp(min=1e-6)
        gradient = torch.empty_like(distances) if ctx.needs_input_grad[0] else None
        total, bounds = distances.new_zeros(()), distances.new_zeros(())
        step = max(1, SLAB_VALUES // (distances[:, :, 0].numel()))
        for first in range(0, distances.shape[2], step):
            part = slice(first, first + step)
            d, v, w = distances[:, :, part], inverse[:, :, part], share[:, :, part]
            descriptors, exponent, argmin = _descriptors(d, v)
            difference = descriptors - target[:, :, part]
            total += (difference.pow(2).mean(dim=1, keepdim=True) * w).sum()
            if gradient is None:
                continue
            # ∂/∂exponent_k, the exponent being (min D − D_k) / V
            slope = difference.mul_(descriptors).mul_(w * (2 / channels))
            g = slope * -v
            g.scatter_add_(1, argmin, slope.sum(dim=1, keepdim=True) * v)  # through min D
            # through V = clamp(mean_k D, low, high), low and high following mean(mean_k D)
            d_variance = -(slope.mul_(exponent)).sum(dim=1, keepdim=True) * v
            below, above = raw[:, :, part] < low, raw[:, :, part] > high
            bounds += VARIANCE_RANGE[0] * d_variance[below].sum()
            bounds += VARIANCE_RANGE[1] * d_variance[above].sum()
            gradient[:, :, part] = g.add_(d_variance.masked_fill_(below | above, 0) / channels)
        if gradient is not None:
            ctx.save_for_backward(gradient, bounds / (raw.numel() * channels))
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        gradient, constant = ctx.saved_tensors
        return (gradient + constant) * grad, None, None


def mind_similarity(a: Tensor, b: Tensor, weight: Tensor | None = None) -> Tensor:
    """``1 − mean squared difference of MIND-SSC descriptors`` (``mind_ssc``), for pairs of
    different modalities (T1/T2, CT/MR)."""
    return _bind_mind(b)(a, weight)


def _bind_mind(b: Tensor) -> Callable[[Tensor, Tensor | None], Tensor]:
    descriptors = mind_ssc(b)

    def value(a: Tensor, weight: Tensor | None = None) -> Tensor:
        return 1 - _MindSquaredError.apply(_mind_distances(a), descriptors, weight)

    return value


NMI_BINS = 32
NMI_SAMPLES = 1 << 16  # voxels entering the joint histogram (evenly strided), for speed


def nmi_similarity(
    a: Tensor, b: Tensor, weight: Tensor | None = None, bins: int = NMI_BINS
) -> Tensor:
    """Normalised mutual information ``(H(A) + H(B)) / H(A, B) − 1`` (1 = identical, 0 =
    independent) from a Parzen-window joint histogram (Gaussian kernel, one bin wide) of
    intensities clipped to [0, 1], over at most ``NMI_SAMPLES`` evenly strided voxels.

    NMI: Studholme, Hill and Hawkes, "An overlap invariant entropy measure of 3D medical image
    alignment", Pattern Recognition 32(1), 1999; differentiable Parzen histograms as in Mattes
    et al., "PET-CT image registration in the chest using free-form deformations", IEEE TMI
    22(1), 2003.
    """
    values_a, values_b = a.reshape(-1), b.reshape(-1)
    w = torch.ones_like(values_a) if weight is None else weight.expand_as(a).reshape(-1)
    if values_a.numel() > NMI_SAMPLES:
        index = torch.linspace(0, values_a.numel() - 1, NMI_SAMPLES, device=a.device).long()
        values_a, values_b, w = values_a[index], values_b[index], w[index]
    centres = (torch.arange(bins, device=a.device, dtype=a.dtype) + 0.5) / bins
    sigma = 1.0 / bins

    def parzen(values: Tensor) -> Tensor:
        distance = (values.clamp(0, 1)[:, None] - centres[None, :]) / sigma
        kernel = torch.exp(-0.5 * distance.pow(2))
        return kernel / kernel.sum(dim=1, keepdim=True)

    joint = (parzen(values_a) * w[:, None]).T @ parzen(values_b)
    joint = joint / joint.sum().clamp(min=1e-12)
    eps = 1e-10

    def entropy(p: Tensor) -> Tensor:
        return -(p * torch.log(p + eps)).sum()

    return (entropy(joint.sum(dim=1)) + entropy(joint.sum(dim=0))) / entropy(joint) - 1


@dataclass(frozen=True)
class Similarity:
    """A registered measure: ``value(a, b, weight)`` (higher is better) and its loss.

    ``diffusion_weight`` is the refinement's regulariser weight for this measure (its gradients
    have their own scale), chosen on the Testing/ cases: ``refine.py`` minimises
    ``loss + diffusion_weight · mean ‖∇u‖²``.
    """

    name: str
    value: Callable[..., Tensor]
    description: str
    diffusion_weight: float
    binder: Callable[[Tensor], Callable[[Tensor, Tensor | None], Tensor]] | None = None

    def bind(self, fixed: Tensor) -> Callable[[Tensor, Tensor | None], Tensor]:
        """``value`` against one fixed image, with what depends on it alone computed once:
        ``bind(b)(a, weight) == value(a, b, weight)`` (LNCC's local moments, MIND's
        descriptors), for optimisations that compare many warped images with one fixed."""
        if self.binder is not None:
            return self.binder(fixed)
        return lambda a, weight=None: self.value(a, fixed, weight)

    def loss(self, a: Tensor, b: Tensor, weight: Tensor | None = None) -> Tensor:
        return -self.value(a, b, weight)

    def score(self, a: Tensor, b: Tensor, weight: Tensor | None = None) -> float:
        """The value as a rounded float, without gradients (for reports)."""
        with torch.no_grad():
            return round(float(self.value(a, b, weight)), 5)


SIMILARITIES: dict[str, Similarity] = {
    s.name: s
    for s in (
        Similarity("lncc", lncc_similarity, "local normalised cross-correlation", 1.0, _bind_lncc),
        Similarity("mind", mind_similarity, "MIND-SSC descriptors (multimodal)", 0.2, _bind_mind),
        Similarity("nmi", nmi_similarity, "normalised mutual information (multimodal)", 0.5),
        Similarity("mse", mse_similarity, "negated mean squared difference", 0.1),
    )
}


def get(name: str) -> Similarity:
    """The registered similarity ``name``; ``KeyError`` names the valid ones."""
    if name not in SIMILARITIES:
        raise KeyError(f"unknown similarity {name!r}; one of {', '.join(SIMILARITIES)}")
    return SIMILARITIES[name]


def intensity_relation(
    a: Tensor, b: Tensor, weight: Tensor | None = None, bins: int = 32
) -> tuple[float, float]:
    """How ``b`` depends on ``a``: Pearson's ``r`` and the correlation ratio ``η²(b | a)``.

    ``r²`` measures a linear (same-modality) relation, ``η²`` any functional one (Roche et al.,
    "The correlation ratio as a new similarity measure for multimodal image registration",
    MICCAI 1998); a pair of one modality has ``r`` close to ``√η²`` and positive, a pair of
    two modalities (T1/T2 contrast inversions, CT/MR) a negative or much smaller ``r``.
    ``a`` is binned into ``bins`` intensity bins over [0, 1].
    """
    with torch.no_grad():
        values_a, values_b = a.reshape(-1).double(), b.reshape(-1).double()
        w = torch.ones_like(values_a) if weight is None else weight.expand_as(a).reshape(-1)
        w = w.double()
        total = w.sum().clamp(min=1e-12)
        mean_a, mean_b = (w * values_a).sum() / total, (w * values_b).sum() / total
        da, db = values_a - mean_a, values_b - mean_b
        var_a, var_b = (w * da * da).sum() / total, (w * db * db).sum() / total
        r = float((w * da * db).sum() / total / torch.sqrt(var_a * var_b).clamp(min=1e-12))
        index = (values_a.clamp(0, 1) * (bins - 1)).round().long()
        count = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, w)
        sums = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, w * values_b)
        means = sums / count.clamp(min=1e-12)
        explained = (count * (means - mean_b) ** 2).sum() / total
        return r, float(explained / var_b.clamp(min=1e-12))


def local_agreement(a: Tensor, b: Tensor, weight: Tensor | None = None, window: int = 3) -> float:
    """``Σ w·c / Σ w·|c|`` of the local correlations ``c`` of ``a`` and ``b`` ``(B, C, *S)``
    over boxes of ``window`` voxels (``local_correlation``): 1 where every edge of one image
    goes the same way in the other (one modality, roughly aligned), about 0 or below where
    contrasts invert in places (T1/T2 inside the brain, CT/MR). Unlike Pearson's ``r`` it is
    not dominated by one large contrast both images share, such as the brain against an empty
    background."""
    with torch.no_grad():
        correlation = local_correlation(a, b, window)
        w = torch.ones_like(correlation) if weight is None else weight.expand_as(correlation)
        return float((w * correlation).sum() / (w * correlation.abs()).sum().clamp(min=1e-12))
