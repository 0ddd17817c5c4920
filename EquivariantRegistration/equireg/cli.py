"""The ``equireg`` command (README, docs/errors.md): argument parsing, progress and exit codes only.

Exit codes: 0 success, 2 bad input or usage (one line on stderr naming the file and the
problem), 3 runtime failure. ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import InputError
from .options import RUN_OPTIONS

EXIT_OK, EXIT_INPUT, EXIT_FAILURE = 0, 2, 3


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
    from .api import register
    from .outputs import check_output_dir

    output_dir = check_output_dir(args.output_dir)
    progress, close = _progress_printer(args.progress)
    try:
        result = register(
            args.fixed,
            args.moving,
            fixed_mask=args.fixed_mask,
            moving_mask=args.moving_mask,
            progress=progress,
            **{option.name: getattr(args, option.name) for option in RUN_OPTIONS},
        )
        outputs = result.save(output_dir)
    finally:
        close()
    if args.progress == "json":
        print(json.dumps({"stage": "done", "progress": 1.0, "outputs": outputs}), flush=True)
    else:
        for warning in result.report["warnings"]:
            print(f"equireg: warning: {warning}", file=sys.stderr)
        for name, path in outputs.items():
            print(f"{name}: {path}")
    return EXIT_OK


def _warp(args: argparse.Namespace) -> int:
    import SimpleITK as sitk

    from .io import read_transform, write_image

    def read(path: str, what: str) -> sitk.Image:
        try:
            return sitk.ReadImage(path)
        except RuntimeError:
            raise InputError(f"{path}: cannot read the {what} image") from None

    image, reference = read(args.image, "input"), read(args.reference, "reference")
    transform = read_transform(args.transform)
    if image.GetDimension() != transform.GetDimension():
        raise InputError(
            f"{args.transform}: {transform.GetDimension()}-D transform for a "
            f"{image.GetDimension()}-D image"
        )
    interpolator = sitk.sitkNearestNeighbor if args.interpolation == "nearest" else sitk.sitkLinear
    warped = sitk.Resample(image, reference, transform, interpolator, 0.0)
    write_image(warped, args.output)
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
    text = json.dumps(metrics, indent=2)
    if args.output is not None:
        from .io import atomic_write

        try:
            atomic_write(args.output, lambda path: Path(path).write_text(text + "\n"))
        except OSError as error:
            raise InputError(f"{args.output}: cannot be written ({error.strerror})") from None
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
        card = train(config, args.output_dir, resolve_device(args.device), args.steps, report)
    finally:
        progress.close()
    print(f"model card: {card}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="equireg", description="Equivariant deep image registration (fixed ← moving)."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    reg = commands.add_parser("register", help="register MOVING to FIXED")
    reg.add_argument("fixed", help="fixed image (NIfTI, NRRD, MHA, DICOM folder, PNG/JPEG)")
    reg.add_argument("moving", help="moving image")
    reg.add_argument("-o", "--output-dir", required=True, help="folder for the outputs")
    for option in RUN_OPTIONS:
        if option.flag_only:
            reg.add_argument(option.flag, action="store_true", help=option.help)
        else:
            reg.add_argument(
                option.flag,
                type=option.kind,
                default=option.default,
                choices=option.choices,
                help=option.help,
            )
    reg.add_argument("--fixed-mask", help="mask on the fixed image's grid")
    reg.add_argument("--moving-mask", help="mask on the moving image's grid")
    reg.add_argument("--progress", default="auto", choices=["auto", "bar", "json", "none"])
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
        "--shift", type=int, default=8, help="moving shift in model-grid voxels (--equivariance)"
    )
    ev.add_argument("--device", default="auto", help="device for --equivariance")
    ev.add_argument("-o", "--output", help="also write the JSON to this file")
    ev.set_defaults(run=_evaluate)

    demo = commands.add_parser("demo", help="register the bundled sample pair(s)")
    demo.add_argument("-o", "--output-dir", default="demo-output")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--refine-steps", type=int, default=None)
    demo.set_defaults(run=_demo)

    train = commands.add_parser("train", help="train (or continue training) a model")
    train.add_argument("config", type=Path, help="training configuration (JSON, see configs/)")
    train.add_argument("-o", "--output-dir", type=Path, required=True, help="checkpoint folder")
    train.add_argument("--steps", type=int, help="total steps (overrides the config)")
    train.add_argument("--device", default="auto")
    train.add_argument("--progress", default="bar", choices=["bar", "none"])
    train.set_defaults(run=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except InputError as error:
        if args.debug:
            raise
        print(f"equireg: error: {error}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("equireg: cancelled", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one line for users, traceback with --debug
        if args.debug:
            raise
        print(f"equireg: failed: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
