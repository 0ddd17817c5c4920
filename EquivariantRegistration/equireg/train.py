"""``equireg train CONFIG``: unsupervised training with resumable, deterministic checkpoints.

Loss: LNCC + diffusion during warm-up, then LNCC + gradient inverse consistency (design §1).
The batch of step ``k`` is drawn from a generator seeded by ``(seed, k)``, so a run resumed
from its checkpoint (on CPU or GPU) sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .data.pairs import random_pairs, retina_pool
from .losses import registration_loss
from .models import save_model
from .nn.builder import build

CHECKPOINT = "checkpoint.pt"
LOG = "log.csv"


def _data_pool(config: dict[str, Any]) -> torch.Tensor:
    data = config["data"]
    if data["kind"] != "retina":
        raise ValueError(f"unknown training data kind {data['kind']!r}")
    return retina_pool(data["pool_size"], tuple(config["card"]["input_shape"]), data["seed"])


def _save_checkpoint(
    path: Path, network: torch.nn.Module, optimiser: torch.optim.Optimizer, step: int
) -> None:
    temporary = path.with_suffix(".tmp")
    torch.save(
        {"model": network.state_dict(), "optimiser": optimiser.state_dict(), "step": step},
        temporary,
    )
    temporary.replace(path)


def train(
    config: dict[str, Any],
    output: Path,
    device: torch.device,
    steps: int | None = None,
    report: Callable[[int, dict[str, float]], None] = lambda _s, _p: None,
) -> Path:
    """Train (or continue) the model of ``config`` in ``output``; returns the model card path.

    ``steps`` overrides the config's total; the checkpoint in ``output`` is continued when
    present. At the end the weights and card (with training facts) are written to ``output``.
    """
    settings = config["training"]
    total_steps = steps if steps is not None else settings["steps"]
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings["seed"])
    network = build(config["card"]["architecture"]).to(device)
    optimiser = torch.optim.Adam(network.parameters(), lr=settings["lr"])
    start = 0
    checkpoint_path = output / CHECKPOINT
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        network.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        start = int(state["step"])
    pool = _data_pool(config) if start < total_steps else None
    log_exists = (output / LOG).exists()
    began = time.perf_counter()
    with open(output / LOG, "a", newline="") as log_file:
        log = csv.writer(log_file)
        if not log_exists:
            log.writerow(["step", "phase", "total", "similarity", "regulariser", "seconds"])
        network.train()
        for step in range(start, total_steps):
            generator = torch.Generator().manual_seed(settings["seed"] * 1_000_003 + step)
            moving, fixed = random_pairs(pool, settings["batch_size"], config["data"], generator)
            moving, fixed = moving.to(device), fixed.to(device)
            warm = step < settings["warmup_steps"]
            loss, parts = registration_loss(
                network,
                moving,
                fixed,
                similarity=settings["similarity"],
                window=settings["lncc_window"],
                regulariser="diffusion" if warm else "gradicon",
                weight=settings["diffusion_weight"] if warm else settings["gradicon_weight"],
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            elapsed = time.perf_counter() - began
            log.writerow(
                [
                    step + 1,
                    "warmup" if warm else "gradicon",
                    parts["total"],
                    parts["similarity"],
                    parts["regulariser"],
                    round(elapsed, 2),
                ]
            )
            report(step + 1, parts)
            if (step + 1) % settings["checkpoint_every"] == 0 or step + 1 == total_steps:
                log_file.flush()
                _save_checkpoint(checkpoint_path, network, optimiser, step + 1)
    card = {
        **config["card"],
        "trained": max(total_steps, start) > 0,
        "training": {
            "data": config["data"],
            "settings": settings,
            "steps": max(total_steps, start),
            "device_last_run": str(device),
            "wall_time_last_run_s": round(time.perf_counter() - began, 1),
        },
    }
    return save_model(network.eval(), card, output).path


def load_config(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
