"""Run every benchmark and rewrite docs/benchmarks.md: ``python benchmarks/run_all.py``.

Each script runs in its own process; what it prints (its tables) replaces the block between
``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in docs/benchmarks.md, so the prose around
the blocks is kept, and the ``run`` block states the commit, machine, date and commands. A
benchmark that fails leaves its error in its block and the others still run. ``--quick``
shrinks the slow ones (fewer shapes, edges up to 128) for a run well under 30 minutes on 2 cores.
``--bench-cases`` adds the block ``registration_bench_cases``: the registration benchmark on the
cases that ``make bench-cases`` builds in ``.data/bench-cases``; ``--peers-only`` leaves this
project's rows out of both registration blocks (``--only registration_bench_cases --bench-cases
--peers-only`` runs the peers on the new cases alone).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, commit, machine

DOC = ROOT / "docs" / "benchmarks.md"
HERE = Path(__file__).resolve().parent


def commands(args: argparse.Namespace) -> dict[str, list[str]]:
    """Each benchmark's command line (script and options), by block name."""
    registration = ["registration.py"] + [f"--model={m}" for m in args.model]
    peers = ["--peers-only"] if args.peers_only else []
    equivariance = ["equivariance.py"] + ([f"--unet={args.unet}"] if args.unet else [])
    equivariance += [f"--air={args.air}"] if args.air else []
    if args.quick:
        speed = ["network_speed.py", "--cpu-shapes", "2d:128,2d:256,3d:64,3d:96"]
        scaling = ["scaling.py", "--max-edge", "128"]
    else:
        speed = ["network_speed.py", "--cpu-shapes", "2d:128,2d:256,3d:64,3d:96,3d:128"]
        scaling = ["scaling.py", "--max-edge", "256"]
    found = {
        "attention": ["attention.py", "--repeats", "5"],
        "registration": registration + peers,
        "network_speed": speed,
        # One thread per process: far less sensitive to other processes on a shared machine.
        "network_speed_1_thread": [*speed, "--threads", "1", "--skip-end-to-end"],
        "scaling": scaling,
        "equivariance": equivariance,
    }
    if args.bench_cases:
        figure = "--figure=docs/figures/bench_registration_bench_cases.png"
        found["registration_bench_cases"] = [
            *registration,
            "--cases=.data/bench-cases",
            figure,
            *peers,
        ]
    return found


def run(command: list[str], code: str) -> str:
    """The block for one benchmark: its command, wall time and printed tables (or its error);
    ``code`` names the commit the run measures."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(HERE / command[0]), *command[1:]],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    minutes = (time.perf_counter() - start) / 60
    shown = " ".join(["python", f"benchmarks/{command[0]}", *command[1:]])
    when = f"{minutes:.1f} min; commit {code}, {datetime.date.today().isoformat()}; "
    when += f"load average {load:.1f} at its start"
    lines = [f"Command: `{shown}` ({when})", ""]
    output = [line for line in result.stdout.splitlines() if not line.startswith("Machine:")]
    lines.append("\n".join(output).strip())
    if result.returncode != 0:
        error = (result.stderr.strip().splitlines() or ["no output"])[-1]
        lines += ["", f"**Failed** (exit {result.returncode}): `{error}`"]
    return "\n".join(lines).strip()


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the ``name`` block's content replaced (appended as a section if absent)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    return text.rstrip() + f"\n\n## {name}\n\n{block}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the reduced set (make bench)")
    parser.add_argument("--only", help="comma-separated block names to run (others kept)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--unet", help="trained U-Net-only model for the equivariance table")
    parser.add_argument("--air", help="trained AiR model for the equivariance table")
    parser.add_argument("--bench-cases", action="store_true", help="also .data/bench-cases")
    parser.add_argument("--peers-only", action="store_true", help="registration without equireg")
    args = parser.parse_args()
    selected = commands(args)
    if args.only:
        selected = {k: v for k, v in selected.items() if k in args.only.split(",")}
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    code = commit()  # before any block: the blocks' tables and figures are changes of their own
    header = f"- Machine: {machine()}\n- Last run: {datetime.date.today().isoformat()}, "
    header += f"commit {code}; blocks rewritten: {', '.join(selected)}"
    for name, command in selected.items():
        print(f"running {name} ...", file=sys.stderr, flush=True)
        text = replace_block(text, name, run(command, code))
        text = replace_block(text, "run", header)
        DOC.write_text(text)  # after every benchmark, so an interrupted run keeps what it did
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
