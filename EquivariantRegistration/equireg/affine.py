"""Affine pre-alignment (``--initial translation|rigid|affine``) in physical space.

The transform maps fixed physical points (LPS mm) to moving physical points, like every
transform we write: ``T(x) = A (x − c) + c + t`` with ``c`` the centre of the fixed image and
``A = R · K · S`` (rotation, upper shear, scales), i.e. an ITK ``AffineTransform`` with centre
``c``. Working in physical coordinates, not on voxel grids, makes its composition with the
network's displacement field exact whatever the two images' spacing and direction.

What is optimised are unbounded variables ``z``; each parameter is ``low + (high − low) · σ(z)``,
so that no step can leave its valid range (scales stay positive, rotations within ±π) and
``z = 0`` is the starting point: the identity, shifted by the centre-of-mass translation.

The loss compares the fixed image at its voxel centres ``x`` with the moving image at ``T x``.
The moving image is a cubic B-spline through its samples, its coefficients computed once per
resolution level; its exact gradient ``∇M`` is the same sum with the derivative of the
kernel, evaluated at ``T x`` from the same coefficients as the value. The gradient of the loss
then comes two interchangeable ways:

* ``autograd``: the loss is built with torch operations and differentiated by a backward pass;
* ``analytic``: the chain rule ``∂C/∂p = Σ C'(F, M∘T)(x) · ∇M(T x) · ∂(T x)/∂p`` with the
  per-voxel loss derivatives ``C'`` written out and the derivatives of ``A`` with respect to
  angles, scales and shears in closed form — no graph, no backward pass.

Both differentiate the same function, so they agree to floating-point rounding (tested). A
derivative-of-Gaussian gradient image sampled by linear interpolation would not be the
derivative of the image the loss sees; the gradients would then differ by a few percent.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .maps import sample
from .preprocess import background_value
from .space import Grid, resample_to_grid

MODES = ("translation", "rigid", "affine")
GRADIENTS = ("analytic", "autograd")
INITIALISATIONS = ("moments", "geometry", "identity")

# Parameter ranges around the starting point (the sigmoid maps z ∈ ℝ into these).
ROTATION_RANGE = math.pi  # rad, each angle
LOG_SCALE_RANGE = math.log(2.0)  # scales within (1/2, 2)
SHEAR_RANGE = 0.5
TRANSLATION_RANGE = 0.5  # × the fixed image's largest edge-to-edge extent, in mm

Progress = Callable[[float, str], None]


# --- parameters -------------------------------------------------------------------------------


def _plane_rotation(
    dim: int, plane: tuple[int, int], angle: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation by ``angle`` in the coordinate ``plane`` (i → j) and its derivative."""
    i, j = plane
    cosine = torch.zeros(dim, dim, dtype=angle.dtype, device=angle.device)
    cosine[i, i] = cosine[j, j] = 1.0
    sine = torch.zeros_like(cosine)
    sine[j, i], sine[i, j] = 1.0, -1.0
    identity = torch.eye(dim, dtype=angle.dtype, device=angle.device)
    rotation = identity + (torch.cos(angle) - 1) * cosine + torch.sin(angle) * sine
    derivative = -torch.sin(angle) * cosine + torch.cos(angle) * sine
    return rotation, derivative


# Rotation planes in parameter order: 2-D about z; 3-D about x, y, z with R = Rz · Ry · Rx.
_PLANES = {2: [(0, 1)], 3: [(1, 2), (2, 0), (0, 1)]}
_SHEARS = {2: [(0, 1)], 3: [(0, 1), (0, 2), (1, 2)]}


class ParameterSpace:
    """The parameters of one mode and dimension, their sigmoid ranges, matrix and derivatives.

    Layout of ``p``: translation (mm, ``d``), then for ``rigid`` and ``affine`` the rotation
    angles (rad: 1 in 2-D, 3 in 3-D: about x, y, z), then for ``affine`` the log-scales (``d``)
    and the shears (1 in 2-D, 3 in 3-D: xy, xz, yz entries of an upper unit triangle).
    """

    def __init__(
        self, mode: str, dim: int, start_translation: np.ndarray, translation_range: float
    ):
        if mode not in MODES:
            raise ValueError(f"affine mode {mode!r}: one of {', '.join(MODES)}")
        self.mode, self.dim = mode, dim
        self.angles = len(_PLANES[dim]) if mode != "translation" else 0
        self.scales = dim if mode == "affine" else 0
        self.shears = len(_SHEARS[dim]) if mode == "affine" else 0
        centre = np.concatenate(
            [start_translation, np.zeros(self.angles + self.scales + self.shears)]
        )
        half = np.concatenate(
            [
                np.full(dim, translation_range),
                np.full(self.angles, ROTATION_RANGE),
                np.full(self.scales, LOG_SCALE_RANGE),
                np.full(self.shears, SHEAR_RANGE),
            ]
        )
        self.low, self.high = centre - half, centre + half

    @property
    def size(self) -> int:
        return len(self.low)

    def point_shift(self, radius: float) -> np.ndarray:
        """How far (mm) a unit change of each ``z`` at 0 moves a point ``radius`` mm from the
        centre: translations move every point alike, the others in proportion to ``radius``."""
        lever = np.concatenate([np.ones(self.dim), np.full(self.size - self.dim, radius)])
        return (self.high - self.low) / 4 * lever

    def _bounds(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = torch.as_tensor(self.low, dtype=like.dtype, device=like.device)
        return low, torch.as_tensor(self.high, dtype=like.dtype, device=like.device) - low

    def parameters(self, z: torch.Tensor) -> torch.Tensor:
        """``p = low + (high − low) · σ(z)``: any ``z`` gives parameters strictly in range."""
        low, width = self._bounds(z)
        return low + width * torch.sigmoid(z)

    def parameter_derivative(self, z: torch.Tensor) -> torch.Tensor:
        """``∂p/∂z`` (diagonal), for the analytic gradient."""
        _, width = self._bounds(z)
        s = torch.sigmoid(z)
        return width * s * (1 - s)

    def unbounded(self, p: torch.Tensor) -> torch.Tensor:
        """The ``z`` whose parameters are ``p`` (the inverse of ``parameters``)."""
        low, width = self._bounds(p)
        return torch.logit((p - low) / width)

    def _factors(
        self, p: torch.Tensor
    ) -> tuple[
        torch.Tensor,
        list[tuple[torch.Tensor, torch.Tensor]],
        list[torch.Tensor],
        tuple[torch.Tensor, torch.Tensor],
    ]:
        """``R``, its plane rotations with their derivatives (parameter order), the shears'
        unit matrices, and ``K · S``'s factors ``K`` and ``S``."""
        d, first = self.dim, self.dim
        eye = torch.eye(d, dtype=p.dtype, device=p.device)
        rotations = [
            _plane_rotation(d, plane, p[first + k])
            for k, plane in enumerate(_PLANES[d][: self.angles])
        ]
        first += self.angles
        scale = torch.diag(torch.exp(p[first : first + self.scales])) if self.scales else eye
        first += self.scales
        shear_units = []
        shear = eye
        for k, (i, j) in enumerate(_SHEARS[d][: self.shears]):
            unit = torch.zeros_like(eye)
            unit[i, j] = 1.0
            shear_units.append(unit)
            shear = shear + p[first + k] * unit
        rotation = eye
        for r, _ in reversed(rotations):  # R = … R_1 R_0
            rotation = rotation @ r
        return rotation, rotations, shear_units, (shear, scale)

    def matrix(self, p: torch.Tensor) -> torch.Tensor:
        """``A = R · K · S`` (differentiable: this is what autograd sees)."""
        rotation, _, _, (shear, scale) = self._factors(p)
        return rotation @ shear @ scale

    def matrix_derivatives(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` and ``∂A/∂p_k`` for every non-translation parameter: ``(K, d, d)``."""
        rotation, rotations, shear_units, (shear, scale) = self._factors(p)
        eye = torch.eye(self.dim, dtype=p.dtype, device=p.device)
        matrix = rotation @ shear @ scale
        derivatives = []
        for k in range(len(rotations)):  # product rule over R = … R_1 R_0
            product = eye
            for m in reversed(range(len(rotations))):
                r, dr = rotations[m]
                product = product @ (dr if m == k else r)
            derivatives.append(product @ shear @ scale)
        for i in range(self.scales):  # ∂(R K S)/∂ log s_i keeps column i of A
            column = torch.zeros_like(eye)
            column[i, i] = 1.0
            derivatives.append(matrix @ column)
        derivatives += [rotation @ unit @ scale for unit in shear_units]
        if not derivatives:
            return matrix, torch.zeros(0, self.dim, self.dim, dtype=p.dtype, device=p.device)
        return matrix, torch.stack(derivatives)

    def named(self, p: np.ndarray) -> dict[str, list[float]]:
        """The parameters as a report: translation (mm), rotation (degrees), scale, shear."""
        d, out = self.dim, {"translation_mm": [round(float(v), 5) for v in p[: self.dim]]}
        if self.angles:
            out["rotation_deg"] = [round(math.degrees(v), 5) for v in p[d : d + self.angles]]
        d += self.angles
        if self.scales:
            out["scale"] = [round(math.exp(v), 6) for v in p[d : d + self.scales]]
        d += self.scales
        if self.shears:
            out["shear"] = [round(float(v), 6) for v in p[d : d + self.shears]]
        return out


# --- the moving image as a cubic B-spline -------------------------------------------------------

_PAD = 3  # replicated voxels around the coefficients: the 4 taps of any clamped point fit


def _cubic_weights(f: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Cubic B-spline weights of the taps ``j−1 … j+2`` at ``v = j + f``, stacked along ``dim``."""
    g = 1 - f
    weights = [g**3 / 6, (3 * f**3 - 6 * f**2 + 4) / 6, (3 * g**3 - 6 * g**2 + 4) / 6, f**3 / 6]
    return torch.stack(weights, dim)


def _cubic_derivative_weights(f: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``d/dv`` of ``_cubic_weights``."""
    g = 1 - f
    weights = [-(g**2) / 2, (3 * f**2 - 4 * f) / 2, -(3 * g**2 - 4 * g) / 2, f**2 / 2]
    return torch.stack(weights, dim)


_POLE = math.sqrt(3.0) - 2.0  # of the cubic B-spline's interpolation prefilter
_PREFILTER_TAPS = 10  # per side; the filter decays as |pole|^k, 0.27^11 ≈ 6e-7


def spline_coefficients(values: torch.Tensor, pad: int) -> torch.Tensor:
    """Cubic B-spline coefficients whose spline passes through ``values`` at the voxel centres,
    over the array extended by ``pad`` replicated voxels per side.

    The exact prefilter inverts ``[1, 4, 1] / 6`` (the B-spline at the integers); its impulse
    response is ``√3 · pole^|k|``, applied per axis as a (truncated) convolution.
    """
    d, k = values.dim(), _PREFILTER_TAPS
    offsets = torch.arange(-k, k + 1, dtype=values.dtype, device=values.device)
    kernel = math.sqrt(3.0) * _POLE ** offsets.abs()
    out = F.pad(values[None, None], [pad + k] * 2 * d, mode="replicate")
    conv = F.conv2d if d == 2 else F.conv3d
    for axis in range(d):
        out = conv(out, kernel.view([1, 1] + [2 * k + 1 if a == axis else 1 for a in range(d)]))
    return out[0, 0]


class SplineImage:
    """A continuous image ``M(y) = Σ_i c_i β3(v(y) − i)`` through an array's samples, in network
    coordinates ``y`` (tensor-axis order; voxel ``i`` of ``n`` at ``(i + ½)/n``, as in
    ``maps.py``; ``v`` the voxel position), with its exact gradient.

    The coefficients ``c`` are computed once (``spline_coefficients``). The gradient ``∇M`` is
    the same sum with the derivative of the kernel: value and gradient come from the same
    ``4^d`` coefficients around ``y``, so the gradient image needs no filtering pass of its own
    and costs no second gather. Outside the array the samples are extended by their border
    values; ``sample`` also says which points fall inside the image's extent (the loss uses
    only those).
    """

    def __init__(self, values: torch.Tensor):
        d = values.dim()
        self.dim = d
        self.shape = torch.tensor(values.shape, dtype=values.dtype, device=values.device)
        padded = spline_coefficients(values, _PAD)
        self.values = padded.reshape(-1)
        self.strides = torch.tensor(padded.stride(), device=values.device)
        taps = torch.tensor(list(itertools.product(range(4), repeat=d)), device=values.device)
        self.offsets = taps @ self.strides  # the 4^d taps, axis 0 slowest
        self.range = (float(padded.min()), float(padded.max()))  # M averages them

    def _taps(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``(4, …, 4, N)`` samples around ``coords`` ``(N, d)`` (points last, so that the
        separable sums below run over contiguous memory), the positions' fractions past the
        second tap ``(d, N)``, and the inside flags ``(N,)``."""
        voxel = coords * self.shape - 0.5
        inside = ((voxel >= -0.5) & (voxel <= self.shape - 0.5)).all(1)
        voxel = torch.clamp(voxel, -torch.ones_like(self.shape), self.shape)
        whole = torch.floor(voxel).detach()
        base = ((whole.long() - 1 + _PAD) * self.strides).sum(1)
        taps = torch.take(self.values, self.offsets[:, None] + base)
        return taps.view(*[4] * self.dim, len(coords)), (voxel - whole).T, inside

    def sample(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Values at ``coords`` ``(N, d)`` (differentiable in ``coords``) and the inside flags."""
        taps, fraction, inside = self._taps(coords)
        cubic = _cubic_weights(fraction, dim=0)  # (4, d, N)
        for axis in range(self.dim):  # separable: sum out the leading tap axis each time
            taps = (taps * cubic[:, axis].view(4, *[1] * (self.dim - 1 - axis), -1)).sum(0)
        return taps, inside

    def sample_with_gradient(
        self, coords: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Values, gradient ``∂M/∂y`` ``(N, d)`` (network units) and inside flags at ``coords``.

        Summed out axis by axis; ``partial[k]`` holds the sums whose kernel is differentiated
        along axis ``k`` (``None``: along none), so that the value and the ``d`` derivatives
        share the work.
        """
        taps, fraction, inside = self._taps(coords)
        cubic = _cubic_weights(fraction, dim=0)
        slope = _cubic_derivative_weights(fraction, dim=0)
        partial: dict[int | None, torch.Tensor] = {None: taps}
        for axis in range(self.dim):
            shape = (4, *[1] * (self.dim - 1 - axis), -1)
            weight, derivative = cubic[:, axis].view(shape), slope[:, axis].view(shape)
            summed = {key: (t * weight).sum(0) for key, t in partial.items()}
            summed[axis] = (partial[None] * derivative).sum(0)
            partial = summed
        gradient = torch.stack([partial[k] for k in range(self.dim)], 1) * self.shape
        return partial[None], gradient, inside


# --- losses -------------------------------------------------------------------------------------


class Loss:
    """A similarity loss ``C(f, m; w)`` of the fixed values ``f`` and the warped moving values
    ``m`` at ``N`` points with weights ``w`` (0 outside a mask or the moving image).

    ``__call__`` is written with differentiable torch operations (the autograd path);
    ``derivative`` returns ``C`` and ``∂C/∂m`` ``(N,)`` in closed form (the analytic path).
    """

    def __call__(self, f: torch.Tensor, m: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def derivative(
        self, f: torch.Tensor, m: torch.Tensor, w: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class L2(Loss):
    """Mean squared difference ``Σ w (m − f)² / Σ w``: images of the same contrast."""

    def __call__(self, f, m, w):
        return (w * (m - f) ** 2).sum() / w.sum()

    def derivative(self, f, m, w):
        total, r = w.sum(), m - f
        return (w * r**2).sum() / total, 2 * w * r / total


class Cauchy(Loss):
    """``Σ w log(1 + ((m − f)/s)²) / Σ w``: quadratic for small residuals, logarithmic for large
    ones, so that content present in only one image (outliers) pulls less than with L2."""

    def __init__(self, scale: float = 0.1):
        self.scale = scale

    def __call__(self, f, m, w):
        return (w * torch.log1p(((m - f) / self.scale) ** 2)).sum() / w.sum()

    def derivative(self, f, m, w):
        total, r = w.sum(), m - f
        value = (w * torch.log1p((r / self.scale) ** 2)).sum() / total
        return value, 2 * w * r / (self.scale**2 + r**2) / total


class Correlation(Loss):
    """``1 − ρ(f, m)`` with ρ the weighted normalised cross-correlation: 0 for ``m = a f + b``
    with any ``a > 0``, so that gain and offset differences between the images do not matter."""

    EPS = 1e-10

    def _moments(self, f, m, w):
        total = w.sum()
        a = f - (w * f).sum() / total
        b = m - (w * m).sum() / total
        fm, ff, mm = ((w * x * y).sum() / total for x, y in ((a, b), (a, a), (b, b)))
        return total, a, b, fm, ff, torch.sqrt(ff * mm + self.EPS)

    def __call__(self, f, m, w):
        *_, fm, _, s = self._moments(f, m, w)
        return 1 - fm / s

    def derivative(self, f, m, w):
        total, a, b, fm, ff, s = self._moments(f, m, w)
        return 1 - fm / s, -(w / total) * (a / s - fm * ff * b / s**3)


class MutualInformation(Loss):
    """``−MI(f, m)`` from a joint histogram with cubic B-spline Parzen windows (Mattes et al.):
    any relation between the two contrasts, as long as one predicts the other.

    ``f`` and ``m`` are mapped onto ``bins`` bins over ``fixed_range`` and ``moving_range``
    (the moving image's B-spline model never leaves the range of its coefficients).
    """

    EPS = 1e-10

    def __init__(
        self,
        fixed_range: tuple[float, float],
        moving_range: tuple[float, float],
        bins: int = 32,
    ):
        self.bins = bins
        self.fixed_range, self.moving_range = fixed_range, moving_range

    def _bin(self, values, value_range):
        low, high = value_range
        scale = (self.bins - 4) / max(high - low, 1e-12)
        position = torch.clamp(1 + (values - low) * scale, 1, self.bins - 3)
        whole = torch.floor(position).detach()
        taps = whole.long()[:, None] - 1 + torch.arange(4, device=values.device)
        return taps, position - whole, scale

    def _histogram(self, f, w, m_taps, m_weights):
        f_taps, f_fraction, _ = self._bin(f, self.fixed_range)
        fixed = torch.zeros(len(f), self.bins, dtype=f.dtype, device=f.device)
        fixed = fixed.scatter_add(1, f_taps, _cubic_weights(f_fraction))
        moving = torch.zeros_like(fixed).scatter_add(1, m_taps, m_weights)
        total = w.sum()
        joint = (w[:, None] * fixed).T @ moving / total
        return fixed, joint, (w[:, None] * fixed).sum(0) / total, joint.sum(0)

    def _information(self, joint, fixed_marginal, moving_marginal):
        log = torch.log
        return (
            (joint * log(joint + self.EPS)).sum()
            - (fixed_marginal * log(fixed_marginal + self.EPS)).sum()
            - (moving_marginal * log(moving_marginal + self.EPS)).sum()
        )

    def __call__(self, f, m, w):
        m_taps, m_fraction, _ = self._bin(m, self.moving_range)
        _, joint, pf, pm = self._histogram(f, w, m_taps, _cubic_weights(m_fraction))
        return -self._information(joint, pf, pm)

    def derivative(self, f, m, w):
        m_taps, m_fraction, scale = self._bin(m, self.moving_range)
        fixed, joint, pf, pm = self._histogram(f, w, m_taps, _cubic_weights(m_fraction))
        eps = self.EPS
        # ∂MI/∂p_ab, the fixed marginal being independent of m (partition of unity).
        g = torch.log(joint + eps) + joint / (joint + eps)
        g = g - (torch.log(pm + eps) + pm / (pm + eps))[None, :]
        per_bin = (fixed @ g).gather(1, m_taps)  # (N, 4): Σ_a W_f[x, a] g[a, b] at m's taps
        position = 1 + (m - self.moving_range[0]) * scale
        inside = (position >= 1) & (position <= self.bins - 3)  # where the clamp lets ∂ through
        slope = (per_bin * _cubic_derivative_weights(m_fraction)).sum(1) * scale * inside
        return -self._information(joint, pf, pm), -(w / w.sum()) * slope


LOSSES = ("l2", "cauchy", "ncc", "mi")


def make_loss(name: str, fixed: torch.Tensor, moving: SplineImage) -> Loss:
    """The loss ``name`` for fixed samples ``fixed`` and the moving image ``moving``."""
    if name == "l2":
        return L2()
    if name == "cauchy":
        return Cauchy()
    if name == "ncc":
        return Correlation()
    if name == "mi":
        return MutualInformation((float(fixed.min()), float(fixed.max())), moving.range)
    raise ValueError(f"affine loss {name!r}: one of {', '.join(LOSSES)}")


# --- one resolution level and its objective -----------------------------------------------------


def _affine_part(function: Callable[[np.ndarray], np.ndarray], dim: int) -> tuple[Any, Any]:
    """Matrix and offset of an affine ``function`` of ``(…, d)`` points, read off by evaluating
    it at the origin and the unit vectors (so ``space.py`` stays the only converter)."""
    probes = np.vstack([np.zeros(dim), np.eye(dim)])
    values = np.asarray(function(probes), dtype=np.float64)
    return (values[1:] - values[0]).T, values[0]


@dataclass
class Level:
    """The data of one resolution level: fixed sample points (LPS mm relative to the centre of
    rotation), their values and weights, and the moving image (values, optional mask) with the
    affine map from physical points to its network coordinates."""

    points: torch.Tensor  # (N, d)
    fixed: torch.Tensor  # (N,)
    weight: torch.Tensor  # (N,)
    moving: SplineImage
    moving_mask: torch.Tensor | None  # (1, 1, *shape) in {0, 1}
    to_network: torch.Tensor  # (d, d): physical → moving network coordinates
    network_offset: torch.Tensor  # (d,)
    centre: torch.Tensor  # (d,)
    voxel_mm: float  # smallest fixed voxel size at this level


def _moving_weight(level: Level, coords: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Fixed weight × inside-the-moving-image × moving mask: constant in the parameters."""
    weight = level.weight * inside
    if level.moving_mask is not None:
        d = coords.shape[1]
        grid = coords.T.reshape(1, d, -1, *[1] * (d - 1))
        weight = weight * (sample(level.moving_mask, grid, mode="nearest").reshape(-1) > 0.5)
    if not bool((weight > 0).any()):
        raise RuntimeError("the affine alignment lost all overlap between the images")
    return weight.detach()


class Objective:
    """The loss at one level as a function of the unbounded variables ``z``, with its gradient
    by autograd or analytically (same value, same gradient)."""

    def __init__(self, level: Level, space: ParameterSpace, loss: Loss):
        self.level, self.space, self.loss = level, space, loss

    def _moving_coords(self, matrix: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
        level = self.level
        moved = level.points @ matrix.T + level.centre + translation  # T x, LPS mm
        return moved @ level.to_network.T + level.network_offset

    def __call__(self, z: torch.Tensor, gradient: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(C(z), ∂C/∂z)``; ``gradient`` is ``analytic`` or ``autograd``."""
        if gradient == "analytic":
            return self.analytic(z)
        if gradient == "autograd":
            return self.autograd(z)
        raise ValueError(f"gradient {gradient!r}: one of {', '.join(GRADIENTS)}")

    def autograd(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            p = self.space.parameters(z)
            coords = self._moving_coords(self.space.matrix(p), p[: self.space.dim])
            values, inside = self.level.moving.sample(coords)
            weight = _moving_weight(self.level, coords.detach(), inside)
            loss = self.loss(self.level.fixed, values, weight)
            (grad,) = torch.autograd.grad(loss, z)
        return loss.detach(), grad

    @torch.no_grad()
    def analytic(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d, level = self.space.dim, self.level
        p = self.space.parameters(z)
        matrix, matrix_derivatives = self.space.matrix_derivatives(p)
        coords = self._moving_coords(matrix, p[:d])
        values, network_gradient, inside = level.moving.sample_with_gradient(coords)
        weight = _moving_weight(level, coords, inside)
        loss, slope = self.loss.derivative(level.fixed, values, weight)
        # ∂C/∂(T x) per point: C'(x) · ∇M(T x) in physical units (row vector · to_network).
        per_point = slope[:, None] * (network_gradient @ level.to_network)
        by_matrix = per_point.T @ level.points  # ∂C/∂A, since T x = A x + …
        grad = torch.cat([per_point.sum(0), (matrix_derivatives * by_matrix).sum((1, 2))])
        return loss, grad * self.space.parameter_derivative(z)


# --- building the levels ------------------------------------------------------------------------


def _level_shape(grid: Grid, factor: float) -> tuple[int, ...]:
    """The shape (tensor order) of ``grid`` with voxels of ``factor`` × its smallest spacing
    along every axis whose voxels are smaller than that: thick slices are not thinned further
    while the in-plane axes catch up (keeping at least 8 voxels per axis)."""
    target = factor * min(grid.spacing)
    size = tuple(
        max(min(n, 8), round(n * s / max(s, target)))
        for n, s in zip(grid.size, grid.spacing, strict=True)
    )
    return Grid(size, grid.spacing, grid.origin, grid.direction).shape


def _on_grid(image: sitk.Image, grid: Grid, nearest: bool = False) -> np.ndarray:
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.GetArrayFromImage(resample_to_grid(image, grid, interpolator))


def _centre_of_mass(grid: Grid, values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Intensity-weighted centre (LPS mm) of ``values`` above their minimum, inside ``mask``."""
    mass = values - values.min()
    if mask is not None:
        mass = mass * (mask > 0)
    points = grid.physical_points().reshape(-1, grid.dim)
    return (mass.reshape(-1, 1) * points).sum(0) / max(mass.sum(), 1e-12)


@dataclass
class ImagePair:
    """The two images, their masks and the intensity normalisation shared by all levels."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_mask: sitk.Image | None
    moving_mask: sitk.Image | None
    low: float
    high: float

    @classmethod
    def of(
        cls,
        fixed: sitk.Image,
        moving: sitk.Image,
        fixed_mask: sitk.Image | None,
        moving_mask: sitk.Image | None,
    ) -> ImagePair:
        """Both images get the fixed image's 1st–99th percentile range mapped to [0, 1] (the same
        map for both, so that L2 and Cauchy compare like with like)."""
        values = sitk.GetArrayViewFromImage(fixed)
        if fixed_mask is not None:
            values = values[sitk.GetArrayViewFromImage(fixed_mask) > 0]
        low, high = (float(v) for v in np.percentile(values, [1, 99]))
        if high <= low:
            low, high = float(values.min()), float(values.max())
        return cls(fixed, moving, fixed_mask, moving_mask, low, max(high, low + 1e-12))

    def normalised(self, values: np.ndarray) -> np.ndarray:
        return (values - self.low) / (self.high - self.low)


def build_level(
    images: ImagePair,
    centre: np.ndarray,
    factors: tuple[float, float],
    max_samples: int,
    device: torch.device | str,
    dtype: torch.dtype,
) -> Level:
    """The level where the fixed and moving images are shrunk by ``factors`` (voxel counts)."""
    fixed_grid = Grid.of(images.fixed).resized(_level_shape(Grid.of(images.fixed), factors[0]))
    moving_grid = Grid.of(images.moving).resized(_level_shape(Grid.of(images.moving), factors[1]))

    def tensor(values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(values), dtype=dtype, device=device)

    fixed_values = tensor(images.normalised(_on_grid(images.fixed, fixed_grid)))
    weight = torch.ones_like(fixed_values)
    if images.fixed_mask is not None:
        weight = tensor(_on_grid(images.fixed_mask, fixed_grid, nearest=True) > 0)
    points = tensor(fixed_grid.physical_points().reshape(-1, fixed_grid.dim) - centre)
    chosen = torch.nonzero(weight.reshape(-1) > 0).reshape(-1)
    if len(chosen) > max_samples:  # a fixed random subset: the objective stays deterministic
        generator = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(chosen), generator=generator)[:max_samples]
        chosen = chosen[pick.sort().values.to(chosen.device)]

    moving_values = tensor(images.normalised(_on_grid(images.moving, moving_grid)))
    moving_mask = None
    if images.moving_mask is not None:
        moving_mask = tensor(_on_grid(images.moving_mask, moving_grid, nearest=True) > 0)[
            None, None
        ]
    matrix, offset = _affine_part(moving_grid.physical_to_network, moving_grid.dim)
    return Level(
        points=points[chosen],
        fixed=fixed_values.reshape(-1)[chosen],
        weight=weight.reshape(-1)[chosen],
        moving=SplineImage(moving_values),
        moving_mask=moving_mask,
        to_network=tensor(matrix),
        network_offset=tensor(offset),
        centre=tensor(centre),
        voxel_mm=min(fixed_grid.spacing),
    )


# --- optimisation -------------------------------------------------------------------------------


@dataclass
class Schedule:
    """Adam per level, in variables scaled so that a unit step of any parameter moves the image
    corners by about one voxel of the level: ``learning_rate`` is thus a step in voxels, that
    of the coarsest level; each finer level starts at ``level_rate`` times the step of the one
    before, since it starts within a fraction of its voxel from the coarser result (a full
    step threw it off and cost it its iterations to come back). The step halves whenever the
    loss has not improved for ``patience`` iterations; a level ends when its steps stay below
    ``tolerance`` voxels (the largest move of a corner) for ``patience`` iterations in a row,
    or after ``iterations``."""

    learning_rate: float = 0.5
    patience: int = 10
    tolerance: float = 0.003
    iterations: int = 300
    level_rate: float = 1.0


def _optimise(
    objective: Objective,
    z: torch.Tensor,
    gradient: str,
    corners: torch.Tensor,
    schedule: Schedule,
    learning_rate: float,
    report: Callable[[int], None],
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Minimise ``objective`` from ``z`` with Adam's first step ``learning_rate`` (voxels);
    returns the best ``z`` seen and a summary."""
    space, level = objective.space, objective.level
    radius = float(corners.norm(dim=1).max())
    unit = torch.as_tensor(level.voxel_mm / space.point_shift(radius), dtype=z.dtype).to(z.device)
    scaled = (z.detach() / unit).clone()  # z = unit · scaled
    optimiser = torch.optim.Adam([scaled], lr=learning_rate, betas=(0.9, 0.99))
    best, best_z, since_best, still = math.inf, z.detach().clone(), 0, 0

    def moved_corners(values: torch.Tensor) -> torch.Tensor:
        p = space.parameters(values)
        return corners @ space.matrix(p).T + p[: space.dim]

    before = moved_corners(z)
    iteration = 0
    for iteration in range(1, schedule.iterations + 1):  # noqa: B007 - reported after the loop
        z = scaled * unit
        loss, grad = objective(z, gradient)
        if float(loss) < best - 1e-7 * abs(float(loss)):
            best, best_z, since_best = float(loss), z.clone(), 0
        else:
            since_best += 1
        if since_best >= schedule.patience:
            for group in optimiser.param_groups:
                group["lr"] *= 0.5
            since_best = 0
        scaled.grad = grad * unit
        optimiser.step()
        after = moved_corners(scaled * unit)
        step = float((after - before).norm(dim=1).max()) / level.voxel_mm
        before = after
        still = still + 1 if step < schedule.tolerance else 0
        report(iteration)
        if still >= schedule.patience:
            break
    return best_z, {"iterations": iteration, "loss": round(best, 7)}


# --- the result and the entry point ------------------------------------------------------------


@dataclass
class AffineResult:
    """``T(x) = matrix · (x − centre) + centre + translation`` (LPS mm), fixed → moving."""

    mode: str
    loss: str
    gradient: str
    matrix: np.ndarray
    centre: np.ndarray
    translation: np.ndarray
    parameters: dict[str, list[float]]
    initialisation: dict[str, Any] = field(default_factory=dict)
    levels: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def transform(self) -> sitk.AffineTransform:
        """As an ITK transform (fixed → moving; its ``GetInverse()`` maps moving → fixed)."""
        transform = sitk.AffineTransform(len(self.centre))
        transform.SetMatrix(self.matrix.flatten().tolist())
        transform.SetCenter(self.centre.tolist())
        transform.SetTranslation(self.translation.tolist())
        return transform

    def apply(self, points: np.ndarray) -> np.ndarray:
        """``T`` on ``(…, d)`` LPS mm points."""
        return (np.asarray(points) - self.centre) @ self.matrix.T + self.centre + self.translation

    def resample(
        self, moving: sitk.Image, moving_mask: sitk.Image | None, fixed: sitk.Image
    ) -> tuple[sitk.Image, sitk.Image | None]:
        """``moving`` (linear) and its mask (nearest) seen through ``T`` on ``fixed``'s grid: what
        the registration that follows this alignment takes as its moving image."""
        transform = self.transform()
        fill = background_value(sitk.GetArrayViewFromImage(moving))  # not 0: −1024 HU for CT
        image = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, fill, sitk.sitkFloat32)
        if moving_mask is None:
            return image, None
        mask = sitk.Resample(moving_mask, fixed, transform, sitk.sitkNearestNeighbor, 0)
        return image, mask

    def compose_displacement(self, displacement: sitk.Image) -> sitk.Image:
        """The displacement of ``x ↦ T(x + u(x))`` on ``displacement``'s grid, ``u`` being the
        field of a registration that ran after this alignment (same geometry, LPS mm)."""
        grid = Grid.of(displacement)
        points = grid.physical_points()
        total = self.apply(points + sitk.GetArrayFromImage(displacement)) - points
        return grid.stamp(sitk.GetImageFromArray(total, isVector=True))

    def report(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "loss": self.loss,
            "gradient": self.gradient,
            "initialisation": self.initialisation,
            "parameters": self.parameters,
            "matrix": [round(float(v), 8) for v in self.matrix.flatten()],
            "centre_mm": [round(float(v), 5) for v in self.centre],
            "translation_mm": [round(float(v), 5) for v in self.translation],
            "levels": self.levels,
            "time_s": round(self.seconds, 3),
        }


def _start_translation(
    images: ImagePair, initialisation: str, centre: np.ndarray, finest: list[float]
) -> np.ndarray:
    """The translation ``z = 0`` stands for (LPS mm): centres of mass, image centres, or none."""
    if initialisation == "identity":
        return np.zeros(len(centre))
    grids = [Grid.of(images.fixed), Grid.of(images.moving)]
    if initialisation == "geometry":
        return grids[1].index_to_physical((np.asarray(grids[1].size) - 1) / 2) - centre
    masses = []
    for image, mask, grid, factor in zip(
        (images.fixed, images.moving),
        (images.fixed_mask, images.moving_mask),
        grids,
        finest,
        strict=True,
    ):
        grid = grid.resized(_level_shape(grid, factor))
        inside = _on_grid(mask, grid, nearest=True) if mask is not None else None
        masses.append(_centre_of_mass(grid, _on_grid(image, grid), inside))
    return masses[1] - masses[0]


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run with one intra-op thread on the CPU (restored afterwards). An iteration is a few
    dozen small operations on at most ``max_samples`` points, where thread hand-offs cost more
    than they give; next to another busy process (a training run) two threads made the whole
    alignment 10–40 times slower than one."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


DEFAULT_LOSS = "ncc"
SAMPLE_RATIO = 4  # fewer samples per coarser level
MIN_SAMPLES = 2048  # 1024 lost a 30° rotation of the fundus photograph (0.94 mm against 0.000)
DEFAULT_MAX_SIZE = {2: 256, 3: 96}  # largest side of the finest level, voxels


def align(
    fixed: sitk.Image,
    moving: sitk.Image,
    mode: str = "affine",
    *,
    loss: str = DEFAULT_LOSS,
    gradient: str = "analytic",
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    initialisation: str = "moments",
    levels: int = 3,
    max_size: int | None = None,
    max_samples: int = 1 << 15,
    schedule: Schedule | None = None,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> AffineResult:
    """Find the ``mode`` transform (fixed → moving, physical space) that best aligns ``moving``
    to ``fixed``, coarse to fine over ``levels`` resolutions.

    ``initialisation``: ``moments`` starts from the translation that matches the intensity
    centres of mass (robust to large offsets), ``geometry`` from the one that matches the image
    centres, ``identity`` from none. Masks (0/1 images on their image's grid) restrict the
    loss. At most ``max_samples`` fixed voxels enter the loss on the finest level, each coarser
    level ``SAMPLE_RATIO`` times fewer (at least ``MIN_SAMPLES``): the coarse levels only bring
    the finest one within its reach, and the finest one's precision is set by its samples
    (a random subset: MI and correlation measured on it are noisy).
    """
    if initialisation not in INITIALISATIONS:
        raise ValueError(f"initialisation {initialisation!r}: one of {', '.join(INITIALISATIONS)}")
    began = time.perf_counter()
    schedule = schedule or Schedule()
    report = progress or (lambda *_: None)
    dim = fixed.GetDimension()
    fixed_grid, moving_grid = Grid.of(fixed), Grid.of(moving)
    images = ImagePair.of(fixed, moving, fixed_mask, moving_mask)
    centre = fixed_grid.index_to_physical((np.asarray(fixed_grid.size) - 1) / 2)
    size = max_size or DEFAULT_MAX_SIZE[dim]
    finest = [max(1.0, max(g.shape) / size) for g in (fixed_grid, moving_grid)]

    start = _start_translation(images, initialisation, centre, finest)
    extent = max(sp * n for sp, n in zip(fixed_grid.spacing, fixed_grid.size, strict=True))
    space = ParameterSpace(mode, dim, start, TRANSLATION_RANGE * extent)

    dtype = torch.float32
    z = torch.zeros(space.size, dtype=dtype, device=device)
    index_corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in fixed_grid.size])))
    corners = torch.as_tensor(
        fixed_grid.index_to_physical(index_corners) - centre, dtype=dtype, device=device
    )
    summaries = []
    with _one_cpu_thread(torch.device(device)):
        for k in range(levels):
            shrink = 2.0 ** (levels - 1 - k)
            samples = max(MIN_SAMPLES, round(max_samples / SAMPLE_RATIO ** (levels - 1 - k)))
            level = build_level(
                images, centre, (finest[0] * shrink, finest[1] * shrink), samples, device, dtype
            )
            objective = Objective(level, space, make_loss(loss, level.fixed, level.moving))

            def step(iteration: int, k: int = k) -> None:
                report((k + iteration / schedule.iterations) / levels, f"level {k + 1}/{levels}")

            rate = schedule.learning_rate * schedule.level_rate**k
            z, summary = _optimise(objective, z, gradient, corners, schedule, rate, step)
            summaries.append({"samples": len(level.fixed), **summary})
    report(1.0, "done")

    p = space.parameters(z).double().cpu()
    return AffineResult(
        mode=mode,
        loss=loss,
        gradient=gradient,
        matrix=space.matrix(p).numpy(),
        centre=centre,
        translation=p[:dim].numpy(),
        parameters=space.named(p.numpy()),
        initialisation={"kind": initialisation, "translation_mm": start.round(5).tolist()},
        levels=summaries,
        seconds=time.perf_counter() - began,
    )
