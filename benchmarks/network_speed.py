"""Network speed and memory against the reference: ``python benchmarks/network_speed.py``.

Forward time and peak memory of our network (the bundled models' architectures, random weights)
and of the reference implementation of the same architecture, ``make_network_final`` of the
``carl`` module of PyPI ``icon-registration`` (attention at 1/4 resolution, then U-Nets at 1/2
and full resolution; random weights), on the same input shapes; then ``equireg register``
end to end on a 512×512×133 CT-sized volume. Each measurement runs in a fresh process, so its
peak memory is its own. Prints two markdown tables (measurements, and measured vs targets) and
writes ``docs/figures/bench_network_speed.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from common import (
    FIGURES,
    NOT_MEASURED,
    best_time,
    current_rss_mb,
    fmt,
    machine,
    markdown_table,
    run_child,
    run_measured,
    save_figure,
    volume_pair,
)

from equireg.maps import evaluate
from equireg.models import read_card
from equireg.nn.builder import build

SYSTEMS = ("equireg", "reference")
LABELS = {"equireg": "equireg (ours)", "reference": "icon-registration carl (reference)"}
CT_SIZE = (512, 512, 133)
CT_SPACING = (0.7, 0.7, 2.5)


def our_forward(dim: int, shape: tuple[int, ...], device: torch.device):
    """Our network as ``register`` runs it (bf16 autocast on CUDA), returning the sampled map."""
    network = build(read_card("auto", dim).architecture).to(device).eval()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )

    def forward(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        with autocast:
            return evaluate(network(moving, fixed), shape, 1, fixed)

    return forward


def reference_forward(dim: int, shape: tuple[int, ...], device: torch.device):
    """The reference network as published (float32). Its builder calls ``.cuda()`` and its
    attention forbids PyTorch's math kernel, which is all a CPU offers for its value width
    (4 ≠ 128): on the CPU both are lifted, so there it materialises the N×M attention matrix.
    Returns ``φ`` on its identity map, as its losses evaluate it."""
    from icon_registration import carl

    def cpu_kernels(**_: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    with contextlib.ExitStack() as stack:
        if device.type == "cpu":
            stack.enter_context(mock.patch.object(torch.nn.Module, "cuda", lambda self: self))
        wrapper = carl.make_network_final([1, 1, *shape], dim)
    network = wrapper.regis_net.to(device).eval()

    def forward(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        with contextlib.ExitStack() as stack:
            if device.type == "cpu":
                stack.enter_context(
                    mock.patch.object(torch.backends.cuda, "sdp_kernel", cpu_kernels)
                )
            return network(moving, fixed)(network.identity_map)

    return forward


def measure_one(system: str, dim: int, edge: int, device_name: str, repeats: int) -> dict:
    """Child process: best forward time (ms) and peak memory (MB) of one network at one shape."""
    device = torch.device(device_name)
    shape = (edge,) * dim
    builder = our_forward if system == "equireg" else reference_forward
    forward = builder(dim, shape, device)
    generator = torch.Generator().manual_seed(0)
    moving, fixed = (torch.rand(1, 1, *shape, generator=generator).to(device) for _ in range(2))
    baseline = current_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        seconds = best_time(lambda: forward(moving, fixed), repeats, device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
    return {"ms": 1000 * seconds, "peak_mb": peak}


def end_to_end(device: str, size: tuple[int, ...]) -> dict:
    """``equireg register`` on a CT-sized pair in a fresh process: wall time, peak RSS."""
    folder = Path(tempfile.mkdtemp(prefix="equireg-bench-ct-"))
    try:
        fixed, moving = volume_pair(folder, size, CT_SPACING)
        command = [Path(sys.executable).parent / "equireg", "register", fixed, moving]
        command += ["-o", folder / "out", "--device", device, "--progress", "none"]
        result = run_measured(command)
        if result["returncode"] != 0:
            return {"error": result["stderr"].strip().splitlines()[-1][:200]}
        report = json.loads((folder / "out" / "report.json").read_text())
        return {
            "seconds": result["seconds"],
            "peak_rss_mb": result["peak_rss_mb"],
            "stages": report["timings_s"],
            "cuda_peak_mb": report["peak_memory"].get("cuda_max_allocated_mb"),
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"2d:128,3d:96"`` -> ``[(2, 128), (3, 96)]``."""
    shapes = []
    for item in filter(None, text.split(",")):
        dim, edge = item.split(":")
        shapes.append((int(dim.rstrip("dD")), int(edge)))
    return shapes


def shape_label(dim: int, edge: int) -> str:
    return f"{edge}{'²' if dim == 2 else '³'}"


def measure_all(
    plans: list[tuple[str, list[tuple[int, int]]]], repeats: int, threads: int | None
) -> list[dict]:
    """Every system at every shape of every device, one fresh process each."""
    script = Path(__file__).resolve()
    rows = []
    for device, shapes in plans:
        for dim, edge in shapes:
            for system in SYSTEMS:
                args = [script, "--one", system, dim, edge, device, "--repeats", repeats]
                args += ["--threads", threads] if threads else []
                rows.append(
                    {"device": device, "dim": dim, "edge": edge, "system": system} | run_child(args)
                )
    return rows


def speedups(rows: list[dict]) -> dict[tuple[str, int, int], float]:
    """Reference time / our time per (device, dim, edge) where both were measured."""
    times = {(r["system"], r["device"], r["dim"], r["edge"]): r.get("ms") for r in rows}
    ratios = {}
    for (system, *key), ms in times.items():
        ours = times.get(("equireg", *key))
        if system == "reference" and ms and ours:
            ratios[tuple(key)] = ms / ours
    return ratios


def measurements_table(rows: list[dict]) -> str:
    ratios = speedups(rows)
    table = []
    for row in rows:
        key = (row["device"], row["dim"], row["edge"])
        ratio = ratios.get(key) if row["system"] == "reference" else None
        table.append(
            [
                row["device"],
                LABELS[row["system"]],
                shape_label(row["dim"], row["edge"]),
                fmt(row.get("ms"), 1),
                fmt(row.get("peak_mb"), 0),
                f"{ratio:.2f}×" if ratio else "",
                row.get("error", ""),
            ]
        )
    headers = ["device", "network", "input", "forward (ms)", "peak memory (MB)", "ours faster by"]
    if not any(row.get("error") for row in rows):
        return markdown_table(headers, [line[:-1] for line in table], 3)
    return markdown_table([*headers, "error"], table, 3)


def plot(rows: list[dict], path: Path) -> None:
    """Grouped bars: forward time and peak memory per input shape, ours beside the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys((r["dim"], r["edge"]) for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    width = 0.38
    for offset, system in enumerate(SYSTEMS):
        found = {(r["dim"], r["edge"]): r for r in rows if r["system"] == system}
        positions = np.arange(len(shapes)) + (offset - 0.5) * width
        for axis, key in zip(axes, ("ms", "peak_mb"), strict=True):
            values = [found.get(shape, {}).get(key, np.nan) for shape in shapes]
            axis.bar(positions, values, width, label=LABELS[system])
    for axis, title in zip(axes, ("forward time (ms, log)", "peak memory (MB, log)"), strict=True):
        axis.set_xticks(np.arange(len(shapes)), [shape_label(*s) for s in shapes], fontsize=8)
        axis.set_yscale("log")
        axis.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Network forward on {rows[0]['device']}, random weights", fontsize=9)
    save_figure(fig, path)


def status(value: float | None, limit: float, at_most: bool = True, gpu: bool = True) -> str:
    if value is None:
        return NOT_MEASURED if gpu and not torch.cuda.is_available() else "not measured"
    return "meets" if (value <= limit if at_most else value >= limit) else "misses"


def targets_table(rows: list[dict], cpu_e2e: dict, gpu_e2e: dict) -> str:
    """Measured against each target of the issue; what was not measured says so."""
    ct = "×".join(map(str, CT_SIZE))
    gpu = [
        r
        for r in rows
        if r["device"] == "cuda" and r["system"] == "equireg" and r["dim"] == 3 and "ms" in r
    ]
    gpu = [r for r in gpu if 160 <= r["edge"] <= 176]
    forward = max((r["ms"] for r in gpu), default=None)
    memory = max((r["peak_mb"] / 1024 for r in gpu), default=None)
    lines = [
        ["GPU forward, 3-D lung network, 160³–176³", fmt(forward, 0) + " ms", "≤ 100 ms"],
        ["GPU peak memory, same", fmt(memory, 2) + " GB", "≤ 4 GB"],
        [f"GPU `equireg register`, {ct} CT", fmt(gpu_e2e.get("seconds"), 1) + " s", "≤ 3 s"],
        [f"CPU `equireg register`, {ct} CT", fmt(cpu_e2e.get("seconds"), 1) + " s", "≤ 60 s"],
        ["CPU peak RAM, same", fmt(cpu_e2e.get("peak_rss_mb", np.nan) / 1024, 2) + " GB", "≤ 4 GB"],
    ]
    values = [forward, memory, gpu_e2e.get("seconds"), cpu_e2e.get("seconds")]
    values.append(cpu_e2e["peak_rss_mb"] / 1024 if "peak_rss_mb" in cpu_e2e else None)
    limits = [100, 4, 3, 60, 4]
    for index, (line, value, limit) in enumerate(zip(lines, values, limits, strict=True)):
        line.append(status(value, limit, gpu=index < 3))
    for (device, dim, edge), ratio in speedups(rows).items():
        label = f"faster than the reference, {device} {shape_label(dim, edge)}"
        lines.append([label, f"{ratio:.2f}×", "≥ 1.5×", status(ratio, 1.5, at_most=False)])
    return markdown_table(["target", "measured", "target value", "status"], lines, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, help="CPU threads per process (torch default)")
    parser.add_argument("--cpu-shapes", default="2d:128,2d:256,3d:64,3d:96")
    parser.add_argument("--gpu-shapes", default="3d:128,3d:160,3d:176")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--one", nargs=4, metavar=("SYSTEM", "DIM", "EDGE", "DEVICE"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        system, dim, edge, device = args.one
        print(json.dumps(measure_one(system, int(dim), int(edge), device, args.repeats)))
        return

    cuda = torch.cuda.is_available()
    plans = [("cpu", parse_shapes(args.cpu_shapes))]
    plans += [("cuda", parse_shapes(args.gpu_shapes))] if cuda else []
    rows = measure_all(plans, args.repeats, args.threads)
    print(f"Machine: {machine()}\n")
    print(f"CPU threads per process: {torch.get_num_threads()}\n")
    print(measurements_table(rows) + "\n")
    measured = [r for r in rows if r["device"] == "cpu" and "ms" in r]
    if measured:
        suffix = f"_{args.threads}_thread" if args.threads else ""
        plot(measured, FIGURES / f"bench_network_speed{suffix}.png")
    cpu_e2e = {} if args.skip_end_to_end else end_to_end("cpu", CT_SIZE)
    gpu_e2e = end_to_end("cuda", CT_SIZE) if cuda and not args.skip_end_to_end else {}
    print(targets_table(rows, cpu_e2e, gpu_e2e))
    for label, result in (("CPU", cpu_e2e), ("GPU", gpu_e2e)):
        if "stages" in result:
            print(f"\n{label} end-to-end stages (s): {json.dumps(result['stages'])}")
        elif "error" in result:
            print(f"\n{label} end-to-end failed: {result['error']}")


if __name__ == "__main__":
    main()
