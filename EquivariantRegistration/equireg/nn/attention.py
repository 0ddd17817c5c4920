"""Function inversion by attention, and the memory-efficient attention it runs on.

``attention`` never builds the ``N × M`` attention matrix. On CUDA it is PyTorch's fused
``scaled_dot_product_attention`` (flash / memory-efficient kernels). Elsewhere it is our chunked
kernel, built so that almost all of its time is the ``N × M × C`` score product:

- scores are computed in base 2 (``log2 e`` folded into the queries) because ``exp2`` is about
  three times faster than ``exp`` on CPU;
- the softmax shift is known before the scores are: ``|q_i| max_j |k_j|`` bounds row ``i``
  (Cauchy–Schwarz), and it is subtracted inside the score product itself through one extra
  column (``[q, -shift] · [k, 1]``), so there is no max pass, no subtraction pass and no
  rescaling of partial sums; rows the bound over-shoots so far that they underflow are redone
  with their exact maximum;
- scores are laid out keys × queries, and each block of queries is cut into one slice per
  thread, so the narrow value product ``[v, 1]ᵀ P`` (which also gives the softmax denominator)
  is a batched short-and-wide product that runs on all cores; as one plain product that
  narrow it runs on one core, and tall-and-thin (``P [v, 1]``) it is slower still.

The backward pass recomputes the probabilities chunk by chunk from the saved row log-sum-exps,
like flash attention, so training also needs only ``O(N + M)`` memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..compose import RegistrationStep
from ..maps import Map, padded_identity_grid, sampled_map
from .featurizer import Featurizer

LOG2E = 1.0 / math.log(2.0)
# Queries per thread and keys per chunk of the CPU kernel's score blocks; measured fastest on a
# 2-core AMD EPYC (AVX-512, 2 MB L2 per core), see docs/benchmarks.md.
QUERIES_PER_THREAD = 256
KEY_CHUNK = 2048
# A row whose shifted sum of exponentials is below this was shifted too far by its bound and
# may have lost precision to underflow; it is recomputed with its exact maximum.
UNDERFLOW_GUARD = 2.0**-60


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``softmax(query @ keyᵀ) @ value`` without materialising the attention matrix.

    Shapes ``(B, N, C)``, ``(B, M, C)``, ``(B, M, Dv)`` -> ``(B, N, Dv)``. No ``1/√C`` scaling:
    callers scale. Differentiable in all three inputs.
    """
    if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
        raise ValueError("attention expects (B, N, C), (B, M, C) and (B, M, Dv) tensors")
    if key.shape[:2] != value.shape[:2] or query.shape[0] != key.shape[0]:
        raise ValueError(f"inconsistent shapes {query.shape}, {key.shape}, {value.shape}")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"query and key widths differ: {query.shape[2]} != {key.shape[2]}")
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return _fused_attention(query, key, value)
    dtype = torch.promote_types(query.dtype, torch.float32)
    out = _ChunkedAttention.apply(query.to(dtype), key.to(dtype), value.to(dtype))
    return out.to(query.dtype)


def _fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """PyTorch's flash / memory-efficient kernels; all widths zero-padded to a common multiple
    of 8 because the kernels want equal, aligned head sizes (zeros change no dot product)."""
    width = -(-max(query.shape[2], value.shape[2]) // 8) * 8

    def widen(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, width - x.shape[2])).unsqueeze(1)

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        out = F.scaled_dot_product_attention(widen(query), widen(key), widen(value), scale=1.0)
    return out[:, 0, :, : value.shape[2]]


def _with_column(x: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """``[x, column]``: ``(R, W)``, ``(R,)`` -> ``(R, W + 1)``."""
    return torch.cat([x, column.unsqueeze(1)], dim=1)


def _exponent_floor(span: float, dtype: torch.dtype) -> float | None:
    """Where to clamp shifted base-2 scores before ``exp2``, or ``None`` when no clamp is needed.

    Producing subnormal floats is dozens of times slower on x86; it can only happen when the
    shifted scores may span (``span``) more than the normal exponent range. The clamp adds at
    most ``M · tiny`` to a row sum of at least ``UNDERFLOW_GUARD``: nothing in float precision.
    """
    floor = math.log2(torch.finfo(dtype).tiny)
    return floor if span > -floor else None


def _even_part(total: int, limit: int) -> int:
    """The size of the fewest equal parts of at most ``limit`` that cover ``total``: no thin last
    part, which would run far below the throughput of the others."""
    return -(-total // -(-total // limit))


def _row_maxima(query2: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Exact ``max_j query2_i · key_j`` for each row, one score block at a time."""
    block = QUERIES_PER_THREAD * torch.get_num_threads()
    maxima = []
    for q0 in range(0, query2.shape[0], block):
        rows = query2[q0 : q0 + block].T
        chunk_maxima = [
            key[k0 : k0 + KEY_CHUNK].mm(rows).amax(dim=0)
            for k0 in range(0, key.shape[0], KEY_CHUNK)
        ]
        maxima.append(torch.stack(chunk_maxima).amax(dim=0))
    return torch.cat(maxima)


def _shifted_sums(
    query2: torch.Tensor,
    shift: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    floor: float | None,
) -> torch.Tensor:
    """``Σ_j 2^(query2_i·key_j - shift_i) [value_j, 1]`` for every row: ``(Dv + 1, N)``.

    Each query block is split into one slice per thread and every product is a batched one over
    the slices: the narrow value product is then spread over the cores (a plain matrix product
    that narrow runs on one core).
    """
    n, m, dv = query2.shape[0], key.shape[0], value.shape[1]
    threads = max(1, min(torch.get_num_threads(), n))
    padded_n = -(-n // threads) * threads
    queries = F.pad(_with_column(query2, -shift), (0, 0, 0, padded_n - n))
    keys = _with_column(key, torch.ones_like(key[:, 0]))
    # [value, 1] as rows, zero-padded to a multiple of 4 rows, the product's fastest shape.
    rows = -(-(dv + 1) // 4) * 4
    values_t = torch.zeros(rows, m, dtype=query2.dtype, device=query2.device)
    values_t[:dv] = value.T
    values_t[dv] = 1
    chunk = _even_part(m, KEY_CHUNK)
    key_chunks = [
        (
            keys[k0 : k0 + chunk].expand(threads, -1, -1),
            values_t[:, k0 : k0 + chunk].expand(threads, -1, -1),
        )
        for k0 in range(0, m, chunk)
    ]
    block = threads * _even_part(padded_n // threads, QUERIES_PER_THREAD)
    buffer = query2.new_empty(chunk * block)
    sums = []
    for q0 in range(0, padded_n, block):
        per_thread = min(block, padded_n - q0) // threads
        slices = (
            queries[q0 : q0 + threads * per_thread].view(threads, per_thread, -1).transpose(1, 2)
        )
        slice_sums = query2.new_zeros(threads, rows, per_thread)
        for chunk_keys, chunk_values in key_chunks:
            scores = buffer[: chunk_keys.shape[1] * threads * per_thread]
            scores = scores.view(threads, chunk_keys.shape[1], per_thread)
            torch.bmm(chunk_keys, slices, out=scores)
            if floor is not None:
                scores.clamp_min_(floor)
            scores.exp2_()
            slice_sums.baddbmm_(chunk_values, scores)
        sums.append(slice_sums.permute(1, 0, 2).reshape(rows, threads * per_thread))
    return torch.cat(sums, dim=1)[: dv + 1, :n]


def _forward_one(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention for one batch item: ``(N, Dv)`` output and each row's base-2 log-sum-exp."""
    query2 = query * LOG2E
    shift = query2.norm(dim=1) * key.norm(dim=1).max()
    floor = _exponent_floor(2 * float(shift.max()), shift.dtype)
    sums = _shifted_sums(query2, shift, key, value, floor)
    underflowed = (sums[-1] < UNDERFLOW_GUARD).nonzero().squeeze(1)
    if underflowed.numel():
        exact_shift = _row_maxima(query2[underflowed], key)
        sums[:, underflowed] = _shifted_sums(query2[underflowed], exact_shift, key, value, floor)
        shift = shift.index_copy(0, underflowed, exact_shift)
    out = (sums[:-1] / sums[-1]).T
    return out, shift + torch.log2(sums[-1])


def _backward_one(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    log2_sum: torch.Tensor,
    grad_out: torch.Tensor,
    need_value_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients for one batch item, recomputing ``Pᵀ`` one ``keys × queries`` block at a time.

    With ``P = softmax(S)``: ``dS = P ∘ (dO Vᵀ - D)`` where ``D_i = dO_i · O_i``; the bracket is one
    product of ``[V, 1]`` with ``[dO, -D]`` so it costs no extra pass.
    """
    n, m = query.shape[0], key.shape[0]
    bound = float(query.norm(dim=1).max() * key.norm(dim=1).max()) * LOG2E
    floor = _exponent_floor(2 * bound + math.log2(m), query.dtype)
    queries = _with_column(query * LOG2E, -log2_sum)
    keys = _with_column(key, torch.ones_like(key[:, 0]))
    values = _with_column(value, torch.ones_like(value[:, 0]))
    grads = _with_column(grad_out, -(grad_out * out).sum(dim=1))
    grad_query = torch.zeros_like(query)
    grad_key = torch.zeros_like(key)
    grad_value = torch.zeros_like(value) if need_value_grad else None
    block = QUERIES_PER_THREAD * torch.get_num_threads()
    for q0 in range(0, n, block):
        rows = slice(q0, q0 + block)
        for k0 in range(0, m, KEY_CHUNK):
            cols = slice(k0, k0 + KEY_CHUNK)
            probabilities = keys[cols] @ queries[rows].T
            if floor is not None:
                probabilities.clamp_min_(floor)
            probabilities.exp2_()
            if grad_value is not None:
                grad_value[cols].addmm_(probabilities, grad_out[rows])
            grad_scores = (values[cols] @ grads[rows].T).mul_(probabilities)
            grad_query[rows].addmm_(grad_scores.T, key[cols])
            grad_key[cols].addmm_(grad_scores, query[rows])
    return grad_query, grad_key, grad_value


class _ChunkedAttention(torch.autograd.Function):
    """Autograd wrapper of the chunked kernel: saves inputs, output and row log-sum-exps."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        results = [_forward_one(q, k, v) for q, k, v in zip(query, key, value, strict=True)]
        out = torch.stack([o for o, _ in results])
        log2_sum = torch.stack([s for _, s in results])
        ctx.save_for_backward(query, key, value, out, log2_sum)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        query, key, value, out, log2_sum = ctx.saved_tensors
        need_value_grad = ctx.needs_input_grad[2]
        grads = [
            _backward_one(*tensors, need_value_grad)
            for tensors in zip(query, key, value, out, log2_sum, grad_out, strict=True)
        ]
        grad_query = torch.stack([g[0] for g in grads])
        grad_key = torch.stack([g[1] for g in grads])
        grad_value = torch.stack([g[2] for g in grads]) if need_value_grad else None
        return grad_query, grad_key, grad_value


class AttentionInversion(RegistrationStep):
    """``Ξ[A, B] ≈ A⁻¹ ∘ B``: every fixed voxel finds where its features occur in the moving image.

    One featurizer (shared weights) sees both images zero-padded by ``pad`` voxels per side; the
    fixed features are cropped back to the fixed grid (queries), the moving ones keep the pad
    (keys). Each feature vector is made unit length, so a score is ``temperature · cos``. The
    values are the moving grid's coordinates, extrapolated linearly into the pad, so the output
    is each fixed voxel's expected moving coordinate. Translating either image only translates
    its features and coordinates, hence ``Ξ[A∘W, B∘U] = W⁻¹ ∘ Ξ[A, B] ∘ U`` away from the borders.
    """

    def __init__(self, featurizer: Featurizer, pad: int, temperature: float):
        super().__init__()
        self.featurizer = featurizer
        self.pad = pad
        self.log_temperature = torch.nn.Parameter(torch.tensor(math.log(temperature)))

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Map:
        batch, dim = fixed.shape[0], fixed.dim() - 2
        padding = (self.pad,) * (2 * dim)
        moving_features = self.featurizer(F.pad(moving, padding))
        fixed_features = self.featurizer(F.pad(fixed, padding))
        crop = tuple(slice(self.pad, self.pad + n) for n in fixed.shape[2:])
        fixed_features = fixed_features[(slice(None), slice(None), *crop)]
        dtype = torch.promote_types(moving.dtype, torch.float32)
        grid = padded_identity_grid(moving.shape[2:], self.pad, batch, moving.device, dtype)
        # Coordinates need at least float32, also under mixed precision: half precision would
        # round them to about a thousandth of the image.
        with torch.autocast(moving.device.type, enabled=False):
            queries = F.normalize(fixed_features.flatten(2).to(dtype), dim=1).transpose(1, 2)
            keys = F.normalize(moving_features.flatten(2).to(dtype), dim=1).transpose(1, 2)
            values = grid.flatten(2).transpose(1, 2)
            coordinates = attention(queries * self.log_temperature.exp(), keys, values)
        return sampled_map(coordinates.transpose(1, 2).reshape(batch, dim, *fixed.shape[2:]))
