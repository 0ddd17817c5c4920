"""Attention kernel throughput: ``python benchmarks/attention.py [--repeats R]``.

Prints a markdown table (the one in docs/benchmarks.md): time and GFLOP/s of plain matrix
multiplication (the machine's reference throughput), our ``equireg.nn.attention``, a naive
query-chunked softmax, and PyTorch's ``scaled_dot_product_attention`` (its CPU flash kernel,
values zero-padded to the key width as that kernel wants). Attention counts only useful flops,
``2·N·M·(C + Dv)``. Sizes are those of the attention step at 1/4 resolution: 2-D 256² (64² queries,
keys with the 8-voxel pad), 3-D 96³ and 128³ (keys with the 4-voxel pad). CUDA rows are added
when a GPU is present. Each entry is the best of ``R`` runs after a warm-up.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F
from common import best_time, cpu_model

from equireg.nn.attention import attention

# (label, queries N, keys M, feature width C, value width Dv)
CASES = [
    ("2-D 256²", 64**2, 80**2, 64, 2),
    ("3-D 96³", 24**3, 32**3, 64, 3),
    ("3-D 128³", 32**3, 40**3, 64, 3),
]
# The reference methods are slow at the largest size; they run only below this many scores.
REFERENCE_LIMIT = 5e8
MATMUL_SIZE = 4096


def naive_chunked(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Softmax attention 1024 queries at a time: O(M) memory per chunk, plain torch ops."""
    chunks = [
        torch.softmax(chunk @ key.transpose(1, 2), dim=-1) @ value
        for chunk in query.split(1024, dim=1)
    ]
    return torch.cat(chunks, dim=1)


def torch_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """PyTorch's fused kernel, values zero-padded to the key width."""
    padded = F.pad(value, (0, query.shape[-1] - value.shape[-1]))
    out = F.scaled_dot_product_attention(query[:, None], key[:, None], padded[:, None], scale=1.0)
    return out[:, 0, :, : value.shape[-1]]


def benchmark(device: torch.device, repeats: int) -> list[tuple]:
    rows = []
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device)
    seconds = best_time(lambda: a @ b, repeats, device)
    matmul = 2 * MATMUL_SIZE**3 / seconds / 1e9
    size = f"{MATMUL_SIZE}² × {MATMUL_SIZE}²"
    rows.append(("matmul", size, "", "", "", "", seconds, matmul, matmul))
    methods = {"equireg attention": attention}
    if device.type == "cpu":
        methods |= {"naive chunked": naive_chunked, "torch SDPA (v padded)": torch_sdpa}
    for label, n, m, c, dv in CASES:
        generator = torch.Generator(device=device).manual_seed(0)
        query = F.normalize(torch.randn(1, n, c, device=device, generator=generator), dim=-1) * 20
        key = F.normalize(torch.randn(1, m, c, device=device, generator=generator), dim=-1)
        value = torch.rand(1, m, dv, device=device, generator=generator)
        for name, method in methods.items():
            if name != "equireg attention" and n * m > REFERENCE_LIMIT:
                continue
            seconds = best_time(partial(method, query, key, value), repeats, device)
            gflops = 2 * n * m * (c + dv) / seconds / 1e9
            rows.append((name, label, n, m, c, dv, seconds, gflops, matmul))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads; torch {torch.__version__}")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
    print()
    print("| device | method | case | N | M | C | Dv | time (s) | GFLOP/s | % of matmul |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for device in devices:
        for name, label, n, m, c, dv, seconds, gflops, matmul in benchmark(device, args.repeats):
            print(
                f"| {device.type} | {name} | {label} | {n} | {m} | {c} | {dv} "
                f"| {seconds:.3f} | {gflops:.1f} | {100 * gflops / matmul:.0f} % |"
            )


if __name__ == "__main__":
    main()
