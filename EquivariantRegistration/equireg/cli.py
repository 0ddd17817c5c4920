"""The ``equireg`` command (README, docs/errors.md): argument parsing, progress and exit codes only.

Exit codes, for every subcommand: 0 success, 2 bad input or usage (one line on stderr naming
the file or option and the problem), 3 runtime failure (one line), 130 interrupted (Ctrl-C),
143 terminated (SIGTERM); both clean up staged outputs. ``--debug`` adds the traceback and
keeps the exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import getpass
import json
import os
import shutil
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from .errors import InputError, RegistrationFailure
from .options import MAX_REFINE_STEPS, RUN_OPTIONS

EXIT_OK, EXIT_INPUT, EXIT_FAILURE = 0, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so that ``finally`` blocks clean up as on Ctrl-C."""


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line naming the option (``--help`` has the rest)."""

    commands: dict[str, argparse.ArgumentParser]  # the top-level parser's subcommands

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("equireg").strip()  # "register", or "" at the top
        where = f"{command}: " if command else ""
        print(f"equireg: error: {where}{message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_INPUT)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__


def _progress_printer(
    mode: str,
) -> tuple[Callable[[str, float, str], None] | None, Callable[[], None]]:
    """A progress callback for ``--progress`` and a function that closes it."""
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "none"
    if mode == "json":

        def emit(stage: str, fraction: float, message: str) -> None:
            line = {"stage": stage, "progress": round(fraction, 4), "message": message}
            print(json.dumps(line), flush=True)

        return emit, lambda: None
    if mode == "bar":
        from tqdm import tqdm  # a terminal's bar only: Slicer (--progress json) has no tqdm

        bar = tqdm(total=1000, unit="‰", file=sys.stderr, bar_format="{l_bar}{bar}| {elapsed}")

        def update(stage: str, fraction: float, message: str) -> None:
            if stage == "warning":  # printed once, after the bar is closed
                return
            bar.set_description(f"{stage}: {message}"[:50])
            bar.n = int(fraction * 1000)
            bar.refresh()

        return update, bar.close
    return None, lambda: None


def _register(args: argparse.Namespace) -> int:
    from .outputs import OutputFolder
    from .validate import check_run_options

    options = {option.name: getattr(args, option.name) for option in RUN_OPTIONS}
    check_run_options(**options)
    inputs = {
        "fixed": args.fixed,
        "moving": args.moving,
        "fixed mask": args.fixed_mask,
        "moving mask": args.moving_mask,
    }
    with OutputFolder(args.output_dir, inputs) as folder:
        from .api import register

        progress, close = _progress_printer(args.progress)
        try:
            result = register(
                args.fixed,
                args.moving,
                fixed_mask=args.fixed_mask,
                moving_mask=args.moving_mask,
                progress=progress,
                **options,
            )
            outputs = result.save(folder.path)
        finally:
            close()
    if args.progress == "json":
        print(json.dumps({"stage": "done", "progress": 1.0, "outputs": outputs}), flush=True)
    else:
        for warning in result.report["warnings"]:
            print(f"equireg: warning: {warning}", file=sys.stderr)
        model = result.report["model"]
        print(f"equireg: model {model['name']} ({model['chosen']})", file=sys.stderr)
        for name, path in outputs.items():
            print(f"{name}: {path}")
    return EXIT_OK


def _warp(args: argparse.Namespace) -> int:
    import SimpleITK as sitk

    from .io import quiet_output, read_any, read_transform, write_image
    from .preprocess import background_value

    output = Path(args.output)
    if output.is_dir():
        raise InputError(f"{output}: -o is a folder; give the output image's file name")
    image = read_any(args.image, "an image")
    reference = read_any(args.reference, "a reference image")
    transform = read_transform(args.transform)
    for path, what, dim in (
        (args.image, "image", image.GetDimension()),
        (args.reference, "reference image", reference.GetDimension()),
    ):
        if dim != transform.GetDimension():
            raise InputError(
                f"{path}: {dim}-D {what}, but {args.transform} is a "
                f"{transform.GetDimension()}-D transform"
            )
    interpolator = sitk.sitkNearestNeighbor if args.interpolation == "nearest" else sitk.sitkLinear
    # Padding as register's warped.nrrd: the image's background (−1024 HU for a CT), not 0.
    fill = 0.0
    complex_pixels = (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64)
    if image.GetNumberOfComponentsPerPixel() == 1 and image.GetPixelID() not in complex_pixels:
        fill = background_value(sitk.GetArrayViewFromImage(image))
    try:
        with quiet_output():
            warped = sitk.Resample(image, reference, transform, interpolator, fill)
    except RuntimeError as error:
        raise InputError(f"{args.image}: cannot be resampled ({_first_line(error)})") from None
    write_image(warped, output)
    print(f"warped: {args.output}")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    progress, close = _progress_printer("auto")
    try:
        summary = run_demo(args.output_dir, args.device, args.refine_steps, progress)
    finally:
        close()
    for warning in summary["warnings"]:
        print(f"equireg: warning: {warning}", file=sys.stderr)
    paths = summary["paths"]
    print(f"sample pair: {paths['fixed']}  {paths['moving']}")
    print(f"outputs:     {paths['outputs']}/ (transform.h5, displacement.nrrd, warped.nrrd, ...)")
    print(f"overview:    {paths['overview']}")
    before, after = summary["similarity_before"]["lncc"], summary["similarity_after"]["lncc"]
    print(
        f"mean error against the true transform: {summary['mean_error_vs_truth_mm']:.3f} mm "
        f"(identity: {summary['mean_error_identity_mm']:.3f} mm); LNCC {before:.3f} -> {after:.3f}"
    )
    return EXIT_OK


def _evaluate(args: argparse.Namespace) -> int:
    from .assess import assess_transform, model_equivariance

    metrics = assess_transform(
        args.fixed,
        args.moving,
        args.transform,
        fixed_landmarks=args.fixed_landmarks,
        moving_landmarks=args.moving_landmarks,
        fixed_labels=args.fixed_labels,
        moving_labels=args.moving_labels,
        truth=args.truth,
    )
    if args.equivariance is not None:
        metrics["equivariance"] = model_equivariance(
            args.fixed, args.moving, args.equivariance, args.shift, args.device
        )
    from .outputs import json_safe

    text = json.dumps(json_safe(metrics), indent=2, allow_nan=False)
    if args.output is not None:
        from .io import write_text

        write_text(text + "\n", args.output)
    print(text)
    return EXIT_OK


def _train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .device import resolve_device
    from .train import load_config, train

    config = load_config(args.config)
    progress = tqdm(desc="training", file=sys.stderr, disable=args.progress == "none")

    def report(step: int, parts: dict[str, float]) -> None:
        progress.n = step
        progress.set_postfix(loss=f"{parts['total']:.4f}", refresh=False)
        progress.refresh()

    try:
        card = train(
            config,
            args.output_dir,
            resolve_device(args.device),
            args.steps,
            report,
            minutes=args.minutes,
            batch_size=args.batch_size,
            workers=args.workers,
        )
    finally:
        progress.close()
    print(f"model card: {card}")
    return EXIT_OK


DEBUG_HELP = "show the traceback of an error (the exit code stays)"


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="equireg", description="Equivariant deep image registration (fixed ← moving)."
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True)

    reg = commands.add_parser(
        "register",
        help="register MOVING to FIXED",
        epilog="Exit codes: 0 success, 2 bad input or usage (one line naming the file or option), "
        "3 runtime failure, 130 cancelled, 143 terminated; outputs appear only when complete "
        "(docs/errors.md).",
    )
    reg.add_argument("fixed", help="fixed image (NIfTI, NRRD, MHA, DICOM folder, PNG/JPEG)")
    reg.add_argument("moving", help="moving image")
    reg.add_argument("-o", "--output-dir", required=True, help="folder for the outputs")
    for option in RUN_OPTIONS:
        if option.flag_only:
            reg.add_argument(option.flag, action="store_true", help=option.help)
        else:
            shown = "" if option.default is None else f" (default: {option.default})"
            reg.add_argument(
                option.flag,
                type=_refine_steps if option.name == "refine_steps" else option.kind,
                default=option.default,
                choices=option.choices,
                help=option.help + shown,
            )
    reg.add_argument(
        "--fixed-mask", help="mask on the fixed image's grid: only voxels ≠ 0 count (default: all)"
    )
    reg.add_argument(
        "--moving-mask",
        help="mask on the moving image's grid: only voxels ≠ 0 count (default: all)",
    )
    reg.add_argument(
        "--progress",
        default="auto",
        choices=["auto", "bar", "json", "none"],
        help="auto (a bar on a terminal, nothing otherwise), bar, json (one JSON line per update "
        "on stdout, as the Slicer module reads it) or none (default: auto)",
    )
    reg.set_defaults(run=_register)

    warp = commands.add_parser("warp", help="resample IMAGE through a transform onto a reference")
    warp.add_argument("image")
    warp.add_argument("--transform", required=True, help="ITK transform (fixed -> moving)")
    warp.add_argument("--reference", required=True, help="image whose grid the output takes")
    warp.add_argument("-o", "--output", required=True)
    warp.add_argument("--interpolation", default="linear", choices=["linear", "nearest"])
    warp.set_defaults(run=_warp)

    ev = commands.add_parser("evaluate", help="metrics of a transform (fixed -> moving) on a pair")
    ev.add_argument("fixed", help="fixed image")
    ev.add_argument("moving", help="moving image")
    ev.add_argument("--transform", required=True, help="ITK transform (fixed -> moving points)")
    ev.add_argument("--fixed-landmarks", help="CSV x,y[,z] in LPS mm, one header row")
    ev.add_argument("--moving-landmarks", help="CSV matching --fixed-landmarks row by row")
    ev.add_argument("--fixed-labels", help="label map on the fixed grid (for Dice)")
    ev.add_argument("--moving-labels", help="label map on the moving grid (warped nearest)")
    ev.add_argument("--truth", help="true transform (fixed -> moving): dense-field error")
    ev.add_argument(
        "--equivariance",
        metavar="MODEL",
        help="also the equivariance error of MODEL (auto, a bundled name or a .pt path)",
    )
    ev.add_argument(
        "--shift",
        type=int,
        default=8,
        help="for --equivariance: how far the moving content is moved, in voxels of the model's "
        "grid (default: 8)",
    )
    ev.add_argument(
        "--device",
        default="auto",
        help="device for --equivariance: auto, cpu, cuda (default: auto)",
    )
    ev.add_argument("-o", "--output", help="also write the JSON (always printed on stdout) here")
    ev.set_defaults(run=_evaluate)

    demo = commands.add_parser("demo", help="register the bundled sample pair(s)")
    demo.add_argument("-o", "--output-dir", default="demo-output")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--refine-steps", type=_refine_steps, default=None)
    demo.set_defaults(run=_demo)

    train = commands.add_parser("train", help="train (or continue training) a model")
    train.add_argument("config", type=Path, help="training configuration (JSON, see configs/)")
    train.add_argument("-o", "--output-dir", type=Path, required=True, help="checkpoint folder")
    train.add_argument("--steps", type=int, help="total steps (overrides the config)")
    train.add_argument(
        "--minutes", type=float, help="end this segment (with a checkpoint) after this wall time"
    )
    train.add_argument("--batch-size", type=int, help="pairs per step (overrides the config)")
    train.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes that generate training pairs ahead of the step (same pairs; for a GPU)",
    )
    train.add_argument("--device", default="auto")
    train.add_argument("--progress", default="bar", choices=["bar", "none"])
    train.set_defaults(run=_train)
    for command in commands.choices.values():  # ``equireg register --debug`` works too
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP
        )
    parser.commands = commands.choices
    return parser


def _refine_steps(text: str) -> int:
    """``--refine-steps``: a whole number in 0..MAX_REFINE_STEPS (argparse names the option)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= MAX_REFINE_STEPS:
        raise argparse.ArgumentTypeError(f"{value}: must be between 0 and {MAX_REFINE_STEPS}")
    return value


def _inductor_cache() -> Path:
    """The folder torch's compiler cache defaults to (created when ``torch.optim`` loads)."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "unknown_user"
    return Path(tempfile.gettempdir()) / f"torchinductor_{user}"


@contextlib.contextmanager
def _no_empty_inductor_cache() -> Iterator[None]:
    """Remove torch's compiler-cache folder afterwards when this run created it and left it
    empty (nothing here compiles; only importing ``torch.optim`` makes it)."""
    cache = _inductor_cache()
    existed = cache.exists()
    try:
        yield
    finally:
        if not existed and cache.is_dir() and not any(p.is_file() for p in cache.rglob("*")):
            shutil.rmtree(cache, ignore_errors=True)


def _on_sigterm(_signum: int, _frame: object) -> None:
    raise Terminated


# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_FREED_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Let glibc's ``malloc`` keep freed blocks of up to ``KEEP_FREED_BYTES`` for reuse (Linux
    only; returns whether it applied). A refinement step frees and reallocates dozens of
    volume-sized tensors; by default glibc hands blocks above 32 MB (and, once it trims its
    heap, smaller ones) back to the system, so each new tensor faults its pages in again: a
    3-D MIND step on the brain volume spent a quarter of its time (56 000 page faults) on
    that. It holds for the whole process and is never undone, so the command sets it for
    itself (``main``; the Slicer module runs the command), and a host application calling
    ``register`` in its own process keeps its allocator as it is."""
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(
            libc.mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BYTES)
            and libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
        )
    except (OSError, AttributeError):  # a C library without mallopt (musl)
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``equireg`` command; returns its exit code (docs/errors.md)."""
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:  # named by the subcommand's parser, as its other usage errors are
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as done:  # --help (0) or a usage error, already printed as one line
        return int(done.code or 0)
    keep_freed_memory()
    previous = None
    with contextlib.suppress(ValueError):  # only the main thread may set signal handlers
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with _no_empty_inductor_cache():
            return args.run(args)
    except InputError as error:
        return _fail(args, f"equireg: error: {_first_line(error)}", EXIT_INPUT)
    except RegistrationFailure as error:
        return _fail(args, f"equireg: failed: {_first_line(error)}", EXIT_FAILURE)
    except KeyboardInterrupt:
        return _fail(args, "equireg: cancelled", EXIT_INTERRUPTED)
    except Terminated:
        return _fail(args, "equireg: terminated", EXIT_TERMINATED)
    except Exception as error:  # noqa: BLE001 - one line for users, traceback with --debug
        return _fail(
            args, f"equireg: failed: {type(error).__name__}: {_first_line(error)}", EXIT_FAILURE
        )
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _fail(args: argparse.Namespace, line: str, code: int) -> int:
    """Print the one line (after the traceback with ``--debug``) and return ``code``."""
    if args.debug:
        traceback.print_exc()
    print(line, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
