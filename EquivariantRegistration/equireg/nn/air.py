"""AiR: the attention-only registration baseline (a patch transformer, no convolutions).

After the AiR paper ("Attention for Image Registration", Wang & Delingette): both images are
cut into non-overlapping patches and embedded linearly, with a fixed sinusoidal embedding of the
patch position added; a transformer encoder runs over the fixed image's patches; a decoder runs
self-attention over the moving image's patches and cross-attention over the encoder's output;
a linear layer turns every decoder token into the displacements of its patch. The displacement
field is applied through the ordinary warp: :func:`build_air` wraps the network in a
:class:`~equireg.compose.DisplacementStep`, so its map is ``x ↦ x + u(x)`` like every step's.

The token of patch ``k`` sits at patch ``k``'s place on the common grid of the two images, and
its displacements are read at those (fixed) coordinates, as in the paper. Nothing here is
translation-equivariant by construction: patches cut on a fixed grid and absolute position
embeddings tie the output to where the content lies in the field of view, and like any
displacement predictor it has no way to produce the offset between the two images (the
``[W, U]`` equivariance the reference network has, ``docs/equivariance.md``).

Its part of an architecture config (``kind: "air"``, built by :func:`build_air`)::

    {
      "kind": "air",
      "dim": 2,                     # 2 or 3
      "air": {
        "patch_size": 8,            # voxels per patch side; input sizes must be divisible by it
        "width": 128,               # token width (embedding dimension)
        "heads": 4,                 # attention heads; must divide width
        "encoder_layers": 2,        # transformer layers over the fixed patches
        "decoder_layers": 2,        # layers of moving self-attention + cross-attention
        "mlp_ratio": 4,             # hidden width of each layer's MLP, in multiples of width
        "field_stride": 1           # the field's grid spacing in voxels, dividing patch_size:
                                    # 1 = a displacement per voxel (the paper), patch_size = one
                                    # per patch, interpolated linearly by the warp
      }
    }
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..compose import DisplacementStep


def patchify(image: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, *S) -> (B, N, C · patch^d)``: non-overlapping patches, patch order row-major
    over the patch grid ``S / patch`` and each patch flattened channel-first."""
    batch, channels, *shape = image.shape
    dims = len(shape)
    grid = [n // patch for n in shape]
    split = image.reshape(batch, channels, *[v for n in grid for v in (n, patch)])
    # (B, C, g0, p, g1, p, ...) -> (B, g0, g1, ..., C, p, p, ...)
    order = [0, *range(2, 2 + 2 * dims, 2), 1, *range(3, 3 + 2 * dims, 2)]
    return split.permute(order).reshape(batch, math.prod(grid), channels * patch**dims)


def unpatchify(tokens: torch.Tensor, grid: list[int], channels: int, patch: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, N, C · patch^d) -> (B, C, *(grid · patch))``."""
    batch = tokens.shape[0]
    dims = len(grid)
    split = tokens.reshape(batch, *grid, channels, *[patch] * dims)
    # (B, g0, g1, ..., C, p, p, ...) -> (B, C, g0, p, g1, p, ...)
    order = [0, 1 + dims, *[v for k in range(dims) for v in (1 + k, 2 + dims + k)]]
    return split.permute(order).reshape(batch, channels, *[n * patch for n in grid])


def sinusoidal_positions(grid: list[int], width: int, device: torch.device) -> torch.Tensor:
    """``(N, width)`` fixed embedding of the patch indices of ``grid`` (row-major).

    Each axis gets ``width // (2 d)`` sine/cosine pairs at geometrically spaced frequencies (the
    transformer's usual scheme, per axis); leftover channels stay zero. Fixed rather than learnt
    so that one network runs on any input size (the tests train at 64², the config at 128²).
    """
    dims = len(grid)
    pairs = width // (2 * dims)
    frequencies = 1.0 / 10000 ** (torch.arange(pairs, device=device) / max(pairs, 1))
    axes = [torch.arange(n, device=device, dtype=torch.float32) for n in grid]
    positions = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, dims)
    angles = positions[:, :, None] * frequencies  # (N, d, pairs)
    embedding = torch.cat([angles.sin(), angles.cos()], dim=-1).reshape(len(positions), -1)
    return nn.functional.pad(embedding, (0, width - embedding.shape[1]))


class AiR(nn.Module):
    """``cat(moving, fixed)`` ``(B, 2C, *S)`` -> displacement ``(B, d, *(S / field_stride))`` in
    network coordinates.

    The output layer starts at zero, so an untrained network predicts no displacement and the
    :class:`~equireg.compose.DisplacementStep` around it starts as the identity map, as the
    U-Net steps do. Sizes must be divisible by ``patch_size``.
    """

    def __init__(
        self,
        dim: int,
        in_channels: int = 1,
        patch_size: int = 8,
        width: int = 128,
        heads: int = 4,
        encoder_layers: int = 2,
        decoder_layers: int = 2,
        mlp_ratio: int = 4,
        field_stride: int = 1,
    ):
        super().__init__()
        if patch_size % field_stride:
            raise ValueError(f"field_stride {field_stride} must divide patch_size {patch_size}")
        self.dim = dim
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.width = width
        self.field_stride = field_stride
        patch_voxels = in_channels * patch_size**dim
        self.embed_fixed = nn.Linear(patch_voxels, width)
        self.embed_moving = nn.Linear(patch_voxels, width)
        # Pre-norm layers without dropout: pre-norm trains stably from scratch without warm-up
        # tricks, and registration nets are not regularised by dropout.
        layer = {
            "d_model": width,
            "nhead": heads,
            "dim_feedforward": mlp_ratio * width,
            "dropout": 0.0,
            "activation": "gelu",
            "batch_first": True,
            "norm_first": True,
        }
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(**layer),
            encoder_layers,
            norm=nn.LayerNorm(width),
            enable_nested_tensor=False,
        )
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(**layer), decoder_layers, norm=nn.LayerNorm(width)
        )
        self.output = nn.Linear(width, dim * (patch_size // field_stride) ** dim)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        shape = list(pair.shape[2:])
        if any(n % self.patch_size for n in shape):
            raise ValueError(
                f"AiR input sizes {tuple(shape)} must be divisible by patch_size {self.patch_size}"
            )
        moving, fixed = pair.split(self.in_channels, dim=1)
        grid = [n // self.patch_size for n in shape]
        positions = sinusoidal_positions(grid, self.width, pair.device).to(pair.dtype)
        memory = self.encoder(self.embed_fixed(patchify(fixed, self.patch_size)) + positions)
        tokens = self.embed_moving(patchify(moving, self.patch_size)) + positions
        decoded = self.decoder(tokens, memory)
        return unpatchify(
            self.output(decoded), grid, self.dim, self.patch_size // self.field_stride
        )


def build_air(config: dict[str, Any]) -> DisplacementStep:
    """The AiR baseline of an architecture config (module docstring) as a registration step."""
    return DisplacementStep(AiR(config["dim"], **config["air"]))
